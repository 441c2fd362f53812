"""How many reconstructions go into one batched call (a pack's chunk).

At most ``max_pack``, and at most what fits in the free memory, measured with a two-iteration
probe of one reconstruction: on a GPU the allocator's peak, on a Linux CPU the process's peak
resident memory (``/proc``); where memory cannot be measured, ``max_pack`` alone. For attacks
of at least ``TIMING_MIN_ITERATIONS`` iterations the size is then the fastest per
reconstruction up to that limit, timed over a few iterations (packing is not always faster:
see ``PackSizer.fastest``). Limits are probed once per (attack, observation shape).

With ``--compile auto`` the runner also asks, per pack, whether ``torch.compile`` pays
(``PackSizer.compile_choice``): only a pack whose eager run is estimated to take at least
``COMPILE_MIN_SECONDS`` is probed compiled, and it is compiled only where the probe's
compilation time plus its compiled iterations beat the eager estimate by a margin.
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
#: with --compile auto, packs estimated to run eager for less than this are not probed compiled: compiling the step
#: took 5-30 s on the development CPU, so a shorter pack could not repay it
COMPILE_MIN_SECONDS = 60.0
#: compiled is chosen only when its estimate (compilation + iterations) is below this share of the eager estimate
COMPILE_MARGIN = 0.9
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
        self.pack_seconds: dict[tuple, dict[int, float]] = {}  # eager seconds per iteration, by pack size
        self.compile_choices: dict[tuple, tuple[str, str]] = {}

    def limit(self, spec: AttackSpec, attack: Attack, sample: Prepared) -> tuple[int, str]:
        """How many reconstructions one call may hold, and where that number comes from: ``max_pack``, and
        what the free memory allows (GPU, or CPU on Linux); probed once per (attack, observation shape)."""
        key = (spec.key, attack.pack_signature(sample.observation))
        if key not in self.limits:
            limit, source = self.measured(spec, sample)
            self.limits[key] = self.fastest(spec, sample, limit, source, key=key)
        return self.limits[key]

    def fastest(self, spec: AttackSpec, sample: Prepared, limit: int, source: str,
                key: tuple | None = None) -> tuple[int, str]:
        """The pack size up to ``limit`` (``limit``, its halves, ..., 1) with the least time per reconstruction
        and iteration, timed over three iterations of each (the first, with its set-up, not counted).

        Packing is not always faster: on a CPU, where vmapped per-candidate weight gradients become
        grouped convolutions, large packs of BatchNorm or wide victims ran slower than one by one
        (tests/perf/test_throughput.py). Short attacks (< ``TIMING_MIN_ITERATIONS``) are not timed."""
        iterations = attack_iterations(spec)
        if limit == 1 or not isinstance(iterations, int) or iterations < TIMING_MIN_ITERATIONS:
            return limit, source
        sizes = sorted({limit >> i for i in range(limit.bit_length()) if limit >> i >= 1})
        try:
            per = {k: iteration_seconds(spec, sample, k, self.device, self.acceleration) / k for k in sizes}
        except Exception as err:
            memory.release(self.device)
            return limit, f"{source}; not timed ({type(err).__name__}: {memory.first_line(err)})"
        if key is not None:
            self.pack_seconds[key] = {k: per[k] * k for k in sizes}
        best = min(per, key=per.get)
        timed = ", ".join(f"{k}: {per[k] * 1e3:.3g}" for k in sizes)
        log.info("%s: ms per reconstruction-iteration by pack size: %s; packs of %d", spec.name, timed, best)
        return best, f"{source}; fastest by timing (ms per reconstruction-iteration, by pack size: {timed})"

    def compile_choice(self, spec: AttackSpec, attack: Attack, sample: Prepared, copies: int) -> tuple[str, str]:
        """``--compile auto`` for a call of ``copies`` reconstructions: ``("default", why)`` where compiling the step
        is measured to pay, else ``("off", why)``; decided once per (attack, observation shape, pack size).
        Attacks whose steps leakbench does not compile (L-BFGS) are probed like the rest where they are long,
        and stay eager: their compiled probe is no faster.

        The eager estimate is the attack's iterations times the pack's seconds per iteration (from the pack
        sizing's timing, else timed here). Below ``COMPILE_MIN_SECONDS`` nothing more is probed. Otherwise a
        compiled three-iteration probe gives the compilation time (its first iteration, less a compiled one) and
        the compiled seconds per iteration; compiled is chosen when compilation + iterations × compiled seconds
        is below ``COMPILE_MARGIN`` × the eager estimate. The probe's own compilation is not reused by the run
        (a new attack object is a new function for torch.compile), so the run pays it again, as estimated."""
        key = (spec.key, tuple(sample.observation.input_shape), copies)
        if key not in self.compile_choices:
            self.compile_choices[key] = self._compile_choice(spec, attack, sample, copies)
        return self.compile_choices[key]

    def _compile_choice(self, spec: AttackSpec, attack: Attack, sample: Prepared, copies: int) -> tuple[str, str]:
        iterations = attack_iterations(spec)
        if not isinstance(iterations, int):
            return "off", "the attack has no iteration count: nothing to compile"
        if iterations < TIMING_MIN_ITERATIONS:
            return "off", f"{iterations} iterations: too short to time"
        eager = self.acceleration.with_compile("off")
        signature = attack.pack_signature(sample.observation) if attack.packable else None
        per_iteration = self.pack_seconds.get((spec.key, signature), {}).get(copies)
        try:
            if per_iteration is None:
                per_iteration = iteration_seconds(spec, sample, copies, self.device, eager)
        except Exception as err:
            memory.release(self.device)
            return "off", f"not timed ({type(err).__name__}: {memory.first_line(err)})"
        estimate = iterations * per_iteration
        if estimate < COMPILE_MIN_SECONDS:
            return "off", (f"eager estimated at {estimate:.3g} s (< {COMPILE_MIN_SECONDS:g} s): compilation "
                           "could not repay itself; not probed")
        try:
            first, compiled = first_and_iteration_seconds(spec, sample, copies, self.device,
                                                          eager.with_compile("default"))
        except Exception as err:
            memory.release(self.device)
            return "off", f"the compiled probe failed ({type(err).__name__}: {memory.first_line(err)})"
        compilation = max(0.0, first - compiled)
        with_compile = compilation + iterations * compiled
        why = (f"eager {estimate:.3g} s estimated; compiled {with_compile:.3g} s ({compilation:.3g} s compilation + "
               f"{iterations} x {compiled * 1e3:.3g} ms vs {per_iteration * 1e3:.3g} ms eager)")
        chosen = "default" if with_compile < COMPILE_MARGIN * estimate else "off"
        log.info("%s: --compile auto: %s, %s", spec.name, chosen, why)
        return chosen, why

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


def attack_iterations(spec: AttackSpec):
    """The attack's ``iterations`` parameter as the spec sets it or its factory defaults it (None where it has none)."""
    entry = components.registries()["attack"].get(spec.name)
    return {**entry.defaults(), **spec.kwargs()}.get("iterations")


def iteration_seconds(spec: AttackSpec, sample: Prepared, copies: int, device: torch.device,
                       acceleration: Acceleration | None = None) -> float:
    """Seconds per iteration of a pack of ``copies`` reconstructions of ``sample``: iterations 2 and 3
    of a three-iteration run (the first carries the call's set-up)."""
    return first_and_iteration_seconds(spec, sample, copies, device, acceleration)[1]


def first_and_iteration_seconds(spec: AttackSpec, sample: Prepared, copies: int, device: torch.device,
                                acceleration: Acceleration | None = None) -> tuple[float, float]:
    """Seconds of the first iteration of a three-iteration pack of ``copies`` (with the call's set-up, and
    compilation when compiled), and seconds per iteration of iterations 2 and 3."""
    stamps: dict[int, float] = {}

    def tick(done: int, total: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps[done] = time.perf_counter()

    run = probe_run(spec, sample, copies=copies, iterations=3, progress=tick, acceleration=acceleration)
    start = time.perf_counter()
    run()
    if not {1, 3} <= stamps.keys():
        raise RuntimeError(f"{spec.name} did not report its iterations")
    return stamps[1] - start, (stamps[3] - stamps[1]) / 2


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
