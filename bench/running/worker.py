"""What a worker does with a pack of cells: the client updates, the battery, the scores.

No store here. The runner (the driver) plans packs (``plan_packs``), hands them to an
executor (``leakbench.running.executors``: in this process, one process per GPU, or Ray), and writes
the events a worker yields back into the store, one (cell, attack) at a time; so whatever
runs the work, the store, resume and crash rules stay the driver's.

A pack is a run of cells that share the server's model (the same victim and weights).
Within a pack, each attack of the battery runs once over all the cells that ask for it:
a packable attack (``Attack.packable``, e.g. ``inverting_gradients``) advances those
cells' reconstructions together, restarts × cells as one batched computation, as long as
their observations have the same shape (``Attack.pack_signature``) and the client models
are identical (a defense such as DP-SGD may change the architecture). Other attacks run
cell after cell. Every reconstruction draws from its own cell's seeds, so a pack gives
the numbers the cells give alone, up to floating-point order.

How many reconstructions go into one batched call: at most ``max_pack``, and at most what
fits in the free memory, measured with a two-iteration probe of one reconstruction: on a
GPU the allocator's peak, on a Linux CPU the process's peak resident memory (``/proc``);
where memory cannot be measured, ``max_pack`` alone. For attacks of at least
``TIMING_MIN_ITERATIONS`` iterations the size is then the fastest per reconstruction up
to that limit, timed over a few iterations (packing is not always faster: see
``Worker._fastest``). On out-of-memory (a GPU's, or a CPU allocation that fails) the call
is split in halves and retried, down to one reconstruction (then the rows say ``oom``);
every row records its pack size, the limit, where it came from and the splits
(``results.execution_json``), so no fallback is silent.
"""

from __future__ import annotations

import io
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from leakbench import components
from leakbench.core import memory
from leakbench.running import sanity
from leakbench.core.acceleration import Acceleration
from leakbench.core import AttackTimeout, Batch, ThreatModelError, derive_seed, generator
from leakbench.fl import utility_cost
from leakbench.metrics import get_lpips, score
from leakbench.store import ResultRow
from leakbench.suite import AttackSpec, Cell, Suite
from leakbench.victims import build_victim

log = logging.getLogger(__name__)

DEFAULT_MAX_PACK = 8
#: attacks of fewer iterations run packs of the memory limit untimed: a timing probe would cost more than it saves
TIMING_MIN_ITERATIONS = 100
MEMORY_HEADROOM = 0.7  # share of the free memory (GPU, or the CPU's available RAM) a pack may plan to use


class Progress(Protocol):
    """What the runner reports while it works; the CLI draws it, tests may record it.

    The unit of ``start`` and ``update`` is the reconstruction-iteration (``planned_iterations``):
    ``start(total, skipped=...)`` gives the work still to do and the work already in the store,
    ``update(n)`` moves the bar by ``n`` as attack calls iterate, and when a (cell, attack) run ends
    (early stop, timeout, error included) by whatever of its share was not reported yet, so the
    bar reaches ``total``. ``advance(status)`` says one (cell, attack) run ended; ``iterations`` and
    ``task`` describe the current call (or a victim's training) for a postfix. A Progress without
    ``update`` (an older implementation) still gets every other call.
    """

    def start(self, total: int, *, skipped: int) -> None: ...
    def task(self, description: str) -> None: ...
    def iterations(self, done: int, total: int) -> None: ...
    def update(self, units: int) -> None: ...
    def advance(self, status: str) -> None: ...
    def close(self) -> None: ...


class SilentProgress:
    def start(self, total: int, *, skipped: int) -> None: ...
    def task(self, description: str) -> None: ...
    def iterations(self, done: int, total: int) -> None: ...
    def update(self, units: int) -> None: ...
    def work(self, runs: tuple[tuple[str, str], ...], done: int, total: int) -> None: ...
    def advance(self, status: str) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- progress in work units

#: the share of an attack run without iterations (``analytic_fc``, ``label_only``): one unit
UNITS_WITHOUT_ITERATIONS = 1
RunKey = tuple[str, str]  # (cell key, attack key)


