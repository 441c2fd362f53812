"""Unit tests of leakbench.data: the embedded photos, image folders, torchvision sets, sampling."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from leakbench.core.registry import RegistryError
from leakbench.core.types import Batch
from leakbench.data import DATASETS, ImageSet, select_indices
from leakbench.data import photos as photos_module
from leakbench.data.photos import ALLOWED_SIDES, ATTACK_CROPS, PHOTOS, PHOTOS_NORMALIZATION, PUBLIC_CROPS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def attack() -> ImageSet:
    return DATASETS.build("photos", side=32)


@pytest.fixture(scope="module")
def public() -> ImageSet:
    return DATASETS.build("photos", side=32, split="public")


# -- photos -----------------------------------------------------------------------------


def test_photos_count_and_metadata(attack: ImageSet, public: ImageSet) -> None:
    assert len(attack) == 8 * 5 == 40
    assert len(public) == 8 * 16 == 128
    for ds in (attack, public):
        assert (ds.side, ds.channels, ds.num_classes) == (32, 3, 8)
        assert ds.class_names == (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "stereo_motorcycle",
        )
        assert ds.normalization == PHOTOS_NORMALIZATION
    assert attack.name == "photos" and public.name == "photos-public"


def test_photos_shapes_range_and_labels(attack: ImageSet) -> None:
    labels = []
    for i in range(len(attack)):
        image, label = attack.get(i)
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0.0 <= image.min().item() and image.max().item() <= 1.0
        assert image.std().item() > 0.01, f"image {attack.image_id(i)} is flat"
        labels.append(label)
    assert labels == [i // len(ATTACK_CROPS) for i in range(40)]  # photo order x crop order


def test_photos_ids_are_stable_and_unique(attack: ImageSet, public: ImageSet) -> None:
    ids = [attack.image_id(i) for i in range(len(attack))]
    assert ids[0] == "photos/astronaut/crop0@32"
    assert ids[7] == "photos/chelsea/crop2@32"
    assert ids[-1] == "photos/stereo_motorcycle/crop4@32"
    again = DATASETS.build("photos", side=32)
    assert [again.image_id(i) for i in range(len(again))] == ids
    public_ids = [public.image_id(i) for i in range(len(public))]
    assert public_ids[0] == "photos/astronaut/public00@32"
    assert len(set(ids) | set(public_ids)) == len(ids) + len(public_ids)
    assert DATASETS.build("photos", side=64).image_id(0) == "photos/astronaut/crop0@64"


def test_photos_are_deterministic(attack: ImageSet) -> None:
    photos_module._build.cache_clear()
    fresh = DATASETS.build("photos", side=32)
    assert torch.equal(fresh.batch(range(40)).images, attack.batch(range(40)).images)
    assert fresh.describe()["source"]["pixels_sha256"] == attack.describe()["source"]["pixels_sha256"]


@pytest.mark.parametrize("side", ALLOWED_SIDES)
def test_photos_every_allowed_side(side: int) -> None:
    ds = DATASETS.build("photos", side=side)
    image, label = ds.get(len(ds) - 1)
    assert image.shape == (3, side, side) and label == 7
    assert 0.0 <= image.min().item() and image.max().item() <= 1.0
    assert ds.image_id(0) == f"photos/astronaut/crop0@{side}"


@pytest.mark.parametrize("side", [0, 8, 33, 256, 512, -32, 32.0, True, "32"])
def test_photos_bad_side_raises(side: object) -> None:
    with pytest.raises(ValueError) as err:
        DATASETS.build("photos", side=side)
    if isinstance(side, int) and not isinstance(side, bool):
        assert "16, 32, 64, 128, 224" in str(err.value)


def test_photos_bad_split_raises() -> None:
    with pytest.raises(ValueError, match="attack"):
        DATASETS.build("photos", split="train")


def test_photos_unknown_parameter_rejected_by_registry() -> None:
    with pytest.raises(RegistryError, match="size"):
        DATASETS.build("photos", size=32)


def test_crop_boxes_of_the_two_splits_never_overlap() -> None:
    """Pixel-exact: no attacked pixel is inside any public crop, for every real photo shape."""
    for name, _, (height, width) in PHOTOS:
        masks = {}
        for split, crops in (("attack", ATTACK_CROPS), ("public", PUBLIC_CROPS)):
            mask = np.zeros((height, width), dtype=bool)
            boxes = set()
            for crop in crops:
                top, left, side = crop.box(height, width)
                assert side > 0 and 0 <= top <= height - side and 0 <= left <= width - side, (name, crop)
                assert (top, left, side) not in boxes, f"{name}: {crop.name} repeats a box"
                boxes.add((top, left, side))
                mask[top : top + side, left : left + side] = True
            masks[split] = (mask, boxes)
        assert not (masks["attack"][1] & masks["public"][1]), f"{name}: a box is in both splits"
        overlap = int((masks["attack"][0] & masks["public"][0]).sum())
        assert overlap == 0, f"{name}: {overlap} pixels are in both an attack and a public crop"


def test_no_image_is_equal_across_splits(attack: ImageSet, public: ImageSet) -> None:
    a = attack.batch(range(len(attack))).images.flatten(1)
    p = public.batch(range(len(public))).images.flatten(1)
    distances = torch.cdist(a.double(), p.double())
    assert distances.min().item() > 0.0
    within = torch.cdist(a.double(), a.double()) + torch.eye(len(a), dtype=torch.float64) * 1e9
    assert within.min().item() > 0.0, "two attacked images are identical"


def test_normalization_constants_match_a_recomputation() -> None:
    mean, std = photos_module.compute_normalization(split="attack", side=32)
    assert PHOTOS_NORMALIZATION.mean == pytest.approx(mean, abs=1e-4)
    assert PHOTOS_NORMALIZATION.std == pytest.approx(std, abs=1e-4)


def test_photos_loaded_once_per_process() -> None:
    DATASETS.build("photos", side=16)
    before = photos_module.load_photos.cache_info()
    DATASETS.build("photos", side=16)
    DATASETS.build("photos", side=16, split="public")
    after = photos_module.load_photos.cache_info()
    assert after.misses == before.misses  # no reload of the source photos


def test_get_returns_a_copy(attack: ImageSet) -> None:
    image, _ = attack.get(0)
    image.zero_()
    assert attack.get(0)[0].max().item() > 0.0


def test_photos_load_offline_without_skimage_cache(tmp_path: Path) -> None:
    """Build photos in a fresh interpreter where every socket connection fails.

    A subprocess, because scikit-image turns a missing download into pytest.skip when it
    sees PYTEST_CURRENT_TEST, which would hide exactly the failure this test looks for.
    """
    script = textwrap.dedent(
        """
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network disabled by test_data")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from leakbench.data import DATASETS
        ds = DATASETS.build("photos", side=32)
        pub = DATASETS.build("photos", side=32, split="public")
        print(len(ds), len(pub), ds.batch([0, 39]).images.shape[0])
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env.update(SKIMAGE_DATADIR=str(tmp_path / "skimage-cache"), HOME=str(tmp_path), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["40", "128", "2"]


def test_describe_is_json_provenance(attack: ImageSet) -> None:
    info = json.loads(json.dumps(attack.describe()))
    assert info["name"] == "photos" and info["side"] == 32 and info["count"] == 40
    assert info["source"]["package"] == "scikit-image"
    assert [c["name"] for c in info["source"]["crops"]] == [c.name for c in ATTACK_CROPS]
    assert len(info["source"]["pixels_sha256"]) == 64
    assert info["normalization"]["mean"] == list(PHOTOS_NORMALIZATION.mean)


# -- batch and select_indices -----------------------------------------------------------


def test_batch_is_a_valid_batch(attack: ImageSet) -> None:
    batch = attack.batch([7, 0, 39])
    assert isinstance(batch, Batch)
    assert batch.images.shape == (3, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [1, 0, 7]
    assert batch.image_ids == (attack.image_id(7), attack.image_id(0), attack.image_id(39))
    assert batch.normalization == attack.normalization and batch.num_classes == 8
    assert torch.equal(batch.images[0], attack.get(7)[0])


def test_batch_rejects_bad_indices(attack: ImageSet) -> None:
    with pytest.raises(IndexError, match="0..39"):
        attack.batch([0, 40])
    with pytest.raises(ValueError, match="repeat"):
        attack.batch([3, 3])
    with pytest.raises(ValueError):
        attack.batch([])


def test_select_indices_is_seeded(attack: ImageSet) -> None:
    first = select_indices(attack, count=8, seed=1)
    assert first == select_indices(attack, count=8, seed=1)
    assert first != select_indices(attack, count=8, seed=2)
    assert len(set(first)) == 8 and all(0 <= i < 40 for i in first)
    assert sorted(select_indices(attack, count=40, seed=3)) == list(range(40))


def test_select_indices_too_many(attack: ImageSet) -> None:
    with pytest.raises(ValueError, match="asks for 41 images but photos has only 40"):
        select_indices(attack, count=41, seed=0)
    with pytest.raises(ValueError):
        select_indices(attack, count=0, seed=0)


# -- imagefolder ------------------------------------------------------------------------


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_multi_class(tmp_path: Path) -> None:
    _png(tmp_path / "dogs" / "b.png", (0, 255, 0))
    _png(tmp_path / "dogs" / "a.png", (0, 0, 255))
    _png(tmp_path / "cats" / "z.png", (255, 0, 0), size=(20, 50))
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    ds = DATASETS.build("imagefolder", root=str(tmp_path), side=16)
    assert len(ds) == 3 and ds.class_names == ("cats", "dogs") and ds.num_classes == 2
    assert [ds.get(i)[1] for i in range(3)] == [0, 1, 1]
    assert ds.image_id(1) == f"imagefolder/{tmp_path.name}/dogs/a.png@16"
    image, _ = ds.get(0)
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 16, 16))
    assert ds.normalization.mean == (0.5, 0.5, 0.5) and ds.normalization.std == (0.5, 0.5, 0.5)
    assert ds.batch([0, 1, 2]).labels.tolist() == [0, 1, 1]


