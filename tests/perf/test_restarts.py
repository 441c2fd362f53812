"""Packed (vmapped) restarts vs a sequential loop over the same reconstructions.

Both run in the same session so their ratio is meaningful on a noisy machine:
`make bench` (or `pytest -o addopts="" tests/perf --benchmark-only`).
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.attacks.common import attacker_model
from bench.attacks.optimize import MATCHING, Schedule, gradient_fn, run_restarts, target_gradients, total_variation
from bench.core import ThreatModel, generator
from bench.data import DATASETS
from bench.fl import PROTOCOLS
from defenses import DEFENSES
from victims import build_victim

ITERATIONS = 20
RESULTS: dict[tuple[str, int], dict[str, float]] = {}


def problem(victim: str, batch_size: int):
    ds = DATASETS.build("photos", side=32)
    batch = ds.batch(list(range(batch_size)))
    model = build_victim(victim, num_classes=ds.num_classes, in_channels=3, side=32, seed=0)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=batch_size).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    attacker = attacker_model(client, obs, torch.device("cpu"))
    candidate = gradient_fn(attacker, obs)
    target = target_gradients(obs, torch.device("cpu"))

    def objective(state):
        m = MATCHING["cosine"](candidate(state["x"], batch.labels), target)
        return m + 1e-4 * total_variation(state["x"]), m

    return objective, obs


@pytest.mark.parametrize("victim", ["lenet", "convnet"])
@pytest.mark.parametrize("restarts", [8])
@pytest.mark.parametrize("mode", ["sequential", "packed"])
def test_restart_throughput(benchmark, victim, restarts, mode):
    objective, obs = problem(victim, 1)
    init = torch.randn(restarts, 1, *obs.input_shape, generator=generator(1))
    schedule = Schedule(iterations=ITERATIONS, lr=0.1)

    def packed():
        run_restarts(objective, {"x": init}, schedule=schedule)

    def sequential():
        for r in range(restarts):
            run_restarts(objective, {"x": init[r:r + 1]}, schedule=schedule)

    fn = packed if mode == "packed" else sequential
    benchmark.group = f"{victim} R={restarts}"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    per_s = restarts * ITERATIONS / benchmark.stats.stats.mean
    benchmark.extra_info["reconstruction_iterations_per_s"] = per_s
    RESULTS.setdefault((victim, restarts), {})[mode] = per_s
    both = RESULTS[(victim, restarts)]
    if len(both) == 2:
        benchmark.extra_info["packed_over_sequential"] = both["packed"] / both["sequential"]
