"""Shared fixtures: tiny suites and synthetic batches that keep the tests fast on a CPU."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from leakbench.core import Batch, Normalization

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def smooth_batch():
    """A batch of smooth random images (upsampled noise), which attacks can recover quickly."""

    def make(size: int = 1, *, side: int = 16, channels: int = 3, num_classes: int = 8, seed: int = 0) -> Batch:
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(size, channels, max(2, side // 4), max(2, side // 4), generator=g)
        images = torch.nn.functional.interpolate(low, size=side, mode="bilinear", align_corners=False).clamp(0, 1)
        labels = torch.randint(0, num_classes, (size,), generator=g)
        norm = Normalization((0.5,) * channels, (0.25,) * channels)
        return Batch(images=images, labels=labels, image_ids=tuple(f"img{i}" for i in range(size)),
                     normalization=norm, num_classes=num_classes)

    return make


TINY_SUITE = """
[suite]
name = "tiny"
seed = 7
images = {images}
leak_threshold = {{ metric = "psnr_db", value = 15.0 }}

[dataset]
name = "photos"
side = 16

[[case]]
victim = "test_tiny"
protocol = {{ name = "fedsgd", batch_size = 1 }}
labels = "idlg"
[[case.attacks]]
name = "inverting_gradients"
iterations = {iterations}
restarts = 2
{extra}

[[case]]
victim = {{ name = "fc", hidden = 32 }}
protocol = {{ name = "fedsgd", batch_size = 1 }}
[[case.attacks]]
name = "analytic_fc"
"""


@pytest.fixture
def tiny_suite_file(tmp_path: Path):
    def make(*, images: int = 2, iterations: int = 20, extra_attack: str = "") -> Path:
        """``extra_attack``: TOML of a second ``[[case.attacks]]`` entry for the test_tiny case."""
        path = tmp_path / "tiny.toml"
        path.write_text(textwrap.dedent(TINY_SUITE.format(images=images, iterations=iterations, extra=extra_attack)))
        return path

    return make
