"""``photos``: the embedded default data set, built from scikit-image's bundled photos.

Eight natural colour photographs ship inside scikit-image's wheel, so this set loads on
any machine with no download and no data directory. Each photo is one class; each is cut
into a fixed, documented list of square crops (``ATTACK_CROPS``), resized to ``side``.

A second list (``PUBLIC_CROPS``) is reserved as *public* data (``split="public"``) for
attacks that may train on data from the same distribution (a generative prior). Its
regions are pixel-disjoint from every attacked region of the same photo, so a prior
trained on the public split has never seen an attacked pixel.

Changing either crop table, the photo list or the resampling changes the images: bump
the registry version of ``photos`` and recompute ``PHOTOS_NORMALIZATION``.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from leakbench.core.types import Normalization
from leakbench.data.base import (
    DATASETS,
    RESAMPLE_NAME,
    ImageSet,
    TensorImageSet,
    check_side,
    check_split,
    resize_square,
    to_uint8_tensor,
)

#: The photos, in label order: (class name, scikit-image loader, expected (H, W)).
#: ``stereo_motorcycle`` returns (left, right, disparity); we take the left image.
PHOTOS: tuple[tuple[str, str, tuple[int, int]], ...] = (
    ("astronaut", "astronaut", (512, 512)),
    ("chelsea", "chelsea", (300, 451)),
    ("coffee", "coffee", (400, 600)),
    ("rocket", "rocket", (427, 640)),
    ("hubble_deep_field", "hubble_deep_field", (872, 1000)),
    ("immunohistochemistry", "immunohistochemistry", (512, 512)),
    ("retina", "retina", (1411, 1411)),
    ("stereo_motorcycle", "stereo_motorcycle", (500, 741)),
)

PHOTO_NAMES: tuple[str, ...] = tuple(p[0] for p in PHOTOS)

ALLOWED_SIDES: tuple[int, ...] = (16, 32, 64, 128, 224)
SPLITS: tuple[str, ...] = ("attack", "public")
#: The ImageSet name of each split (the attacked set keeps the registry name).
SET_NAMES: dict[str, str] = {"attack": "photos", "public": "photos-public"}


@dataclass(frozen=True)
class Crop:
    """A square crop at a relative position of a photo.

    ``cy``/``cx`` place the crop's centre as fractions of the photo's height/width;
    ``size`` is the crop's side as a fraction of the photo's *shorter* side. Crops that
    are disjoint on a unit square stay disjoint (and inside the photo) at any aspect
    ratio, because positions scale with each side and sizes with the shorter one.
    """

    name: str
    cy: float
    cx: float
    size: float
    where: str

    def box(self, height: int, width: int) -> tuple[int, int, int]:
        """(top, left, side) in pixels of this crop in a ``height`` x ``width`` photo."""
        exact = self.size * min(height, width)
        side = math.floor(exact + 0.5)
        top = math.floor(self.cy * height - exact / 2 + 0.5)
        left = math.floor(self.cx * width - exact / 2 + 0.5)
        top = min(max(top, 0), height - side)
        left = min(max(left, 0), width - side)
        return top, left, side


#: The attacked crops: a large central square and four smaller ones around the centre
#: (on a square photo, crop1..crop4 are the quadrants of crop0, to a pixel). All lie in the
#: central region: rows 20..80 % of the height, columns 20..80 % of the width.
ATTACK_CROPS: tuple[Crop, ...] = (
    Crop("crop0", 0.50, 0.50, 0.60, "centre"),
    Crop("crop1", 0.35, 0.35, 0.30, "upper left of centre"),
    Crop("crop2", 0.35, 0.65, 0.30, "upper right of centre"),
    Crop("crop3", 0.65, 0.35, 0.30, "lower left of centre"),
    Crop("crop4", 0.65, 0.65, 0.30, "lower right of centre"),
)


#: The public crops: 16 squares of 20 % of the short side around the border, clockwise
#: from the top-left corner. They lie in the outer 20 % band, outside the central
#: region that holds every attacked crop, so the two splits share no pixel.
PUBLIC_CROPS: tuple[Crop, ...] = (
    Crop("public00", 0.10, 0.10, 0.20, "top-left corner"),
    Crop("public01", 0.10, 0.30, 0.20, "top edge"),
    Crop("public02", 0.10, 0.50, 0.20, "top edge, middle"),
    Crop("public03", 0.10, 0.70, 0.20, "top edge"),
    Crop("public04", 0.10, 0.90, 0.20, "top-right corner"),
    Crop("public05", 0.30, 0.90, 0.20, "right edge"),
    Crop("public06", 0.50, 0.90, 0.20, "right edge, middle"),
    Crop("public07", 0.70, 0.90, 0.20, "right edge"),
    Crop("public08", 0.90, 0.90, 0.20, "bottom-right corner"),
    Crop("public09", 0.90, 0.70, 0.20, "bottom edge"),
    Crop("public10", 0.90, 0.50, 0.20, "bottom edge, middle"),
    Crop("public11", 0.90, 0.30, 0.20, "bottom edge"),
    Crop("public12", 0.90, 0.10, 0.20, "bottom-left corner"),
    Crop("public13", 0.70, 0.10, 0.20, "left edge"),
    Crop("public14", 0.50, 0.10, 0.20, "left edge, middle"),
    Crop("public15", 0.30, 0.10, 0.20, "left edge"),
)

CROPS: dict[str, tuple[Crop, ...]] = {"attack": ATTACK_CROPS, "public": PUBLIC_CROPS}

#: Per-channel statistics of the attack split at 32 px over all its pixels (population
#: std), rounded to 4 decimals. Recompute with
#: ``leakbench.data.photos.compute_normalization(split="attack", side=32)``;
#: ``tests/unit/test_data.py`` checks that the two agree.
PHOTOS_NORMALIZATION = Normalization(
    mean=(0.5084, 0.3517, 0.3054),
    std=(0.3001, 0.2294, 0.2290),
)


def _load_photo(loader: str) -> np.ndarray:
    import skimage.data  # deferred: scikit-image is only needed when photos are built

    image = getattr(skimage.data, loader)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return np.asarray(image)


@functools.lru_cache(maxsize=None)
def load_photos() -> tuple[np.ndarray, ...]:
    """The eight source photos as read-only ``uint8`` (H, W, 3) arrays, loaded once."""
    photos = []
    for _, loader, shape in PHOTOS:
        image = _load_photo(loader)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape != (*shape, 3):
            raise RuntimeError(
                f"scikit-image's {loader!r} photo is {image.dtype} {image.shape}, expected uint8 "
                f"{(*shape, 3)}; this scikit-image release ships a different photo, so the "
                f"photos data set would change: update PHOTOS and bump its version"
            )
        image = np.ascontiguousarray(image)
        image.setflags(write=False)
        photos.append(image)
    return tuple(photos)


@functools.lru_cache(maxsize=None)
def _build(split: str, side: int) -> tuple[torch.Tensor, tuple[int, ...], tuple[str, ...], str]:
    """Pixels (uint8 N,3,side,side), labels, ids and a SHA-256 of the pixels; cached."""
    crops = CROPS[split]
    images, labels, ids = [], [], []
    for label, (photo_name, photo) in enumerate(zip(PHOTO_NAMES, load_photos())):
        height, width = photo.shape[:2]
        for crop in crops:
            top, left, s = crop.box(height, width)
            region = Image.fromarray(photo[top : top + s, left : left + s])
            images.append(to_uint8_tensor(resize_square(region, side), channels=3))
            labels.append(label)
            ids.append(f"photos/{photo_name}/{crop.name}@{side}")
    pixels = torch.stack(images)
    digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
    return pixels, tuple(labels), tuple(ids), digest


def compute_normalization(*, split: str = "attack", side: int = 32) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of a split's pixels in [0, 1] (unrounded)."""
    split = check_split(split, allowed=SPLITS, name="photos")
    side = check_side(side, allowed=ALLOWED_SIDES, name="photos")
    pixels = _build(split, side)[0].to(torch.float64) / 255.0
    flat = pixels.permute(1, 0, 2, 3).reshape(pixels.shape[1], -1)
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1, correction=0).tolist())


