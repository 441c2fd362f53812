"""The runner: expands nothing (the suite did), computes each defended update once, runs
the battery against it, scores, and stores rows. Resumable: work already in the store is skipped.
"""

from __future__ import annotations

import io
import logging
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from bench import components, sanity
from bench.core import AttackTimeout, Batch, ThreatModelError, derive_seed, generator
from bench.fl import utility_cost
from bench.metrics import get_lpips, score
from bench.store import ResultRow, Store, run_lock, store_path
from bench.suite import AttackSpec, Cell, Suite
from victims import build_victim

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What the runner reports while it works; the CLI draws it, tests may record it."""

    def start(self, total: int, *, skipped: int) -> None: ...
    def task(self, description: str) -> None: ...
    def iterations(self, done: int, total: int) -> None: ...
    def advance(self, status: str) -> None: ...
    def close(self) -> None: ...


class SilentProgress:
    def start(self, total: int, *, skipped: int) -> None: ...
    def task(self, description: str) -> None: ...
    def iterations(self, done: int, total: int) -> None: ...
    def advance(self, status: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class RunSummary:
    run_id: int
    suite_hash: str
    store: Path
    attack_runs: int
    skipped: int
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda; got {device!r}")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def provenance_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("leakbench", "torch", "torchvision", "lpips", "opacus", "numpy", "scikit-image", "scipy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
    return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


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


def run_suite(
    suite: Suite,
    *,
    out_dir: str | Path,
    device: str = "auto",
    retry_failed: bool = False,
    progress: Progress | None = None,
    argv: str = "",
) -> RunSummary:
    """Run every (cell, attack) of ``suite`` that the store under ``out_dir`` does not hold yet."""
    progress = progress or SilentProgress()
    dev = resolve_device(device)
    reg = components.registries()
    path = store_path(out_dir)
    started = time.monotonic()
    with run_lock(out_dir), Store(path) as store:
        if retry_failed:
            forgotten = store.forget_failed(suite.hash)
            if forgotten:
                log.info("retrying %d failed (cell, attack) pairs", forgotten)
        done = store.done(suite.hash)
        todo = [(cell, a) for cell in suite.cells for a in cell.attacks if (cell.key, a.key) not in done]
        summary = RunSummary(run_id=-1, suite_hash=suite.hash, store=path,
                             attack_runs=suite.work_items(), skipped=suite.work_items() - len(todo))
        run_id = store.start_run(
            suite_name=suite.name, suite_hash=suite.hash, suite_text=suite.source_text,
            leak_metric=suite.leak_threshold.metric, leak_value=suite.leak_threshold.value,
            git_commit=git_commit(), versions=provenance_versions(), device=describe_device(dev),
            argv=argv, started_utc=utc_now(),
        )
        summary.run_id = run_id
        log.info("run %d of suite %s (%s): %d attack runs to do, %d already stored",
                 run_id, suite.name, suite.hash, len(todo), summary.skipped)
        progress.start(len(todo), skipped=summary.skipped)
        status = "interrupted"
        try:
            dataset = reg["dataset"].build(suite.dataset.name, **suite.dataset.kwargs())
            lpips_scorer = get_lpips(dev) if todo else None
            if lpips_scorer is not None and not lpips_scorer.available:
                log.warning("LPIPS is not available, its column will be NULL: %s", lpips_scorer.reason)
            victims = _Cache()
            pending: dict[str, list[AttackSpec]] = {}
            cells = {}
            for cell, attack in todo:
                pending.setdefault(cell.key, []).append(attack)
                cells[cell.key] = cell
            for key, attacks in pending.items():
                _run_cell(cells[key], attacks, store=store, run_id=run_id, suite=suite, dataset=dataset,
                          victims=victims, device=dev, lpips_scorer=lpips_scorer, progress=progress,
                          summary=summary)
            status = "finished"
        finally:
            progress.close()
            store.end_run(run_id, status=status, ended_utc=utc_now())
            summary.seconds = time.monotonic() - started
    return summary


def _run_cell(cell: Cell, attacks: list[AttackSpec], *, store: Store, run_id: int, suite: Suite, dataset,
              victims: _Cache, device: torch.device, lpips_scorer, progress: Progress, summary: RunSummary) -> None:
    reg = components.registries()
    defense_info: dict = {}
    victim_info: dict = {}
    client_error: str | None = None
    observation = client_model = None
    indices = cell.image_indices
    try:
        defense = reg["defense"].build(cell.defense.name, **cell.defense.kwargs())
        # A defense may choose which images the client trains on together (label disguising):
        # the rows then score those images.
        indices = defense.compose_batch(indices, label_of=lambda i: dataset.get(i)[1], pool_size=len(dataset),
                                        generator=generator(cell.suite_seed, cell.key, "compose"))
    except Exception as err:  # a broken cell is data: every attack gets an error row
        client_error = f"client update failed: {type(err).__name__}: {err}"
    batch = dataset.batch(list(indices))
    batch = Batch(images=batch.images.to(device), labels=batch.labels.to(device), image_ids=batch.image_ids,
                  normalization=batch.normalization, num_classes=batch.num_classes)
    truth_pngs = {slot: to_png(img) for slot, img in enumerate(batch.images)}
    if client_error is None:
        try:
            model, victim_info = victims.get(cell.victim_seed_parts,
                                             lambda: _server_model(cell, dataset, device=device, progress=progress))
            protocol = reg["protocol"].build(cell.protocol.name, **cell.protocol.kwargs())
            observation, client_model = protocol.client_update(
                model, batch, defense=defense, threat=cell.threat,
                generator=generator(cell.suite_seed, cell.key, "client"))
            defense_info = {**defense.describe(), **_utility(protocol, model, batch, defense, observation, cell)}
        except Exception as err:  # a broken cell is data: every attack gets an error row
            client_error = f"client update failed: {type(err).__name__}: {err}"
    if client_error is not None:
        log.warning("cell %s: %s", cell.key, client_error)
    cell_flags = sanity.update_flags(observation) if observation is not None else []
    store.put_cell(suite.hash, cell.key, _cell_fields(cell, batch.size, defense_info, victim_info, cell_flags))
    for attack in attacks:
        description = f"{cell.victim.label()} | {cell.defense.label()} | batch {cell.batch_index} | {attack.name}"
        progress.task(description)
        t0 = time.monotonic()
        if client_error is not None:
            rows, recon_pngs = _failed_rows(batch, "error", client_error), {}
        else:
            rows, recon_pngs = _attack_rows(cell, attack, observation, client_model, batch, lpips_scorer, progress)
        elapsed = time.monotonic() - t0
        rows = [ResultRow(**{**r.__dict__, "seconds": elapsed}) for r in rows]
        store.put_results(
            suite_hash=suite.hash, cell_key=cell.key, attack_key=attack.key, run_id=run_id,
            attack=attack.identity(), rows=rows, truth_pngs=truth_pngs, reconstruction_pngs=recon_pngs,
            created_utc=utc_now(),
        )
        status = rows[0].status
        summary.statuses[status] = summary.statuses.get(status, 0) + 1
        progress.advance(status)
    if sanity.checks_leak(defense=cell.defense.name, batch_size=batch.size) and client_error is None:
        # over every attack of the cell, including those stored by an earlier (resumed) run
        stored = store.conn.execute("SELECT psnr_db FROM results WHERE suite_hash = ? AND cell_key = ?",
                                    (suite.hash, cell.key)).fetchall()
        flags = sanity.leak_flags([r[0] for r in stored], grey_db=sanity.grey_psnr_db(batch.images)[0])
        if flags:
            store.put_cell(suite.hash, cell.key,
                           _cell_fields(cell, batch.size, defense_info, victim_info, cell_flags + flags))


def _utility(protocol, model, batch: Batch, defense, observation, cell: Cell) -> dict:
    """The defense's utility cost (cosine to the undefended update), for the cell's row only:
    never part of the observation. Same client generator, so a shuffling client keeps its order."""
    try:
        return utility_cost(protocol, model, batch, defense=defense, defended=observation,
                            generator=generator(cell.suite_seed, cell.key, "client"))
    except Exception as err:  # a missing utility number must not cost the cell its attacks
        log.warning("cell %s: utility cost failed: %s", cell.key, err)
        return {"utility_error": f"{type(err).__name__}: {err}"}


def _server_model(cell: Cell, dataset, *, device: torch.device, progress: Progress) -> tuple[torch.nn.Module, dict]:
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
    from victims.training import load_or_train

    train_set = components.registries()["dataset"].build(recipe.dataset, **recipe.dataset_kwargs())
    progress.task(f"{cell.victim.label()} | training or loading the checkpoint")
    trained = load_or_train(cell.victim.name, cell.victim.kwargs(), recipe=recipe, train_set=train_set,
                            test_set=dataset, **context, device=device, progress=progress.iterations)
    return trained.model, trained.info()


def _cell_fields(cell: Cell, batch_size: int, defense_info: dict, victim_info: dict | None = None,
                 flags: list[str] | None = None) -> dict:
    from bench.suite import dumps

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
    }


def _failed_rows(batch: Batch, status: str, error: str) -> list[ResultRow]:
    return [ResultRow(image_slot=i, image_id=batch.image_ids[i], true_label=int(batch.labels[i]), status=status,
                      error=error) for i in range(batch.size)]


def _attack_rows(cell: Cell, spec: AttackSpec, observation, client_model, batch: Batch, lpips_scorer,
                 progress: Progress) -> tuple[list[ResultRow], dict[int, bytes]]:
    reg = components.registries()
    try:
        attack = reg["attack"].build(spec.name, **spec.kwargs())
        labels = None
        if attack.uses_labels:  # DLG infers its own; a strategy's error must not fail an attack that needs none
            strategy = reg["labels"].build(spec.labels.name, **spec.labels.kwargs())
            # seeded by the strategy, not the attack: attacks sharing a strategy in a cell share its labels
            labels = strategy.recover(observation, client_model,
                                      generator=generator(cell.suite_seed, cell.key, spec.labels.identity(), "labels"))
        deadline = None if spec.timeout_s is None else time.monotonic() + spec.timeout_s
        recon = attack.reconstruct(
            observation, client_model, labels=labels,
            generator=generator(cell.suite_seed, cell.key, spec.key, "attack"),
            deadline=deadline, progress=progress.iterations,
        )
        if recon.labels is None and labels is not None:
            recon = type(recon)(**{**recon.__dict__, "labels": labels.cpu()})
        scored = score(recon, _cpu(batch), lpips_scorer=lpips_scorer)
    except AttackTimeout as err:
        return _failed_rows(batch, "timeout", str(err)), {}
    except torch.cuda.OutOfMemoryError as err:
        return _failed_rows(batch, "oom", str(err).splitlines()[0]), {}
    except ThreatModelError as err:
        return _failed_rows(batch, "error", f"threat model: {err}"), {}
    except Exception as err:  # failures are data, with their reason
        log.debug("attack %s failed:\n%s", spec.name, traceback.format_exc())
        return _failed_rows(batch, "error", f"{type(err).__name__}: {err}"), {}
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


def _cpu(batch: Batch) -> Batch:
    return Batch(images=batch.images.cpu(), labels=batch.labels.cpu(), image_ids=batch.image_ids,
                 normalization=batch.normalization, num_classes=batch.num_classes)
