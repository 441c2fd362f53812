"""Rendering a leaderboard: its JSON records and its Markdown page (``templates/leaderboard.md``).

This is the only place where leaderboard numbers get decimals; missing values print as ``n/a``
(never 0).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

# the shared vocabulary (torch-free)
from leakbench.core.vocabulary import PSNR_CAP_DB
from leakbench.reports.aggregation import (AVERAGE_COLUMNS, DEFENSE_NUMBER_COLUMNS, WORST_COLUMNS, AttackCell,
                                           AttackGroup, attack_groups, attacks_by_name, completeness,
                                           consistency_warnings, control_unbroken)
from leakbench.reports.loading import BOOTSTRAP_RESAMPLES, NO_BATTERY, ResultSet, _missing, _num, parse_json, shorten_paths
from leakbench.reports.rero import RERO_NOTE, has_rero, rero_text

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).parent / "templates"

# --------------------------------------------------------------------------- JSON


def _json_number(value: Any) -> float | int | None:
    if _missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else None


def json_records(board: pd.DataFrame, *, results: ResultSet) -> list[dict[str, Any]]:
    """The leaderboard as JSON-able objects, one per row (RobustBench-style: each entry carries its context).

    Every object has the suite (name, hash, battery, threat model, leak threshold), the row's key,
    its metrics (``metrics``: every worst-case and average column; ``ci95``: their intervals), the
    leak rate, the positive control with its verdict, the per-attack worst cases by attack name
    with the budgets that ran, the defense's numbers, counts, flags and oracle settings. Missing
    numbers are ``null``, never 0.
    """
    groups = {group.name: group for group in attack_groups(results)}
    by_name = attacks_by_name(results)
    state = completeness(results)
    threat = {k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in results.suite_threat_model.items()}
    versions = [parse_json(text, {}) for text in productive_runs(results)["versions_json"]] if len(results.runs) else []
    leakbench_versions = list(dict.fromkeys(str(v.get("leakbench")) for v in versions
                                            if isinstance(v, dict) and v.get("leakbench")))
    records = []
    for row in board.to_dict("records"):
        key = (row["victim"], row["defense"], row["protocol"])
        attacks = {}
        for name, cell in by_name.get(key, {}).items():
            group = groups.get(name)
            attacks[name] = {"worst_psnr_db": _json_number(cell.worst_psnr_db),
                             "budgets": [shorten_paths(group.variants[label]) if group else label
                                         for label in cell.labels]}
        metrics = {name: _json_number(row[name]) for name in (*WORST_COLUMNS, *AVERAGE_COLUMNS)}
        records.append({
            "suite": results.suite_name,
            "suite_hash": results.suite_hash,
            "battery": row["battery"] or NO_BATTERY,
            "threat_model": threat,
            "leak_threshold": {"metric": results.threshold.metric, "value": results.threshold.value,
                               "text": results.threshold.describe()},
            "victim": row["victim"],
            "defense": row["defense"],
            "protocol": row["protocol"],
            "batch_size": int(row["batch_size"]),
            "images": int(row["images"]),
            "metrics": metrics,
            "ci95": {name: [_json_number(row[f"{name}_lo"]), _json_number(row[f"{name}_hi"])]
                     for name in (*WORST_COLUMNS, *AVERAGE_COLUMNS)},
            "leak_rate": _json_number(row["leak_rate"]),
            "leak_rate_ci95": [_json_number(row["leak_rate_lo"]), _json_number(row["leak_rate_hi"])],
            "leaked_images": int(row["leaked_images"]),
            "control_verdict": row["control_verdict"],
            "control": {"leak_rate": _json_number(row["control_leak_rate"]),
                        "leaked_images": int(row["control_leaked_images"]), "images": int(row["control_images"]),
                        "worst_psnr_db": _json_number(row["control_worst_psnr_db"]),
                        "description": shorten_paths(row["control"]) or None,
                        "row_inconclusive": control_unbroken(row)},
            "attacks": attacks,
            "floor_psnr_db": _json_number(row["floor_psnr_db"]),
            "defense_info": {name: _json_number(row[name]) for name in DEFENSE_NUMBER_COLUMNS},
            "victim_state": row["victim_state"] or None,
            "victim_test_accuracy": _json_number(row["victim_test_accuracy"]),
            "counts": {name: int(row[name]) for name in ("cells", "failed_cells", "rows", "failed_rows",
                                                         "flagged_rows", "flagged_cells")},
            "flags": shorten_paths(row["flags"]) or None,
            "oracle_labels": bool(row["oracle_labels"]),
            "shared_bn_stats": bool(row["shared_bn_stats"]),
            "lpips_note": shorten_paths(row["lpips_note"]) or None,
            "complete": state.complete,
            "leakbench": ", ".join(leakbench_versions) or None,
        })
    return records


def to_json(board: pd.DataFrame, *, results: ResultSet) -> str:
    """:func:`json_records` as a JSON array (strict JSON: no NaN), one object per leaderboard row."""
    return json.dumps(json_records(board, results=results), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- markdown

_MARK_ORACLE_LABELS = "†"
_MARK_SHARED_BN = "‡"
_MARK_LPIPS = "¹"
WARNING_SIGN = "⚠"


def optional_columns(board: pd.DataFrame) -> dict[str, bool]:
    """Which optional columns any row fills: a table shows ε, utility (update cosine, FL accuracy), victim accuracy,
    defense notes, flags and the battery only when there is something to show (the CSV
    always has every column)."""
    def any_number(column: str) -> bool:
        return bool(len(board)) and bool(board[column].notna().any())

    def any_text(column: str) -> bool:
        return bool(len(board)) and bool((board[column].astype(str) != "").any())

    return {
        "epsilon": any_number("epsilon") or any_number("delta"),
        "rero": has_rero(board),
        "utility": any_number("utility_cosine"),
        "accuracy": any_number("utility_accuracy"),
        "defense_notes": any_text("defense_notes"),
        "victim": any_text("victim_state") or any_number("victim_test_accuracy"),
        "flags": bool(len(board)) and (bool((board["flagged_rows"] + board["flagged_cells"]).sum() > 0)
                                       or bool(board["rero_exceeded"].any())),
        "battery": any_text("battery") and set(board["battery"]) != {NO_BATTERY},
        "floor": any_number("floor_psnr_db"),
    }


def to_markdown(board: pd.DataFrame, *, results: ResultSet) -> str:
    """A GitHub-flavoured table under a one-line header naming the suite, hash and threshold.

    This is the only place where leaderboard numbers get decimals; missing values print as
    ``n/a`` (never 0), every worst-case and average value carries its 95% interval in
    brackets, oracle settings get a marker on the row and in the header, and consistency
    warnings (mixed batteries, versions, threat models) come right under the header.
    """
    groups = attack_groups(results)  # one column per attack name, whatever budgets it ran at
    by_name = attacks_by_name(results)
    oracle = bool(board["oracle_labels"].any()) if len(board) else False
    shared_bn = bool(board["shared_bn_stats"].any()) if len(board) else False
    show = optional_columns(board)
    threshold = results.threshold.describe()
    header = (f"**leakbench leaderboard** · suite {_md(results.suite_name)} · hash `{results.suite_hash}` · "
              f"battery {_md(', '.join(results.batteries) or NO_BATTERY)} · leak threshold: worst-case {threshold}")
    if oracle:
        header += f" · {_MARK_ORACLE_LABELS} ORACLE labels granted on marked rows"
    if shared_bn:
        header += f" · {_MARK_SHARED_BN} BN statistics shared on marked rows"
    warnings = consistency_warnings(results)
    problems = completeness(results).problems
    titles = ["victim", "defense", "protocol", "batch", "images", "worst PSNR (dB)", "worst SSIM", "worst LPIPS",
              "worst label acc.", "avg PSNR (dB)", "avg SSIM", "avg LPIPS", "avg label acc.",
              f"leak rate ({threshold})", "control leak rate"]
    titles += ["floor PSNR (dB)", "gain over floor (dB)"] * show["floor"]
    titles += ["ε (δ)"] * show["epsilon"] + ["ReRo ceiling γ (estimated κ̂) vs measured"] * show["rero"]
    titles += ["update cosine"] * show["utility"]
    titles += ["FL accuracy (undefended)"] * show["accuracy"]
    titles += ["defense info"] * show["defense_notes"] + ["victim state (test acc.)"] * show["victim"]
    titles += ["cells (failed)", "rows (failed)"] + ["sanity flags"] * show["flags"] + ["battery"] * show["battery"]
    titles += [f"PSNR (dB) {group.name}" for group in groups]
    table = [_md_row(titles), "|" + "|".join(["---"] * 3 + ["---:"] * (len(titles) - 3)) + "|"]
    notes: dict[str, str] = {}
    for row in board.to_dict("records"):
        victim = row["victim"] + (f" {_MARK_ORACLE_LABELS}" if row["oracle_labels"] else "") + (
            f" {_MARK_SHARED_BN}" if row["shared_bn_stats"] else "")
        lpips_mark = ""
        if row["lpips_note"]:
            lpips_mark = _MARK_LPIPS
            notes.setdefault(row["lpips_note"], "")
        cells = [
            victim, row["defense"], row["protocol"], str(row["batch_size"]), str(row["images"]),
            _with_ci(row, "worst_psnr_db", 2), _with_ci(row, "worst_ssim", 3), _with_ci(row, "worst_lpips", 3) + lpips_mark,
            _with_ci(row, "worst_label_accuracy", percent=True),
            _with_ci(row, "avg_psnr_db", 2), _with_ci(row, "avg_ssim", 3), _with_ci(row, "avg_lpips", 3) + lpips_mark,
            _with_ci(row, "label_accuracy", percent=True),
            ("n/a" if _missing(row["leak_rate"]) else
             f"{_pct(row['leak_rate'])} ({row['leaked_images']}/{row['images']})"
             + ("" if _pct(row["leak_rate_lo"]) == _pct(row["leak_rate_hi"]) else
                f" [{_pct(row['leak_rate_lo'])}, {_pct(row['leak_rate_hi'])}]")),
            control_rate_text(row),
        ]
        if show["floor"]:
            cells += [_num(row["floor_psnr_db"], 2), _signed(row["gain_over_floor_db"], 2)]
        if show["epsilon"]:
            cells.append(_epsilon_text(row))
        if show["rero"]:
            cells.append(rero_text(row))
        if show["utility"]:
            cells.append(_num(row["utility_cosine"], 3))
        if show["accuracy"]:
            cells.append(accuracy_text(row))
        if show["defense_notes"]:
            cells.append(row["defense_notes"] or "")
        if show["victim"]:
            cells.append(_victim_text(row))
        cells += [f"{row['cells']} ({row['failed_cells']})", f"{row['rows']} ({row['failed_rows']})"]
        if show["flags"]:
            cells.append(row["flags"] or "none")
        if show["battery"]:
            cells.append(row["battery"])
        mine = by_name.get((row["victim"], row["defense"], row["protocol"]), {})
        cells += [_attack_text(mine.get(group.name), group) for group in groups]
        table.append(_md_row(cells))
    return _markdown_environment().get_template("leaderboard.md").render(
        header=header, warnings=[_md(w) for w in warnings], problems=[_md(p) for p in problems], sign=WARNING_SIGN,
        table=table, resamples=BOOTSTRAP_RESAMPLES, threshold=threshold, cap=f"{PSNR_CAP_DB:g}",
        control_note=CONTROL_NOTE,
        budgets=_md(shorten_paths(" · ".join(group.describe() for group in groups))) if groups else "",
        optional_notes=[note for note, shown in ((FLOOR_NOTE, show["floor"]), (ACCURACY_NOTE, show["accuracy"]),
                                                 (RERO_NOTE, show["rero"])) if shown],
        oracle=oracle, oracle_mark=_MARK_ORACLE_LABELS, shared_bn=shared_bn, shared_bn_mark=_MARK_SHARED_BN,
        lpips_notes=[_md(note) for note in notes], lpips_mark=_MARK_LPIPS, provenance=_md(provenance_text(results)))


def _markdown_environment() -> jinja2.Environment:
    """The Markdown page's jinja2 environment: no HTML escaping (values arrive Markdown-escaped), strict
    about undefined names, block tags on lines of their own."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=False,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def productive_runs(results: ResultSet) -> pd.DataFrame:
    """The runs that wrote rows of this suite (a rerun of a finished suite writes none); all runs if none did."""
    runs = results.runs
    if not len(runs) or "run_id" not in results.rows:
        return runs
    wrote = runs[runs["run_id"].isin(set(results.rows["run_id"]))]
    return wrote if len(wrote) else runs


