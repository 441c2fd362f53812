"""The runner, the driver of a run: plans the suite's remaining work as packs
(``leakbench.running.worker``), hands them to an executor (``leakbench.running.executors``) and alone writes the
store, one (cell, attack) per transaction as results come. Resumable: work already in the
store is skipped.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Sequence

import torch

from leakbench.core.acceleration import Acceleration
from leakbench.running import sanity
from leakbench.running.executors import EXECUTORS, LocalExecutor, ProcessExecutor
from leakbench.running.executors.processes import devices_for
from leakbench.running.packs import DEFAULT_MAX_PACK, CellEvent, plan_packs
from leakbench.running.progress import Progress, SilentProgress, WorkMeter, planned_iterations
from leakbench.store import CellRow, ResultRow, Store, StoreError, check_store, run_lock, store_path
from leakbench.suite import Suite

log = logging.getLogger(__name__)


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


def resolve_device(device: str, *, remote: bool = False) -> torch.device:
    """The run's device. ``remote``: the workers run elsewhere (Ray), so ``cuda`` is not
    checked on the driver's machine (the Ray executor checks that the cluster has GPUs)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available() and not remote:
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda; got {device!r}")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "cuda: on the workers (none on the driver)"
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = cpu_model()
    return f"cpu: {platform.processor() or platform.machine()}{f' ({model})' if model else ''}, " \
           f"{torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The processor's model name where Linux says it (``/proc/cpuinfo``), else "". Two CPU models give
    different rounding in their kernels, which the chaotic L-BFGS attacks turn into different PSNRs."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


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


def run_suite(
    suite: Suite,
    *,
    out_dir: str | Path,
    device: str = "auto",
    retry_failed: bool = False,
    progress: Progress | None = None,
    argv: str = "",
    executor: str = "local",
    workers: int | None = None,
    max_pack: int = DEFAULT_MAX_PACK,
    ray_address: str | None = None,
    acceleration: Acceleration | None = None,
) -> RunSummary:
    """Run every (cell, attack) of ``suite`` that the store under ``out_dir`` does not hold yet.

    The work is planned as packs of cells that share a server model (``leakbench.running.worker``)
    and run by ``executor`` (``local``, ``processes`` or ``ray``, see ``leakbench.running.executors``);
    only this process writes the store, one (cell, attack) per transaction, as events come.
    ``max_pack`` bounds how many cells a pack holds and how many reconstructions one
    batched attack call advances (1 turns packing off).
    """
    progress = progress or SilentProgress()
    dev = resolve_device(device, remote=executor == "ray")
    if max_pack < 1:
        raise ValueError(f"--pack-size must be >= 1, got {max_pack}")
    path = store_path(out_dir)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise StoreError(f"--out {out_dir} is a file, not a directory; pass a directory for the store and reports "
                         "(it is created if missing)")
    check_store(path)  # before the lock file is written beside it: a refused store's folder stays as it was
    started = time.monotonic()
    with run_lock(out_dir), Store(path) as store:
        if retry_failed:
            forgotten = store.forget_failed(suite.hash)
            if forgotten:
                log.info("retrying %d failed (cell, attack) pairs", forgotten)
        done = store.done(suite.hash)
        todo = [(cell, [a for a in cell.attacks if (cell.key, a.key) not in done]) for cell in suite.cells]
        todo = [(cell, attacks) for cell, attacks in todo if attacks]
        remaining = {cell.key: len(attacks) for cell, attacks in todo}
        total = sum(remaining.values())
        summary = RunSummary(run_id=-1, suite_hash=suite.hash, store=path,
                             attack_runs=suite.work_items(), skipped=suite.work_items() - total)
        # the bar counts reconstruction-iterations: each (cell, attack) run's planned share, the stored ones as done
        units: dict[str, int] = {}
        for spec in {spec.key: spec for cell in suite.cells for spec in cell.attacks}.values():
            units[spec.key] = planned_iterations(spec)
        meter = WorkMeter(progress, {(cell.key, a.key): units[a.key] for cell, attacks in todo for a in attacks})
        skipped_units = sum(units[a.key] for cell in suite.cells for a in cell.attacks if (cell.key, a.key) in done)
        runner = _executor(executor, suite, device=dev, workers=workers, max_pack=max_pack, progress=meter,
                           ray_address=ray_address, acceleration=acceleration)
        run_id = store.start_run(
            suite_name=suite.name, suite_hash=suite.hash, suite_text=suite.source_text,
            leak_metric=suite.leak_threshold.metric, leak_value=suite.leak_threshold.value,
            git_commit=git_commit(), versions=provenance_versions(), device=describe_device(dev),
            argv=argv, started_utc=utc_now(),
        )
        summary.run_id = run_id
        packs = plan_packs(todo, max_cells=max_pack)
        log.info("run %d of suite %s (%s): %d attack runs to do in %d packs, %d already stored; executor %s",
                 run_id, suite.name, suite.hash, total, len(packs), summary.skipped, runner.describe())
        meter.start(meter.total, skipped=skipped_units)
        status = "interrupted"
        cells: dict[str, CellEvent] = {}
        written: set[tuple[str, str]] = set()
        try:
            for _, event in runner.events(packs):
                if isinstance(event, CellEvent):
                    if remaining.get(event.cell_key, 0) > 0:  # a retried pack re-sends finished cells
                        cells[event.cell_key] = event
                        store.put_cell(suite.hash, event.cell_key, event.row)
                    continue
                if (event.cell_key, event.attack_key) in written:
                    continue  # already written by an earlier attempt of the same pack
                cell = cells[event.cell_key]
                last = remaining[event.cell_key] == 1
                baseline = _is_baseline(event.attack["name"])  # a floor: stored as such, kept out of the flag
                store.put_results(
                    suite_hash=suite.hash, cell_key=event.cell_key, attack_key=event.attack_key, run_id=run_id,
                    attack=event.attack, rows=event.rows, truth_pngs=cell.truth_pngs,
                    reconstruction_pngs=event.reconstruction_pngs, created_utc=utc_now(),
                    execution={**event.execution, "executor": runner.name},
                    baseline=baseline,
                    cell_row=None if not last else _flagged_row(store, suite, cell, [] if baseline else event.rows),
                )
                _kill_point("results")
                written.add((event.cell_key, event.attack_key))
                status_of = event.rows[0].status
                summary.statuses[status_of] = summary.statuses.get(status_of, 0) + 1
                meter.finished((event.cell_key, event.attack_key), status_of)
                remaining[event.cell_key] -= 1
            status = "finished"
        finally:
            meter.close()
            store.end_run(run_id, status=status, ended_utc=utc_now())
            summary.seconds = time.monotonic() - started
    return summary


