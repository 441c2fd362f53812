"""One worker process per device on this machine (each GPU, or CPU workers sharing the cores).

Workers are started with the ``spawn`` method (CUDA cannot be forked), each pinned to one
device, and stream their events back to the driver as they complete. When a worker dies
(killed, crashed, out of host memory), the driver notices, starts a new one on the same
device and hands the pack out again, at most ``max_retries`` times; the rows already
written from the first attempt stay and are not written twice (the driver skips them).

Each worker sends to the driver over a pipe of its own, not a queue shared by all: a worker
killed while writing to a shared ``multiprocessing.Queue`` keeps that queue's write lock for
ever, and every other worker's messages then wait behind it (seen here: a run hung after a
worker was SIGKILLed). A dead worker's pipe reads as closed once its last message is read,
which is how the driver notices the death.

Progress is live: a worker sends its attack calls' iterations and task descriptions through
the same pipe (at most every ``PROGRESS_S`` per worker, and every call's last report), and
the driver hands them to the run's Progress (``leakbench.running.progress.WorkMeter``), so the bar
moves while packs run, not only when their rows come.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import traceback
from dataclasses import replace
from multiprocessing.connection import wait
from typing import Iterable, Iterator

import torch

from leakbench.running.packs import AttackEvent, Event, Pack
from leakbench.running.progress import ForwardedProgress, Progress, SilentProgress
from leakbench.suite import Suite

log = logging.getLogger(__name__)

POLL_S = 0.5
PROGRESS_S = 0.5  # a worker sends its progress at most this often (a call's last report always)


class _QueueProgress(ForwardedProgress):
    """A worker's progress, sent to the driver as ``("progress", worker, pack, attempt, (method, args))``."""

    every = PROGRESS_S

    def __init__(self, conn, worker_id: int, index: int, attempt: int):
        super().__init__()
        self.conn = conn  # the worker's end of its pipe to the driver
        self.header = ("progress", worker_id, index, attempt)

    def _send(self, method: str, *args) -> None:
        self.conn.send((*self.header, (method, args)))


class WorkerLost(RuntimeError):
    """A pack whose worker died more often than the retries allow."""


def devices_for(workers: int | None, device: torch.device) -> list[str]:
    """One device name per worker: every visible GPU by default, else ``workers`` CPU workers."""
    if device.type == "cuda":
        count = torch.cuda.device_count()
        n = workers or count
        return [f"cuda:{i % count}" for i in range(n)]
    return ["cpu"] * max(1, workers or 1)


def _worker_main(suite: Suite, device: str, max_pack: int, threads: int, tasks, conn, worker_id: int,
                 acceleration=None, memory_share: float = 1.0) -> None:
    import signal

    from leakbench.running.worker import Worker

    # Ctrl-C reaches the whole process group: the driver alone handles it (it keeps the finished
    # rows and ends the workers at once), so a worker neither prints a traceback nor finishes its pack
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    worker = Worker(suite, device=dev, max_pack=max_pack, acceleration=acceleration, memory_share=memory_share)
    while True:
        item = tasks.get()
        if item is None:
            return
        pack, attempt = item
        try:
            for event in worker.run_pack(pack, _QueueProgress(conn, worker_id, pack.index, attempt)):
                conn.send(("event", worker_id, pack.index, attempt, event))
        except BaseException:  # the driver records it; the worker goes on with the next pack
            conn.send(("failed", worker_id, pack.index, attempt, traceback.format_exc()))
        else:
            conn.send(("done", worker_id, pack.index, attempt, None))