def provenance_text(results: ResultSet) -> str:
    """The runs behind a leaderboard in one line: how many, when, commits, devices, versions."""
    runs = productive_runs(results)
    if not len(runs):
        return "no runs"
    recorded = len(results.runs)

    def distinct(values: Any) -> str:
        return " / ".join(dict.fromkeys(str(v) for v in values if not _missing(v))) or "unknown"

    versions = [parse_json(text, {}) for text in runs["versions_json"]]
    versions = [v for v in versions if isinstance(v, dict)]
    ended = runs["ended_utc"].where(runs["ended_utc"].notna(), runs["started_utc"])
    count = f"{len(runs)} run(s)" + (f" wrote these rows ({recorded} recorded)" if recorded != len(runs) else "")
    return (f"{count} from {runs['started_utc'].min()} to {ended.max()} (UTC); "
            f"commit {distinct(runs['git_commit'])}; device {distinct(runs['device'])}; "
            f"leakbench {distinct(v.get('leakbench') for v in versions)}, torch {distinct(v.get('torch') for v in versions)}")


def _attack_text(cell: AttackCell | None, group: AttackGroup) -> str:
    """An attack name's Markdown cell: its worst case, and the budget(s) that ran when the name has several."""
    if cell is None:
        return "not run"
    budgets = "; ".join(text for text in (group.differing[label] for label in cell.labels) if text)
    return _num(cell.worst_psnr_db, 2) + (f" ({budgets})" if budgets else "")