@DATASETS.register("photos", version="1")
def photos(*, side: int = 32, split: str = "attack") -> ImageSet:
    """scikit-image's eight bundled colour photos, cut into fixed square crops (offline).

    ``split="attack"`` gives the 40 attacked crops (8 photos x 5); ``split="public"``
    gives 128 disjoint border crops (8 x 16) that attacks may train priors on.
    Label = photo. Order: photo order x crop order.
    """
    side = check_side(side, allowed=ALLOWED_SIDES, name="photos")
    split = check_split(split, allowed=SPLITS, name="photos")
    pixels, labels, ids, digest = _build(split, side)
    import skimage

    source: dict[str, Any] = {
        "kind": "scikit-image bundled sample photos",
        "package": "scikit-image",
        "package_version": skimage.__version__,
        "split": split,
        "photos": [
            {"name": n, "loader": f"skimage.data.{loader}", "shape": list(shape)} for n, loader, shape in PHOTOS
        ],
        "crops": [{"name": c.name, "cy": c.cy, "cx": c.cx, "size": c.size, "where": c.where} for c in CROPS[split]],
        "resample": RESAMPLE_NAME,
        "pixels_sha256": digest,
    }
    return TensorImageSet(
        name=SET_NAMES[split],
        pixels=pixels,
        labels=labels,
        image_ids=ids,
        class_names=PHOTO_NAMES,
        normalization=PHOTOS_NORMALIZATION,
        source=source,
    )