def test_imagefolder_center_crops_to_square(tmp_path: Path) -> None:
    image = np.zeros((20, 60, 3), dtype=np.uint8)
    image[:, 20:40] = 255  # white centre square, black side bands
    Image.fromarray(image).save(tmp_path / "wide.png")
    ds = DATASETS.build("imagefolder", root=str(tmp_path), side=20)
    assert ds.get(0)[0].min().item() == 1.0


def test_imagefolder_single_class_grayscale_and_custom_stats(tmp_path: Path) -> None:
    _png(tmp_path / "one.png", (10, 20, 30))
    _png(tmp_path / "two.jpg", (200, 100, 50))
    ds = DATASETS.build("imagefolder", root=str(tmp_path), side=8, grayscale=True, mean=[0.4], std=[0.2])
    assert len(ds) == 2 and ds.class_names == (tmp_path.name,) and ds.channels == 1
    assert ds.get(1)[0].shape == (1, 8, 8) and ds.get(1)[1] == 0
    assert ds.normalization.mean == (0.4,) and ds.normalization.std == (0.2,)
    with pytest.raises(ValueError, match="channel"):
        DATASETS.build("imagefolder", root=str(tmp_path), mean=[0.4], std=[0.2])


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DATASETS.build("imagefolder", root=str(missing))


