"""Watching a ``leakbench run`` subprocess through its store, to kill it mid-run."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path

from leakbench.store import store_path


def attack_runs(out: Path) -> int:
    """Distinct (cell, attack) runs with rows in the store under ``out``; 0 before it exists or while it is locked."""
    if not store_path(out).exists():
        return 0
    try:
        with sqlite3.connect(store_path(out)) as conn:
            return conn.execute("SELECT COUNT(DISTINCT cell_key || attack_key) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def wait_for_attack_runs(proc: subprocess.Popen, out: Path, count: int, *, timeout_s: float) -> None:
    """Poll every 0.2 s until the store holds ``count`` attack runs, ``proc`` ends, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if attack_runs(out) >= count:
            return
        time.sleep(0.2)
