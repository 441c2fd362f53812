"""``cifar10``, ``cifar100``, ``mnist``: the standard sets, read through torchvision.

Nothing is downloaded unless a suite sets ``download = true``; without the files the
factories raise FileNotFoundError naming the folder and how to fill it. torchvision's
own messages and progress bars are captured and sent to the log, never to stdout.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.error import URLError

import torch
from PIL import Image

from leakbench.core.types import Normalization
from leakbench.data.base import DATASETS, RESAMPLE_NAME, ImageSet, check_side, check_split, resize_square, to_uint8_tensor

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class StandardSpec:
    """How to open one torchvision data set and what it is."""

    name: str
    torchvision_class: str
    channels: int
    normalization: Normalization
    files: str  # where torchvision expects the files, relative to root
    native_side: int  # side of the images as stored


SPECS: dict[str, StandardSpec] = {
    "cifar10": StandardSpec(
        name="cifar10",
        torchvision_class="CIFAR10",
        channels=3,
        normalization=Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        files="cifar-10-batches-py",
        native_side=32,
    ),
    "cifar100": StandardSpec(
        name="cifar100",
        torchvision_class="CIFAR100",
        channels=3,
        normalization=Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        files="cifar-100-python",
        native_side=32,
    ),
    "mnist": StandardSpec(
        name="mnist",
        torchvision_class="MNIST",
        channels=1,
        normalization=Normalization((0.1307,), (0.3081,)),
        files="MNIST/raw",
        native_side=28,
    ),
}


class TorchvisionImageSet(ImageSet):
    """A torchvision data set, resized to ``side`` image by image on demand."""

    def __init__(self, *, spec: StandardSpec, dataset: Any, root: Path, split: str, side: int) -> None:
        super().__init__(
            name=spec.name,
            side=side,
            channels=spec.channels,
            class_names=tuple(str(c) for c in dataset.classes),
            normalization=spec.normalization,
        )
        self._spec = spec
        self._dataset = dataset
        self._root = root
        self._split = split

    def __len__(self) -> int:
        return len(self._dataset)

    def image_id(self, index: int) -> str:
        return f"{self.name}/{self._split}/{self._check_index(index):05d}@{self.side}"

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._dataset[index]  # PIL image: no transform is set
        if not isinstance(image, Image.Image):
            raise RuntimeError(f"{self.name}: torchvision returned {type(image).__name__}, expected a PIL image")
        return to_uint8_tensor(resize_square(image, self.side), channels=self.channels), int(label)

    def _source(self) -> dict[str, Any]:
        import torchvision

        return {
            "kind": "torchvision data set",
            "class": f"torchvision.datasets.{self._spec.torchvision_class}",
            "torchvision_version": torchvision.__version__,
            "root": str(self._root),
            "split": self._split,
            "resize": f"{RESAMPLE_NAME} to {self.side} px" if self.side != self._spec.native_side else "none",
        }


def _missing_message(spec: StandardSpec, root: Path, reason: str) -> str:
    return (
        f"{spec.name}: data set files not found under {root} (torchvision expects {root / spec.files}): {reason}. "
        f"To fix: put a copy of the {spec.torchvision_class} files there, or set download = true "
        f"for this data set in the suite and run once on a machine with network access"
    )


def _open(spec: StandardSpec, *, root: str, side: int, split: str, download: bool) -> ImageSet:
    import torchvision.datasets

    side = check_side(side, name=spec.name)
    split = check_split(split, allowed=SPLITS, name=spec.name)
    path = Path(os.path.expanduser(str(root))).resolve()
    if not download and not path.is_dir():
        raise FileNotFoundError(_missing_message(spec, path, "the root folder does not exist"))
    factory: Callable[..., Any] = getattr(torchvision.datasets, spec.torchvision_class)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            dataset = factory(root=str(path), train=split == "train", download=download, transform=None)
    except (RuntimeError, URLError, OSError) as err:
        _log_captured(spec, captured)
        reason = f"download failed ({err})" if download else str(err).split("\n")[0]
        raise FileNotFoundError(_missing_message(spec, path, reason)) from err
    _log_captured(spec, captured)
    return TorchvisionImageSet(spec=spec, dataset=dataset, root=path, split=split, side=side)


def _log_captured(spec: StandardSpec, captured: io.StringIO) -> None:
    text = captured.getvalue().strip()
    if text:
        logger.info("torchvision (%s): %s", spec.name, text)


@DATASETS.register("cifar10", version="1")
def cifar10(*, root: str, side: int = 32, split: str = "test", download: bool = False) -> ImageSet:
    """CIFAR-10 (10 classes, 32 px colour) from ``root`` via torchvision."""
    return _open(SPECS["cifar10"], root=root, side=side, split=split, download=download)


@DATASETS.register("cifar100", version="1")
def cifar100(*, root: str, side: int = 32, split: str = "test", download: bool = False) -> ImageSet:
    """CIFAR-100 (100 fine classes, 32 px colour) from ``root`` via torchvision."""
    return _open(SPECS["cifar100"], root=root, side=side, split=split, download=download)


@DATASETS.register("mnist", version="1")
def mnist(*, root: str, side: int = 32, split: str = "test", download: bool = False) -> ImageSet:
    """MNIST (10 digits, 28 px grayscale, resized to ``side``) from ``root`` via torchvision."""
    return _open(SPECS["mnist"], root=root, side=side, split=split, download=download)
