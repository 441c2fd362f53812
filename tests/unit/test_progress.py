"""The run's progress counts reconstruction-iterations: the total is what the suite plans, the bar
moves while attacks iterate (before any run ends), ends exactly at the total whatever ends a run,
and a resumed store counts as done. The ETA logic is checked on a synthetic clock."""

from __future__ import annotations

import io
import re

import pytest

from leakbench.attacks.inverting_gradients import InvertingGradients
from leakbench.cli import TqdmProgress
from leakbench.running.progress import UNITS_WITHOUT_ITERATIONS, RateEstimate, SilentProgress, WorkMeter, planned_iterations
from leakbench.running.runner import run_suite
from leakbench.suite import load_suite

IMAGES, ITERATIONS, RESTARTS = 2, 20, 2  # the tiny suite: inverting_gradients (2 restarts), then analytic_fc
PLANNED = IMAGES * ITERATIONS * RESTARTS + IMAGES * UNITS_WITHOUT_ITERATIONS
IG_SHARE = ITERATIONS * RESTARTS


class Recording(SilentProgress):
    """Records every call; ``log`` keeps the order of updates and ended runs."""

    def __init__(self):
        self.starts: list[tuple[int, int]] = []
        self.log: list[tuple[str, object]] = []

    def start(self, total: int, *, skipped: int) -> None:
        self.starts.append((total, skipped))

    def update(self, units: int) -> None:
        self.log.append(("update", units))

    def advance(self, status: str) -> None:
        self.log.append(("advance", status))

    @property
    def updates(self) -> list[int]:
        return [n for kind, n in self.log if kind == "update"]

    @property
    def statuses(self) -> list[str]:
        return [s for kind, s in self.log if kind == "advance"]

    def before_first_run_ended(self) -> list[int]:
        first = next(i for i, (kind, _) in enumerate(self.log) if kind == "advance")
        return [n for kind, n in self.log[:first] if kind == "update"]


@pytest.fixture
def tiny(tiny_suite_file):
    return load_suite(tiny_suite_file(images=IMAGES, iterations=ITERATIONS))


def test_planned_iterations_of_the_tiny_suite(tiny):
    shares = sorted(planned_iterations(a) for cell in tiny.cells for a in cell.attacks)
    assert shares == [UNITS_WITHOUT_ITERATIONS] * IMAGES + [IG_SHARE] * IMAGES


def test_planned_iterations_read_the_batteries_budgets(tmp_path):
    suite_file = tmp_path / "battery.toml"
    suite_file.write_text("""
[suite]
name = "b"
images = 1
[dataset]
name = "photos"
side = 16
[[case]]
victim = "lenet"
protocol = { name = "fedsgd", batch_size = 1 }
battery = "cpu-v1"
""")
    suite = load_suite(suite_file)
    shares = {a.name: planned_iterations(a) for a in suite.cells[0].attacks}
    # cpu-v1: L-BFGS attacks count iterations x inner_steps updates; the rest iterations x restarts
    assert shares == {"dlg": 50 * 20, "idlg": 100 * 20, "inverting_gradients": 2400, "gradinversion": 500,
                      "geng": 20 * 20}


def test_the_bar_counts_the_planned_iterations_and_moves_before_a_run_ends(tiny, tmp_path):
    progress = Recording()
    summary = run_suite(tiny, out_dir=tmp_path, device="cpu", progress=progress)
    assert summary.statuses == {"ok": 2 * IMAGES}
    assert progress.starts == [(PLANNED, 0)]
    assert sum(progress.updates) == PLANNED  # the count ends at the total
    early = progress.before_first_run_ended()
    assert early and sum(early) > 0, "the bar did not move before the first attack run ended"
    assert min(early) < IG_SHARE  # moves of less than one run's share: it follows the iterations
    assert len(progress.statuses) == 2 * IMAGES


def test_resuming_a_finished_store_reports_everything_done(tiny, tmp_path):
    run_suite(tiny, out_dir=tmp_path, device="cpu")
    progress = Recording()
    run_suite(tiny, out_dir=tmp_path, device="cpu", progress=progress)
    assert progress.starts == [(0, PLANNED)]  # nothing to do, all of it stored
    assert progress.updates == [] and progress.statuses == []
    out = io.StringIO()
    bar = TqdmProgress(enabled=True, file=out)
    run_suite(tiny, out_dir=tmp_path, device="cpu", progress=bar)
    assert bar.bar.n == bar.bar.total == PLANNED
    assert f"{PLANNED}/{PLANNED}" in out.getvalue() and "100%" in out.getvalue()


