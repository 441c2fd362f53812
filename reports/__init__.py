"""Leaderboards, the HTML report, regression tracking and certification, from a leakbench store alone.

This package never imports torch: a report can be rebuilt on any machine from the
``leakbench.sqlite`` file of a run. May import ``leakbench.store`` and the shared vocabulary
(``leakbench.core.vocabulary``) only (contract ``reports`` in pyproject.toml). See
reports/README.md for what each file shows.
"""

from leakbench.reports.html import ReportPaths, render_leaderboard_html, render_report, write_reports
# The names come through the facade module leakbench.reports.leaderboard, imported here first, so
# that the package's attribute ``leaderboard`` stays the function, not that submodule.
from leakbench.reports.leaderboard import (
    PSNR_CAP_DB,
    ReportError,
    ResultSet,
    Threshold,
    bootstrap_mean_interval,
    consistency_warnings,
    json_records,
    leaderboard,
    load_results,
    per_image_worst,
    to_json,
    to_markdown,
)

__all__ = [
    "PSNR_CAP_DB",
    "ReportError",
    "ReportPaths",
    "ResultSet",
    "Threshold",
    "bootstrap_mean_interval",
    "consistency_warnings",
    "json_records",
    "leaderboard",
    "load_results",
    "per_image_worst",
    "render_leaderboard_html",
    "render_report",
    "to_json",
    "to_markdown",
    "write_reports",
]
