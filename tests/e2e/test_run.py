"""End to end on the embedded photos: run, resume, crash-resume, failures as rows, bad input."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from runwatch import wait_for_attack_runs

from leakbench.cli import main
from leakbench.running.runner import run_suite
from leakbench.store import SCHEMA_VERSION, Store, StoreError, store_path
from leakbench.suite import load_suite, parse_suite


def result_keys(out: Path) -> list[tuple]:
    with sqlite3.connect(store_path(out)) as conn:
        return conn.execute("SELECT cell_key, attack_key, image_slot, run_id, status FROM results").fetchall()


def test_run_then_rerun_does_no_attack_work(tiny_suite_file, tmp_path):
    suite = load_suite(tiny_suite_file(images=2, iterations=5))
    out = tmp_path / "out"
    first = run_suite(suite, out_dir=out, device="cpu")
    assert first.statuses == {"ok": 4}  # 2 cells x 1 attack, twice
    rows = result_keys(out)
    assert len(rows) == 4 and {r[4] for r in rows} == {"ok"}
    second = run_suite(suite, out_dir=out, device="cpu")
    assert second.statuses == {} and second.skipped == second.attack_runs == 4
    assert result_keys(out) == rows  # nothing rewritten
    with Store(store_path(out), readonly=True) as store:
        runs = store.runs()
        assert [r["status"] for r in runs] == ["finished", "finished"]
        assert runs[0]["suite_hash"] == suite.hash and runs[0]["versions_json"]


def test_same_suite_same_numbers(tiny_suite_file, tmp_path):
    suite = load_suite(tiny_suite_file(images=1, iterations=5))
    run_suite(suite, out_dir=tmp_path / "a", device="cpu")
    run_suite(suite, out_dir=tmp_path / "b", device="cpu")
    q = "SELECT cell_key, attack_key, image_slot, psnr_db, ssim, matching_loss FROM results ORDER BY 1, 2, 3"
    with sqlite3.connect(store_path(tmp_path / "a")) as a, sqlite3.connect(store_path(tmp_path / "b")) as b:
        assert a.execute(q).fetchall() == b.execute(q).fetchall()


def test_crash_mid_run_resumes_without_duplicates_or_losses(tiny_suite_file, tmp_path):
    path = tiny_suite_file(images=6, iterations=150)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # --pack-size 1: rows arrive one (cell, attack) at a time, so the kill lands between them
    # (a pack's rows arrive together, and the analytic cells after them take milliseconds)
    proc = subprocess.Popen([sys.executable, "-m", "leakbench", "run", str(path), "--out", str(out), "--device", "cpu", "-q",
                             "--pack-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_for_attack_runs(proc, out, 2, timeout_s=600)  # returns as soon as they are in; long for a loaded machine
        assert proc.poll() is None, "the run finished before it could be killed; raise the budget"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {r[:3]: r[3] for r in result_keys(out)}
    assert 2 <= len(before) < 12
    suite = load_suite(path)
    summary = run_suite(suite, out_dir=out, device="cpu")
    after = result_keys(out)
    keys = [r[:3] for r in after]
    assert len(keys) == len(set(keys)) == 12  # 12 cells x 1 attack x 1 image, each once
    assert summary.skipped == len({k[:2] for k in before})  # finished pairs were not redone
    assert all(dict((r[:3], r[3]) for r in after)[k] == run for k, run in before.items())
    with Store(store_path(out), readonly=True) as store:
        assert [r["status"] for r in store.runs()] == ["running", "finished"]  # the killed run stays visible


def test_failures_are_rows_with_a_status(tmp_path):
    text = """
    [suite]
    name = "fail"
    images = 2
    [dataset]
    name = "photos"
    side = 16
    [[case]]
    victim = "test_tiny"
    [[case.attacks]]
    name = "analytic_fc"          # no fully connected first layer: an error row, with the reason
    [[case.attacks]]
    name = "inverting_gradients"
    iterations = 100000
    timeout_s = 0.5               # runs out of time: a timeout row
    """
    import textwrap

    suite = parse_suite(textwrap.dedent(text))
    summary = run_suite(suite, out_dir=tmp_path, device="cpu")
    assert summary.statuses == {"error": 2, "timeout": 2}
    with sqlite3.connect(store_path(tmp_path)) as conn:
        rows = conn.execute("SELECT attack, status, error, psnr_db FROM results").fetchall()
    assert len(rows) == 4
    errors = [r for r in rows if r[0] == "analytic_fc"]
    assert all(r[1] == "error" and "fully connected" in r[2] and r[3] is None for r in errors)
    assert all(r[1] == "timeout" and "time budget" in r[2] for r in rows if r[0] == "inverting_gradients")
    # --retry-failed runs them again
    again = run_suite(suite, out_dir=tmp_path, device="cpu", retry_failed=True)
    assert again.skipped == 0 and sum(again.statuses.values()) == 4


BAD_BASE = """
[suite]
name = "b"
images = 2
[dataset]
name = "photos"
side = 16
[[case]]
victim = "test_tiny"
protocol = { name = "fedsgd", batch_size = 1 }
[[case.attacks]]
name = "inverting_gradients"
iterations = 3
"""


@pytest.mark.parametrize(
    "old,new,path,needle",
    [
        ("iterations = 3", "iteratons = 3", "case[0].attacks[0].iteratons", "did you mean 'iterations'"),
        ('victim = "test_tiny"', 'victim = "lenett"', "case[0].victim.name", "unknown victim"),
        ('name = "photos"', 'name = "fotos"', "dataset.name", "unknown dataset"),
        ('name = "inverting_gradients"', 'name = "inverting"', "case[0].attacks[0].name", "unknown attack"),
        ('[[case.attacks]]', 'defense = "noise"\n[[case.attacks]]', "case[0].defense.name", "unknown defense"),
        ("iterations = 3", 'iterations = "3"', "case[0].attacks[0].iterations", "must be int"),
        ("iterations = 3", "iterations = -3", "case[0].attacks[0].iterations", "impossible value"),
        ("batch_size = 1", "batch_size = 3", "case[0].protocol.batch_size", "larger than the 2 images"),
    ],
)
def test_bad_suite_exits_2_names_the_path_and_writes_nothing(tmp_path, capsys, old, new, path, needle):
    assert old in BAD_BASE
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_BASE.replace(old, new, 1))
    out = tmp_path / "out"
    assert main(["run", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = next((ln for ln in err.splitlines() if ln.strip().startswith(path + ":")), None)
    assert line is not None and needle in line, err
    assert not out.exists()
    assert main(["check", str(bad)]) == 2


def test_newer_store_is_refused(tmp_path):
    path = store_path(tmp_path)
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer leakbench"):
        Store(path)


def test_cli_run_prints_leaderboard_and_report_path(tiny_suite_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_suite_file(images=1, iterations=5)), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "test_tiny" in printed and "fc(hidden=32)" in printed
    report = out / "report.html"
    assert f"HTML report: {report}" in printed and report.is_file()
    assert (out / "leaderboard.csv").is_file()
    assert main(["check", str(tiny_suite_file(images=1, iterations=5))]) == 0
    assert main(["list", "victim", "res*"]) == 0
    assert "resnet18" in capsys.readouterr().out


def test_a_second_run_on_the_same_store_is_refused(tiny_suite_file, tmp_path):
    from leakbench.store import run_lock

    suite = load_suite(tiny_suite_file(images=1, iterations=2))
    with run_lock(tmp_path):
        with pytest.raises(StoreError, match="another leakbench run"):
            run_suite(suite, out_dir=tmp_path, device="cpu")
    assert run_suite(suite, out_dir=tmp_path, device="cpu").statuses  # free again once released
