"""Regression tracking: did leakage grow between two results (two stores, or two suites in one)?

Per leaderboard row (victim, defense, protocol), each worst-case metric of the new
results is set against the base's with a significance test over images: paired where the
same image ids appear in both (Wilcoxon signed-rank for PSNR/SSIM/LPIPS, exact McNemar
for the leak indicator), unpaired otherwise (Mann–Whitney U, Fisher's exact). A row
*regresses* when its leakage grew by more than the stated tolerance **and** the change
is significant (asv's rule: only call a change real when it is), on the worst-case PSNR
or on the leak rate. SSIM and LPIPS changes are reported with their tests but do not
decide. The Markdown is meant for a pull-request comment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from leakbench.core.vocabulary import METRICS as VOCABULARY_METRICS
from leakbench.core.vocabulary import Threshold
from leakbench.reports.aggregation import component_versions, consistency_warnings, per_image_worst
from leakbench.reports.loading import ResultSet
from leakbench.reports.rendering import _md, _md_row

GROUP_KEYS = ("victim", "defense", "protocol")
DEFAULT_TOLERANCE_DB = 1.0
DEFAULT_TOLERANCE_LEAK_RATE = 0.10
DEFAULT_ALPHA = 0.05

# Worst-case metrics compared, and the sign that turns a change into "more leakage".
METRICS: dict[str, tuple[str, int]] = {
    f"worst_{m.name}": (f"worst {m.label}", +1 if m.higher_leaks else -1) for m in VOCABULARY_METRICS.values()
}


@dataclass(frozen=True)
class Tolerance:
    """How much more leakage is tolerated before a significant change fails the comparison."""

    psnr_db: float = DEFAULT_TOLERANCE_DB
    leak_rate: float = DEFAULT_TOLERANCE_LEAK_RATE
    alpha: float = DEFAULT_ALPHA

    def describe(self, threshold: Threshold) -> str:
        return (f"a row regresses when its mean worst-case PSNR grew by more than {self.psnr_db:g} dB, or its leak "
                f"rate ({threshold.describe()}) by more than {100 * self.leak_rate:g} percentage points, and the "
                f"change is significant (two-sided p < {self.alpha:g})")


@dataclass(frozen=True)
class MetricChange:
    """One metric of one row, base against new, with its test over images."""

    metric: str
    base: float
    new: float
    test: str  # the test's name, with "paired"/"unpaired" and n
    p_value: float
    n_base: int
    n_new: int
    n_paired: int

    @property
    def delta(self) -> float:
        """new − base on the metric's own scale (for the leak rate: a share, 0..1)."""
        return self.new - self.base

    def significant(self, alpha: float) -> bool:
        return not math.isnan(self.p_value) and self.p_value < alpha


@dataclass(frozen=True)
class RowComparison:
    victim: str
    defense: str
    protocol: str
    status: str  # regressed | improved | unchanged | added | removed
    changes: dict[str, MetricChange] = field(default_factory=dict)
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    failed_rows: tuple[int, int] = (0, 0)
    images: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Comparison:
    base: ResultSet
    new: ResultSet
    rows: tuple[RowComparison, ...]
    tolerance: Tolerance
    threshold: Threshold
    warnings: tuple[str, ...]

    @property
    def regressed(self) -> list[RowComparison]:
        return [r for r in self.rows if r.status == "regressed"]

    @property
    def ok(self) -> bool:
        return not self.regressed

    @property
    def compared(self) -> list[RowComparison]:
        return [r for r in self.rows if r.status not in ("added", "removed")]


# --------------------------------------------------------------------------- tests


