"""Packs as Ray tasks on a Ray cluster (``pip install 'leakbench[ray]'``; see ``RAY.md``).

Each pack is one Ray task that asks for one GPU when the run's device is CUDA, else for
CPUs (one by default; torch uses as many threads as the task holds). At most ``workers``
tasks are in flight (default: the cluster's GPUs, else its CPUs); a task returns every
event of its pack, and the driver yields them as tasks finish, so the store is written
pack by pack, by the driver alone.

A worker that dies (killed, crashed, out of memory, its node lost) costs only its pack:
the driver submits the pack again, at most ``max_retries`` times, logs a warning and marks
the rows of the new attempt (``execution_json``: ``"attempt": 2``, ...). Ray's own silent
retries are off, so every retry is recorded. A pack whose own code raises is retried
within the same bound, then the run stops with the error.

Workers need the same leakbench (and torch) as the driver, the data roots the suite names,
and the caches: ``LEAKBENCH_CACHE``, ``TORCH_HOME`` and ``XDG_CACHE_HOME`` are passed to
them when set on the driver. A worker process keeps one ``leakbench.running.worker.Worker`` (data
set, server model, LPIPS) between the packs of a run; GPU tasks get a fresh process per
pack (Ray's default for GPU tasks, so each holds exactly its GPU and frees its memory).

Progress is live: the tasks put their attack calls' iterations and task descriptions on a Ray
queue (``ray.util.queue.Queue``, an actor that holds no CPU; at most every ``PROGRESS_S`` per
task, and every call's last report), which the driver drains while it waits for the tasks and
hands to the run's Progress (``leakbench.running.progress.WorkMeter``). The rows still come per pack,
when its task returns; a run whose live reports were lost (a queue that could not be reached)
is filled to its full share when its rows come, so the bar's total stays right.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from collections import deque
from contextlib import contextmanager
from dataclasses import replace
from importlib import metadata
from typing import Any, Iterable, Iterator

import ray
import ray.exceptions
import torch

from leakbench.core.acceleration import Acceleration
from leakbench.running.packs import AttackEvent, Event, Pack
from leakbench.running.progress import ForwardedProgress, Progress, SilentProgress
from leakbench.running.executors.processes import WorkerLost
from leakbench.suite import Suite

log = logging.getLogger(__name__)

WORKER_ENV = ("LEAKBENCH_CACHE", "TORCH_HOME", "XDG_CACHE_HOME")
CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_RETRIES = 2
POLL_S = 0.5  # how often the driver drains the progress queue while tasks run
PROGRESS_S = 1.0  # a task sends its progress at most this often (a call's last report always)

_WORKER: dict[str, Any] = {"key": None, "worker": None}  # per Ray worker process: the last Worker built


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's cache locations that the workers need, for Ray's ``runtime_env``.

    A relative path is made absolute against the driver's directory; ``~`` is left for
    each worker to expand (its own home)."""
    environ = os.environ if environ is None else environ
    env = {}
    for name in WORKER_ENV:
        value = environ.get(name)
        if value:
            env[name] = value if value.startswith("~") or os.path.isabs(value) else os.path.abspath(value)
    return env


def plugin_env(modules, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``PYTHONPATH`` for Ray workers: the folders of the suite's plug-in modules (``leakbench.plugins``),
    then the driver's own ``PYTHONPATH``; empty without plug-ins."""
    from leakbench.plugins import module_roots

    roots = module_roots(modules)
    if not roots:
        return {}
    environ = os.environ if environ is None else environ
    extra = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(roots + extra))}


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        out["leakbench"] = metadata.version("leakbench")
    except metadata.PackageNotFoundError:
        out["leakbench"] = "not installed"
    return out


class _QueueProgress(ForwardedProgress):
    """A task's progress, put on the driver's Ray queue as ``(pack, attempt, method, args)``. Progress
    never costs a pack: a queue that cannot be reached ends the reports, not the work."""

    every = PROGRESS_S

    def __init__(self, queue, index: int, attempt: int):
        super().__init__()
        self.queue = queue
        self.key = (index, attempt)

    def _send(self, method: str, *args) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait((*self.key, method, args))
        except Exception as err:  # the driver is gone or the queue died: the rows still come
            log.debug("progress queue unreachable, no more live progress for this pack: %s", err)
            self.queue = None


