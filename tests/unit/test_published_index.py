"""The published leaderboards: the label study on mnist5k and the front page (leakbench.reports.index)."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest

from leakbench.programs import label_study
from leakbench.reports import index


def test_label_study_on_digits_records_the_trained_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))
    rows = label_study.run_study(dataset="mnist5k", victims=("test_tiny",), batch_sizes=(1, 16),
                                 distributions=("unique", "one_class"), strategies=("idlg", "geng"), trials=1,
                                 side=16, trained=True, epochs=1, recipe_options={"optimizer": "adam", "lr": 0.003,
                                                                                 "augment": "none"})
    assert {r.dataset for r in rows} == {"mnist5k"}
    accuracy = {r.test_accuracy for r in rows}
    assert len(accuracy) == 1 and 0.2 < accuracy.pop() <= 1.0  # one epoch on 4 000 digits beats chance (10 %)
    by = {(r.distribution, r.batch_size, r.strategy): r for r in rows}
    assert by[("unique", 1, "idlg")].accuracy == 1.0  # one image: iDLG reads its label
    assert by[("unique", 16, "geng")].accuracy is None  # 16 distinct labels do not exist among 10 digits
    assert by[("one_class", 16, "idlg")].accuracy is None and by[("one_class", 16, "geng")].accuracy is not None
    files = label_study.write_outputs(rows, tmp_path / "out", meta={"dataset": "mnist5k", "trials": 1})
    data = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert len(data["rows"]) == len(rows) and data["meta"]["dataset"] == "mnist5k"
    assert "trained (" in (tmp_path / "out" / "labels.md").read_text() and len(files) == 4


def _store(path, *, ended="2026-12-01T10:30:00+00:00"):
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE runs (run_id INTEGER PRIMARY KEY, suite_name TEXT, suite_hash TEXT, versions_json TEXT,
                           device TEXT, git_commit TEXT, started_utc TEXT, ended_utc TEXT, status TEXT);
        CREATE TABLE cells (suite_hash TEXT, cell_key TEXT);
        CREATE TABLE results (suite_hash TEXT, cell_key TEXT, battery TEXT, status TEXT);
    """)
    conn.execute("INSERT INTO runs VALUES (1, 'study', 'h1', '{\"torch\": \"2.9\"}', 'cpu: x86_64, 2 threads', 'abc',"
                 " '2026-12-01T10:00:00+00:00', '2026-12-01T10:10:00+00:00', 'interrupted')")
    conn.execute("INSERT INTO runs VALUES (2, 'study', 'h1', '{\"torch\": \"2.9\"}', 'cpu: x86_64, 2 threads', 'abc',"
                 " '2026-12-01T10:20:00+00:00', ?, 'finished')", (ended,))
    conn.execute("INSERT INTO runs VALUES (0, 'study', 'old', '{}', 'gpu', 'x', '2026-11-01T10:00:00+00:00',"
                 " '2026-11-01T20:00:00+00:00', 'finished')")
    conn.executemany("INSERT INTO cells VALUES ('h1', ?)", [("a",), ("b",)])
    conn.executemany("INSERT INTO results VALUES ('h1', ?, 'cpu-v1', ?)", [("a", "ok"), ("b", "ok"), ("b", "error")])
    conn.commit()
    conn.close()


def test_record_sums_the_runs_of_the_current_suite_hash(tmp_path):
    _store(tmp_path / "leakbench.sqlite")
    info = index.record("study", results=tmp_path, out=tmp_path / "pub", load="0.9 1.0 1.1")
    assert info["wall_seconds"] == 20 * 60  # 10 + 10 minutes; the other hash's 10 hours are not counted
    assert info["batteries"] == ["cpu-v1"] and info["cells"] == 2 and info["attack_runs"] == {"ok": 2, "error": 1}
    assert json.loads((tmp_path / "pub" / "run.json").read_text())["load_average"] == "0.9 1.0 1.1"
    assert index.record("study_file_stem", results=tmp_path, out=tmp_path / "pub2")["suite_hash"] == "h1"  # one suite
    with sqlite3.connect(tmp_path / "leakbench.sqlite") as conn:
        conn.execute("INSERT INTO runs VALUES (-1, 'another', 'h9', '{}', 'cpu', 'x', '2026-10-01T10:00:00+00:00',"
                     " '2026-10-01T11:00:00+00:00', 'finished')")
    with pytest.raises(ValueError, match="no run of suite 'other'"):
        index.record("other", results=tmp_path, out=tmp_path / "pub")
    with pytest.raises(FileNotFoundError, match="run the suite first"):
        index.record("study", results=tmp_path / "missing", out=tmp_path / "pub")