def _with_ci(row: dict[str, Any], column: str, digits: int = 2, *, percent: bool = False) -> str:
    """``value [lo, hi]``, or ``n/a``; the interval is left out when it is a single point (one image)."""
    fmt = _pct if percent else (lambda v: _num(v, digits))
    value = row[column]
    if _missing(value):
        return "n/a"
    lo, hi = row[f"{column}_lo"], row[f"{column}_hi"]
    if _missing(lo) or fmt(lo) == fmt(hi):  # one image, or every image alike: no interval to show
        return fmt(value)
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def _epsilon_text(row: dict[str, Any]) -> str:
    if _missing(row["epsilon"]):
        return "n/a"
    delta = "" if _missing(row["delta"]) else f" (δ={row['delta']:.0e})"
    return f"{row['epsilon']:.3g}{delta}"


CONTROL_NOTE = ("Control leak rate: the share of images leaking in the row's positive control (the same victim and "
                "images, no defense, FedSGD batch 1, the same attacks; \"own\" when the row is its own control); "
                "n/a when none is stored. A row whose control does not leak proves nothing: certify calls it "
                "inconclusive.")
FLOOR_NOTE = ("Floor: mean PSNR of the baselines (label_only's grey guess), which never enter the worst case, the "
              "averages or the leak rate; gain over floor: mean over images of the worst case minus the floor.")