def test_a_run_that_ends_early_fills_its_share(tiny, tmp_path, monkeypatch):
    """An attack that reports a quarter of its iterations, then fails: its rows say error, and the bar
    still reaches the total (the rest of the share comes when the rows do)."""

    def quarter_then_fail(self, observations, model, *, progress=None, **kwargs):
        if progress is not None:
            progress(ITERATIONS // 4, ITERATIONS)
        raise RuntimeError("stopped early on purpose")

    monkeypatch.setattr(InvertingGradients, "reconstruct_many", quarter_then_fail)
    progress = Recording()
    summary = run_suite(tiny, out_dir=tmp_path, device="cpu", progress=progress)
    assert summary.statuses == {"error": IMAGES, "ok": IMAGES}
    assert sum(progress.updates) == PLANNED
    early = progress.before_first_run_ended()
    # live: a quarter of each packed cell's share; then the first run's rest, as its error rows come
    assert early == [IMAGES * IG_SHARE // 4, IG_SHARE - IG_SHARE // 4]


def test_process_workers_report_iterations_live(tiny, tmp_path):
    progress = Recording()
    summary = run_suite(tiny, out_dir=tmp_path, device="cpu", progress=progress, executor="processes", workers=1)
    assert summary.statuses == {"ok": 2 * IMAGES}
    assert progress.starts == [(PLANNED, 0)]
    assert sum(progress.updates) == PLANNED
    early = progress.before_first_run_ended()
    assert early and min(early) < IG_SHARE, "the worker's iterations did not reach the driver's bar"


def test_meter_caps_each_run_at_its_share_and_ignores_finished_runs():
    inner = Recording()
    a, b = ("cell-a", "ig"), ("cell-b", "ig")
    meter = WorkMeter(inner, {a: 100, b: 100})
    assert meter.total == 200
    meter.work((a, b), 25, 100)  # a pack of two: a quarter of each
    assert inner.updates == [50]
    meter.work((a, b), 10, 100)  # a retried pack starts again below what was reported: no move
    assert inner.updates == [50]
    meter.work((a,), 50, 50)
    meter.finished(a, "ok")  # already full: nothing more to fill
    meter.work((a, b), 60, 100)  # a is done; b moves from 25 to 60
    meter.finished(b, "timeout")
    meter.finished(b, "timeout")  # a run ends once
    assert inner.updates == [50, 75, 35, 40]
    assert sum(inner.updates) == meter.total == meter.done()
    assert inner.statuses == ["ok", "timeout"]


def test_meter_works_with_a_progress_that_cannot_update():
    class Old:  # a Progress written before update() existed
        def __init__(self):
            self.advanced = 0

        def start(self, total, *, skipped): ...
        def task(self, description): ...
        def iterations(self, done, total): ...
        def advance(self, status):
            self.advanced += 1
        def close(self): ...

    old = Old()
    meter = WorkMeter(old, {("c", "a"): 10})
    meter.work((("c", "a"),), 5, 10)
    meter.finished(("c", "a"), "ok")
    assert old.advanced == 1


def test_rate_estimate_on_a_synthetic_clock():
    now = [0.0]
    estimate = RateEstimate(clock=lambda: now[0])
    assert estimate.rate(0) is None and estimate.remaining_s(0, 1000) is None
    now[0] = 30.0  # 30 s of setting up (workers, data, LPIPS): not part of the rate
    estimate.record(10)
    assert estimate.rate(10) is None  # one point measures no span
    now[0] = 90.0
    estimate.record(610)
    assert estimate.rate(610) == pytest.approx(10.0)  # 600 units in the 60 s since the first report
    assert estimate.remaining_s(610, 2410) == pytest.approx(180.0)
    estimate.record(700)  # only the first report anchors the rate
    assert estimate.rate(700) == pytest.approx(690 / 60)
    assert estimate.remaining_s(2410, 2410) == 0


def test_the_bar_shows_the_estimates_time_left():
    out = io.StringIO()
    bar = TqdmProgress(enabled=True, file=out)
    bar.start(2400, skipped=0)
    now = [100.0]
    bar.estimate.clock = lambda: now[0]
    bar.update(100)
    now[0] = 160.0
    bar.update(500)  # 500 in 60 s since the first update: 1800 left take 216 s
    assert bar.bar.format_dict["rate"] == pytest.approx(500 / 60)
    assert bar.estimate.remaining_s(600, 2400) == pytest.approx(216.0)
    assert re.search(r"<03:3[56]", str(bar.bar)), str(bar.bar)  # tqdm rounds 216 s down or up
    bar.task("lenet | none | batch 0 | inverting_gradients | pack of 3 cells")
    bar.iterations(625, 2400)
    assert "pack of 3 cells | it 625/2400" in str(bar.bar)
    bar.close()
