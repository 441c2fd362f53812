"""suites/resnets.toml (the GPU-sized ResNet study) runs end to end under the smoke budget (every victim, both training states)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import load_suite, parse_suite

RESNETS = Path(__file__).resolve().parents[2] / "suites" / "resnets.toml"


def test_resnets_suite_validates_with_its_sweeps():
    suite = load_suite(RESNETS)
    names = {c.victim.name for c in suite.cells}
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet20"} <= names
    assert {c.victim.kwargs().get("width") for c in suite.cells if c.victim.name == "resnet20"} == {1, 2, 4, 8}
    assert {c.victim.kwargs()["padding_mode"] for c in suite.cells} == {"zeros", "circular"}
    assert {c.victim.state for c in suite.cells} == {"init", "trained"}
    assert {c.protocol.kwargs()["bn_mode"] for c in suite.cells} == {"eval"}
    assert all(a.kwargs()["iterations"] >= 2000 for c in suite.cells for a in c.attacks)


@pytest.mark.slow
def test_resnets_suite_smoke_run_finishes(tmp_path, monkeypatch):
    """Smoke budget (4 iterations, 1 epoch), one image and 16 px so that the CPU check takes minutes, not an hour:
    every victim is built, the trained ones trained and tested, every attack stores an ok row."""
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))
    text = RESNETS.read_text().replace("images = 4", "images = 1").replace("side = 32", "side = 16")
    suite = parse_suite(text, budget="smoke")
    summary = run_suite(suite, out_dir=tmp_path / "out", device="cpu")
    assert summary.statuses == {"ok": len(suite.cells)} == {"ok": 13}
    with sqlite3.connect(store_path(tmp_path / "out")) as conn:
        infos = [json.loads(r[0]) for r in conn.execute("SELECT victim_info_json FROM cells")]
    trained = [i for i in infos if i["state"] == "trained"]
    assert len(trained) == 2 and all(i["recipe"]["epochs"] == 1 and 0 <= i["test_accuracy"] <= 1 for i in trained)
