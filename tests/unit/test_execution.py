"""Packs, executors and the out-of-memory fallback: how work runs never changes what it gives."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3

import torch

from bench.execute import SilentProgress, plan_packs
from bench.store import store_path
from bench.suite import load_suite
from bench.runner import run_suite


def rows(out) -> dict[tuple, tuple]:
    with sqlite3.connect(store_path(out)) as conn:
        return {(c, a, s): (status, psnr, loss, json.loads(ex)) for c, a, s, status, psnr, loss, ex in conn.execute(
            "SELECT cell_key, attack, image_slot, status, psnr_db, matching_loss, execution_json FROM results")}


def same_numbers(a: dict, b: dict, *, tol: float = 1e-3) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == b[key][0] == "ok", key
        assert abs(a[key][1] - b[key][1]) <= tol * max(1.0, abs(a[key][1])), (key, a[key][1], b[key][1])
        assert abs(a[key][2] - b[key][2]) <= tol * max(1e-3, abs(a[key][2])), (key, a[key][2], b[key][2])


def test_packs_are_runs_of_cells_with_one_server_model(tiny_suite_file):
    suite = load_suite(tiny_suite_file(images=5))
    todo = [(cell, list(cell.attacks)) for cell in suite.cells]
    packs = plan_packs(todo, max_cells=2)
    assert [len(p.items) for p in packs] == [2, 2, 1, 2, 2, 1]  # 5 test_tiny cells, then 5 fc cells
    for pack in packs:
        assert len({cell.victim.name for cell, _ in pack.items}) == 1
    assert [cell.key for p in packs for cell, _ in p.items] == [cell.key for cell in suite.cells]


def test_packing_cells_gives_what_each_cell_gives_alone(tiny_suite_file, tmp_path):
    suite = load_suite(tiny_suite_file(images=4, iterations=15))
    run_suite(suite, out_dir=tmp_path / "alone", device="cpu", max_pack=1)
    run_suite(suite, out_dir=tmp_path / "packed", device="cpu", max_pack=4)
    alone, packed = rows(tmp_path / "alone"), rows(tmp_path / "packed")
    same_numbers(alone, packed)
    packs = {r[3]["pack"] for k, r in packed.items() if k[1].startswith("inverting")}
    assert packs == {4} and {r[3]["pack"] for r in alone.values()} == {1}


def test_out_of_memory_splits_the_pack_and_says_so(tiny_suite_file, tmp_path, monkeypatch):
    """A pack that does not fit is halved until it does; the rows record the splits."""
    from bench.attacks.inverting_gradients import InvertingGradients

    real = InvertingGradients.reconstruct_many

    def small_memory(self, observations, *args, **kwargs):
        if len(observations) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, observations, *args, **kwargs)

    monkeypatch.setattr(InvertingGradients, "reconstruct_many", small_memory)
    suite = load_suite(tiny_suite_file(images=4, iterations=5))
    summary = run_suite(suite, out_dir=tmp_path, device="cpu", max_pack=4)
    assert summary.statuses == {"ok": 8}
    ig = [r for k, r in rows(tmp_path).items() if k[1].startswith("inverting")]
    assert len(ig) == 4 and all(r[3]["pack"] == 1 and r[3]["oom_splits"] == 2 for r in ig)


class KillAWorker(SilentProgress):
    """Kills one busy worker process (SIGKILL) when the first result arrives: mid-pack."""

    def __init__(self):
        self.killed = None

    def advance(self, status: str) -> None:
        if self.killed is None:
            workers = [p for p in multiprocessing.active_children() if p.name.startswith("leakbench-worker")]
            if workers:
                self.killed = workers[0].pid
                os.kill(self.killed, signal.SIGKILL)


def test_process_workers_match_local_and_survive_a_killed_worker(tiny_suite_file, tmp_path):
    suite = load_suite(tiny_suite_file(images=4, iterations=10))
    run_suite(suite, out_dir=tmp_path / "local", device="cpu", max_pack=2)
    progress = KillAWorker()
    summary = run_suite(suite, out_dir=tmp_path / "procs", device="cpu", max_pack=2, executor="processes", workers=2,
                        progress=progress)
    assert progress.killed is not None
    assert summary.statuses == {"ok": 8}  # every (cell, attack) once, none lost
    local, procs = rows(tmp_path / "local"), rows(tmp_path / "procs")
    same_numbers(local, procs)
    executions = [r[3] for r in procs.values()]
    assert all(e["executor"] == "processes" for e in executions)
    assert any(e.get("attempt") == 2 for e in executions)  # the killed worker's pack ran again, recorded


def test_gpu_pack_limit_is_what_the_measured_free_memory_holds(tiny_suite_file, monkeypatch):
    """On a GPU: packs of at most MEMORY_HEADROOM x free memory / one reconstruction's probed peak,
    never above --pack-size, at least 1; probed once per (attack, observation shape)."""
    import bench.execute as execute
    from bench.execute import MEMORY_HEADROOM, Worker, _Prepared

    suite = load_suite(tiny_suite_file(images=2))
    worker = Worker(suite, device=torch.device("cpu"), max_pack=16)
    worker.device = torch.device("cuda")  # only _pack_limit reads it here; nothing is allocated
    probes = []
    monkeypatch.setattr(execute, "_probe_memory", lambda spec, sample, device: probes.append(1) or 100 * 2**20)
    free = {"bytes": 1024 * 2**20}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))

    class Packable:
        def pack_signature(self, observation):
            return ("shape",)

    spec = suite.cells[0].attacks[0]
    sample = _Prepared(cell=suite.cells[0], batch=None)
    limit, source = worker._pack_limit(spec, Packable(), sample)
    assert limit == int(MEMORY_HEADROOM * 1024 // 100) == 7 and source == "measured GPU memory"
    worker._pack_limit(spec, Packable(), sample)
    assert len(probes) == 1  # cached
    worker._limits.clear()
    free["bytes"] = 10 * 2**20  # not even one fits: still packs of one (an OOM then gives oom rows)
    assert worker._pack_limit(spec, Packable(), sample)[0] == 1
    worker._limits.clear()
    free["bytes"] = 80 * 2**30
    assert worker._pack_limit(spec, Packable(), sample)[0] == 16  # capped by --pack-size
