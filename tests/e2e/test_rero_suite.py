"""End to end: a tiny DP suite's leaderboard shows γ, κ̂ and the measured rate; a defense that adds
less noise than it declares raises ``rero_exceeded``."""

from __future__ import annotations

import json
import sqlite3

import pytest

from leakbench.defenses.dp import OpacusClipping
from leakbench.reports.leaderboard import leaderboard, load_results, to_markdown
from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import load_suite

SUITE = """
[suite]
name = "tiny_rero"
seed = 0
images = 4
leak_threshold = {{ metric = "psnr_db", value = 20.0 }}

[dataset]
name = "photos"
side = 16

[[case]]
victim = "fc"
defense = [{defenses}]
protocol = {{ name = "fedsgd", batch_size = 1 }}
labels = "idlg"
[[case.attacks]]
name = "analytic_fc"
"""
# σ = 4 on one update: γ seen = Φ(Φ⁻¹(κ) + 1/4), well below the lower limit of 4 leaks in 4
DP = '{ name = "dp_sgd", noise_multiplier = 4.0, max_grad_norm = 1.0 }'


def _run(tmp_path, defenses: str, budget: str):
    path = tmp_path / "suite.toml"
    path.write_text(SUITE.format(defenses=defenses))
    out = tmp_path / "out"
    run_suite(load_suite(path, budget=budget), out_dir=out, device="cpu")
    results = load_results(out)
    return out, results, leaderboard(results)


def test_tiny_dp_suite_shows_gamma_kappa_and_the_measured_rate(tmp_path):
    out, results, board = _run(tmp_path, DP + ', { name = "gaussian_noise", sigma = 0.001 }', "smoke")
    dp = board[board["defense"].str.startswith("dp_sgd")].iloc[0]
    noise = board[board["defense"].str.startswith("gaussian_noise")].iloc[0]
    # numbers in the store, per cell, with their parameters and libraries
    with sqlite3.connect(store_path(out)) as conn:
        stored = conn.execute("SELECT rero_kappa, rero_kappa_upper, rero_gamma_observed, rero_gamma_training, rero_json"
                              " FROM cells WHERE defense = 'dp_sgd'").fetchall()
    assert len(stored) == dp["cells"] >= 1
    kappa, kappa_upper, seen, training, info = stored[0]
    info = json.loads(info)
    assert 0 < kappa <= kappa_upper < 1 and kappa_upper <= seen < 1 and kappa_upper <= training < 1
    assert info["guarantee"]["noise_multiplier"] == 4.0 and info["observed"]["steps"] == 1
    assert info["observed"]["sample_rate"] == 1.0 and "closed form" in info["observed"]["method"]
    assert "dp-accounting" in info["training"]["library"] and info["training"]["sample_rate"] == 0.01
    assert info["kappa"]["prior"].startswith("photos(") and "split=public" in info["kappa"]["prior"]
    assert dp["rero_gamma_observed"] == pytest.approx(seen) and dp["rero_kappa"] == pytest.approx(kappa)
    assert dp["leak_rate"] == 0.0 and not dp["rero_exceeded"] and dp["leak_rate_cp_hi"] > 0.5
    assert noise["rero_gamma_observed"] != noise["rero_gamma_observed"]  # NaN: no guarantee
    assert "no clipping" in noise["rero_note"]
    markdown = to_markdown(board, results=results)
    assert f"γ {seen:.3g} seen / {training:.3g} training" in markdown and f"κ̂ {kappa:.3g}" in markdown
    assert "measured 0 [0," in markdown and "no DP guarantee" in markdown and "*estimate*" in markdown


def test_defense_adding_less_noise_than_declared_raises_the_flag(tmp_path, monkeypatch):
    honest = OpacusClipping.client_gradients

    def less_noise(self, *args, **kwargs):  # declares σ = 4, adds none
        declared = self.noise_multiplier
        self.noise_multiplier = 0.0
        try:
            return honest(self, *args, **kwargs)
        finally:
            self.noise_multiplier = declared

    monkeypatch.setattr(OpacusClipping, "client_gradients", less_noise)
    _, results, board = _run(tmp_path, DP, "full")  # 4 images (the smoke budget attacks 1)
    row = board.iloc[0]
    assert row["leaked_images"] == 4  # the analytic attack inverts the clipped, noiseless update
    assert row["rero_gamma_observed"] < 0.4 and row["rero_exceeded"]
    assert "rero_exceeded" in row["flags"]
    assert "rero_exceeded" in to_markdown(board, results=results)