def control_rate_text(row: dict[str, Any]) -> str:
    """``75.0% (3/4)``, ``own`` marked, or ``n/a`` when no control is stored."""
    if _missing(row["control_leak_rate"]):
        return "n/a" if not row["control_images"] else "n/a (metric missing)"
    own = " own" if row["control"].startswith("the row itself") else ""
    text = f"{_pct(row['control_leak_rate'])} ({row['control_leaked_images']}/{row['control_images']}){own}"
    return text + (" ❔ inconclusive" if control_unbroken(row) else "")


#: the share of a control's images that must leak for a row's "no leak" to be evidence (certify's default)
def _signed(value: Any, digits: int) -> str:
    return "n/a" if _missing(value) else f"{value:+.{digits}f}"


ACCURACY_NOTE = ("FL accuracy: top-1 accuracy on the suite's images after the suite's short, seeded FL training "
                 "([utility]: rounds, clients and images per client in the defense info) with the row's defense "
                 "and protocol, from the victim's initialization; in parentheses the same training without the "
                 "defense.")


def accuracy_text(row: dict[str, Any]) -> str:
    """``62.5% (75.0%)``: test accuracy after the suite's FL training with the defense (without it)."""
    if _missing(row["utility_accuracy"]):
        return "n/a"
    if _missing(row["utility_accuracy_undefended"]):
        return _pct(row["utility_accuracy"])
    return f"{_pct(row['utility_accuracy'])} ({_pct(row['utility_accuracy_undefended'])})"


def _victim_text(row: dict[str, Any]) -> str:
    state = row["victim_state"] or "n/a"
    if _missing(row["victim_test_accuracy"]):
        return state
    return f"{state} ({_pct(row['victim_test_accuracy'])})"


def _pct(value: Any) -> str:
    return "n/a" if _missing(value) else f"{100 * value:.1f}%"


def _md(text: Any) -> str:
    """Text that cannot break a table cell or inject HTML into a rendered Markdown page."""
    text = shorten_paths(str(text)).replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"
