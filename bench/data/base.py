"""The data-set abstraction every attack batch comes from, and its registry.

An :class:`ImageSet` is a finite, indexable set of labelled images at one fixed side
length. Images leave it as float32 tensors in [0, 1] (the metrics compare in that space)
together with the :class:`~leakbench.core.types.Normalization` the victim applies, so no
caller ever has to guess which statistics a model was fed.

Every set is built through :data:`DATASETS`, so a suite names a data set and its
parameters and the registry checks them against the factory's signature before any
compute starts.
"""

from __future__ import annotations

import abc
import logging
import operator
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from leakbench.core.registry import Registry
from leakbench.core.types import Batch, Normalization

logger = logging.getLogger(__name__)

#: Resampling filter for every resize in ``leakbench.data``. PIL widens the filter's support
#: by the scale factor when it shrinks an image, so downsampling is antialiased.
RESAMPLE = Image.Resampling.BICUBIC
RESAMPLE_NAME = "PIL bicubic (antialiased)"


class ImageSet(abc.ABC):
    """A finite, indexable set of labelled images at a fixed side length.

    Subclasses provide ``__len__``, :meth:`image_id`, :meth:`_load` (one image as a
    ``uint8`` tensor of shape ``(channels, side, side)`` and its label) and
    :meth:`_source` (provenance for :meth:`describe`). Everything else is shared.
    """

    def __init__(
        self,
        *,
        name: str,
        side: int,
        channels: int,
        class_names: Sequence[str],
        normalization: Normalization,
    ) -> None:
        if len(normalization.mean) != channels or len(normalization.std) != channels:
            raise ValueError(
                f"{name}: normalization has {len(normalization.mean)} means and "
                f"{len(normalization.std)} stds but the images have {channels} channel(s)"
            )
        self.name = name
        self.side = side
        self.channels = channels
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.normalization = normalization

    # -- what a subclass provides -------------------------------------------------------

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def image_id(self, index: int) -> str:
        """A stable, human-readable id of image ``index`` (same id in every run)."""

    @abc.abstractmethod
    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        """Image ``index`` (already checked) as uint8 ``(C, side, side)`` and its label."""

    @abc.abstractmethod
    def _source(self) -> dict[str, Any]:
        """JSON-able facts about where the images come from and how they were made."""

    # -- shared behaviour ---------------------------------------------------------------

    def _check_index(self, index: int) -> int:
        i = operator.index(index)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: index {i} is out of range; valid indices are 0..{len(self) - 1}")
        return i

    def get(self, index: int) -> tuple[torch.Tensor, int]:
        """Image ``index`` as float32 ``(C, side, side)`` in [0, 1], and its label."""
        i = self._check_index(index)
        pixels, label = self._load(i)
        expected = (self.channels, self.side, self.side)
        if tuple(pixels.shape) != expected or pixels.dtype != torch.uint8:
            raise RuntimeError(
                f"{self.name}: image {i} loaded as {pixels.dtype} {tuple(pixels.shape)}, "
                f"expected torch.uint8 {expected}"
            )
        return pixels.to(torch.float32).div_(255.0), int(label)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The images at ``indices`` (in that order) as a :class:`Batch`."""
        indices = [self._check_index(i) for i in indices]
        if not indices:
            raise ValueError(f"{self.name}: a batch needs at least one index")
        if len(set(indices)) != len(indices):
            raise ValueError(f"{self.name}: batch indices repeat an image: {indices}")
        images, labels = zip(*(self.get(i) for i in indices))
        return Batch(
            images=torch.stack(images),
            labels=torch.tensor(labels, dtype=torch.int64),
            image_ids=tuple(self.image_id(i) for i in indices),
            normalization=self.normalization,
            num_classes=self.num_classes,
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: name, side, count, classes, normalization, source."""
        return {
            "name": self.name,
            "side": self.side,
            "count": len(self),
            "channels": self.channels,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "normalization": {
                "mean": list(self.normalization.mean),
                "std": list(self.normalization.std),
            },
            "source": self._source(),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self)} images, {self.channels}x{self.side}x{self.side}>"