class ProcessExecutor:
    name = "processes"

    def __init__(self, suite: Suite, *, devices: list[str], max_pack: int, max_retries: int = 2, acceleration=None,
                 progress: Progress | None = None):
        self.progress = progress or SilentProgress()
        self.acceleration = acceleration
        self.suite = suite
        self.devices = devices
        self.max_pack = max_pack
        self.max_retries = max_retries
        cpu_workers = sum(1 for d in devices if d == "cpu")
        self.threads = max(1, torch.get_num_threads() // cpu_workers) if cpu_workers else 0

    def describe(self) -> str:
        return f"processes ({len(self.devices)} workers: {', '.join(self.devices)}; packs of up to {self.max_pack})"

    def events(self, packs: Iterable[Pack]) -> Iterator[tuple[Pack, Event]]:
        packs = {p.index: p for p in packs}
        if not packs:
            return
        ctx = mp.get_context("spawn")
        todo: list[tuple[int, int]] = [(i, 0) for i in packs]  # (pack index, attempt)
        workers: dict[int, dict] = {}

        def start(worker_id: int, device: str) -> None:
            tasks = ctx.Queue()  # written by the driver only
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, name=f"leakbench-worker-{worker_id}", daemon=True,
                               args=(self.suite, device, self.max_pack, self.threads, tasks, writer, worker_id,
                                     self.acceleration, 1 / self.devices.count(device)))
            proc.start()
            writer.close()  # the worker holds the only write end: when it dies, the pipe reads as closed
            workers[worker_id] = {"proc": proc, "tasks": tasks, "conn": reader, "device": device, "busy": None}

        def feed(worker_id: int) -> None:
            w = workers[worker_id]
            if w["busy"] is None and todo:
                w["busy"] = todo.pop(0)
                w["tasks"].put((packs[w["busy"][0]], w["busy"][1]))

        for worker_id, device in enumerate(self.devices):
            start(worker_id, device)
            feed(worker_id)
        next_id = len(self.devices)
        try:
            while any(w["busy"] is not None for w in workers.values()) or todo:
                readers = {w["conn"]: worker_id for worker_id, w in workers.items()}
                for conn in wait(list(readers), timeout=POLL_S):
                    worker_id = readers[conn]
                    w = workers[worker_id]
                    try:
                        kind, _, index, attempt, payload = conn.recv()
                    except (EOFError, OSError):  # its last message is read and it is gone
                        conn.close()
                        del workers[worker_id]
                        w["proc"].join(timeout=5)
                        if w["busy"] is not None:
                            index, attempt = w["busy"]
                            self._retry(index, attempt, f"worker {worker_id} on {w['device']} died "
                                                        f"(exit code {w['proc'].exitcode})", todo)
                        if todo:
                            start(next_id, w["device"])
                            feed(next_id)
                            next_id += 1
                        continue
                    if kind == "progress":
                        method, args = payload
                        if method == "task" and len(self.devices) > 1:
                            args = (f"worker {worker_id}: {args[0]}",)
                        report = getattr(self.progress, method, None)
                        if report is not None:
                            report(*args)
                    elif kind == "event":
                        if attempt and isinstance(payload, AttackEvent):
                            payload = replace(payload, execution={**payload.execution, "attempt": attempt + 1})
                        yield packs[index], payload
                    elif kind == "failed":
                        w["busy"] = None
                        self._retry(index, attempt, f"worker {worker_id} raised:\n{payload}", todo)
                        feed(worker_id)
                    else:
                        w["busy"] = None
                        feed(worker_id)
        except BaseException:  # Ctrl-C or an error of the driver: the work in flight is not kept, end it now
            for w in workers.values():
                if w["proc"].is_alive():
                    w["proc"].kill()
            raise
        finally:
            for w in workers.values():
                try:
                    w["tasks"].put(None)
                except (OSError, ValueError):
                    pass
            for w in workers.values():
                w["proc"].join(timeout=10)
                if w["proc"].is_alive():
                    w["proc"].kill()
                w["conn"].close()

    def _retry(self, index: int, attempt: int, reason: str, todo: list[tuple[int, int]]) -> None:
        if attempt >= self.max_retries:
            raise WorkerLost(f"pack {index} failed {attempt + 1} times; last: {reason}")
        log.warning("pack %d: %s; handing it out again (attempt %d of %d)", index, reason, attempt + 2,
                    self.max_retries + 1)
        todo.insert(0, (index, attempt + 1))