def _paired_test(base: np.ndarray, new: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of new − base (1.0 when nothing changed)."""
    from scipy.stats import wilcoxon

    differences = new - base
    if len(differences) == 0:
        return math.nan
    if np.all(differences == 0):
        return 1.0
    return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def _unpaired_test(base: np.ndarray, new: np.ndarray) -> float:
    from scipy.stats import mannwhitneyu

    if len(base) == 0 or len(new) == 0:
        return math.nan
    if np.all(base == base[0]) and np.all(new == base[0]):
        return 1.0
    return float(mannwhitneyu(new, base, alternative="two-sided").pvalue)


def _mcnemar(base: np.ndarray, new: np.ndarray) -> float:
    """Exact McNemar: a binomial test on the images whose leak indicator flipped."""
    from scipy.stats import binomtest

    gained = int(np.sum(~base & new))
    lost = int(np.sum(base & ~new))
    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5, alternative="two-sided").pvalue)


def _fisher(base: np.ndarray, new: np.ndarray) -> float:
    from scipy.stats import fisher_exact

    if len(base) == 0 or len(new) == 0:
        return math.nan
    table = [[int(new.sum()), int(len(new) - new.sum())], [int(base.sum()), int(len(base) - base.sum())]]
    return float(fisher_exact(table, alternative="two-sided").pvalue)


def compare_metric(metric: str, base: pd.Series, new: pd.Series) -> MetricChange:
    """Compare one per-image metric (indexed by image id): paired on the shared images when two or more are shared."""
    base, new = base.dropna(), new.dropna()
    shared = base.index.intersection(new.index)
    binary = metric == "leak_rate"
    if len(shared) >= 2:
        b, n = base.loc[shared].to_numpy(), new.loc[shared].to_numpy()
        if binary:
            p, name = _mcnemar(b.astype(bool), n.astype(bool)), "exact McNemar"
        else:
            p, name = _paired_test(b.astype(float), n.astype(float)), "Wilcoxon signed-rank"
        return MetricChange(metric=metric, base=float(b.mean()), new=float(n.mean()), test=f"{name}, paired",
                            p_value=p, n_base=len(base), n_new=len(new), n_paired=len(shared))
    b, n = base.to_numpy(), new.to_numpy()
    if binary:
        p, name = _fisher(b.astype(bool), n.astype(bool)), "Fisher's exact"
    else:
        p, name = _unpaired_test(b.astype(float), n.astype(float)), "Mann–Whitney U"
    return MetricChange(metric=metric, base=float(b.mean()) if len(b) else math.nan,
                        new=float(n.mean()) if len(n) else math.nan, test=f"{name}, unpaired", p_value=p,
                        n_base=len(base), n_new=len(new), n_paired=0)


# --------------------------------------------------------------------------- comparison


def _leak_indicator(images: pd.DataFrame, threshold: Threshold) -> pd.Series:
    """Per image: 1.0 leaked, 0.0 not (every row failed counts as not), NaN unknown (metric missing)."""
    worst = images[f"worst_{threshold.metric}"].astype(float)
    passes = worst < threshold.value if threshold.lower_is_worse else worst > threshold.value
    out = passes.astype(float)
    out[worst.isna()] = math.nan
    out[images["ok_rows"] == 0] = 0.0
    return out


def _per_group(results: ResultSet, threshold: Threshold) -> dict[tuple[str, ...], pd.DataFrame]:
    images = per_image_worst(results)
    images["leak_rate"] = _leak_indicator(images, threshold)
    return {key: group.set_index("image_id") for key, group in images.groupby(list(GROUP_KEYS), sort=False)}


def compare(base: ResultSet, new: ResultSet, *, tolerance: Tolerance = Tolerance()) -> Comparison:
    """Every row of both results, matched by (victim, defense, protocol), with its verdict.

    Leak rates of both sides use the base's threshold, so a changed threshold cannot pass
    for a change in leakage (it is warned about).
    """
    threshold = base.threshold
    base_groups, new_groups = _per_group(base, threshold), _per_group(new, threshold)
    rows = []
    for key in [*base_groups, *(k for k in new_groups if k not in base_groups)]:
        victim, defense, protocol = key
        if key not in new_groups:
            rows.append(RowComparison(victim, defense, protocol, "removed",
                                      images=(len(base_groups[key]), 0),
                                      notes=("only in base: not compared",)))
            continue
        if key not in base_groups:
            rows.append(RowComparison(victim, defense, protocol, "added", images=(0, len(new_groups[key])),
                                      notes=("only in new: not compared",)))
            continue
        rows.append(_compare_row(key, base_groups[key], new_groups[key], tolerance))
    warnings = comparison_warnings(base, new)
    unmatched = [r for r in rows if r.status in ("added", "removed")]
    if unmatched:
        warnings.append(f"{len(unmatched)} row(s) appear on one side only and were not compared; rows match by "
                        "their victim, defense and protocol labels, which include every parameter (a new default "
                        "parameter of a component changes them)")
    return Comparison(base=base, new=new, rows=tuple(rows), tolerance=tolerance, threshold=threshold,
                      warnings=tuple(warnings))


def _compare_row(key: tuple[str, ...], base: pd.DataFrame, new: pd.DataFrame, tolerance: Tolerance) -> RowComparison:
    changes = {metric: compare_metric(metric, base[metric], new[metric]) for metric in (*METRICS, "leak_rate")}
    reasons, improved = [], []
    psnr, leak = changes["worst_psnr_db"], changes["leak_rate"]
    if psnr.delta > tolerance.psnr_db and psnr.significant(tolerance.alpha):
        reasons.append(f"worst PSNR +{psnr.delta:.2f} dB (> {tolerance.psnr_db:g} dB, p = {psnr.p_value:.3g})")
    elif psnr.delta < -tolerance.psnr_db and psnr.significant(tolerance.alpha):
        improved.append("worst PSNR")
    if leak.delta > tolerance.leak_rate and leak.significant(tolerance.alpha):
        reasons.append(f"leak rate +{100 * leak.delta:.1f} points (> {100 * tolerance.leak_rate:g}, "
                       f"p = {leak.p_value:.3g})")
    elif leak.delta < -tolerance.leak_rate and leak.significant(tolerance.alpha):
        improved.append("leak rate")
    notes = []
    failed = (int(base["failed_rows"].sum()), int(new["failed_rows"].sum()))
    if failed[1] > failed[0]:
        notes.append(f"more failed rows in new ({failed[0]} → {failed[1]}): failures count as no leak and may hide "
                     "leakage")
    if psnr.n_paired == 0 and psnr.n_base and psnr.n_new:
        notes.append("fewer than two shared image ids: unpaired tests")
    if psnr.delta > tolerance.psnr_db and not psnr.significant(tolerance.alpha):
        notes.append(f"worst PSNR grew by {psnr.delta:.2f} dB but not significantly (p = {psnr.p_value:.3g}, "
                     f"{psnr.n_paired or min(psnr.n_base, psnr.n_new)} images); more images would tell")
    if leak.delta > tolerance.leak_rate and not leak.significant(tolerance.alpha):
        notes.append(f"leak rate grew by {100 * leak.delta:.1f} points but not significantly "
                     f"(p = {leak.p_value:.3g}); more images would tell")
    status = "regressed" if reasons else ("improved" if improved else "unchanged")
    return RowComparison(*key, status=status, changes=changes, reasons=tuple(reasons), notes=tuple(notes),
                         failed_rows=failed, images=(len(base), len(new)))


def comparison_warnings(base: ResultSet, new: ResultSet) -> list[str]:
    """What makes base and new measure different things: battery, threat model, threshold, versions."""
    warnings = [f"base {w}" for w in consistency_warnings(base)] + [f"new {w}" for w in consistency_warnings(new)]
    if base.batteries != new.batteries:
        warnings.append(f"the batteries differ (base: {', '.join(base.batteries) or 'none'}; new: "
                        f"{', '.join(new.batteries) or 'none'})")
    if base.suite_threat_model != new.suite_threat_model:
        warnings.append(f"the threat models differ (base: {_settings(base.suite_threat_model)}; new: "
                        f"{_settings(new.suite_threat_model)})")
    if base.threshold != new.threshold:
        warnings.append(f"the leak thresholds differ (base: {base.threshold.describe()}; new: "
                        f"{new.threshold.describe()}); both leak rates use the base's")
    base_versions, new_versions = component_versions(base), component_versions(new)
    for component in sorted(set(base_versions) & set(new_versions)):
        if base_versions[component] != new_versions[component]:
            kind, name = component
            warnings.append(f"{kind} {name!r} changed version ({', '.join(base_versions[component])} → "
                            f"{', '.join(new_versions[component])}): a change may come from the component itself")
    return warnings


def _settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


# --------------------------------------------------------------------------- markdown

_STATUS_MARK = {"regressed": "❌ regressed", "improved": "✅ improved", "unchanged": "✅ unchanged",
                "added": "➕ added", "removed": "➖ removed"}


def _change_text(change: MetricChange | None, *, digits: int, percent: bool = False) -> str:
    if change is None:
        return "n/a"

    def fmt(value: float) -> str:
        if math.isnan(value):
            return "n/a"
        return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"

    if math.isnan(change.base) or math.isnan(change.new):
        return f"{fmt(change.base)} → {fmt(change.new)}"
    delta = 100 * change.delta if percent else change.delta
    unit = " pts" if percent else ""
    p = "p n/a" if math.isnan(change.p_value) else f"p={change.p_value:.3g}"
    return f"{fmt(change.base)} → {fmt(change.new)} ({delta:+.{1 if percent else digits}f}{unit}, {p})"


def _side(results: ResultSet) -> str:
    runs = results.runs
    commits = ", ".join(dict.fromkeys(str(c) for c in runs["git_commit"].fillna("unknown"))) if len(runs) else "n/a"
    return (f"suite {_md(results.suite_name)} `{results.suite_hash}` in `{_md(results.store_path)}` "
            f"(battery {_md(', '.join(results.batteries) or 'none')}; commit {_md(commits)})")


def comparison_markdown(comparison: Comparison) -> str:
    """A Markdown summary for a pull-request comment: verdict line, rule, warnings, one row per (victim, defense)."""
    regressed = comparison.regressed
    compared = [r for r in comparison.rows if r.status not in ("added", "removed")]
    if regressed:
        title = f"### leakbench compare: ❌ leakage grew in {len(regressed)} of {len(compared)} row(s)"
    else:
        title = f"### leakbench compare: ✅ no leakage growth beyond tolerance ({len(compared)} row(s) compared)"
    lines = [title, "", f"- **base**: {_side(comparison.base)}", f"- **new**: {_side(comparison.new)}",
             f"- **rule**: {comparison.tolerance.describe(comparison.threshold)}. Tests over images: Wilcoxon "
             "signed-rank (metrics) and exact McNemar (leak indicator) on the images both sides share; Mann–Whitney U "
             "and Fisher's exact when they share fewer than two. SSIM and LPIPS are shown, not gated.", ""]
    for warning in comparison.warnings:
        lines.append(f"> ⚠ **Warning:** {_md(warning)}")
    if comparison.warnings:
        lines.append("")
    titles = ["", "victim", "defense", "protocol", "images (paired)", "worst PSNR (dB)", "worst SSIM", "worst LPIPS",
              "leak rate", "failed rows"]
    lines += [_md_row(titles), "|" + "|".join(["---"] * 4 + ["---:"] * (len(titles) - 4)) + "|"]
    for row in comparison.rows:
        psnr = row.changes.get("worst_psnr_db")
        paired = "" if psnr is None else f" ({psnr.n_paired})"
        lines.append(_md_row([
            _STATUS_MARK[row.status], row.victim, row.defense, row.protocol,
            f"{row.images[0]} → {row.images[1]}{paired}",
            _change_text(psnr, digits=2), _change_text(row.changes.get("worst_ssim"), digits=3),
            _change_text(row.changes.get("worst_lpips"), digits=3),
            _change_text(row.changes.get("leak_rate"), digits=1, percent=True),
            f"{row.failed_rows[0]} → {row.failed_rows[1]}",
        ]))
    details = [(row, text) for row in comparison.rows for text in (*row.reasons, *row.notes)]
    if details:
        lines.append("")
        for row, text in details:
            lines.append(f"- {_md(row.victim)} · {_md(row.defense)} · {_md(row.protocol)}: {_md(text)}")
    lines.append("")
    lines.append("Worst case = best reconstruction per image over all attacks and trials; values are means over "
                 "images, base → new (change, two-sided p).")
    return "\n".join(lines) + "\n"


__all__ = ["Comparison", "MetricChange", "RowComparison", "Tolerance", "compare", "compare_metric",
           "comparison_markdown", "comparison_warnings"]
