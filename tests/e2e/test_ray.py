"""The Ray executor on a local Ray instance (2 CPUs): the local executor's rows, a killed
worker's pack retried and recorded, a killed driver resumed from the store."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from leakbench.running.runner import run_suite  # noqa: E402
from leakbench.store import Store, store_path  # noqa: E402
from leakbench.suite import load_suite  # noqa: E402
from runwatch import wait_for_attack_runs  # noqa: E402

ROWS = ("SELECT cell_key, attack_key, image_slot, status, psnr_db, ssim, lpips, matching_loss, label_accuracy, "
        "matched_slot FROM results ORDER BY 1, 2, 3")
HAS_PROC = Path("/proc/self/stat").exists()


def rows(out: Path) -> list[tuple]:
    with sqlite3.connect(store_path(out)) as conn:
        return conn.execute(ROWS).fetchall()


def executions(out: Path) -> dict[tuple, dict]:
    with sqlite3.connect(store_path(out)) as conn:
        found = conn.execute("SELECT cell_key, attack_key, image_slot, execution_json FROM results").fetchall()
    return {r[:3]: json.loads(r[3]) for r in found}


@pytest.fixture
def one_thread():
    """The Ray tasks each hold one CPU and use one thread; the local run does the same, so
    floating-point reductions happen in the same order and the numbers are identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    if ray.is_initialized():  # a failed test must not leave its instance to the next one
        ray.shutdown()
        pytest.fail("the Ray executor left its Ray instance running")


def test_ray_gives_the_local_executors_rows(tiny_suite_file, tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))  # reaches the workers through runtime_env
    suite = load_suite(tiny_suite_file(images=2, iterations=20))
    local = run_suite(suite, out_dir=tmp_path / "local", device="cpu")
    remote = run_suite(suite, out_dir=tmp_path / "ray", device="cpu", executor="ray", workers=2)
    assert local.statuses == remote.statuses == {"ok": 4}
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
    assert {e["executor"] for e in executions(tmp_path / "ray").values()} == {"ray"}
    assert not any("attempt" in e for e in executions(tmp_path / "ray").values())


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def _running_packs() -> list[int]:
    """Ray workers of this test's Ray instance that are running a pack (Ray titles them ``ray::<task>``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::_run_pack") and os.getpid() in _ancestors(int(entry)):
            found.append(int(entry))
    return found


class PackKiller(threading.Thread):
    """SIGKILLs the first Ray worker seen running a pack for ``after_s`` seconds, once."""

    def __init__(self, after_s: float = 3.0):
        super().__init__(daemon=True)
        self.after_s = after_s
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        first_seen: dict[int, float] = {}
        while not self.stop.is_set() and self.killed is None:
            now = time.monotonic()
            running = _running_packs()
            first_seen = {pid: first_seen.get(pid, now) for pid in running}
            for pid, since in first_seen.items():
                if now - since >= self.after_s and pid in _running_packs():
                    os.kill(pid, signal.SIGKILL)
                    self.killed = pid
                    break
            time.sleep(0.2)


@pytest.mark.skipif(not HAS_PROC, reason="finds the Ray worker through /proc")
def test_a_killed_worker_costs_only_its_pack_which_is_retried_and_recorded(tiny_suite_file, tmp_path, one_thread,
                                                                          caplog):
    suite = load_suite(tiny_suite_file(images=2, iterations=1500))
    killer = PackKiller(after_s=3.0)
    killer.start()
    try:
        with caplog.at_level("WARNING", logger="leakbench.running.executors.ray"):
            summary = run_suite(suite, out_dir=tmp_path, device="cpu", executor="ray", workers=2)
    finally:
        killer.stop.set()
        killer.join(timeout=5)
    assert killer.killed is not None, "no pack ran long enough to be killed; raise the iterations"
    assert summary.statuses == {"ok": 4}
    keys = [r[:3] for r in rows(tmp_path)]
    assert len(keys) == len(set(keys)) == 4  # 2 cells x 2 cases, one image each, each once
    attempts = [e.get("attempt", 1) for e in executions(tmp_path).values()]
    assert 2 in attempts and set(attempts) <= {1, 2}
    assert "its worker was lost" in caplog.text and "attempt 2 of 3" in caplog.text
    with Store(store_path(tmp_path), readonly=True) as store:
        assert [r["status"] for r in store.runs()] == ["finished"]


@pytest.mark.skipif(not HAS_PROC, reason="counts the store's rows while the driver runs")
def test_a_killed_ray_driver_resumes_from_the_store(tiny_suite_file, tmp_path, one_thread):
    path = tiny_suite_file(images=4, iterations=400)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "leakbench", "run", str(path), "--out", str(out), "--device", "cpu", "-q",
           "--executor", "ray", "--workers", "2", "--pack-size", "1"]
    # A session of its own: the driver's local Ray instance goes with it when the test cleans up.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_attack_runs(proc, out, 2, timeout_s=150)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its Ray instance is still there
        except ProcessLookupError:
            pass
    before = {r[:3]: r for r in rows(out)}
    assert 2 <= len(before) < 8
    summary = run_suite(load_suite(path), out_dir=out, device="cpu", executor="ray", workers=2, max_pack=1)
    after = rows(out)
    keys = [r[:3] for r in after]
    assert len(keys) == len(set(keys)) == 8  # 4 images x 2 cases, each once
    assert summary.skipped == len({k[:2] for k in before})
    assert all(dict((r[:3], r) for r in after)[k] == r for k, r in before.items())  # written rows stay as they were
    with Store(store_path(out), readonly=True) as store:
        assert [r["status"] for r in store.runs()] == ["running", "finished"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_nobody_listens_on_is_a_clear_error(tiny_suite_file, tmp_path):
    suite = load_suite(tiny_suite_file(images=1, iterations=2))
    started = time.monotonic()
    with pytest.raises(ValueError, match="cannot reach the Ray cluster at 127.0.0.1"):
        run_suite(suite, out_dir=tmp_path, device="cpu", executor="ray", ray_address=f"127.0.0.1:{_free_port()}")
    assert time.monotonic() - started < 30


def test_workers_get_the_drivers_cache_locations(tmp_path, monkeypatch):
    from leakbench.running.executors.ray import worker_env

    monkeypatch.chdir(tmp_path)
    env = worker_env({"LEAKBENCH_CACHE": "cache", "TORCH_HOME": "~/torch", "HOME": "/x", "XDG_CACHE_HOME": ""})
    assert env == {"LEAKBENCH_CACHE": str(tmp_path / "cache"), "TORCH_HOME": "~/torch"}


def test_a_cuda_run_on_a_cluster_without_gpus_stops_at_once(tiny_suite_file):
    from leakbench.running.executors.ray import RayExecutor

    suite = load_suite(tiny_suite_file(images=1, iterations=2))
    with pytest.raises(ValueError, match="has no GPU"):
        RayExecutor(suite, device=torch.device("cuda"), max_pack=8, workers=1)
    # no_ray_left checks that the instance it started was shut down
