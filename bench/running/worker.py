"""What a worker does with a pack of cells: the client updates, the battery, the scores.

No store here. The runner (the driver) plans packs (``leakbench.running.packs.plan_packs``),
hands them to an executor (``leakbench.running.executors``: in this process, one process per
GPU, or Ray), and writes the events a worker yields back into the store, one (cell, attack) at a
time; so whatever runs the work, the store, resume and crash rules stay the driver's.

A worker has three parts, each in its own module:

- the client side (``leakbench.running.client``): each cell's server model, defended update
  and store row;
- the pack sizes (``leakbench.running.sizing``): how many reconstructions one batched call
  holds, from memory and timing probes;
- the attacks (``leakbench.running.attacking``): each attack once over the pack's cells that
  ask for it, packed where it can be, split on out-of-memory, scored.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from leakbench import components
from leakbench.core.acceleration import Acceleration
from leakbench.metrics import get_lpips
from leakbench.running.attacking import AttackRunner
from leakbench.running.client import ClientSide, Prepared
from leakbench.running.packs import DEFAULT_MAX_PACK, Event, Pack
from leakbench.running.progress import Progress, SilentProgress
from leakbench.running.sizing import PackSizer
from leakbench.suite import AttackSpec, Suite

log = logging.getLogger(__name__)


class Worker:
    """Runs packs of one suite on one device: its client side (``ClientSide``: the data set, the last
    server model, each cell's update and row), its pack sizes (``PackSizer``) and its attacks
    (``AttackRunner``: packing, OOM splits, scoring with LPIPS)."""

    def __init__(self, suite: Suite, *, device: torch.device, max_pack: int = DEFAULT_MAX_PACK,
                 acceleration: Acceleration | None = None, memory_share: float = 1.0):
        """``memory_share``: the part of the device's free memory this worker plans for (1/N for N
        workers on one device, so that together they stay within the headroom)."""
        self.acceleration = acceleration or Acceleration()
        self.acceleration.apply_backend_flags()  # TF32: torch's own process-wide switch
        self.suite = suite
        self.device = device
        self.max_pack = max(1, int(max_pack))
        from leakbench.plugins import load_plugins

        load_plugins(getattr(suite, "plugins", ()))  # a worker process imports the suite's plug-ins itself
        dataset = components.registries()["dataset"].build(suite.dataset.name, **suite.dataset.kwargs())
        self.client = ClientSide(suite, device=device, dataset=dataset)
        self.sizer = PackSizer(device=device, max_pack=self.max_pack, acceleration=self.acceleration,
                               memory_share=memory_share)
        self.attacks = AttackRunner(device=device, max_pack=self.max_pack, acceleration=self.acceleration,
                                    sizer=self.sizer, lpips=lambda: self.lpips)
        self._lpips = None

    @property
    def dataset(self):
        return self.client.dataset

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
            ready, event = self.client.prepare(cell, progress)
            prepared.append(ready)
            yield event
        by_key = {p.cell.key: p for p in prepared}
        order: dict[str, list[tuple[AttackSpec, Prepared]]] = {}
        for cell, attacks in pack.items:
            for spec in attacks:
                order.setdefault(spec.key, []).append((spec, by_key[cell.key]))
        for group in order.values():
            yield from self.attacks.run_group(group, progress)
