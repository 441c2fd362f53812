"""Packs, executors and the out-of-memory fallback: how work runs never changes what it gives."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import sys

import pytest
import torch

from leakbench.core import memory
from leakbench.running.packs import plan_packs
from leakbench.running.progress import SilentProgress
from leakbench.store import store_path
from leakbench.suite import load_suite
from leakbench.running.runner import run_suite


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


def test_gradinversion_packs_too_and_channels_last_is_recorded(tiny_suite_file, tmp_path):
    """GradInversion packs across cells in the runner, and ``--channels-last`` gives the same numbers
    (values unchanged, only strides) and says so in every row's execution record."""
    from leakbench.core import Acceleration
    from leakbench.core.acceleration import backend_flags

    flags = backend_flags()

    suite = load_suite(tiny_suite_file(images=3, iterations=12, extra_attack="""
        [[case.attacks]]
        name = "gradinversion"
        iterations = 12
        restarts = 2
        warmup = 2
        bn_prior = "none"
        """))
    run_suite(suite, out_dir=tmp_path / "alone", device="cpu", max_pack=1)
    run_suite(suite, out_dir=tmp_path / "packed", device="cpu", max_pack=3,
              acceleration=Acceleration(channels_last=True))
    alone, packed = rows(tmp_path / "alone"), rows(tmp_path / "packed")
    same_numbers(alone, packed)
    assert {r[3]["pack"] for k, r in packed.items() if k[1].startswith("gradinversion")} == {3}
    assert all(r[3]["acceleration"] == {"channels_last": True} for r in packed.values())
    assert all("acceleration" not in r[3] for r in alone.values())  # plain fp32 names no speed-up
    assert backend_flags() == flags  # torch's TF32 switches are back as they were


OUT_OF_MEMORY = {
    "cuda": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu allocator": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                          "can't allocate memory: you tried to allocate 2147483648 bytes."),
    "python": lambda: MemoryError(),
}


@pytest.mark.parametrize("error", OUT_OF_MEMORY)
def test_out_of_memory_splits_the_pack_and_says_so(tiny_suite_file, tmp_path, monkeypatch, error):
    """A pack that does not fit (on a GPU or a CPU) is halved until it does; the rows record the splits."""
    from leakbench.attacks.inverting_gradients import InvertingGradients

    real = InvertingGradients.reconstruct_many

    def small_memory(self, observations, *args, **kwargs):
        if len(observations) > 1:
            raise OUT_OF_MEMORY[error]()
        return real(self, observations, *args, **kwargs)

    monkeypatch.setattr(InvertingGradients, "reconstruct_many", small_memory)
    suite = load_suite(tiny_suite_file(images=4, iterations=5))
    summary = run_suite(suite, out_dir=tmp_path, device="cpu", max_pack=4)
    assert summary.statuses == {"ok": 8}
    ig = [r for k, r in rows(tmp_path).items() if k[1].startswith("inverting")]
    assert len(ig) == 4 and all(r[3]["pack"] == 1 and r[3]["oom_splits"] == 2 for r in ig)


class KillAWorker(SilentProgress):
    """Kills the worker processes (SIGKILL) when the first result arrives: the worker that sent it
    may already be idle, the other is mid-pack, so at least one pack is lost and retried."""

    def __init__(self):
        self.killed = None

    def advance(self, status: str) -> None:
        if self.killed is None:
            workers = [p for p in multiprocessing.active_children() if p.name.startswith("leakbench-worker")]
            if workers:
                self.killed = [w.pid for w in workers]
                for pid in self.killed:
                    os.kill(pid, signal.SIGKILL)


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
    # the two CPU workers share the machine's memory: each plans packs for half of it
    assert {e["limit_from"] for e in executions if "limit_from" in e} == {"measured CPU memory (a 0.5 share)"}