def _executor(name: str, suite: Suite, *, device: torch.device, workers: int | None, max_pack: int,
              progress: Progress, ray_address: str | None, acceleration: Acceleration | None):
    if name == "local":
        if workers not in (None, 1):
            raise ValueError("--workers needs --executor processes (or ray); the local executor runs one worker")
        return LocalExecutor(suite, device=device, max_pack=max_pack, progress=progress, acceleration=acceleration)
    if name == "processes":
        return ProcessExecutor(suite, devices=devices_for(workers, device), max_pack=max_pack,
                               acceleration=acceleration, progress=progress)
    if name == "ray":
        try:
            from leakbench.running.executors.ray import RayExecutor
        except ImportError as err:
            raise ValueError(f"--executor ray needs Ray: pip install 'leakbench[ray]' ({err})") from None
        return RayExecutor(suite, device=device, max_pack=max_pack, address=ray_address, workers=workers,
                           acceleration=acceleration, progress=progress)
    raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}; got {name!r}")


def _is_baseline(attack: str) -> bool:
    """Whether the registry declares the attack a baseline (a floor such as label_only, not an attack)."""
    from leakbench.attacks.registry import ATTACKS

    return attack in ATTACKS and ATTACKS.get(attack).baseline


def _flagged_row(store: Store, suite: Suite, cell: CellEvent, new_rows: Sequence[ResultRow]) -> CellRow | None:
    """The cell's row with the no-leak sanity flag, over every attack of the cell but baselines (the
    flag's bar is their floor; those stored by an earlier, resumed run and ``new_rows``, its last);
    written with those rows in one transaction. None when no flag is raised (the cell's row, written
    when the cell began, stays as it is)."""
    check, grey_db = cell.leak_check
    if not check:
        return None
    flags = sanity.leak_flags(store.attack_psnrs(suite.hash, cell.cell_key) + [r.psnr_db for r in new_rows],
                              grey_db=grey_db)
    return cell.row.with_flags(flags) if flags else None


#: ``LEAKBENCH_KILL_AT=results:N`` SIGKILLs the run right after its N-th (cell, attack) write:
#: the kill-mid-run tests use it to land a kill at an exact point (where the cell's flags were
#: once written in a second transaction). Unset in normal use.
_KILL_ENV = "LEAKBENCH_KILL_AT"
_kill_counts: dict[str, int] = {}


def _kill_point(name: str) -> None:
    spec = os.environ.get(_KILL_ENV)
    if not spec or not spec.startswith(name + ":"):
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] >= int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
