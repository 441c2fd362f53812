"""``kill -9`` at chosen points of a run with several attacks per cell: after resuming, every
(cell, attack) is stored once and each cell's flags agree with its rows.

The fixed kill points land right after a (cell, attack) write (``LEAKBENCH_KILL_AT=results:N``),
which is where a cell's flags were once written in a second transaction; the random ones land
at seeded moments inside attacks (the store watched, then a random delay).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from runwatch import wait_for_attack_runs

from leakbench.running import sanity
from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import load_suite

# 3 undefended batch-1 cells (no_leak_undefended is watched there) x 3 attacks, too short (DLG) or too slow
# (Inverting Gradients at lr 0.001) to leak
SUITE = """
[suite]
name = "kills"
seed = 5
images = 3
leak_threshold = { metric = "psnr_db", value = 15.0 }

[dataset]
name = "photos"
side = 16

[[case]]
victim = "test_tiny"
protocol = { name = "fedsgd", batch_size = 1 }
labels = "idlg"
[[case.attacks]]
name = "inverting_gradients"
iterations = ITER
lr = 0.001
[[case.attacks]]
name = "inverting_gradients"
iterations = ITER
restarts = 2
lr = 0.001
[[case.attacks]]
name = "dlg"
iterations = DLG_ITER
"""

CELLS, ATTACKS = 3, 3


def suite_file(tmp_path: Path, iterations: int, dlg_iterations: int | None = None) -> Path:
    path = tmp_path / "kills.toml"
    text = SUITE.replace("DLG_ITER", str(iterations if dlg_iterations is None else dlg_iterations))
    path.write_text(textwrap.dedent(text.replace("ITER", str(iterations))))
    return path


def start(path: Path, out: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "leakbench", "run", str(path), "--out", str(out), "--device", "cpu", "-q",
         "--pack-size", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def rows(out: Path) -> list[tuple]:
    with sqlite3.connect(store_path(out)) as conn:
        return conn.execute("SELECT cell_key, attack_key, image_slot, run_id FROM results").fetchall()


def grey_db(conn: sqlite3.Connection, cell_key: str) -> float:
    """The grey-image PSNR of the cell's stored ground-truth image (the bar of no_leak_undefended)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    png = conn.execute("SELECT png FROM images WHERE cell_key = ? AND attack_key = ''", (cell_key,)).fetchone()[0]
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    return sanity.grey_psnr_db(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0]


def assert_consistent(out: Path) -> None:
    """Every (cell, attack, image) once, and each cell's no_leak_undefended flag as its rows imply."""
    keys = [r[:3] for r in rows(out)]
    assert len(keys) == len(set(keys)) == CELLS * ATTACKS
    with sqlite3.connect(store_path(out)) as conn:
        cells = conn.execute("SELECT cell_key, cell_flags_json FROM cells").fetchall()
        assert len(cells) == CELLS
        for cell_key, flags_json in cells:
            psnrs = [r[0] for r in conn.execute("SELECT psnr_db FROM results WHERE cell_key = ?", (cell_key,))]
            assert len(psnrs) == ATTACKS
            expected = sanity.leak_flags(psnrs, grey_db=grey_db(conn, cell_key))
            assert expected == ["no_leak_undefended"]  # the tiny budget leaks nothing: the flag must be there
            assert "no_leak_undefended" in json.loads(flags_json), (cell_key, flags_json)


def resume(path: Path, out: Path, before: list[tuple]) -> None:
    summary = run_suite(load_suite(path), out_dir=out, device="cpu", max_pack=1)
    assert summary.skipped == len({r[:2] for r in before})
    after = {r[:3]: r[3] for r in rows(out)}
    assert all(after[r[:3]] == r[3] for r in before)  # finished rows untouched
    assert_consistent(out)


@pytest.mark.parametrize("writes", [ATTACKS, ATTACKS + 1])
def test_kill_right_after_a_write_keeps_flags_and_rows_agreeing(tmp_path, writes):
    """``writes = ATTACKS``: killed right after a cell's last attack is stored, before anything else."""
    path, out = suite_file(tmp_path, 3), tmp_path / "out"
    proc = start(path, out, LEAKBENCH_KILL_AT=f"results:{writes}")
    proc.wait(timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    before = rows(out)
    assert len({r[:2] for r in before}) == writes
    resume(path, out, before)


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_random_moments_inside_attacks(tmp_path, seed):
    # any two attacks take longer than the delay below plus the watcher's 0.2 s polling (here
    # about 0.4 s for Inverting Gradients at 300 iterations, 0.4 s for DLG at 30), so the
    # kill lands before the last of them ends
    path, out = suite_file(tmp_path, 300, dlg_iterations=30), tmp_path / "out"
    rng = random.Random(seed)
    proc = start(path, out)
    try:
        wait_for_attack_runs(proc, out, rng.randint(1, CELLS * ATTACKS - 2), timeout_s=240)
        time.sleep(rng.uniform(0.0, 0.6))  # mostly inside the next attack's iterations
        assert proc.poll() is None, "the run finished before it could be killed; raise the iterations"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = rows(out)
    assert 1 <= len({r[:2] for r in before}) < CELLS * ATTACKS
    resume(path, out, before)


@pytest.mark.parametrize("executor", ["local", "processes"])
def test_ctrl_c_stops_soon_keeps_finished_rows_and_says_how_to_resume(tmp_path, executor):
    path, out = suite_file(tmp_path, 600), tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "leakbench", "run", str(path), "--out", str(out), "--device", "cpu", "-q",
         "--pack-size", "1", "--executor", executor],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a shell that starts a job in the background (nohup ... &, some CI runners) makes it ignore SIGINT, and
        # children inherit that; a terminal's Ctrl-C reaches a process that does not ignore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_attack_runs(proc, out, 1, timeout_s=240)
        assert proc.poll() is None, "the run finished before it could be interrupted; raise the iterations"
        before = rows(out)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = err.decode()
    assert proc.returncode == 130, err
    assert waited < 30, f"took {waited:.1f} s to stop"  # a few seconds on an idle machine; generous under load
    assert "Traceback" not in err and f"Resume with: leakbench run {path} --out {out}" in err, err
    assert set(before) <= set(rows(out))  # every finished row kept