def test_gpu_pack_limit_is_what_the_measured_free_memory_holds(tiny_suite_file, monkeypatch):
    """On a GPU: packs of at most MEMORY_HEADROOM x free memory / one reconstruction's probed peak,
    never above --pack-size, at least 1; probed once per (attack, observation shape)."""
    import leakbench.running.sizing as execute
    from leakbench.running.client import Prepared as _Prepared
    from leakbench.running.sizing import MEMORY_HEADROOM
    from leakbench.running.worker import Worker

    suite = load_suite(tiny_suite_file(images=2))
    worker = Worker(suite, device=torch.device("cpu"), max_pack=16)
    worker.sizer.device = torch.device("cuda")  # only the pack sizing reads it here; nothing is allocated
    probes = []
    monkeypatch.setattr(execute, "probe_memory", lambda spec, sample, device, acceleration=None: probes.append(1) or 100 * 2**20)
    free = {"bytes": 1024 * 2**20}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))

    class Packable:
        def pack_signature(self, observation):
            return ("shape",)

    spec = suite.cells[0].attacks[0]
    sample = _Prepared(cell=suite.cells[0], batch=None)
    limit, source = worker.sizer.limit(spec, Packable(), sample)
    assert limit == int(MEMORY_HEADROOM * 1024 // 100) == 7 and source == "measured GPU memory"
    worker.sizer.limit(spec, Packable(), sample)
    assert len(probes) == 1  # cached
    worker.sizer.limits.clear()
    free["bytes"] = 10 * 2**20  # not even one fits: still packs of one (an OOM then gives oom rows)
    assert worker.sizer.limit(spec, Packable(), sample)[0] == 1
    worker.sizer.limits.clear()
    free["bytes"] = 80 * 2**30
    assert worker.sizer.limit(spec, Packable(), sample)[0] == 16  # capped by --pack-size


class Packable:
    packable = True

    def pack_signature(self, observation):
        return ("shape",)


def test_cpu_pack_limit_is_what_the_measured_available_memory_holds(tiny_suite_file, monkeypatch):
    """On a CPU: the GPU's arithmetic with the probed peak resident set and the available RAM."""
    import leakbench.running.sizing as execute
    from leakbench.running.client import Prepared as _Prepared
    from leakbench.running.sizing import MEMORY_HEADROOM
    from leakbench.running.worker import Worker

    suite = load_suite(tiny_suite_file(images=2))
    worker = Worker(suite, device=torch.device("cpu"), max_pack=16)
    probes = []
    monkeypatch.setattr(execute, "probe_memory", lambda spec, sample, device, acceleration=None: probes.append(device) or 300 * 2**20)
    free = {"bytes": 2048 * 2**20}
    monkeypatch.setattr(memory, "free_cpu_bytes", lambda: free["bytes"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("a CPU worker asked CUDA"))

    spec = suite.cells[0].attacks[0]
    sample = _Prepared(cell=suite.cells[0], batch=None)
    limit, source = worker.sizer.limit(spec, Packable(), sample)
    assert limit == int(MEMORY_HEADROOM * 2048 // 300) == 4 and source == "measured CPU memory"
    assert worker.sizer.limit(spec, Packable(), sample) == (4, "measured CPU memory")
    assert probes == [torch.device("cpu")]  # cached per (attack, observation shape)
    worker.sizer.limits.clear()
    free["bytes"] = 100 * 2**20  # not even one fits: still packs of one (an allocation failure then gives oom rows)
    assert worker.sizer.limit(spec, Packable(), sample) == (1, "measured CPU memory")
    worker.sizer.limits.clear()
    free["bytes"] = 64 * 2**30
    assert worker.sizer.limit(spec, Packable(), sample) == (16, "measured CPU memory")  # capped by --pack-size
    # two CPU workers on one machine (--executor processes --workers 2) each plan for half the headroom
    halved = Worker(suite, device=torch.device("cpu"), max_pack=16, memory_share=0.5)
    free["bytes"] = 2048 * 2**20
    assert halved.sizer.limit(spec, Packable(), sample) == (int(MEMORY_HEADROOM * 1024 // 300),
                                                            "measured CPU memory (a 0.5 share)")


def test_the_pack_size_is_the_fastest_by_timing_for_long_attacks(tiny_suite_file, monkeypatch):
    """Up to the memory limit, the pack size with the least time per reconstruction and iteration wins:
    packing can be slower (measured on this CPU for ResNet-18); short attacks are not timed."""
    import leakbench.running.sizing as execute
    from leakbench.running.client import Prepared as _Prepared
    from leakbench.running.sizing import TIMING_MIN_ITERATIONS
    from leakbench.running.worker import Worker

    suite = load_suite(tiny_suite_file(images=2, iterations=TIMING_MIN_ITERATIONS))
    spec = suite.cells[0].attacks[0]
    sample = _Prepared(cell=suite.cells[0], batch=None)
    monkeypatch.setattr(execute, "probe_memory", lambda spec, sample, device, acceleration=None: 2**20)
    seconds = {1: 1.0, 2: 1.5, 4: 2.4, 8: 6.4}  # per pack: 4 is the fastest per reconstruction (0.6 s)
    timed = []
    monkeypatch.setattr(execute, "iteration_seconds",
                        lambda spec, sample, copies, device, acceleration=None: timed.append(copies) or seconds[copies])
    worker = Worker(suite, device=torch.device("cpu"), max_pack=8)
    limit, source = worker.sizer.limit(spec, Packable(), sample)
    assert limit == 4 and sorted(timed) == [1, 2, 4, 8]
    assert source.startswith("measured CPU memory; fastest by timing") and "4: 600" in source
    assert worker.sizer.limit(spec, Packable(), sample) == (limit, source) and len(timed) == 4  # cached

    seconds.update({2: 2.5, 4: 5.0, 8: 10.0})  # packing slower than one by one: packs of one
    worker.sizer.limits.clear()
    assert worker.sizer.limit(spec, Packable(), sample)[0] == 1

    def broken(spec, sample, copies, device, acceleration=None):
        raise RuntimeError("no clock")

    monkeypatch.setattr(execute, "iteration_seconds", broken)
    worker.sizer.limits.clear()
    assert worker.sizer.limit(spec, Packable(), sample) == (
        8, "measured CPU memory; not timed (RuntimeError: no clock)")

    short = load_suite(tiny_suite_file(images=2, iterations=TIMING_MIN_ITERATIONS - 1))
    worker = Worker(short, device=torch.device("cpu"), max_pack=8)
    assert worker.sizer.limit(short.cells[0].attacks[0], Packable(), sample) == (8, "measured CPU memory")


def test_iteration_seconds_times_a_real_pack(tiny_suite_file):
    from leakbench.running.sizing import iteration_seconds as _iteration_seconds
    from leakbench.running.worker import Worker

    suite = load_suite(tiny_suite_file(images=1))
    worker = Worker(suite, device=torch.device("cpu"), max_pack=4)
    sample, _ = worker.client.prepare(suite.cells[0], SilentProgress())
    one = _iteration_seconds(suite.cells[0].attacks[0], sample, 1, worker.device)
    assert 0 < one < 5


@pytest.mark.parametrize("missing", ["_CLEAR_REFS", "_PROC_STATUS", "_MEMINFO"])
def test_cpu_memory_not_measurable_falls_back_to_max_pack(tiny_suite_file, monkeypatch, tmp_path, missing):
    """No /proc (macOS), or a /proc file not there or not writable (a locked-down container): packs of
    --pack-size, saying why, once per key; without a way to read and reset the peak, the probe does not run."""
    import leakbench.running.sizing as execute
    from leakbench.running.client import Prepared as _Prepared
    from leakbench.running.worker import Worker

    suite = load_suite(tiny_suite_file(images=2))
    worker = Worker(suite, device=torch.device("cpu"), max_pack=16)
    monkeypatch.setattr(memory, missing, str(tmp_path / "no-such-dir" / "file"))
    runs = []
    monkeypatch.setattr(execute, "probe_run", lambda spec, sample, **kw: lambda: runs.append(1))

    spec = suite.cells[0].attacks[0]
    sample = _Prepared(cell=suite.cells[0], batch=None)
    limit, source = worker.sizer.limit(spec, Packable(), sample)
    assert limit == 16 and source.startswith("max_pack (memory not measured: ") and "no-such-dir" in source
    assert worker.sizer.limit(spec, Packable(), sample) == (limit, source)
    assert runs == ([1] if missing == "_MEMINFO" else [])


def test_a_failing_probe_falls_back_to_max_pack(tiny_suite_file, monkeypatch):
    """The probe is a real reconstruction; if it fails, the packed call runs anyway (its rows then say why)."""
    import leakbench.running.sizing as execute
    from leakbench.running.client import Prepared as _Prepared
    from leakbench.running.worker import Worker

    suite = load_suite(tiny_suite_file(images=2))
    worker = Worker(suite, device=torch.device("cpu"), max_pack=16)

    def broken(spec, sample, **kw):
        raise ValueError("no such thing\nsecond line")

    monkeypatch.setattr(execute, "probe_run", broken)
    sample = _Prepared(cell=suite.cells[0], batch=None)
    assert worker.sizer.limit(suite.cells[0].attacks[0], Packable(), sample) == (
        16, "max_pack (memory not measured: the probe failed: ValueError: no such thing)")


def meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_free_cpu_bytes_is_the_available_ram():
    from leakbench.core.memory import free_cpu_bytes

    assert 0 < free_cpu_bytes() <= meminfo_kib("MemTotal") * 1024


def test_free_cpu_bytes_stays_under_cgroup_v2_limits(monkeypatch, tmp_path):
    """Under cgroup v2, each limited level (the process's cgroup or an ancestor) caps the free bytes at
    its limit less its usage, inactive page cache counted as free; "max" levels do not cap."""

    (tmp_path / "meminfo").write_text("MemTotal:       8000000 kB\nMemAvailable:   4194304 kB\n")  # 4 GiB
    (tmp_path / "cgroup").write_text("12:memory:/ignored-v1\n0::/pod/job\n")
    root = tmp_path / "fs"
    for group, limit, current, inactive in [("pod", 3 * 2**30, 2 * 2**30, 0),
                                            ("pod/job", "max", 2**30, 0)]:
        (root / group).mkdir(parents=True)
        (root / group / "memory.max").write_text(f"{limit}\n")
        (root / group / "memory.current").write_text(f"{current}\n")
        (root / group / "memory.stat").write_text(f"anon 1000\ninactive_file {inactive}\nactive_file 5\n")
    monkeypatch.setattr(memory, "_MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(memory, "_PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(memory, "_CGROUP_ROOT", str(root))
    assert memory.free_cpu_bytes() == 2**30  # the pod: 3 GiB limit, 2 GiB used

    (root / "pod/job/memory.max").write_text(f"{int(1.5 * 2**30)}\n")
    (root / "pod/job/memory.stat").write_text(f"inactive_file {2**29}\n")
    assert memory.free_cpu_bytes() == 2**30  # the job: 1.5 GiB limit, 1 GiB used of which 0.5 GiB reclaimable

    (root / "pod/job/memory.max").write_text(f"{2**30}\n")
    assert memory.free_cpu_bytes() == 2**29
    (tmp_path / "cgroup").write_text("12:memory:/only-cgroup-v1\n")  # no cgroup v2: MemAvailable
    assert memory.free_cpu_bytes() == 4 * 2**30


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_cpu_probe_measures_what_a_reconstruction_holds(tiny_suite_file):
    """The CPU probe's peak resident set: an allocation's size when the probe allocates a known tensor,
    small and positive for the tiny suite's attack, and clearly more for the same attack with 512 x its
    restarts; the pack limit then says it was measured."""
    import dataclasses

    from leakbench import components
    from leakbench.running.sizing import probe_memory as _probe_memory
    from leakbench.running.worker import Worker
    from leakbench.core.memory import _cpu_peak_bytes

    # the kernel's resident-set counters lag by up to 64 pages per thread: not to the byte
    assert 60 * 2**20 < _cpu_peak_bytes(lambda: torch.ones(64 * 2**20, dtype=torch.uint8)) < 80 * 2**20

    suite = load_suite(tiny_suite_file(images=1))
    worker = Worker(suite, device=torch.device("cpu"), max_pack=16)
    sample, _ = worker.client.prepare(suite.cells[0], SilentProgress())
    spec = suite.cells[0].attacks[0]  # inverting_gradients, 2 restarts of one 16 x 16 image
    more = dataclasses.replace(spec, params=tuple((k, 1024 if k == "restarts" else v) for k, v in spec.params))
    _probe_memory(spec, sample, worker.device)  # a process's first reconstruction also faults in code and buffers
    small = _probe_memory(spec, sample, worker.device)
    big = _probe_memory(more, sample, worker.device)
    assert 0 < small < 64 * 2**20  # measured: about 0.13 MiB
    assert big - small > 16 * 2**20  # measured: about 78 MiB

    attack = components.registries()["attack"].build(spec.name, **spec.kwargs())
    limit, source = worker.sizer.limit(spec, attack, sample)
    assert source == "measured CPU memory" and 1 <= limit <= 16


def test_cpu_allocation_failures_are_out_of_memory():
    from leakbench.core.memory import is_oom

    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes"))
    assert is_oom(MemoryError())
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**62, dtype=torch.uint8)  # more than any address space: the allocator's own error
    assert is_oom(failed.value)
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_oom(ValueError("can't allocate memory"))  # only the allocator's RuntimeError


def test_a_cpu_run_records_the_processor_model(monkeypatch, tmp_path):
    """Kernels of two CPU models round differently (the L-BFGS attacks then part); the run says which it was."""
    import builtins

    import torch

    from leakbench.running import runner

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t: fpu\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    assert runner.cpu_model() == "Example CPU 9000"
    assert "(Example CPU 9000)" in runner.describe_device(torch.device("cpu"))
    cpuinfo.unlink()  # no /proc/cpuinfo (macOS, Windows): the rest stays
    assert runner.cpu_model() == ""
    assert runner.describe_device(torch.device("cpu")).startswith("cpu: ")


def test_compile_auto_compiles_only_where_the_probe_says_it_repays(tiny_suite_file, monkeypatch):
    """``--compile auto``: a call estimated to run eager for under COMPILE_MIN_SECONDS is not probed; a longer one is
    compiled only when compilation + compiled iterations beat the eager estimate; a failing probe stays eager."""
    import leakbench.running.sizing as sizing
    from leakbench.core import Acceleration
    from leakbench.running.client import Prepared as _Prepared
    from leakbench.running.worker import Worker

    iterations = sizing.TIMING_MIN_ITERATIONS
    suite = load_suite(tiny_suite_file(images=2, iterations=iterations))
    spec, sample = suite.cells[0].attacks[0], _Prepared(cell=suite.cells[0], batch=None)
    sample.observation = type("Obs", (), {"input_shape": (1, 3, 8, 8)})()
    eager = {"s": 0.1}  # seconds per iteration of the pack, eager
    compiled = {"first": 10.0, "s": 0.2}
    probes = []
    monkeypatch.setattr(sizing, "iteration_seconds", lambda spec, sample, copies, device, acceleration=None: eager["s"])

    def compiled_probe(spec, sample, copies, device, acceleration=None):
        probes.append(acceleration.compile)
        if compiled.get("error"):
            raise RuntimeError("no C++ compiler")
        return compiled["first"], compiled["s"]

    monkeypatch.setattr(sizing, "first_and_iteration_seconds", compiled_probe)

    def choose(copies=4):
        worker = Worker(suite, device=torch.device("cpu"), max_pack=8, acceleration=Acceleration(compile="auto"))
        return worker.sizer.compile_choice(spec, Packable(), sample, copies)

    chosen, why = choose()  # 100 x 0.1 s = 10 s eager: not worth a compilation
    assert chosen == "off" and "not probed" in why and probes == []
    eager["s"] = 1.0  # 100 s eager; compiled 9.8 s + 100 x 0.2 s = 29.8 s
    chosen, why = choose()
    assert chosen == "default" and probes == ["default"] and "9.8 s compilation" in why
    compiled.update(first=50.0, s=0.9)  # 49.1 s + 90 s > 0.9 x 100 s: compiling would not pay
    assert choose()[0] == "off"
    compiled["error"] = True
    chosen, why = choose()
    assert chosen == "off" and "the compiled probe failed (RuntimeError: no C++ compiler)" in why

    worker = Worker(suite, device=torch.device("cpu"), max_pack=8, acceleration=Acceleration(compile="auto"))
    del compiled["error"]
    probes.clear()
    first = worker.sizer.compile_choice(spec, Packable(), sample, 4)
    assert worker.sizer.compile_choice(spec, Packable(), sample, 4) == first and len(probes) == 1  # decided once
    short = load_suite(tiny_suite_file(images=2, iterations=iterations - 1))
    worker = Worker(short, device=torch.device("cpu"), max_pack=8, acceleration=Acceleration(compile="auto"))
    assert worker.sizer.compile_choice(short.cells[0].attacks[0], Packable(), sample, 4) == (
        "off", f"{iterations - 1} iterations: too short to time")


def test_compile_auto_is_resolved_and_recorded_in_every_row(tiny_suite_file, tmp_path):
    """A run under ``--compile auto`` (the CLI's default) gives eager's numbers where auto stays eager, and each row
    says what auto decided and why; an unresolved "auto" handed to an attack directly runs eager."""
    from leakbench.attacks import ATTACKS
    from leakbench.core import Acceleration

    suite = load_suite(tiny_suite_file(images=2, iterations=12))
    run_suite(suite, out_dir=tmp_path / "eager", device="cpu")
    run_suite(suite, out_dir=tmp_path / "auto", device="cpu", acceleration=Acceleration(compile="auto"))
    eager, auto = rows(tmp_path / "eager"), rows(tmp_path / "auto")
    same_numbers(eager, auto, tol=1e-9)
    decided = {k[1]: r[3]["compile_auto"] for k, r in auto.items()}
    assert decided == {"inverting_gradients": "off: 12 iterations: too short to time",
                       "analytic_fc": "off: the attack has no iteration count: nothing to compile"}
    assert all("acceleration" not in r[3] for r in auto.values())  # ran eager: no speed-up named
    assert all("compile_auto" not in r[3] for r in eager.values())
    attack = ATTACKS.build("inverting_gradients", iterations=2)
    attack.acceleration = Acceleration(compile="auto")
    assert not attack.acceleration.compiles and attack.acceleration.wrap(len) is len
