"""The shared vocabulary (leakbench.core.vocabulary): one definition, used by engine and reports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from leakbench.core import vocabulary
from leakbench.core.vocabulary import METRICS, PSNR_CAP_DB, STATUSES, THRESHOLD_METRICS, Threshold


def test_threshold_direction_follows_the_metric() -> None:
    psnr, lpips = Threshold("psnr_db", 20.0), Threshold("lpips", 0.3)
    assert psnr.leaks(20.5) and not psnr.leaks(20.0) and not psnr.leaks(None)
    assert lpips.leaks(0.1) and not lpips.leaks(0.3) and not lpips.leaks(None)
    assert (psnr.describe(), lpips.describe()) == ("psnr_db > 20", "lpips < 0.3")
    assert Threshold("ssim", 0.5).lower_is_worse is False and lpips.lower_is_worse is True
    assert tuple(psnr) == ("psnr_db", 20.0)  # a (metric, value) pair, as the store holds it


def test_metrics_name_direction_and_cap() -> None:
    assert THRESHOLD_METRICS == ("psnr_db", "ssim", "lpips")
    assert [m.higher_leaks for m in METRICS.values()] == [True, True, False]
    assert METRICS["psnr_db"].cap == PSNR_CAP_DB
    assert STATUSES[0] == "ok" and set(vocabulary.FAILED_STATUSES) == set(STATUSES) - {"ok"}


def test_engine_and_reports_share_one_definition() -> None:
    import importlib

    import leakbench.metrics
    from leakbench import store
    from leakbench.suite import loading as suite_loading, types as suite_types

    # (the package leakbench.reports exports a function named leaderboard; take the modules)
    leaderboard = importlib.import_module("leakbench.reports.leaderboard")
    compare = importlib.import_module("leakbench.reports.compare")

    assert suite_types.LeakThreshold is Threshold and leaderboard.Threshold is Threshold
    assert suite_loading.THRESHOLD_METRICS is THRESHOLD_METRICS and leaderboard.THRESHOLD_METRICS is THRESHOLD_METRICS
    assert store.STATUSES is STATUSES and leaderboard.STATUSES is STATUSES
    assert leakbench.metrics.PSNR_CAP_DB is PSNR_CAP_DB and leaderboard.PSNR_CAP_DB is PSNR_CAP_DB
    assert compare.METRICS == {"worst_psnr_db": ("worst PSNR (dB)", 1), "worst_ssim": ("worst SSIM", 1),
                               "worst_lpips": ("worst LPIPS", -1)}


def test_psnr_of_identical_images_is_the_cap() -> None:
    torch = pytest.importorskip("torch")
    from leakbench.metrics import psnr_db

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert psnr_db(images, images).tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]


def test_vocabulary_and_store_load_without_torch() -> None:
    code = "import sys, leakbench.core.vocabulary, leakbench.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
