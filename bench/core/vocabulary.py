"""The words the engine and the reports share: metrics (direction and cap), statuses, thresholds.

Plain Python, no torch: ``leakbench.reports`` and ``leakbench.store`` import this module and
nothing else of the engine, so a report never loads torch. The engine (``leakbench.metrics``,
``leakbench.suite``, the runner) imports the same definitions, so there is one of each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Metric:
    """A per-image reconstruction metric as stored in a result row."""

    name: str  # the column: psnr_db | ssim | lpips
    label: str  # for people: "PSNR (dB)"
    higher_leaks: bool  # True: a higher value is a closer reconstruction (PSNR, SSIM); LPIPS is a distance
    cap: float | None = None  # the largest value a row can hold (PSNR of identical images), None when bounded anyway


#: PSNR of identical images (MSE <= 1e-10) is reported as this instead of +inf.
PSNR_CAP_DB: float = 100.0

METRICS: dict[str, Metric] = {
    "psnr_db": Metric("psnr_db", "PSNR (dB)", higher_leaks=True, cap=PSNR_CAP_DB),
    "ssim": Metric("ssim", "SSIM", higher_leaks=True),
    "lpips": Metric("lpips", "LPIPS", higher_leaks=False),
}

#: The metrics a suite's leak threshold may name.
THRESHOLD_METRICS: tuple[str, ...] = tuple(METRICS)

#: How an attack run ended; every failure is stored as a row too (with its error), never dropped.
FAILED_STATUSES: tuple[str, ...] = ("error", "timeout", "oom")
STATUSES: tuple[str, ...] = ("ok", *FAILED_STATUSES)


class Threshold(NamedTuple):
    """The suite's leak threshold: an image leaks when its worst case passes it.

    A (metric, value) pair, immutable; whoever builds one from input (the suite checker, the
    reports' loader) checks first that the metric is one of ``THRESHOLD_METRICS``."""

    metric: str  # one of THRESHOLD_METRICS
    value: float

    @property
    def lower_is_worse(self) -> bool:
        """LPIPS is a distance: a reconstruction leaks when it is *below* the value."""
        return not METRICS[self.metric].higher_leaks

    def leaks(self, value: float | None) -> bool:
        """Whether ``value`` (one image's worst case) passes the threshold; a missing value does not."""
        if value is None:
            return False
        return value < self.value if self.lower_is_worse else value > self.value

    def describe(self) -> str:
        return f"{self.metric} {'<' if self.lower_is_worse else '>'} {self.value:g}"