def _leaderboard(folder, rows):
    folder.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(folder / "leaderboard.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def test_front_page_shows_each_study_with_its_control_verdict(tmp_path):
    base = {"victim": "lenet", "protocol": "fedsgd(batch_size=1)", "worst_psnr_db": "31.25", "avg_psnr_db": "25.0",
            "leak_rate": "0.75", "leaked_images": "3", "images": "4", "control_leaked_images": "3",
            "control_images": "4", "control_leak_rate": "0.75", "victim_state": "init", "epsilon": ""}
    _leaderboard(tmp_path / "defenses", [
        {**base, "defense": "none"},
        {**base, "defense": "dp_sgd(noise_multiplier=2)", "leak_rate": "0", "leaked_images": "0",
         "worst_psnr_db": "9.5", "epsilon": "12.5", "rero_gamma_observed": "0.41", "rero_kappa": "0.02"},
    ])
    _leaderboard(tmp_path / "weak", [{**base, "defense": "none", "control_leak_rate": "0.25",
                                      "control_leaked_images": "1", "leak_rate": "0", "leaked_images": "0"}])
    _store(tmp_path / "store.sqlite")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "labels.json").write_text(json.dumps({"meta": {"command": "python -m x", "seconds": 5},
        "rows": [{"victim": "lenet", "state": "trained", "test_accuracy": 0.956, "distribution": "unique",
                  "batch_size": 1, "strategy": "idlg", "accuracy": 1.0},
                 {"victim": "lenet", "state": "trained", "test_accuracy": 0.956, "distribution": "unique",
                  "batch_size": 1, "strategy": "geng", "accuracy": None}]}))
    md_path, html_path = index.build(tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    assert "## defenses" in md and "## weak" in md and "## labels" in md
    assert "| lenet | init | dp_sgd(noise_multiplier=2) | fedsgd(batch_size=1) | 9.5 |" in md
    assert "leaks 3/4" in md and "inconclusive (1/4)" in md
    assert "12.500" in md and "0.410" in md  # epsilon and gamma where a row has them
    assert "| lenet | trained (95.6%) | unique | 1 | 100 | n/a |" in md
    assert "<h2>defenses</h2>" in page and "inconclusive (1/4)" in page and "<script" not in page


def test_every_reference_suite_is_published_with_its_run_and_listed():
    """The Makefile's REFERENCE_SUITES, the committed folders under reports/leaderboards and the
    README's table agree: each reference suite has its leaderboard (CSV, Markdown, JSON, HTML) and
    a run.json that names its suite, wall time and cells, and the README links its folder."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    line = next(ln for ln in (root / "Makefile").read_text().splitlines() if ln.startswith("REFERENCE_SUITES ?="))
    suites = line.split("?=", 1)[1].split()
    assert {"architecture", "defenses", "quick"} <= set(suites)
    published = root / "reports" / "leaderboards"
    readme = (published / "README.md").read_text()
    for name in suites:
        folder = published / name
        for file in ("leaderboard.csv", "leaderboard.md", "leaderboard.json", "leaderboard.html", "run.json"):
            assert (folder / file).is_file(), f"{name}: {file} is not committed; run `make leaderboards`"
        run = json.loads((folder / "run.json").read_text())
        assert run["wall_seconds"] > 0 and run["cells"] > 0 and run["runs"], name
        assert re.search(rf"\]\({re.escape(name)}/leaderboard\.md\)", readme), f"README.md does not link {name}/"
    assert (published / "labels" / "labels.json").is_file()
