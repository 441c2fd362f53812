"""``imagefolder``: a directory of image files on disk, one class per subfolder.

Layouts (the same as torchvision's ``ImageFolder`` where they overlap):

* ``root/<class>/**/<image>``: one class per subfolder, classes in sorted name order;
* ``root/<image>``: the root holds image files directly, a single class named after it.

Every image is center-cropped to a square and resized to ``side``. Files are read when a
batch asks for them, so building the set only lists the folder.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from leakbench.core.types import Normalization
from leakbench.data.base import (
    DATASETS,
    RESAMPLE_NAME,
    ImageSet,
    center_square,
    check_side,
    resize_square,
    to_uint8_tensor,
)

logger = logging.getLogger(__name__)

#: File name endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_under(folder: Path, seen: set[str] | None = None) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden entries skipped), in sorted order.

    Symbolic links to folders are followed once: a folder already walked (by its real path,
    ``seen`` shared across class folders) is not walked again, so a link loop ends."""
    seen = set() if seen is None else seen
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            logger.warning("imagefolder: %s leads back to %s, already read; not reading it twice", dirpath, real)
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(Path(dirpath) / f))
    return found


#: images whose header claims more pixels than this are refused (decompression bombs and impossible sizes)
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0}


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images scaled by their real range to 8 bits (PIL's convert would clip them at 255)."""
    import numpy as np

    if image.mode not in _WIDE_MODES and image.mode not in ("I", "F"):
        return image
    array = np.asarray(image, dtype=np.float64)
    if image.mode in _WIDE_MODES:
        top = _WIDE_MODES[image.mode]
    elif image.mode == "I":  # 16-bit PNGs open as "I": their range is 16 bits unless a value says more
        top = 65535.0 if array.max(initial=0) <= 65535 else float(array.max())
    else:  # float images: [0, 1] when they fit, else their own maximum
        top = 1.0 if array.max(initial=0) <= 1.0 else float(array.max())
    array = np.clip(array, 0, None) / max(top, 1e-12) * 255.0
    return Image.fromarray(np.round(array).astype(np.uint8), mode="L")


def check_image_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image, from its header (and, for PNG, its chunks' checksums),
    without decoding its pixels; None when it can."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty (zero bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width < 1 or height < 1 or width * height > MAX_PIXELS:
                    return (f"its header claims {width} x {height} pixels, more than the {MAX_PIXELS:,} "
                            "an image may have (a decompression bomb or a damaged header)")
                image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"a decompression bomb ({err})"
    except UnidentifiedImageError:
        return "not an image file PIL can read (its name ends like one, its content is not)"
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or damaged data
        return f"damaged or truncated ({err})"
    return None


def _normalization(channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalization:
    mean_t = tuple(float(m) for m in mean) if mean is not None else (0.5,) * channels
    std_t = tuple(float(s) for s in std) if std is not None else (0.5,) * channels
    for what, values in (("mean", mean_t), ("std", std_t)):
        if len(values) != channels:
            raise ValueError(
                f"imagefolder: {what} has {len(values)} value(s) but the images have {channels} channel(s)"
                f" ({'grayscale' if channels == 1 else 'RGB'}); give one value per channel"
            )
    if any(s <= 0 for s in std_t):
        raise ValueError(f"imagefolder: every std must be positive, got {std_t}")
    return Normalization(mean=mean_t, std=std_t)


class ImageFolderSet(ImageSet):
    """Image files listed once at construction and read (and resized) on demand."""

    def __init__(
        self,
        *,
        root: Path,
        files: Sequence[Path],
        labels: Sequence[int],
        class_names: Sequence[str],
        layout: str,
        side: int,
        channels: int,
        normalization: Normalization,
    ) -> None:
        super().__init__(
            name="imagefolder", side=side, channels=channels, class_names=class_names, normalization=normalization
        )
        self.root = root
        self._files = tuple(files)
        self._labels = tuple(labels)
        self._layout = layout

    def __len__(self) -> int:
        return len(self._files)

    def image_id(self, index: int) -> str:
        path = self._files[self._check_index(index)]
        return f"imagefolder/{self.root.name}/{path.relative_to(self.root).as_posix()}@{self.side}"

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        path = self._files[index]
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                image = _to_8bit(image).convert("L" if self.channels == 1 else "RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise ValueError(f"imagefolder: cannot read image {path}: {err}; remove or replace the file") from err
        square = resize_square(center_square(image), self.side)
        return to_uint8_tensor(square, channels=self.channels), self._labels[index]

    def unreadable(self) -> list[tuple[Path, str]]:
        """Every file that cannot be read, with why (``check_image_file``: headers only, fast)."""
        return [(path, why) for path in self._files if (why := check_image_file(path)) is not None]

    def _source(self) -> dict[str, Any]:
        return {
            "kind": "image folder",
            "root": str(self.root),
            "layout": self._layout,
            "extensions": list(IMAGE_EXTENSIONS),
            "files": len(self._files),
            "preprocess": f"center square crop, resize with {RESAMPLE_NAME}",
        }


@DATASETS.register("imagefolder", version="1")
def imagefolder(
    *,
    root: str,
    side: int = 32,
    grayscale: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageSet:
    """Image files under ``root``: one class per subfolder, or one class if files sit in root.

    Images are center-cropped to square and resized to ``side``; ``grayscale`` gives one
    channel. Normalization is 0.5/0.5 per channel unless ``mean`` and ``std`` are given.
    """
    side = check_side(side, name="imagefolder")
    channels = 1 if grayscale else 3
    normalization = _normalization(channels, mean, std)
    path = Path(os.path.expanduser(str(root))).resolve()
    if not path.exists():
        raise FileNotFoundError(f"imagefolder: root {path} does not exist; check the path in the suite")
    if not path.is_dir():
        raise NotADirectoryError(f"imagefolder: root {path} is not a directory")

    direct = sorted(p for p in path.iterdir() if _is_image(p))
    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    seen = {str(path)}
    per_class = {d.name: _images_under(d, seen) for d in subfolders}
    searched = ", ".join(IMAGE_EXTENSIONS)
    if direct and any(per_class.values()):
        with_images = [n for n, files in per_class.items() if files]
        raise ValueError(
            f"imagefolder: root {path} holds image files directly and in subfolders "
            f"({', '.join(with_images[:5])}); use one layout: one subfolder per class, or all files in the root"
        )
    if direct:
        files, labels, class_names, layout = direct, [0] * len(direct), [path.name], "single class (files in root)"
    else:
        empty = [n for n, found in per_class.items() if not found]
        if not any(per_class.values()):
            raise ValueError(f"imagefolder: no images found under {path} (searched for {searched})")
        if empty:
            raise ValueError(
                f"imagefolder: class folder(s) {', '.join(empty)} under {path} hold no images "
                f"(searched for {searched}); remove them or add images, since each subfolder is a class"
            )
        class_names = sorted(per_class)
        files = [f for name in class_names for f in per_class[name]]
        labels = [k for k, name in enumerate(class_names) for _ in per_class[name]]
        layout = "one class per subfolder"
    logger.debug("imagefolder %s: %d images in %d classes", path, len(files), len(class_names))
    return ImageFolderSet(
        root=path,
        files=files,
        labels=labels,
        class_names=class_names,
        layout=layout,
        side=side,
        channels=channels,
        normalization=normalization,
    )
