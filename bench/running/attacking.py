"""Running one attack over the cells of a pack that ask for it, and scoring what it returns.

A packable attack (``Attack.packable``, e.g. ``inverting_gradients``) advances those cells'
reconstructions together, restarts x cells as one batched computation, as long as their
observations have the same shape (``Attack.pack_signature``) and the client models are identical
(a defense such as DP-SGD may change the architecture); other attacks run cell after cell.
Every reconstruction draws from its own cell's seeds, so a pack gives the numbers the cells give
alone, up to floating-point order. On out-of-memory (a GPU's, or a CPU allocation that fails)
the call is split in halves and retried, down to one reconstruction (then the rows say
``oom``); every row records its pack size, the limit, where it came from and the splits
(``results.execution_json``), so no fallback is silent. Failures are rows with their reason.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Callable, Iterator

import torch
from torch import nn

from leakbench import components
from leakbench.core import (Attack, AttackTimeout, Batch, Observation, Reconstruction, ThreatModelError, generator,
                            memory)
from leakbench.core.acceleration import Acceleration
from leakbench.metrics import score
from leakbench.metrics.perceptual import LPIPSScorer
from leakbench.running import sanity
from leakbench.running.client import Prepared, to_png
from leakbench.running.packs import AttackEvent
from leakbench.running.progress import CallProgress, Progress
from leakbench.running.sizing import PackSizer
from leakbench.store import ResultRow
from leakbench.suite import AttackSpec, Cell

log = logging.getLogger(__name__)


class OutOfMemory(RuntimeError):
    pass


class AttackRunner:
    """Runs attack groups of prepared cells on one device, with the run's speed-ups and pack limits."""

    def __init__(self, *, device: torch.device, max_pack: int, acceleration: Acceleration, sizer: PackSizer,
                 lpips: Callable[[], Any]) -> None:
        """``lpips``: returns the LPIPS scorer (loaded on first use)."""
        self.device = device
        self.max_pack = max_pack
        self.acceleration = acceleration
        self.sizer = sizer
        self._lpips = lpips

    @property
    def lpips(self):
        return self._lpips()

    def run_group(self, group: list[tuple[AttackSpec, Prepared]], progress: Progress) -> Iterator[AttackEvent]:
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
        packable: dict[tuple, list[Prepared]] = {}
        alone: list[Prepared] = []
        for _, p in group:
            signature = None
            if attack is not None and attack.packable and p.error is None and self.max_pack > 1:
                signature = attack.pack_signature(p.observation)
            if signature is None:
                alone.append(p)
            else:
                packable.setdefault((signature, model_fingerprint(p.client_model)), []).append(p)
        for members in packable.values():
            if len(members) == 1:
                alone.extend(members)
                continue
            same, other = split_by_weights(members)
            alone.extend(other)
            if len(same) == 1:
                alone.extend(same)
            else:
                yield from self._packed(spec, attack, same, progress)
        for p in sorted(alone, key=lambda p: [q.cell.key for _, q in group].index(p.cell.key)):
            yield self._one(spec, attack, build_error, p, progress)

    def _one(self, spec: AttackSpec, attack: Attack | None, build_error: str | None, p: Prepared,
             progress: Progress) -> AttackEvent:
        progress.task(describe_run(p.cell, spec))
        t0 = time.monotonic()
        used, acceleration = {}, None
        if p.error is not None:
            rows, pngs = failed_rows(p.batch, "error", p.error), {}
        elif build_error is not None:
            rows, pngs = failed_rows(p.batch, "error", build_error), {}
        else:
            used = self._resolved(spec, attack, p, 1)
            acceleration = attack.acceleration
            rows, pngs = attack_rows(p.cell, spec, attack, p.observation, p.client_model, p.batch, self.lpips,
                                     CallProgress(progress, ((p.cell.key, spec.key),)))
        return self._event(p, spec, rows, pngs, time.monotonic() - t0, {"pack": 1, **used}, progress,
                           acceleration=acceleration)

    def _resolved(self, spec: AttackSpec, attack: Attack, sample: Prepared, copies: int) -> dict:
        """``--compile auto`` resolved for a call of ``copies`` reconstructions (the attack is handed the result);
        what was decided and why, for the rows' execution record. Nothing to resolve: ``{}``."""
        if self.acceleration.compile != "auto":
            return {}
        chosen, why = self.sizer.compile_choice(spec, attack, sample, copies)
        attack.acceleration = self.acceleration.with_compile(chosen)
        return {"compile_auto": f"{chosen}: {why}"}

    def _packed(self, spec: AttackSpec, attack: Attack, members: list[Prepared],
                progress: Progress) -> Iterator[AttackEvent]:
        progress.task(f"{describe_run(members[0].cell, spec)}: sizing the pack (memory and speed probes)")
        limit, how = self.sizer.limit(spec, attack, members[0])
        start = 0
        while start < len(members):
            chunk = members[start:start + limit]
            start += len(chunk)
            yield from self._run_chunk(spec, attack, chunk, progress, {"limit": limit, "limit_from": how}, splits=0)

    def _run_chunk(self, spec: AttackSpec, attack: Attack, chunk: list[Prepared], progress: Progress, info: dict, *,
                   splits: int) -> Iterator[AttackEvent]:
        progress.task(f"{describe_run(chunk[0].cell, spec)} | pack of {len(chunk)} cells" if len(chunk) > 1
                      else describe_run(chunk[0].cell, spec))
        used = self._resolved(spec, attack, chunk[0], len(chunk))
        t0 = time.monotonic()
        try:
            outcomes = packed_rows(chunk, spec, attack, self.lpips,
                                   CallProgress(progress, tuple((p.cell.key, spec.key) for p in chunk)))
        except OutOfMemory as err:
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
        execution = {"pack": len(chunk), **info, **used, "oom_splits": splits}
        for p, (rows, pngs) in zip(chunk, outcomes):
            yield self._event(p, spec, rows, pngs, seconds, execution, progress, acceleration=attack.acceleration)

    def _recorded(self, execution: dict, acceleration: Acceleration | None = None) -> dict:
        """The row's execution record, with the speed-ups it ran under (none named: plain fp32)."""
        speedups = (acceleration or self.acceleration).describe()
        return {**execution, "acceleration": speedups} if speedups else execution

    def _event(self, p: Prepared, spec: AttackSpec, rows: list[ResultRow], pngs: dict[int, bytes], seconds: float,
               execution: dict, progress: Progress, acceleration: Acceleration | None = None) -> AttackEvent:
        rows = [ResultRow(**{**r.__dict__, "seconds": seconds}) for r in rows]
        return AttackEvent(cell_key=p.cell.key, attack_key=spec.key, attack=spec.identity(), rows=rows,
                           reconstruction_pngs=pngs, execution=self._recorded(execution, acceleration))


