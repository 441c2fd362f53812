"""Executors: who runs the packs of a suite. The driver (``leakbench.running.runner``) alone writes the store.

- ``local`` (default): packs one after the other in this process.
- ``processes``: one worker process per device (``--workers N``; each GPU of the machine,
  or N CPU workers sharing the cores), fed packs through a queue. A worker that dies loses
  only the pack in hand, which is handed out again (at most ``max_retries`` times,
  recorded in the rows' ``execution_json`` and the log).
- ``ray``: packs as Ray tasks on a Ray cluster (``leakbench.running.executors.ray``; optional extra).

Every executor yields the worker's events (``leakbench.running.packs.CellEvent`` / ``AttackEvent``)
as they come; seeds come from the cells, so the rows do not depend on who computed them.

Part of running, where the engine's parts meet: may import the suite, the worker
(``leakbench.running.worker``) and the attacks' speed-up settings; never the CLI or the reports.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from leakbench.running.executors.local import LocalExecutor
from leakbench.running.executors.processes import ProcessExecutor

EXECUTORS = ("local", "processes", "ray")


class Executor(Protocol):
    name: str

    def describe(self) -> str: ...
    def events(self, packs: Iterable) -> Iterator: ...


__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "ProcessExecutor"]