class TensorImageSet(ImageSet):
    """An image set held in memory as one ``uint8`` tensor ``(N, C, side, side)``."""

    def __init__(
        self,
        *,
        name: str,
        pixels: torch.Tensor,
        labels: Sequence[int],
        image_ids: Sequence[str],
        class_names: Sequence[str],
        normalization: Normalization,
        source: dict[str, Any],
    ) -> None:
        if pixels.dim() != 4 or pixels.dtype != torch.uint8 or pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"{name}: pixels must be uint8 (N, C, S, S), got {pixels.dtype} {tuple(pixels.shape)}")
        if not len(labels) == len(image_ids) == pixels.shape[0]:
            raise ValueError(f"{name}: {pixels.shape[0]} images, {len(labels)} labels, {len(image_ids)} ids")
        super().__init__(
            name=name,
            side=int(pixels.shape[-1]),
            channels=int(pixels.shape[1]),
            class_names=class_names,
            normalization=normalization,
        )
        self._pixels = pixels
        self._labels = tuple(int(x) for x in labels)
        self._ids = tuple(image_ids)
        self._source_info = dict(source)

    def __len__(self) -> int:
        return int(self._pixels.shape[0])

    def image_id(self, index: int) -> str:
        return self._ids[self._check_index(index)]

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        return self._pixels[index], self._labels[index]

    def _source(self) -> dict[str, Any]:
        return dict(self._source_info)


DATASETS: Registry[ImageSet] = Registry("dataset")


def select_indices(dataset: ImageSet, *, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of ``dataset``, drawn by a generator seeded with ``seed``.

    The same (dataset length, count, seed) always gives the same indices, in the same
    order, on any machine: the draw is ``torch.randperm`` on a CPU ``torch.Generator``.
    """
    count = operator.index(count)
    if count < 1:
        raise ValueError(f"the suite asks for {count} images from {dataset.name}; ask for at least 1")
    if count > len(dataset):
        raise ValueError(
            f"the suite asks for {count} images but {dataset.name} has only {len(dataset)}; "
            f"ask for at most {len(dataset)} or use a larger data set"
        )
    g = torch.Generator(device="cpu")
    g.manual_seed(operator.index(seed))
    return torch.randperm(len(dataset), generator=g)[:count].tolist()


# -- helpers shared by the concrete sets ------------------------------------------------


def check_side(side: int, *, allowed: Sequence[int] | None = None, name: str) -> int:
    """``side`` as an int, or ValueError saying which values are allowed."""
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)):
        raise ValueError(f"{name}: side must be an integer, got {side!r}")
    side = int(side)
    if allowed is not None and side not in allowed:
        raise ValueError(f"{name}: side {side} is not supported; allowed sides: {', '.join(map(str, allowed))}")
    if side < 1:
        raise ValueError(f"{name}: side must be a positive number of pixels, got {side}")
    _check_side_memory(side, name=name)
    return side


#: float32 copies of an image that even the lightest attack holds at once (the image, its candidate,
#: their gradients and the optimizer's moments): less memory than that, and the side cannot run
IMAGE_COPIES = 8


def _check_side_memory(side: int, *, name: str) -> None:
    """Refuses a side whose images could not be held in this machine's memory, before anything is allocated."""
    need = IMAGE_COPIES * 3 * 4 * side * side
    try:
        from leakbench.core.memory import free_cpu_bytes

        free = free_cpu_bytes()
    except Exception:  # no measurement off Linux: nothing to compare with
        return
    if need > free:
        raise ValueError(f"{name}: side {side} needs at least {need / 2**30:.1f} GiB per image under attack, more "
                         f"than the {free / 2**30:.1f} GiB this machine has free; choose a smaller side")


def check_split(split: str, *, allowed: Sequence[str], name: str) -> str:
    if split not in allowed:
        raise ValueError(f"{name}: split {split!r} is not one of {', '.join(repr(s) for s in allowed)}")
    return split


def center_square(image: Image.Image) -> Image.Image:
    """The largest centered square of ``image``."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def resize_square(image: Image.Image, side: int) -> Image.Image:
    """A square ``image`` resized to ``side`` x ``side`` (antialiased when shrinking)."""
    if image.size == (side, side):
        return image
    return image.resize((side, side), resample=RESAMPLE)


def to_uint8_tensor(image: Image.Image, *, channels: int) -> torch.Tensor:
    """A PIL image as a ``uint8`` tensor ``(channels, H, W)`` (mode L for 1, RGB for 3)."""
    mode = {1: "L", 3: "RGB"}[channels]
    if image.mode != mode:
        image = image.convert(mode)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
