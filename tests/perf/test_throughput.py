"""Attack throughput: packed reconstructions vs a plain sequential loop over the same ones.

``inverting_gradients`` on K cells (different images, the same server model), each with
R restarts: *packed* is one ``reconstruct_many`` call (K·R candidates advanced as one
vectorized computation); *sequential* is what reference implementations do, a Python
loop over cells and over restarts, one reconstruction at a time. Both run in the same
session, so their ratio means something on a noisy machine.

    make bench                                     # the CPU subset
    LEAKBENCH_BENCH_FULL=1 make bench              # the whole table (meant for a GPU)
    LEAKBENCH_BENCH_JSON=out.json make bench       # also write the table as JSON
    LEAKBENCH_BENCH_ITERATIONS=5 ...               # fewer iterations per timed round (big CPU cases)

Each benchmark records iterations per second, reconstructions per hour (at the suite's
4 800 iterations), peak GPU memory per reconstruction and, on a GPU, the share of the
device's peak fp32 arithmetic the step reaches (FLOPs per iteration counted with
``torch.utils.flop_counter``).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from leakbench.attacks import ATTACKS
from leakbench.core import ThreatModel, generator
from leakbench.data import DATASETS
from leakbench.fl import PROTOCOLS
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim

FULL = os.environ.get("LEAKBENCH_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CELLS = int(os.environ.get("LEAKBENCH_BENCH_CELLS", "8"))
ITERATIONS = int(os.environ.get("LEAKBENCH_BENCH_ITERATIONS", 50 if DEVICE.type == "cuda" else 10))
SUITE_ITERATIONS = 4800
#: dense fp32 peak (non-tensor-core) FLOP/s by device name fragment; TF32 tensor cores are ~7x more
FP32_PEAK = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L40": 90.5e12, "A10": 31.2e12, "V100": 15.7e12}

VICTIMS = [("lenet", 32), ("convnet", 32), ("resnet18", 32), ("resnet18", 224)]
CASES = [("inverting_gradients", v, side, b, r) for v, side in VICTIMS for b in (1, 8) for r in (1, 8, 32)]
CASES.append(("gradinversion", "convnet", 32, 1, 4))  # the other packable attack, at its default restarts
#: fixed settings per attack (no client BatchNorm statistics are granted here)
SETTINGS = {"gradinversion": {"bn_prior": "none"}}
# On a CPU only the small cases, unless asked for everything.
CPU_CASES = {("inverting_gradients", "lenet", 32, 1, 1), ("inverting_gradients", "lenet", 32, 1, 8),
             ("inverting_gradients", "convnet", 32, 1, 1), ("inverting_gradients", "convnet", 32, 8, 1),
             ("gradinversion", "convnet", 32, 1, 4)}
RESULTS: dict[tuple, dict[str, dict]] = {}


def cells(victim: str, side: int, batch_size: int):
    """CELLS observations of one model, each of a different batch of images."""
    ds = DATASETS.build("photos", side=side)
    model = build_victim(victim, num_classes=ds.num_classes, in_channels=3, side=side, seed=0).to(DEVICE)
    out = []
    for k in range(CELLS):
        idx = [(k * batch_size + i) % len(ds) for i in range(batch_size)]
        batch = ds.batch(idx)
        batch = type(batch)(images=batch.images.to(DEVICE), labels=batch.labels.to(DEVICE),
                            image_ids=batch.image_ids, normalization=batch.normalization, num_classes=batch.num_classes)
        obs, client = PROTOCOLS.build("fedsgd", batch_size=batch_size).client_update(
            model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(k))
        out.append((obs, client, batch.labels))
    return out


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _flops_per_iteration(problem, name: str, restarts: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    attack = ATTACKS.build(name, iterations=1, restarts=restarts, **SETTINGS.get(name, {}))
    counter = FlopCounterMode(display=False)
    with counter:
        attack.reconstruct_many([o for o, _, _ in problem], problem[0][1], labels=[y for _, _, y in problem],
                                generators=[generator(k) for k in range(len(problem))])
    return counter.get_total_flops()


@pytest.mark.parametrize("name,victim,side,batch_size,restarts", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", ["sequential", "packed"])
def test_packed_vs_sequential(benchmark, name, victim, side, batch_size, restarts, mode):
    case = (name, victim, side, batch_size, restarts)
    if not FULL and DEVICE.type == "cpu" and case not in CPU_CASES:
        pytest.skip("a GPU-sized case; LEAKBENCH_BENCH_FULL=1 runs it on a CPU too")
    problem = cells(victim, side, batch_size)
    model = problem[0][1]
    packed_attack = ATTACKS.build(name, iterations=ITERATIONS, restarts=restarts, **SETTINGS.get(name, {}))
    single_attack = ATTACKS.build(name, iterations=ITERATIONS, restarts=1, **SETTINGS.get(name, {}))

    def packed():
        packed_attack.reconstruct_many([o for o, _, _ in problem], model, labels=[y for _, _, y in problem],
                                       generators=[generator(k) for k in range(CELLS)])
        _sync()

    def sequential():
        for k, (obs, client, y) in enumerate(problem):
            for r in range(restarts):
                single_attack.reconstruct(obs, client, labels=y, generator=generator(k, r))
        _sync()

    fn = packed if mode == "packed" else sequential
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.group = f"{name} {victim} {side}px B={batch_size} R={restarts} K={CELLS}"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    seconds = benchmark.stats.stats.min  # the least disturbed round: shared machines are noisy
    reconstructions = CELLS * restarts
    info = {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "reconstruction_iterations_per_s": reconstructions * ITERATIONS / seconds,
        # one reconstruction = one cell's R restarts at the suite budget
        "reconstructions_per_hour": 3600 / (seconds * SUITE_ITERATIONS / ITERATIONS) * CELLS,
    }
    if DEVICE.type == "cuda":
        in_flight = reconstructions if mode == "packed" else 1
        info["peak_mib_per_reconstruction"] = (torch.cuda.max_memory_allocated() - base) / 2**20 / in_flight
        if mode == "packed":
            flops = _flops_per_iteration(problem, name, restarts)
            peak = next((v for k, v in FP32_PEAK.items() if k in torch.cuda.get_device_name()), None)
            info["flops_per_iteration"] = flops
            if peak:
                info["fraction_of_fp32_peak"] = flops * ITERATIONS / seconds / peak
    benchmark.extra_info.update(info)
    both = RESULTS.setdefault(case, {})
    both[mode] = info
    if len(both) == 2:
        ratio = both["packed"]["reconstructions_per_hour"] / both["sequential"]["reconstructions_per_hour"]
        benchmark.extra_info["packed_over_sequential"] = ratio
        both["ratio"] = {"packed_over_sequential": ratio}
        _write_json()


def _write_json() -> None:
    path = os.environ.get("LEAKBENCH_BENCH_JSON")
    if not path:
        return
    table = [{"attack": a, "victim": v, "side": s, "batch_size": b, "restarts": r, "cells": CELLS,
              "iterations": ITERATIONS, **modes} for (a, v, s, b, r), modes in RESULTS.items()]
    with open(path, "w") as handle:
        json.dump({"written": time.strftime("%Y-%m-%dT%H:%M:%S"), "table": table}, handle, indent=1)


COMPILE_CASES = [("lenet", 8, 100), ("convnet", 1, 50)]
#: each optional speed-up, against eager fp32 in the default layout
SPEEDUPS = {"off": {}, "compile": {"compile": "default"}, "channels_last": {"channels_last": True}}
ACCELERATED: dict[tuple, dict[str, float]] = {}


@pytest.mark.parametrize("victim,restarts,iterations", COMPILE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("speedup", list(SPEEDUPS))
def test_accelerated_packed_step(benchmark, victim, restarts, iterations, speedup):
    """``--compile default`` and ``--channels-last`` vs eager on a pack of CELLS cells (the warm-up round
    pays the compilation)."""
    from leakbench.core import Acceleration

    problem = cells(victim, 32, 1)
    attack = ATTACKS.build("inverting_gradients", iterations=iterations, restarts=restarts)

    def packed():
        attack.reconstruct_many([o for o, _, _ in problem], problem[0][1], labels=[y for _, _, y in problem],
                                generators=[generator(k) for k in range(CELLS)])
        _sync()

    attack.acceleration = Acceleration(**SPEEDUPS[speedup])
    benchmark.group = f"speed-ups {victim} R={restarts} K={CELLS} {iterations} it"
    benchmark.pedantic(packed, rounds=3, warmup_rounds=1)
    times = ACCELERATED.setdefault((victim, restarts, iterations), {})
    times[speedup] = benchmark.stats.stats.min
    if speedup != "off" and "off" in times:
        benchmark.extra_info["speed_over_eager"] = times["off"] / times[speedup]
