"""The attacker's own images: what a generative prior is trained on, and the guard that keeps them public.

A prior names its data like a victim's recipe does: ``dataset = { name = "photos", split
= "public" }``. The name is looked up first in ``PRIOR_DATA`` (attacker-only proxy sets,
below), then in the data-set registry of ``leakbench.data``. ``side`` is never given: it is
the attacked images' side, known from the observation.

**Threat-model guard** (``check_public``): a prior is attacker knowledge and must not have
seen the attacked images. Every registered data set whose factory has a ``split``
parameter attacks its *default* split when a suite names it without one (``photos``:
``"attack"``; ``cifar10``, ``cifar100``, ``mnist``: ``"test"``), so a prior on that split
is refused with a message that names the public split to use. What the guard cannot see:
a suite that attacks a non-default split (say ``cifar10`` with ``split = "train"``) while
its prior trains on the same one; attacks never receive the suite's data-set spec. Such a
suite would have to be caught in review; the prior's data is in every row's
``attack_json``, so it can be.

``PRIOR_DATA`` holds proxy sets for priors trained on *another* distribution (the
paper's "wrong data" generator), offline:

- ``lfw_faces``: the 100 face crops of Labeled Faces in the Wild that scikit-image ships
  (``skimage.data.lfw_subset()``; 25x25 grayscale, resized to the attacked side, copied
  to three channels for colour victims). Faces are not among the photos' classes.

Channels are adapted when they differ from the attacked images': grayscale copied to
three channels, colour turned into luminance (ITU-R 601 weights).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from typing import Any

import numpy as np
import torch
from PIL import Image

from leakbench.core import ParamError, Registry, did_you_mean

#: Attacker-only image sources: factory(side) -> (uint8 (N, C, side, side), JSON-able provenance).
PRIOR_DATA: Registry[tuple[torch.Tensor, dict]] = Registry("prior data set")


def _datasets():
    from leakbench.data import DATASETS  # deferred: leakbench.generators imports leakbench.data only to resolve a prior's data

    return DATASETS


def known_names() -> list[str]:
    return sorted(set(PRIOR_DATA.names()) | set(_datasets().names()))


def check_public(name: str, params: dict[str, Any], *, param: str, key: str = "dataset") -> str:
    """Raises ``ParamError`` unless ``name`` and ``params`` describe data an attacker may hold; returns its version.

    ``side`` is reserved (the attacked images' side); a ``split`` equal to the data set's
    default split (the one suites attack) is refused.
    """
    if name in PRIOR_DATA:
        entry = PRIOR_DATA.get(name)
    elif name in _datasets():
        entry = _datasets().get(name)
    else:
        raise ParamError(param, f"{key}: unknown data set {name!r}{did_you_mean(name, known_names())}; "
                                f"known: {', '.join(known_names())}")
    from leakbench.generators.tables import check_against

    check_against(entry, params, param=param, key=key, reserved=("side",))
    split_param = entry.parameters().get("split")
    if split_param is not None and split_param.default is not inspect.Parameter.empty:
        attacked = split_param.default
        if params.get("split", attacked) == attacked:
            raise ParamError(
                param,
                f"{key}: a prior trained on {name}'s split {attacked!r} would be trained on the images the suite "
                f"attacks (a suite that names {name!r} attacks that split); the prior is attacker knowledge and must "
                f"come from disjoint data: set {key} = {{ name = \"{name}\", split = \"{_public_hint(name)}\" }}",
            )
    return entry.version


def _public_hint(name: str) -> str:
    return "public" if name == "photos" else "train"


def prior_images(name: str, params: dict[str, Any], *, side: int, channels: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Every image of the prior's data at ``side`` with ``channels`` channels (float32 in [0, 1]), the labels
    (``None`` for unlabelled proxy sets) and the data's provenance."""
    if name in PRIOR_DATA:
        pixels, source = PRIOR_DATA.build(name, side=side, **params)
        images, labels = pixels.to(torch.float32) / 255.0, None
    else:
        dataset = _datasets().build(name, side=side, **params)
        pairs = [dataset.get(i) for i in range(len(dataset))]
        images = torch.stack([p[0] for p in pairs])
        labels = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
        source = dataset.describe()
    return adapt_channels(images, channels), labels, source


def adapt_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Images with ``channels`` channels: grayscale copied to colour, colour turned into luminance."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, channels, -1, -1).clone()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(1, keepdim=True)
    raise ValueError(f"cannot turn {have}-channel prior images into {channels}-channel ones")


@functools.lru_cache(maxsize=None)
def _lfw_faces() -> np.ndarray:
    import skimage.data

    images = np.asarray(skimage.data.lfw_subset())
    faces = images[:100]  # the first 100 are faces, the other 100 background patches (skimage's docstring)
    return np.round(np.clip(faces, 0.0, 1.0) * 255.0).astype(np.uint8) if faces.dtype != np.uint8 else faces


def _resize_all(faces: np.ndarray, side: int) -> torch.Tensor:
    resized = [np.asarray(Image.fromarray(f).resize((side, side), Image.Resampling.BICUBIC)) for f in faces]
    return torch.from_numpy(np.stack(resized))[:, None]


@PRIOR_DATA.register("lfw_faces", version="1")
def lfw_faces(*, side: int) -> tuple[torch.Tensor, dict]:
    """The 100 LFW face crops bundled with scikit-image (25 px grayscale, resized): data of another distribution."""
    pixels = _resize_all(_lfw_faces(), side)
    source = {
        "name": "lfw_faces", "side": side, "count": int(pixels.shape[0]), "channels": 1,
        "source": {"kind": "scikit-image bundled", "loader": "skimage.data.lfw_subset()[:100]",
                   "resize": "PIL bicubic", "pixels_sha256": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()},
    }
    return pixels, source
