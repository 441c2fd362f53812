"""The ReRo numbers in reports, certify and the store, on hand-made stores (no torch)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from leakbench import store as store_module
from leakbench.reports import load_results
from leakbench.reports.certify import Limits, certificate_markdown, certify
from leakbench.reports.leaderboard import leaderboard, to_markdown
from leakbench.reports.plots import rero_plot
from leakbench.store import SCHEMA_VERSION, Store
from storebuilder import StoreBuilder


def rero_cell(gamma_seen: float, gamma_training: float, *, sigma: float = 2.0, kappa: float = 0.1,
              kappa_upper: float = 0.15) -> dict:
    info = {
        "dp": True,
        "guarantee": {"noise_multiplier": sigma, "clipping_norm": 1.0, "sample_rate": 0.01, "steps": 1000,
                      "delta": 1e-5},
        "kappa": {"kappa": kappa, "kappa_upper": kappa_upper, "successes": 3, "trials": 30, "confidence": 0.95,
                  "best_guess": "mean image", "criterion": "psnr_db > 20", "prior": "photos(split=public)",
                  "sample_size": 30},
        "observed": {"gamma": gamma_seen, "steps": 1, "sample_rate": 1.0, "method": "closed form: mu-GDP",
                     "library": "scipy"},
        "training": {"gamma": gamma_training, "steps": 1000, "sample_rate": 0.01, "method": "PLD",
                     "library": "dp-accounting, riskcal"},
    }
    return {"rero_kappa": kappa, "rero_kappa_upper": kappa_upper, "rero_gamma_observed": gamma_seen,
            "rero_gamma_training": gamma_training, "rero_json": info}


NO_DP = {"rero_json": {"dp": False, "note": "no clipping: the noise is not calibrated to a sensitivity"}}


def build(tmp_path: Path, groups: dict[str, tuple[list[float], list[dict]]]) -> Path:
    """``{"defense": (psnrs, rero per cell)}``: one cell per image, victim fc; every row's positive control
    (undefended fc) leaks, so attack-based verdicts can pass."""
    b = StoreBuilder(tmp_path)
    control = (b.controls("fc", [("control-img-0", 100.0)]), [b.attack_key()])
    for case, (defense, (psnrs, reros)) in enumerate(groups.items()):
        for index, psnr in enumerate(psnrs):
            key = f"{defense}-{index}"
            b.cell(key, victim="fc", defense=defense, batch_index=index, case=case, rero=reros[index % len(reros)],
                   control_of=control)
            b.attack(key, [(f"{defense}-img-{index}", psnr)])
    return b.close()


def test_leaderboard_row_takes_the_weakest_cell_and_shows_the_exact_interval(tmp_path):
    path = build(tmp_path, {"dp_sgd": ([25.0, 10.0, 10.0, 10.0], [rero_cell(0.3, 0.2), rero_cell(0.4, 0.25)]),
                            "gaussian_noise": ([30.0, 30.0], [NO_DP])})
    results = load_results(path)
    board = leaderboard(results)
    dp, noise = board.iloc[0], board.iloc[1]
    assert dp["rero_gamma_observed"] == 0.4 and dp["rero_gamma_training"] == 0.25
    assert dp["leak_rate"] == 0.25 and 0 < dp["leak_rate_cp_lo"] < 0.25 < dp["leak_rate_cp_hi"] < 1
    assert dp["rero_noise_multiplier"] == 2.0 and dp["rero_steps_observed"] == 1.0
    assert not dp["rero_exceeded"]
    assert math.isnan(noise["rero_gamma_observed"]) and "no clipping" in noise["rero_note"]
    markdown = to_markdown(board, results=results)
    assert "γ 0.4 seen / 0.25 training; κ̂ 0.1 (≤ 0.15); measured 0.25 [" in markdown
    assert "no DP guarantee" in markdown and "κ̂ is an *estimate*" in markdown


def test_rate_above_the_ceiling_raises_the_flag(tmp_path):
    path = build(tmp_path, {"dp_sgd": ([30.0] * 10, [rero_cell(0.3, 0.2)])})
    board = leaderboard(load_results(path))
    assert board.iloc[0]["rero_exceeded"] and "rero_exceeded" in board.iloc[0]["flags"]


def test_max_rero_certifies_by_the_guarantee_whatever_the_attacks(tmp_path):
    path = build(tmp_path, {"dp_sgd": ([25.0] + [10.0] * 9, [rero_cell(0.3, 0.2)]),      # one image above 20 dB
                            "weak": ([10.0] * 4, [rero_cell(0.7, 0.5)]),
                            "gaussian_noise": ([10.0] * 4, [NO_DP]),
                            "liar": ([30.0] * 10, [rero_cell(0.3, 0.2)])})
    results = load_results(path)
    both = certify(results, limits=Limits(max_psnr_db=20.0, max_rero=0.5))
    by = {r.defense: r for r in both.rows}
    assert by["dp_sgd"].passed and by["dp_sgd"].certified_by == "guarantee"  # the attack check alone fails
    assert by["weak"].passed and by["weak"].certified_by == "attacks"       # the attacks pass it, not the bound
    assert by["gaussian_noise"].certified_by == "attacks"
    assert not by["liar"].passed  # the attacks contradict the guarantee
    only = {r.defense: r for r in certify(results, limits=Limits(max_rero=0.5)).rows}
    assert [d for d, r in only.items() if r.passed] == ["dp_sgd"]
    assert "no bound" in only["gaussian_noise"].checks[-1].observed
    assert only["dp_sgd"].rero["gamma_observed"] == 0.3 and only["dp_sgd"].rero["kappa_is_estimate"]
    text = certificate_markdown(certify(results, limits=Limits(max_rero=0.5)))
    assert "pass (certified by the guarantee)" in text and "κ is an estimate" in text
    with pytest.raises(ValueError, match="--max-rero"):
        Limits(max_rero=1.5)


def test_plot_drawn_for_dp_rows_and_skipped_without(tmp_path):
    board = leaderboard(load_results(build(tmp_path / "a", {"dp_sgd": ([10.0] * 3, [rero_cell(0.3, 0.2)])})))
    assert rero_plot(board).drawn
    plain = leaderboard(load_results(build(tmp_path / "b", {"gaussian_noise": ([10.0] * 3, [NO_DP])})))
    skipped = rero_plot(plain)
    assert not skipped.drawn and "DP guarantee" in skipped.note


def test_store_of_the_previous_schema_is_read_and_migrated(tmp_path):
    path = build(tmp_path, {"none": ([10.0, 12.0], [NO_DP])})
    old = tmp_path / "old" / "leakbench.sqlite"
    old.parent.mkdir()
    with sqlite3.connect(path) as src, sqlite3.connect(old) as dst:  # the same store at schema 2 (before ReRo, controls)
        src.backup(dst)
        for column in (*store_module._RERO_COLUMNS, "case_indices_json", "control", "control_json",
                       *store_module.DEFENSE_NUMBERS):
            dst.execute(f"ALTER TABLE cells DROP COLUMN {column}")
        dst.execute("ALTER TABLE results DROP COLUMN baseline")
        dst.execute("PRAGMA user_version = 2")
    assert len(leaderboard(load_results(old))) == 1  # read-only: not migrated, still readable
    with Store(old) as store:
        columns = {r[1] for r in store.conn.execute("PRAGMA table_info(cells)")}
        assert set(store_module._RERO_COLUMNS) <= columns
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