def model_fingerprint(model: torch.nn.Module) -> tuple:
    """Architecture and tensor shapes; equal fingerprints are then compared value by value (``_same_models``)."""
    return (type(model).__name__, tuple((n, tuple(t.shape), str(t.dtype)) for n, t in model.state_dict().items()))


def split_by_weights(members: list[Prepared]) -> tuple[list[Prepared], list[Prepared]]:
    """Members whose client model equals the first one's value by value, and the others (run alone)."""
    first = members[0].client_model.state_dict()
    same, other = [], []
    for p in members:
        state = p.client_model.state_dict()
        (same if all(torch.equal(first[k], state[k]) for k in first) else other).append(p)
    return same, other


def describe_run(cell: Cell, spec: AttackSpec) -> str:
    return f"{cell.victim.label()} | {cell.defense.label()} | batch {cell.batch_index} | {spec.name}"


def recover_labels(cell: Cell, spec: AttackSpec, attack: Attack, observation: Observation,
                   client_model: nn.Module) -> torch.Tensor | None:
    """The attack's labels from its strategy (seeded by the strategy, not the attack: attacks sharing
    a strategy in a cell share its labels); None for attacks that infer their own (DLG)."""
    if not attack.uses_labels:
        return None
    strategy = components.registries()["labels"].build(spec.labels.name, **spec.labels.kwargs())
    return strategy.recover(observation, client_model,
                            generator=generator(cell.suite_seed, cell.key, spec.labels.identity(), "labels"))


def attack_rows(cell: Cell, spec: AttackSpec, attack: Attack, observation: Observation, client_model: nn.Module,
                batch: Batch, lpips_scorer: LPIPSScorer,
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


def packed_rows(chunk: list[Prepared], spec: AttackSpec, attack: Attack, lpips_scorer: LPIPSScorer,
                progress: Progress) -> list[tuple[list[ResultRow], dict[int, bytes]]]:
    """One batched ``reconstruct_many`` over the chunk's cells; a cell whose labels fail gets its error
    rows and leaves the pack. Raises ``OutOfMemory`` for the caller to split the chunk."""
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
                raise OutOfMemory(memory.first_line(err)) from err
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


def scored_rows(recon: Reconstruction, labels: torch.Tensor | None, batch: Batch,
                lpips_scorer: LPIPSScorer) -> tuple[list[ResultRow], dict[int, bytes]]:
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
