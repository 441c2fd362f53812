"""The default executor: every pack in this process, on one device, with live progress."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from leakbench.core.acceleration import Acceleration, backend_flags, restore_backend_flags
from leakbench.running.packs import Event, Pack
from leakbench.running.progress import Progress, SilentProgress
from leakbench.running.worker import Worker
from leakbench.suite import Suite


class LocalExecutor:
    name = "local"

    def __init__(self, suite: Suite, *, device: torch.device, max_pack: int, progress: Progress | None = None,
                 acceleration: Acceleration | None = None):
        self.acceleration = acceleration
        self.suite = suite
        self.device = device
        self.max_pack = max_pack
        self.progress = progress or SilentProgress()

    def describe(self) -> str:
        return f"local ({self.device.type}, packs of up to {self.max_pack})"

    def events(self, packs: Iterable[Pack]) -> Iterator[tuple[Pack, Event]]:
        before = backend_flags()  # TF32 is torch's process-wide switch: a library caller gets its own back
        try:
            worker = Worker(self.suite, device=self.device, max_pack=self.max_pack, acceleration=self.acceleration)
            for pack in packs:
                for event in worker.run_pack(pack, self.progress):
                    yield pack, event
        finally:
            restore_backend_flags(before)