def planned_iterations(spec: AttackSpec) -> int:
    """The reconstruction-iterations one (cell, attack) run plans: restarts x iterations (x ``inner_steps``
    for the L-BFGS attacks, whose every inner update costs a gradient evaluation, as an iteration of
    the others does; nested searches such as GIAS's ``latent`` and ``weights`` add up).
    Attacks without iterations count ``UNITS_WITHOUT_ITERATIONS``. From the spec's parameters
    and the registry's defaults; an attack the registry does not know counts as one without."""
    params = spec.kwargs()
    try:
        params = {**components.registries()["attack"].get(spec.name).defaults(), **params}
    except Exception:  # an unknown attack: its run fails with its own error; it still has a share
        pass

    def count(value) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    iterations = count(params.get("iterations"))
    if iterations is None:
        nested = [count(v.get("iterations")) for v in params.values() if hasattr(v, "get") and not isinstance(v, str)]
        iterations = sum(n for n in nested if n) or None
    if iterations is None:
        return UNITS_WITHOUT_ITERATIONS
    return iterations * (count(params.get("restarts")) or 1) * (count(params.get("inner_steps")) or 1)


class WorkMeter(SilentProgress):
    """The driver's accounting of a run's progress in reconstruction-iterations, between the workers
    and the Progress that draws it (``progress``).

    Each planned (cell, attack) run has a share (``planned_iterations``). A worker reports an attack
    call over some runs (one, or a pack's) as ``work(runs, done, total)``: each of those runs has
    then done ``done / total`` of its share, whatever the attack's own unit of ``total`` (iterations,
    L-BFGS updates, stages); ``finished`` fills the rest of a run's share when its rows arrive, so an
    early stop, a timeout or an error still adds up to the total. What a run has reported only grows
    and never passes its share: a retried pack's calls start again below it and move the bar only
    past it; reports for a run already finished are ignored.
    """

    def __init__(self, progress: Progress, shares: dict[RunKey, int]):
        self.progress = progress
        self.shares = dict(shares)
        self.reported: dict[RunKey, int] = {}
        self.finished_runs: set[RunKey] = set()
        self._update = getattr(progress, "update", None)

    @property
    def total(self) -> int:
        return sum(self.shares.values())

    def done(self) -> int:
        """Units reported so far (finished runs in full, the others as far as they have come)."""
        return sum(self.reported.values())

    def start(self, total: int, *, skipped: int) -> None:
        self.progress.start(total, skipped=skipped)

    def task(self, description: str) -> None:
        self.progress.task(description)

    def iterations(self, done: int, total: int) -> None:
        self.progress.iterations(done, total)

    def work(self, runs: tuple[RunKey, ...], done: int, total: int) -> None:
        if total <= 0:
            return
        fraction = min(max(done, 0), total) / total
        moved = 0
        for key in runs:
            if key in self.finished_runs or key not in self.shares:
                continue
            share = self.shares[key]
            now = min(share, int(share * fraction))
            before = self.reported.get(key, 0)
            if now > before:
                self.reported[key] = now
                moved += now - before
        self._move(moved)

    def finished(self, key: RunKey, status: str) -> None:
        if key in self.finished_runs:
            return
        self.finished_runs.add(key)
        share = self.shares.get(key, 0)
        rest = share - self.reported.get(key, 0)
        self.reported[key] = share
        self._move(rest)
        self.progress.advance(status)

    def close(self) -> None:
        self.progress.close()

    def _move(self, units: int) -> None:
        if units > 0 and self._update is not None:
            self._update(units)