def _run_pack(suite: Suite, pack: Pack, device_kind: str, max_pack: int, acceleration: Acceleration | None,
              threads: int, progress_queue=None, attempt: int = 1) -> tuple[dict[str, Any], list[Event]]:
    """The Ray task: every event of ``pack``, with where it ran. Module level, so Ray pickles
    it by reference and the worker imports this module (and keeps ``_WORKER``)."""
    from leakbench.running.worker import Worker

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_kind)  # on a GPU task, Ray's CUDA_VISIBLE_DEVICES names only the task's GPU
    key = repr((suite.hash, device_kind, max_pack, acceleration, threads))
    if _WORKER["key"] != key:
        _WORKER["key"], _WORKER["worker"] = None, None
        _WORKER["worker"] = Worker(suite, device=device, max_pack=max_pack, acceleration=acceleration)
        _WORKER["key"] = key
    events = list(_WORKER["worker"].run_pack(pack, _QueueProgress(progress_queue, pack.index, attempt)))
    info = {"host": platform.node(), "pid": os.getpid(), **versions()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info, events


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address is 127.0.0.1 (as on a laptop)


@contextmanager
def loopback_only():
    """While a local Ray instance starts: its node address is 127.0.0.1, so the GCS, raylets, object
    store and workers listen on the loopback interface only, never on the machine's network. Ray reads
    the setting at import (this process) and from the environment (the processes it starts); both are
    put back afterwards, so a later connection to a real cluster from this process is unaffected."""
    from ray._private import ray_constants

    before_env = os.environ.get(LOOPBACK_ENV)
    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[LOOPBACK_ENV] = "0"
    if before is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before_env
        if before is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before


def _check_reachable(address: str) -> None:
    """Fail fast on an address nobody listens on (``ray.init`` would wait for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port; let Ray judge it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ValueError(f"cannot reach the Ray cluster at {address} ({err}); start one with "
                         f"`ray start --head --port {port}` or check --address") from None


class RayExecutor:
    name = "ray"

    def __init__(self, suite: Suite, *, device: torch.device, max_pack: int, address: str | None = None,
                 workers: int | None = None, acceleration: Acceleration | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, progress: Progress | None = None):
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.suite = suite
        self.device = device
        self.max_pack = max_pack
        self.acceleration = acceleration
        self.max_retries = max_retries
        self.progress = progress or SilentProgress()
        self.address = address
        self.env = worker_env()
        self.env.update(plugin_env(getattr(suite, "plugins", ())))
        self._started = False
        self._connect(address, workers)
        self.where = (f"cluster at {address}" if address and self._started
                      else "local instance" if self._started else "the Ray session of this process")
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.cpus = int(resources.get("CPU", 0))
        if device.type == "cuda":
            if self.gpus == 0:
                self.close()
                raise ValueError(f"the run's device is cuda, but the Ray cluster ({self.where}) has no GPU; "
                                 "add GPU nodes or run with --device cpu")
            self.resources = {"num_gpus": 1}
            self.threads = 0
            self.workers = workers or self.gpus
        else:
            if self.cpus == 0:
                self.close()
                raise ValueError(f"the Ray cluster ({self.where}) has no CPU to run tasks on")
            node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
            per_task = max(1, min(node_cpus, self.cpus // workers)) if workers else 1
            self.resources = {"num_cpus": per_task}
            self.threads = per_task
            self.workers = workers or max(1, self.cpus // per_task)
        self._seen_hosts: set[str] = set()

    # ------------------------------------------------------------------ connection

    def _connect(self, address: str | None, workers: int | None) -> None:
        if ray.is_initialized():  # a caller's own Ray session: use it, leave it running
            log.info("using the Ray session already connected")
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address:
            _check_reachable(address)
            kwargs["address"] = address
        else:
            kwargs["address"] = "local"
            if self.device.type != "cuda" and workers:
                kwargs["num_cpus"] = workers
        try:
            if address:
                ray.init(**kwargs)
            else:
                with loopback_only():
                    ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            hint = ""
            if address not in (None, "auto") and os.environ.get("RAY_AUTH_MODE") is None:
                hint = ("; if the cluster uses token authentication (what `ray start` sets up in recent Ray), "
                        "set RAY_AUTH_MODE=token and give its token (~/.ray/auth_token or RAY_AUTH_TOKEN)")
            raise ValueError(f"cannot connect to {where}: {err}{hint}") from None
        self._started = True

    def close(self) -> None:
        """Shut down the Ray session this executor started (never one it found running)."""
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def describe(self) -> str:
        task = "1 GPU" if "num_gpus" in self.resources else f"{self.resources['num_cpus']} CPU"
        return (f"ray ({self.where}: {self.gpus} GPUs, {self.cpus} CPUs; up to {self.workers} tasks "
                f"in flight, {task} each; packs of up to {self.max_pack})")

    # ------------------------------------------------------------------ work

    def _task(self):
        options: dict[str, Any] = {**self.resources, "max_retries": 0, "retry_exceptions": False}
        if "num_gpus" in self.resources:
            options["max_calls"] = 1
        if self.env:
            options["runtime_env"] = {"env_vars": dict(self.env)}
        return ray.remote(**options)(_run_pack)

    def events(self, packs: Iterable[Pack]) -> Iterator[tuple[Pack, Event]]:
        running: dict[Any, tuple[Pack, int]] = {}
        queue = None
        try:
            todo = deque((pack, 1) for pack in packs)  # (pack, attempt)
            if not todo:
                return
            task = self._task()
            suite_ref = ray.put(self.suite)
            device_kind = "cuda" if self.device.type == "cuda" else "cpu"
            queue = self._progress_queue()
            while todo or running:
                while todo and len(running) < self.workers:
                    pack, attempt = todo.popleft()
                    ref = task.remote(suite_ref, pack, device_kind, self.max_pack, self.acceleration, self.threads,
                                      queue, attempt)
                    running[ref] = (pack, attempt)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S if queue is not None else None)
                self._drain(queue, {(p.index, a) for p, a in running.values()})
                for ref in ready:
                    pack, attempt = running.pop(ref)
                    try:
                        info, events = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:  # the pack's own code raised
                        self._retry(pack, attempt, f"its task raised:\n{err}", todo)
                        continue
                    except ray.exceptions.RayError as err:  # the worker or its node died
                        self._retry(pack, attempt, f"its worker was lost: {type(err).__name__}: "
                                                   f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                                    todo)
                        continue
                    self._check_versions(info)
                    for event in events:
                        if isinstance(event, AttackEvent):
                            extra = {"host": info.get("host")}
                            if attempt > 1:
                                extra["attempt"] = attempt
                            event = replace(event, execution={**event.execution, **extra})
                        yield pack, event
        finally:
            for ref in running:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone; nothing to stop
                    pass
            if queue is not None:
                try:
                    ray.kill(queue.actor)
                except Exception:  # gone with its session already
                    pass
            self.close()

    def _progress_queue(self):
        """The queue the tasks report their progress on, or None (then the bar moves per pack only)."""
        try:
            from ray.util.queue import Queue

            return Queue(actor_options={"num_cpus": 0})
        except Exception as err:
            log.warning("no live progress from the Ray tasks (the bar moves as packs finish): %s", err)
            return None

    def _drain(self, queue, running: set[tuple[int, int]]) -> None:
        """Hand what the running tasks reported to the run's Progress (reports of lost attempts are dropped)."""
        if queue is None:
            return
        try:
            size = queue.qsize()
            items = queue.get_nowait_batch(size) if size else []
        except Exception as err:
            log.debug("progress queue unreadable: %s", err)
            return
        for index, attempt, method, args in items:
            if (index, attempt) not in running and method != "work":
                continue  # a lost attempt's postfix; its work reports are capped by the meter anyway
            report = getattr(self.progress, method, None)
            if report is not None:
                report(*args)

    def _retry(self, pack: Pack, attempt: int, reason: str, todo: deque) -> None:
        if attempt > self.max_retries:
            raise WorkerLost(f"pack {pack.index} failed {attempt} times on Ray; last: {reason}")
        log.warning("pack %d: %s; submitting it again (attempt %d of %d)", pack.index, reason, attempt + 1,
                    self.max_retries + 1)
        todo.appendleft((pack, attempt + 1))

    def _check_versions(self, info: dict[str, Any]) -> None:
        host = info.get("host", "?")
        if host in self._seen_hosts:
            return
        self._seen_hosts.add(host)
        mine = versions()
        differ = {k: (mine[k], info.get(k)) for k in mine if info.get(k) != mine[k]}
        if differ:
            log.warning("Ray worker on %s runs other versions than the driver (%s): its rows may differ",
                        host, ", ".join(f"{k} {theirs} vs {ours}" for k, (ours, theirs) in differ.items()))