def test_imagefolder_empty_root(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(ValueError) as err:
        DATASETS.build("imagefolder", root=str(tmp_path))
    assert str(tmp_path) in str(err.value) and ".png" in str(err.value)


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "x.png", (1, 2, 3))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="b"):
        DATASETS.build("imagefolder", root=str(tmp_path))  # empty class folder
    _png(tmp_path / "b" / "y.png", (1, 2, 3))
    _png(tmp_path / "loose.png", (1, 2, 3))
    with pytest.raises(ValueError, match="one layout"):
        DATASETS.build("imagefolder", root=str(tmp_path))


def test_imagefolder_unreadable_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ds = DATASETS.build("imagefolder", root=str(tmp_path))
    with pytest.raises(ValueError, match="broken.png"):
        ds.get(0)


# -- torchvision sets -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
@pytest.mark.parametrize("exists", [False, True])
def test_standard_sets_missing_files(name: str, exists: bool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data"
    if exists:
        root.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        DATASETS.build(name, root=str(root))
    message = str(err.value)
    assert str(root) in message and "download = true" in message and "put a copy" in message
    assert capsys.readouterr().out == ""


def test_failed_download_is_file_not_found_and_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torchvision.datasets

    def offline(self: object) -> None:
        print("Downloading https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
        raise URLError("offline")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(FileNotFoundError, match="download failed"):
        DATASETS.build("cifar10", root=str(tmp_path), download=True)
    assert capsys.readouterr().out == ""


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (uint8): magic 0x08 type, dims big-endian, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_local_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    ds = DATASETS.build("mnist", root=str(tmp_path))
    assert len(ds) == 5 and ds.channels == 1 and ds.num_classes == 10
    assert ds.normalization.mean == (0.1307,) and ds.normalization.std == (0.3081,)
    batch = ds.batch([0, 4])
    assert batch.images.shape == (2, 1, 32, 32) and batch.labels.tolist() == [3, 5]
    assert batch.image_ids == ("mnist/test/00000@32", "mnist/test/00004@32")
    native = DATASETS.build("mnist", root=str(tmp_path), side=28, split="train")
    assert torch.equal(native.get(2)[0][0], torch.from_numpy(images[2]).float() / 255)
    assert json.loads(json.dumps(native.describe()))["source"]["split"] == "train"