class RateEstimate:
    """The bar's rate and time left: the average rate since the first work was reported.

    Setting up before the first iteration (workers starting, data, LPIPS, a victim's training) is
    left out of the rate, since it does not recur per unit; everything after it is in (probes,
    scoring, later set-ups), so on work of even cost per iteration the estimate converges to the
    true rate. ``clock`` is ``time.monotonic`` unless a test gives its own.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.first: tuple[float, int] | None = None  # (time, units done) at the first report

    def record(self, done: int) -> None:
        """Units done so far (``done``, counted from the bar's start), as the bar moves."""
        if self.first is None:
            self.first = (self.clock(), done)

    def rate(self, done: int) -> float | None:
        """Units per second since the first report, or None before any measurable span."""
        if self.first is None:
            return None
        t0, n0 = self.first
        elapsed = self.clock() - t0
        if elapsed <= 0 or done <= n0:
            return None
        return (done - n0) / elapsed

    def remaining_s(self, done: int, total: int) -> float | None:
        """Seconds left at the current rate, or None while the rate is unknown."""
        rate = self.rate(done)
        if rate is None:
            return None
        return max(0, total - done) / rate


@dataclass(frozen=True)
class Pack:
    """Cells that share the server's model, each with the attacks still to run on it."""

    items: tuple[tuple[Cell, tuple[AttackSpec, ...]], ...]
    index: int = 0

    @property
    def attack_runs(self) -> int:
        return sum(len(attacks) for _, attacks in self.items)


@dataclass
class CellEvent:
    """A cell's description for the ``cells`` table (sent before its attacks' rows)."""

    cell_key: str
    fields: dict[str, Any]
    truth_pngs: dict[int, bytes]
    leak_check: tuple[bool, float] = (False, 0.0)  # (check no_leak_undefended?, grey-image PSNR)


@dataclass
class AttackEvent:
    """All rows of one (cell, attack): what ``Store.put_results`` writes in one transaction."""

    cell_key: str
    attack_key: str
    attack: dict[str, Any]
    rows: list[ResultRow]
    reconstruction_pngs: dict[int, bytes]
    execution: dict[str, Any] = field(default_factory=dict)


Event = CellEvent | AttackEvent


def plan_packs(todo: list[tuple[Cell, list[AttackSpec]]], *, max_cells: int = DEFAULT_MAX_PACK) -> list[Pack]:
    """Consecutive runs of cells with the same server model, at most ``max_cells`` each, in suite order."""
    packs: list[Pack] = []
    current: list[tuple[Cell, tuple[AttackSpec, ...]]] = []
    for cell, attacks in todo:
        if current and (_model_key(current[0][0]) != _model_key(cell) or len(current) >= max_cells):
            packs.append(Pack(items=tuple(current), index=len(packs)))
            current = []
        current.append((cell, tuple(attacks)))
    if current:
        packs.append(Pack(items=tuple(current), index=len(packs)))
    return packs


def _model_key(cell: Cell) -> tuple:
    return (cell.victim_seed_parts, repr(getattr(cell.victim, "recipe", None)))


def to_png(image: torch.Tensor) -> bytes:
    """A (C, H, W) image in [0, 1] as PNG bytes (grey for one channel)."""
    array = (image.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class _Cache:
    """One-entry cache: consecutive cells usually share a victim."""

    def __init__(self) -> None:
        self.key = None
        self.value = None

    def get(self, key, make):
        if key != self.key:
            self.key, self.value = key, make()
        return self.value


@dataclass
class _Prepared:
    """A cell after its client update: what the attacks see, and what they are scored against."""

    cell: Cell
    batch: Batch
    observation: Any = None
    client_model: torch.nn.Module | None = None
    error: str | None = None


class Worker:
    """Runs packs of one suite on one device. Holds the data set, the last server model and LPIPS."""

    def __init__(self, suite: Suite, *, device: torch.device, max_pack: int = DEFAULT_MAX_PACK,
                 acceleration: Acceleration | None = None, memory_share: float = 1.0):
        """``memory_share``: the part of the device's free memory this worker plans for (1/N for N
        workers on one device, so that together they stay within the headroom)."""
        self.acceleration = acceleration or Acceleration()
        self.acceleration.apply_backend_flags()  # TF32: torch's own process-wide switch
        self.suite = suite
        self.device = device
        self.max_pack = max(1, int(max_pack))
        self.memory_share = memory_share
        from leakbench.plugins import load_plugins

        load_plugins(getattr(suite, "plugins", ()))  # a worker process imports the suite's plug-ins itself
        self.dataset = components.registries()["dataset"].build(suite.dataset.name, **suite.dataset.kwargs())
        self.victims = _Cache()
        self._lpips = None
        self._limits: dict[tuple, tuple[int, str]] = {}

    @property
    def lpips(self):
        if self._lpips is None:
            self._lpips = get_lpips(self.device)
            if not self._lpips.available:
                log.warning("LPIPS is not available, its column will be NULL: %s", self._lpips.reason)
        return self._lpips

    def run_pack(self, pack: Pack, progress: Progress | None = None) -> Iterator[Event]:
        """Every event of the pack, each as soon as it is complete."""
        progress = progress or SilentProgress()
        prepared = []
        for cell, _ in pack.items:
            ready, event = self._prepare(cell, progress)
            prepared.append(ready)
            yield event
        by_key = {p.cell.key: p for p in prepared}
        order: dict[str, list[tuple[AttackSpec, _Prepared]]] = {}
        for cell, attacks in pack.items:
            for spec in attacks:
                order.setdefault(spec.key, []).append((spec, by_key[cell.key]))
        for group in order.values():
            yield from self._attack_group(group, progress)

    # ------------------------------------------------------------------ client side

    def _prepare(self, cell: Cell, progress: Progress) -> tuple[_Prepared, CellEvent]:
        reg = components.registries()
        defense_info: dict = {}
        victim_info: dict = {}
        error: str | None = None
        observation = client_model = None
        indices = cell.image_indices
        dataset = self.dataset
        try:
            defense = reg["defense"].build(cell.defense.name, **cell.defense.kwargs())
            # A defense may choose which images the client trains on together (label disguising):
            # the rows then score those images.
            indices = defense.compose_batch(indices, label_of=lambda i: dataset.get(i)[1], pool_size=len(dataset),
                                            generator=generator(cell.suite_seed, cell.key, "compose"))
        except Exception as err:  # a broken cell is data: every attack gets an error row
            error = f"client update failed: {type(err).__name__}: {err}"
        batch = dataset.batch(list(indices))
        batch = Batch(images=batch.images.to(self.device), labels=batch.labels.to(self.device),
                      image_ids=batch.image_ids, normalization=batch.normalization, num_classes=batch.num_classes)
        truth_pngs = {slot: to_png(img) for slot, img in enumerate(batch.images)}
        if error is None:
            try:
                model, victim_info = self.victims.get(
                    cell.victim_seed_parts, lambda: server_model(cell, dataset, device=self.device, progress=progress))
                protocol = reg["protocol"].build(cell.protocol.name, **cell.protocol.kwargs())
                observation, client_model = protocol.client_update(
                    model, batch, defense=defense, threat=cell.threat,
                    generator=generator(cell.suite_seed, cell.key, "client"))
                defense_info = {**defense.describe(), **_utility(protocol, model, batch, defense, observation, cell)}
                defense_info.update(self._fl_utility(cell))
            except Exception as err:  # a broken cell is data: every attack gets an error row
                error = f"client update failed: {type(err).__name__}: {err}"
        if error is not None:
            log.warning("cell %s: %s", cell.key, error)
        flags = sanity.update_flags(observation) if observation is not None else []
        checks = error is None and sanity.checks_leak(defense=cell.defense.name, batch_size=batch.size)
        fields = cell_fields(cell, batch.size, defense_info, victim_info, flags)
        if error is None:
            fields.update(self._rero(cell, defense, observation))
        event = CellEvent(
            cell_key=cell.key, fields=fields,
            truth_pngs=truth_pngs,
            leak_check=(checks, sanity.grey_psnr_db(batch.images)[0] if checks else 0.0),
        )
        return _Prepared(cell=cell, batch=batch, observation=observation, client_model=client_model, error=error), event

    def _rero(self, cell: Cell, defense, observation) -> dict:
        """The ReRo columns (kappa, gamma) of a cell whose defense declares a DP guarantee (leakbench.privacy)."""
        from leakbench.privacy.cells import cell_rero

        threshold = getattr(self.suite, "leak_threshold", None)
        if threshold is None:
            return {}
        return cell_rero(defense, local_steps=int(getattr(observation, "local_steps", 1) or 1), threshold=threshold,
                         dataset_name=cell.dataset.name, dataset_params=cell.dataset.kwargs(),
                         spec=getattr(self.suite, "rero", None))

    def _fl_utility(self, cell: Cell) -> dict:
        """The suite's optional test accuracy after a short FL training with the cell's defense."""
        if getattr(self.suite, "utility", None) is None or not cell.case_indices:
            return {}  # a cell added only as a positive control is evidence for attacks, not a utility row
        try:
            from leakbench.fl.accuracy import cell_utility

            return cell_utility(self.suite, cell, self.dataset, device=self.device)
        except Exception as err:  # a missing utility number must not cost the cell its attacks
            log.warning("cell %s: FL utility failed: %s", cell.key, err)
            return {"utility_accuracy_error": f"{type(err).__name__}: {err}"}

    # ------------------------------------------------------------------ attacks

    def _attack_group(self, group: list[tuple[AttackSpec, _Prepared]], progress: Progress) -> Iterator[AttackEvent]:
        """One attack spec over every cell of the pack that asks for it."""
        spec = group[0][0]
        reg = components.registries()
        try:
            attack = reg["attack"].build(spec.name, **spec.kwargs())
            attack.acceleration = self.acceleration
        except Exception as err:
            attack, build_error = None, f"{type(err).__name__}: {err}"
        else:
            build_error = None
        packable: dict[tuple, list[_Prepared]] = {}
        alone: list[_Prepared] = []
        for _, p in group:
            signature = None
            if attack is not None and attack.packable and p.error is None and self.max_pack > 1:
                signature = attack.pack_signature(p.observation)
            if signature is None:
                alone.append(p)
            else:
                packable.setdefault((signature, _model_fingerprint(p.client_model)), []).append(p)
        for members in packable.values():
            if len(members) == 1:
                alone.extend(members)
                continue
            same, other = _split_by_weights(members)
            alone.extend(other)
            if len(same) == 1:
                alone.extend(same)
            else:
                yield from self._packed(spec, attack, same, progress)
        for p in sorted(alone, key=lambda p: [q.cell.key for _, q in group].index(p.cell.key)):
            yield self._one(spec, attack, build_error, p, progress)

    def _one(self, spec: AttackSpec, attack, build_error: str | None, p: _Prepared, progress: Progress) -> AttackEvent:
        progress.task(_describe(p.cell, spec))
        t0 = time.monotonic()
        if p.error is not None:
            rows, pngs = failed_rows(p.batch, "error", p.error), {}
        elif build_error is not None:
            rows, pngs = failed_rows(p.batch, "error", build_error), {}
        else:
            rows, pngs = attack_rows(p.cell, spec, attack, p.observation, p.client_model, p.batch, self.lpips,
                                     _CallProgress(progress, ((p.cell.key, spec.key),)))
        return self._event(p, spec, rows, pngs, time.monotonic() - t0, {"pack": 1}, progress)

    def _packed(self, spec: AttackSpec, attack, members: list[_Prepared], progress: Progress) -> Iterator[AttackEvent]:
        progress.task(f"{_describe(members[0].cell, spec)}: sizing the pack (memory and speed probes)")
        limit, how = self._pack_limit(spec, attack, members[0])
        start = 0
        while start < len(members):
            chunk = members[start:start + limit]
            start += len(chunk)
            yield from self._run_chunk(spec, attack, chunk, progress, {"limit": limit, "limit_from": how}, splits=0)

    def _run_chunk(self, spec, attack, chunk: list[_Prepared], progress: Progress, info: dict, *,
                   splits: int) -> Iterator[AttackEvent]:
        progress.task(f"{_describe(chunk[0].cell, spec)} | pack of {len(chunk)} cells" if len(chunk) > 1
                      else _describe(chunk[0].cell, spec))
        t0 = time.monotonic()
        try:
            outcomes = packed_rows(chunk, spec, attack, self.lpips,
                                   _CallProgress(progress, tuple((p.cell.key, spec.key) for p in chunk)))
        except _OutOfMemory as err:
            memory.release(self.device)
            if len(chunk) == 1:
                rows = failed_rows(chunk[0].batch, "oom", str(err))
                yield self._event(chunk[0], spec, rows, {}, time.monotonic() - t0,
                                  {"pack": 1, **info, "oom_splits": splits}, progress)
                return
            half = len(chunk) // 2
            log.warning("%s: out of memory with %d reconstructions packed; splitting into %d + %d",
                        spec.name, len(chunk), half, len(chunk) - half)
            yield from self._run_chunk(spec, attack, chunk[:half], progress, info, splits=splits + 1)
            yield from self._run_chunk(spec, attack, chunk[half:], progress, info, splits=splits + 1)
            return
        seconds = (time.monotonic() - t0) / len(chunk)  # each reconstruction's share of the packed call
        execution = {"pack": len(chunk), **info, "oom_splits": splits}
        for p, (rows, pngs) in zip(chunk, outcomes):
            yield self._event(p, spec, rows, pngs, seconds, execution, progress)

    def _pack_limit(self, spec: AttackSpec, attack, sample: _Prepared) -> tuple[int, str]:
        """How many reconstructions one call may hold, and where that number comes from: ``max_pack``, and
        what the free memory allows (GPU, or CPU on Linux); probed once per (attack, observation shape)."""
        key = (spec.key, attack.pack_signature(sample.observation))
        if key not in self._limits:
            limit, source = self._measured_limit(spec, sample)
            self._limits[key] = self._fastest(spec, sample, limit, source)
        return self._limits[key]

    def _fastest(self, spec: AttackSpec, sample: _Prepared, limit: int, source: str) -> tuple[int, str]:
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
            per = {k: _iteration_seconds(spec, sample, k, self.device, self.acceleration) / k for k in sizes}
        except Exception as err:
            memory.release(self.device)
            return limit, f"{source}; not timed ({type(err).__name__}: {memory.first_line(err)})"
        best = min(per, key=per.get)
        timed = ", ".join(f"{k}: {per[k] * 1e3:.3g}" for k in sizes)
        log.info("%s: ms per reconstruction-iteration by pack size: %s; packs of %d", spec.name, timed, best)
        return best, f"{source}; fastest by timing (ms per reconstruction-iteration, by pack size: {timed})"

    def _measured_limit(self, spec: AttackSpec, sample: _Prepared) -> tuple[int, str]:
        try:
            per = _probe_memory(spec, sample, self.device, self.acceleration)
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

    def _recorded(self, execution: dict) -> dict:
        """The row's execution record, with the speed-ups it ran under (none named: plain fp32)."""
        speedups = self.acceleration.describe()
        return {**execution, "acceleration": speedups} if speedups else execution

    def _event(self, p: _Prepared, spec: AttackSpec, rows: list[ResultRow], pngs: dict[int, bytes], seconds: float,
               execution: dict, progress: Progress) -> AttackEvent:
        rows = [ResultRow(**{**r.__dict__, "seconds": seconds}) for r in rows]
        return AttackEvent(cell_key=p.cell.key, attack_key=spec.key, attack=spec.identity(), rows=rows,
                           reconstruction_pngs=pngs, execution=self._recorded(execution))


class _OutOfMemory(RuntimeError):
    pass


class _CallProgress:
    """One attack call's progress callback: the postfix's iterations, and the same fraction as work
    done on the call's (cell, attack) runs (``WorkMeter.work``: one iteration of a pack of k cells is
    k cells' iteration), for a Progress that counts work."""

    def __init__(self, progress: Progress, runs: tuple[RunKey, ...]):
        self.progress = progress
        self.runs = runs
        self._work = getattr(progress, "work", None)

    def iterations(self, done: int, total: int) -> None:
        self.progress.iterations(done, total)
        if self._work is not None:
            self._work(self.runs, done, total)


def _probe_memory(spec: AttackSpec, sample: _Prepared, device: torch.device,
                  acceleration: Acceleration | None = None) -> int:
    """Peak bytes of one reconstruction of ``spec`` over two iterations, above what is in use now
    (``leakbench.core.memory.peak_bytes``); raises ``NotMeasured`` where memory cannot be measured."""
    return memory.peak_bytes(_probe_run(spec, sample, acceleration=acceleration), device)


def _iteration_seconds(spec: AttackSpec, sample: _Prepared, copies: int, device: torch.device,
                       acceleration: Acceleration | None = None) -> float:
    """Seconds per iteration of a pack of ``copies`` reconstructions of ``sample``: iterations 2 and 3
    of a three-iteration run (the first carries the call's set-up)."""
    stamps: dict[int, float] = {}

    def tick(done: int, total: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps[done] = time.perf_counter()

    _probe_run(spec, sample, copies=copies, iterations=3, progress=tick, acceleration=acceleration)()
    if not {1, 3} <= stamps.keys():
        raise RuntimeError(f"{spec.name} did not report its iterations")
    return (stamps[3] - stamps[1]) / 2


def _probe_run(spec: AttackSpec, sample: _Prepared, *, copies: int = 1, iterations: int = 2,
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


def _model_fingerprint(model: torch.nn.Module) -> tuple:
    """Architecture and tensor shapes; equal fingerprints are then compared value by value (``_same_models``)."""
    return (type(model).__name__, tuple((n, tuple(t.shape), str(t.dtype)) for n, t in model.state_dict().items()))


def _split_by_weights(members: list[_Prepared]) -> tuple[list[_Prepared], list[_Prepared]]:
    """Members whose client model equals the first one's value by value, and the others (run alone)."""
    first = members[0].client_model.state_dict()
    same, other = [], []
    for p in members:
        state = p.client_model.state_dict()
        (same if all(torch.equal(first[k], state[k]) for k in first) else other).append(p)
    return same, other


def _describe(cell: Cell, spec: AttackSpec) -> str:
    return f"{cell.victim.label()} | {cell.defense.label()} | batch {cell.batch_index} | {spec.name}"


def recover_labels(cell: Cell, spec: AttackSpec, attack, observation, client_model) -> torch.Tensor | None:
    """The attack's labels from its strategy (seeded by the strategy, not the attack: attacks sharing
    a strategy in a cell share its labels); None for attacks that infer their own (DLG)."""
    if not attack.uses_labels:
        return None
    strategy = components.registries()["labels"].build(spec.labels.name, **spec.labels.kwargs())
    return strategy.recover(observation, client_model,
                            generator=generator(cell.suite_seed, cell.key, spec.labels.identity(), "labels"))


def attack_rows(cell: Cell, spec: AttackSpec, attack, observation, client_model, batch: Batch, lpips_scorer,
                progress: Progress) -> tuple[list[ResultRow], dict[int, bytes]]:
    try:
        labels = recover_labels(cell, spec, attack, observation, client_model)
        deadline = None if spec.timeout_s is None else time.monotonic() + spec.timeout_s
        recon = attack.reconstruct(
            observation, client_model, labels=labels,
            generator=generator(cell.suite_seed, cell.key, spec.key, "attack"),
            deadline=deadline, progress=progress.iterations,
        )
        return scored_rows(recon, labels, batch, lpips_scorer)
    except Exception as err:
        return failure(err, batch, spec)


def packed_rows(chunk: list[_Prepared], spec: AttackSpec, attack, lpips_scorer,
                progress: Progress) -> list[tuple[list[ResultRow], dict[int, bytes]]]:
    """One batched ``reconstruct_many`` over the chunk's cells; a cell whose labels fail gets its error
    rows and leaves the pack. Raises ``_OutOfMemory`` for the caller to split the chunk."""
    results: dict[int, tuple[list[ResultRow], dict[int, bytes]]] = {}
    members, labels = [], []
    for i, p in enumerate(chunk):
        try:
            labels.append(recover_labels(p.cell, spec, attack, p.observation, p.client_model))
            members.append(i)
        except Exception as err:
            results[i] = failure(err, p.batch, spec)
    if members:
        # the time budget is per reconstruction: a pack of K may take K budgets
        deadline = None if spec.timeout_s is None else time.monotonic() + spec.timeout_s * len(members)
        try:
            recons = attack.reconstruct_many(
                [chunk[i].observation for i in members], chunk[members[0]].client_model, labels=labels,
                generators=[generator(chunk[i].cell.suite_seed, chunk[i].cell.key, spec.key, "attack") for i in members],
                deadline=deadline, progress=progress.iterations)
        except Exception as err:
            if memory.is_oom(err):
                raise _OutOfMemory(memory.first_line(err)) from err
            for i in members:
                results[i] = failure(err, chunk[i].batch, spec)
        else:
            for i, recon, y in zip(members, recons, labels):
                try:
                    results[i] = scored_rows(recon, y, chunk[i].batch, lpips_scorer)
                except Exception as err:
                    results[i] = failure(err, chunk[i].batch, spec)
    return [results[i] for i in range(len(chunk))]


def failure(err: BaseException, batch: Batch, spec: AttackSpec) -> tuple[list[ResultRow], dict[int, bytes]]:
    """Failures are data, with their reason."""
    if isinstance(err, AttackTimeout):
        return failed_rows(batch, "timeout", str(err)), {}
    if memory.is_oom(err):
        return failed_rows(batch, "oom", memory.first_line(err)), {}
    if isinstance(err, ThreatModelError):
        return failed_rows(batch, "error", f"threat model: {err}"), {}
    log.debug("attack %s failed:\n%s", spec.name, "".join(traceback.format_exception(err)))
    return failed_rows(batch, "error", f"{type(err).__name__}: {err}"), {}


def scored_rows(recon, labels, batch: Batch, lpips_scorer) -> tuple[list[ResultRow], dict[int, bytes]]:
    if recon.labels is None and labels is not None:
        recon = type(recon)(**{**recon.__dict__, "labels": labels.cpu()})
    scored = score(recon, _cpu(batch), lpips_scorer=lpips_scorer)
    rows = []
    pngs = {}
    for s in scored.images:
        slot = s.reference_index
        pngs[slot] = to_png(recon.images[s.matched_index])
        rows.append(ResultRow(
            image_slot=slot, image_id=batch.image_ids[slot], true_label=int(batch.labels[slot]), status="ok",
            psnr_db=s.psnr_db, ssim=s.ssim, lpips=s.lpips, lpips_note=scored.lpips_reason,
            label_accuracy=scored.label_accuracy, matched_slot=s.matched_index, matching_loss=recon.matching_loss,
            iterations=recon.iterations, restarts=recon.restarts, trace=recon.trace,
            flags=sanity.reconstruction_flags(recon, s.matched_index),
        ))
    return rows, pngs


def failed_rows(batch: Batch, status: str, error: str) -> list[ResultRow]:
    return [ResultRow(image_slot=i, image_id=batch.image_ids[i], true_label=int(batch.labels[i]), status=status,
                      error=error) for i in range(batch.size)]


def _cpu(batch: Batch) -> Batch:
    return Batch(images=batch.images.cpu(), labels=batch.labels.cpu(), image_ids=batch.image_ids,
                 normalization=batch.normalization, num_classes=batch.num_classes)


def _utility(protocol, model, batch: Batch, defense, observation, cell: Cell) -> dict:
    """The defense's utility cost (cosine to the undefended update), for the cell's row only:
    never part of the observation. Same client generator, so a shuffling client keeps its order."""
    try:
        return utility_cost(protocol, model, batch, defense=defense, defended=observation,
                            generator=generator(cell.suite_seed, cell.key, "client"))
    except Exception as err:  # a missing utility number must not cost the cell its attacks
        log.warning("cell %s: utility cost failed: %s", cell.key, err)
        return {"utility_error": f"{type(err).__name__}: {err}"}


def server_model(cell: Cell, dataset, *, device: torch.device, progress: Progress) -> tuple[torch.nn.Module, dict]:
    """The model the server sends, and what the cell's row says about it (``victim_info_json``).

    ``state = "init"``: weights from the cell's victim seed. ``state = "trained"``: the
    checkpoint of the victim's recipe, trained on first use (with progress) and loaded
    from the cache (``$LEAKBENCH_CACHE/victims``) afterwards; its test accuracy is
    measured on the suite's data set, the images the suite attacks.
    """
    context = {"num_classes": dataset.num_classes, "in_channels": dataset.channels, "side": dataset.side}
    recipe = getattr(cell.victim, "recipe", None)
    if recipe is None:
        model = build_victim(cell.victim.name, cell.victim.kwargs(), **context, seed=derive_seed(*cell.victim_seed_parts))
        return model.to(device), {"state": "init", "parameters": sum(p.numel() for p in model.parameters())}
    from leakbench.victims.training import load_or_train

    train_set = components.registries()["dataset"].build(recipe.dataset, **recipe.dataset_kwargs())
    progress.task(f"{cell.victim.label()} | training or loading the checkpoint")
    trained = load_or_train(cell.victim.name, cell.victim.kwargs(), recipe=recipe, train_set=train_set,
                            test_set=dataset, **context, device=device, progress=progress.iterations)
    return trained.model, trained.info()


def cell_fields(cell: Cell, batch_size: int, defense_info: dict, victim_info: dict | None = None,
                flags: list[str] | None = None) -> dict:
    from leakbench.suite import dumps

    return {
        "victim_info_json": dumps(victim_info or {}),
        "cell_flags_json": dumps(list(flags or [])),
        "case_index": cell.case_index,
        "dataset": cell.dataset.label(),
        "victim": cell.victim.name,
        "victim_label": cell.victim.label(),
        "victim_json": dumps(cell.victim.identity()),
        "defense": cell.defense.name,
        "defense_label": cell.defense.label(),
        "defense_json": dumps(cell.defense.identity()),
        "defense_info_json": dumps(defense_info),
        "protocol": cell.protocol.name,
        "protocol_json": dumps(cell.protocol.identity()),
        "batch_size": batch_size,
        "bn_mode": cell.protocol.kwargs().get("bn_mode", "train"),
        "batch_index": cell.batch_index,
        "trial": cell.trial,
        "threat_labels": cell.threat.labels,
        "threat_bn_stats": cell.threat.bn_stats,
        "case_indices_json": dumps(list(cell.case_indices)),
        "control": int(cell.control),
        "control_json": dumps({"cells": list(cell.control_cells), "attacks": list(cell.control_attacks)}
                              if cell.control_cells else {}),
    }

