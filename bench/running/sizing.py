"""How many reconstructions go into one batched call (a pack's chunk).

At most ``max_pack``, and at most what fits in the free memory, measured with a two-iteration
probe of one reconstruction: on a GPU the allocator's peak, on a Linux CPU the process's peak
resident memory (``/proc``); where memory cannot be measured, ``max_pack`` alone. For attacks
of at least ``TIMING_MIN_ITERATIONS`` iterations the size is then the fastest per
reconstruction up to that limit, timed over a few iterations (packing is not always faster:
see ``PackSizer.fastest``). Limits are probed once per (attack, observation shape).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from leakbench import components
from leakbench.core import Attack, generator, memory
from leakbench.core.acceleration import Acceleration
from leakbench.running.client import Prepared
from leakbench.suite import AttackSpec

log = logging.getLogger(__name__)

#: attacks of fewer iterations run packs of the memory limit untimed: a timing probe would cost more than it saves
TIMING_MIN_ITERATIONS = 100
MEMORY_HEADROOM = 0.7  # share of the free memory (GPU, or the CPU's available RAM) a pack may plan to use


class PackSizer:
    """The pack limit of each (attack, observation shape), probed once on this worker's device."""

    def __init__(self, *, device: torch.device, max_pack: int, acceleration: Acceleration,
                 memory_share: float = 1.0) -> None:
        """``memory_share``: the part of the device's free memory this worker plans for (1/N for N
        workers on one device, so that together they stay within the headroom)."""
        self.device = device
        self.max_pack = max_pack
        self.acceleration = acceleration
        self.memory_share = memory_share
        self.limits: dict[tuple, tuple[int, str]] = {}

    def limit(self, spec: AttackSpec, attack: Attack, sample: Prepared) -> tuple[int, str]:
        """How many reconstructions one call may hold, and where that number comes from: ``max_pack``, and
        what the free memory allows (GPU, or CPU on Linux); probed once per (attack, observation shape)."""
        key = (spec.key, attack.pack_signature(sample.observation))
        if key not in self.limits:
            limit, source = self.measured(spec, sample)
            self.limits[key] = self.fastest(spec, sample, limit, source)
        return self.limits[key]

    def fastest(self, spec: AttackSpec, sample: Prepared, limit: int, source: str) -> tuple[int, str]:
        """The pack size up to ``limit`` (``limit``, its halves, ..., 1) with the least time per reconstruction
        and iteration, timed over three iterations of each (the first, with its set-up, not counted).

        Packing is not always faster: on a CPU, where vmapped per-candidate weight gradients become
        grouped convolutions, large packs of BatchNorm or wide victims ran slower than one by one
        (tests/perf/test_throughput.py). Short attacks (< ``TIMING_MIN_ITERATIONS``) are not timed."""
        entry = components.registries()["attack"].get(spec.name)
        iterations = {**entry.defaults(), **spec.kwargs()}.get("iterations")
        if limit == 1 or not isinstance(iterations, int) or iterations < TIMING_MIN_ITERATIONS:
            return limit, source
        sizes = sorted({limit >> i for i in range(limit.bit_length()) if limit >> i >= 1})
        try:
            per = {k: iteration_seconds(spec, sample, k, self.device, self.acceleration) / k for k in sizes}
        except Exception as err:
            memory.release(self.device)
            return limit, f"{source}; not timed ({type(err).__name__}: {memory.first_line(err)})"
        best = min(per, key=per.get)
        timed = ", ".join(f"{k}: {per[k] * 1e3:.3g}" for k in sizes)
        log.info("%s: ms per reconstruction-iteration by pack size: %s; packs of %d", spec.name, timed, best)
        return best, f"{source}; fastest by timing (ms per reconstruction-iteration, by pack size: {timed})"

    def measured(self, spec: AttackSpec, sample: Prepared) -> tuple[int, str]:
        try:
            per = probe_memory(spec, sample, self.device, self.acceleration)
            free = memory.free_bytes(self.device)
        except memory.NotMeasured as err:
            reason = str(err)
        except Exception as err:  # the packed call itself will then say what is wrong, as rows
            memory.release(self.device)
            reason = f"the probe failed: {type(err).__name__}" + (f": {memory.first_line(err)}" if str(err) else "")
        else:
            limit = max(1, min(self.max_pack, int(MEMORY_HEADROOM * self.memory_share * free // max(per, 1))))
            log.info("%s: %.1f MiB per reconstruction, %.0f MiB free: packs of %d", spec.name, per / 2**20,
                     free / 2**20, limit)
            share = "" if self.memory_share == 1 else f" (a {self.memory_share:.2g} share)"
            return limit, f"measured {'GPU' if self.device.type == 'cuda' else 'CPU'} memory{share}"
        log.info("%s: packs of at most %d, memory not measured: %s", spec.name, self.max_pack, reason)
        return self.max_pack, f"max_pack (memory not measured: {reason})"


def probe_memory(spec: AttackSpec, sample: Prepared, device: torch.device,
                  acceleration: Acceleration | None = None) -> int:
    """Peak bytes of one reconstruction of ``spec`` over two iterations, above what is in use now
    (``leakbench.core.memory.peak_bytes``); raises ``NotMeasured`` where memory cannot be measured."""
    return memory.peak_bytes(probe_run(spec, sample, acceleration=acceleration), device)


def iteration_seconds(spec: AttackSpec, sample: Prepared, copies: int, device: torch.device,
                       acceleration: Acceleration | None = None) -> float:
    """Seconds per iteration of a pack of ``copies`` reconstructions of ``sample``: iterations 2 and 3
    of a three-iteration run (the first carries the call's set-up)."""
    stamps: dict[int, float] = {}

    def tick(done: int, total: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps[done] = time.perf_counter()

    probe_run(spec, sample, copies=copies, iterations=3, progress=tick, acceleration=acceleration)()
    if not {1, 3} <= stamps.keys():
        raise RuntimeError(f"{spec.name} did not report its iterations")
    return (stamps[3] - stamps[1]) / 2


def probe_run(spec: AttackSpec, sample: Prepared, *, copies: int = 1, iterations: int = 2,
               progress: Callable[[int, int], None] | None = None,
               acceleration: Acceleration | None = None) -> Callable[[], object]:
    """The probe: ``spec``'s attack cut to ``iterations``, ready to reconstruct ``copies`` of ``sample`` as one pack."""
    reg = components.registries()
    params = spec.kwargs()
    if "iterations" in reg["attack"].get(spec.name).parameters():
        params = {**params, "iterations": iterations}
    probe = reg["attack"].build(spec.name, **params)
    if acceleration is not None:
        probe.acceleration = acceleration
    labels = sample.batch.labels if probe.uses_labels else None
    return lambda: probe.reconstruct_many([sample.observation] * copies, sample.client_model,
                                          labels=[labels] * copies, generators=[generator(i) for i in range(copies)],
                                          progress=progress)
