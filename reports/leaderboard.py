"""Leaderboards from the store: per-image worst cases, averages, leak rates, a Markdown table.

The leaderboard's public interface, in three rooms:

- ``leakbench.reports.loading``: ``load_results`` reads a suite's rows from the store into a
  ``ResultSet`` (readable labels, the threat model, the batteries);
- ``leakbench.reports.aggregation``: ``leaderboard`` turns them into one row per (victim,
  defense, protocol): worst cases and averages with bootstrap intervals, leak rates, the
  positive control and its verdict, the defense's numbers, consistency warnings, completeness;
- ``leakbench.reports.rendering``: ``json_records`` / ``to_json`` and ``to_markdown`` (through
  ``templates/leaderboard.md``, as the HTML pages go through their templates).

Everything is computed from the SQLite store alone (no torch), so a report can be rebuilt
anywhere from ``leakbench.sqlite``.
"""

from __future__ import annotations

# the shared vocabulary (torch-free), as the reports name it
from leakbench.core.vocabulary import (FAILED_STATUSES, PSNR_CAP_DB, STATUSES, Threshold, THRESHOLD_METRICS)
from leakbench.reports.aggregation import (attack_column, attack_groups, AttackCell, AttackGroup,
                                           attacks_by_name, AVERAGE_COLUMNS, BOARD_COLUMNS,
                                           bootstrap_mean_interval, Completeness, completeness,
                                           component_versions, consistency_warnings, CONTROL_DEFENSE,
                                           control_figures, CONTROL_PROTOCOL, CONTROL_SHARE,
                                           control_unbroken, control_verdict, CONTROL_VERDICTS,
                                           ControlFigures, defense_info_column, DEFENSE_NUMBER_COLUMNS,
                                           flag_counts, INTERVAL_COLUMNS, leaderboard, per_image_worst,
                                           WORST_COLUMNS)
from leakbench.reports.loading import (baseline_rows, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE_LEVEL,
                                       GROUP_COLUMNS, load_results, NO_BATTERY, ORACLE_VALUES, parse_json,
                                       readable_labels, ReportError, ResultSet, shorten_paths,
                                       THREAT_MODEL_DEFAULTS)
from leakbench.reports.rendering import (ACCURACY_NOTE, accuracy_text, CONTROL_NOTE, control_rate_text,
                                         FLOOR_NOTE, json_records, optional_columns, productive_runs,
                                         provenance_text, to_json, to_markdown, WARNING_SIGN)
