"""Live progress from Ray tasks: their iterations reach the driver's bar while packs run, and the
count ends at the suite's planned reconstruction-iterations."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from leakbench.running.progress import UNITS_WITHOUT_ITERATIONS, SilentProgress  # noqa: E402
from leakbench.running.runner import run_suite  # noqa: E402
from leakbench.suite import load_suite  # noqa: E402


class Recording(SilentProgress):
    def __init__(self):
        self.starts: list[tuple[int, int]] = []
        self.log: list[tuple[str, object]] = []

    def start(self, total: int, *, skipped: int) -> None:
        self.starts.append((total, skipped))

    def update(self, units: int) -> None:
        self.log.append(("update", units))

    def advance(self, status: str) -> None:
        self.log.append(("advance", status))


def test_ray_tasks_report_iterations_live(tiny_suite_file, tmp_path):
    images, iterations, restarts = 2, 300, 2
    suite = load_suite(tiny_suite_file(images=images, iterations=iterations))
    progress = Recording()
    summary = run_suite(suite, out_dir=tmp_path, device="cpu", executor="ray", workers=1, progress=progress)
    assert not ray.is_initialized()
    assert summary.statuses == {"ok": 2 * images}
    planned = images * iterations * restarts + images * UNITS_WITHOUT_ITERATIONS
    assert progress.starts == [(planned, 0)]
    updates = [n for kind, n in progress.log if kind == "update"]
    assert sum(updates) == planned
    first_end = next(i for i, (kind, _) in enumerate(progress.log) if kind == "advance")
    live = [n for kind, n in progress.log[:first_end] if kind == "update"]
    # one pack holds both cells' inverting_gradients: its share is 2 x 600; live reports move less
    assert live and min(live) < iterations * restarts, progress.log[:first_end]
