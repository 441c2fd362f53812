"""The CPU reference suites behind reports/leaderboards: what they sweep, that every cell has a control, and that
each runs end to end (smoke budget, one image, so the check takes seconds)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from leakbench.catalog import resolve as suite_path
from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import load_suite, parse_suite


def _cells(name):
    return load_suite(suite_path(name), budget="cpu").cells


def test_architecture_sweeps_width_depth_padding_training_and_batchnorm():
    cells = _cells("architecture")
    params = [c.victim.kwargs() for c in cells]
    assert {c.victim.name for c in cells} == {"lenet"}
    assert {p["width"] for p in params} == {6, 12, 24, 48} and {p["depth"] for p in params} == {3, 5, 8}
    assert {p["padding_mode"] for p in params} == {"zeros", "circular"}
    assert {c.victim.state for c in cells} == {"init", "trained"}
    assert {(p["norm"], c.protocol.kwargs()["bn_mode"]) for p, c in zip(params, cells) if p["norm"] == "batch"} == {
        ("batch", "train"), ("batch", "eval")}
    assert {c.dataset.name for c in cells} == {"mnist5k"}
    # under --budget cpu the battery is cpu-v1, with every attack it has for a conv victim
    assert {a.name for c in cells for a in c.attacks} == {"dlg", "idlg", "inverting_gradients", "gradinversion",
                                                          "geng"}
    assert all(c.control and c.control_cells for c in cells)  # each victim is its own positive control


def test_defenses_sweep_has_every_defense_family_and_one_control():
    cells = _cells("defenses")
    defenses = {c.defense.name for c in cells}
    assert defenses == {"none", "topk", "gaussian_noise", "dp_sgd", "quantize", "label_disguise"}
    protocols = {(c.protocol.name, c.protocol.kwargs().get("batch_size"), c.protocol.kwargs().get("clients", 1),
                  c.protocol.kwargs().get("local_epochs")) for c in cells}
    assert {("fedavg", 1, 1, 1), ("fedavg", 1, 1, 5), ("fedavg", 1, 1, 10), ("fedsgd", 4, 4, None),
            ("fedsgd", 4, 1, None)} <= protocols
    controls = {key for c in cells for key in c.control_cells}
    control_cells = [c for c in cells if c.key in controls]
    assert control_cells and all(c.defense.name == "none" and c.protocol.kwargs()["batch_size"] == 1
                                 for c in control_cells)
    assert all(c.control_cells for c in cells)
    suite = load_suite(suite_path("defenses"), budget="cpu")
    assert suite.utility is not None and suite.utility.train == "mnist5k"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["architecture", "defenses"])
def test_reference_suite_smoke_run_stores_ok_rows(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))
    text = suite_path(name).read_text().replace("images = 8", "images = 4").replace("rounds = 300", "rounds = 2")
    suite = parse_suite(text, budget="smoke")
    summary = run_suite(suite, out_dir=tmp_path / "out", device="cpu")
    assert set(summary.statuses) == {"ok"}
    with sqlite3.connect(store_path(tmp_path / "out")) as conn:
        infos = [json.loads(r[0]) for r in conn.execute("SELECT victim_info_json FROM cells")]
    trained = [i for i in infos if i.get("state") == "trained"]
    assert all(0 <= i["test_accuracy"] <= 1 for i in trained)


def test_similarity_compares_the_two_distances_at_one_budget():
    cells = _cells("similarity")
    for cell in cells:
        attacks = {a.name: a.kwargs() for a in cell.attacks}
        assert set(attacks) == {"inverting_gradients", "inverting_gradients_euclidean"}
        assert attacks["inverting_gradients"] == attacks["inverting_gradients_euclidean"]
