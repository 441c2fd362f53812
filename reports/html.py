"""HTML pages (jinja2, autoescaped) and :func:`write_reports`, which writes every report file.

The report is one self-contained file: images are inline ``data:`` URIs read from the
store's ``images`` table, styles and the sorting script are inline, and nothing is
fetched from anywhere, so it opens offline and can be attached to a ticket or a CI run.
Labels come from suite files and are escaped like any other text.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jinja2
import pandas as pd
from markupsafe import Markup

from leakbench.store import Store
from leakbench.core.vocabulary import PSNR_CAP_DB
from leakbench.reports.aggregation import (
    attack_groups,
    attacks_by_name,
    completeness,
    consistency_warnings,
    CONTROL_SHARE,
    control_unbroken,
    flag_counts,
    leaderboard,
    per_image_worst,
)
from leakbench.reports.loading import (
    BOOTSTRAP_RESAMPLES,
    CONFIDENCE_LEVEL,
    GROUP_COLUMNS,
    load_results,
    ORACLE_VALUES,
    ResultSet,
    shorten_paths,
    THREAT_MODEL_DEFAULTS,
)
from leakbench.reports.rendering import TEMPLATES_DIR, optional_columns, to_json, to_markdown
from leakbench.reports.plots import report_plots

log = logging.getLogger(__name__)

from leakbench.reports.rero import RERO_NOTE, rero_text

TRUTH_ATTACK_KEY = ""  # the images table stores the ground truth under attack_key ''


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_reports` put each file."""

    csv: Path
    markdown: Path
    leaderboard_html: Path
    report_html: Path
    json: Path

    def __iter__(self) -> Iterator[Path]:
        return iter((self.csv, self.markdown, self.json, self.leaderboard_html, self.report_html))


# --------------------------------------------------------------------------- view model


@dataclass(frozen=True)
class Tile:
    """One attack's outcome for one image in one trial: a reconstruction or a failure."""

    trial: int
    status: str
    error: str | None
    psnr_db: float
    ssim: float
    lpips: float
    lpips_note: str | None
    src: str | None
    best: bool


@dataclass(frozen=True)
class AttackCell:
    label: str
    tiles: tuple[Tile, ...]


@dataclass(frozen=True)
class ImageRow:
    image_id: str
    true_label: int
    worst_psnr_db: float
    leaked: bool | None
    truth_src: str | None
    attacks: tuple[AttackCell, ...]


@dataclass(frozen=True)
class Grid:
    victim: str
    defense: str
    protocol: str
    oracle_labels: bool
    shared_bn_stats: bool
    attack_labels: tuple[str, ...]
    images: tuple[ImageRow, ...]
    hidden: int = 0


# --------------------------------------------------------------------------- jinja


def environment() -> jinja2.Environment:
    """The report's jinja2 environment: autoescaped, strict about undefined names."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_no_machine_paths,
    )
    env.filters["num"] = _format_number
    env.filters["pct"] = _format_percent
    env.filters["sortkey"] = _sort_key
    env.filters["rero_text"] = rero_text  # the DP rows' ReRo ceiling beside the measured rate (reports/rero.py)
    env.globals["rero_note"] = RERO_NOTE
    env.globals["control_share"] = CONTROL_SHARE  # a positive control passes when it leaks on this share of images
    env.tests["missing"] = _missing
    return env


def _no_machine_paths(value: Any) -> Any:
    """Every text a page prints, with the machine's absolute paths cut to their last component (a report is
    attached to tickets and CI runs; the store keeps the full text). Markup (the filters' own HTML) and
    inline images pass as they are."""
    if isinstance(value, str) and not isinstance(value, Markup) and not value.startswith("data:"):
        return shorten_paths(value)
    return value


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def _format_number(value: Any, digits: int = 2, *, note: str | None = None) -> Markup | str:
    """Decimals for a number; a visible, explained ``n/a`` (never 0) for a missing one."""
    if _missing(value):
        if note:
            return Markup('<span class="na" title="{}">n/a</span>').format(shorten_paths(str(note)))
        return Markup('<span class="na">n/a</span>')
    return f"{value:.{digits}f}"


def _format_percent(value: Any) -> Markup | str:
    if _missing(value):
        return Markup('<span class="na">n/a</span>')
    return f"{100 * value:.1f}%"


def _sort_key(value: Any) -> str:
    """The raw number for the sorting script; '' for missing, which sorts last."""
    return "" if _missing(value) else repr(float(value))


# --------------------------------------------------------------------------- rendering


def render_leaderboard_html(results: ResultSet, *, board: pd.DataFrame | None = None) -> str:
    """The leaderboard alone, as a standalone page (for dashboards and CI artifacts)."""
    board = leaderboard(results) if board is None else board
    return environment().get_template("leaderboard.html").render(**_common(results, board))


def render_report(
    results: ResultSet, *, board: pd.DataFrame | None = None, max_images_per_group: int | None = None,
    plots: bool = True,
) -> str:
    """The full report: header, provenance, metric notes, leaderboard, plots, reconstruction grids.

    ``max_images_per_group`` keeps only the images with the highest worst-case PSNR of
    each group (the ones that matter to an auditor) when a suite has too many to inline.
    ``plots`` False leaves the figures out (they take a second or two of matplotlib).
    """
    board = leaderboard(results) if board is None else board
    images = per_image_worst(results)
    with Store(results.store_path, readonly=True) as store:
        grids = _grids(results, images, store=store, max_images=max_images_per_group)
    lpips_notes = [n for n in dict.fromkeys(board["lpips_note"]) if n] if len(board) else []
    runs = [_run_view(run) for run in results.runs.to_dict("records")]
    return environment().get_template("report.html").render(
        **_common(results, board),
        grids=grids,
        runs=runs,
        provenance=_provenance_summary(runs, wrote=set(results.rows["run_id"]) if len(results.rows) else set()),
        threat_models=results.threat_models,
        threat_settings=_threat_settings(results),
        status_counts=results.status_counts,
        flags=flag_counts(results),
        lpips_notes=lpips_notes,
        confidence=CONFIDENCE_LEVEL,
        resamples=BOOTSTRAP_RESAMPLES,
        plots=report_plots(results, board, images) if plots else [],
        suite_text=str(results.runs["suite_text"].iloc[-1]),
    )


def _threat_settings(results: ResultSet) -> list[dict[str, Any]]:
    """Every threat-model setting with its value and whether it grants oracle knowledge."""
    settings = []
    for name, value in results.suite_threat_model.items():
        known = name in THREAT_MODEL_DEFAULTS
        settings.append({
            "name": name, "value": value, "default": value == THREAT_MODEL_DEFAULTS.get(name),
            "oracle": known and value == ORACLE_VALUES.get(name),
            "unknown": not known,
        })
    return settings


def _provenance_summary(runs: list[dict[str, Any]], *, wrote: set[Any]) -> dict[str, Any]:
    """The runs at a glance: how many, when, which commits, devices and leakbench versions.

    Only the runs that wrote rows count here (a rerun of a finished suite writes none); the
    provenance table lists every run.
    """
    def distinct(values: Any) -> list[str]:
        return [str(v) for v in dict.fromkeys(v for v in values if not _missing(v))]

    recorded = len(runs)
    runs = [r for r in runs if r["run_id"] in wrote] or runs
    return {
        "recorded": recorded,
        "runs": len(runs),
        "first": min((r["started_utc"] for r in runs), default=None),
        "last": max((r["ended_utc"] or r["started_utc"] for r in runs), default=None),
        "commits": distinct(r["git_commit"] or "unknown" for r in runs),
        "devices": distinct(r["device"] for r in runs),
        "leakbench": distinct(dict(r["versions"]).get("leakbench") for r in runs),
        "torch": distinct(dict(r["versions"]).get("torch") for r in runs),
    }


def _common(results: ResultSet, board: pd.DataFrame) -> dict[str, Any]:
    groups = attack_groups(results)
    by_name = attacks_by_name(results)
    rows = [{**row, "control_unbroken": control_unbroken(row),
             "by_name": _attack_cells(by_name.get((row["victim"], row["defense"], row["protocol"]), {}), groups)}
            for row in board.to_dict("records")]
    return {
        "suite_name": results.suite_name,
        "suite_hash": results.suite_hash,
        "threshold": results.threshold,
        "batteries": results.batteries,
        "warnings": consistency_warnings(results),
        "show": optional_columns(board),
        "board": rows,
        "problems": completeness(results).problems,  # why the store is incomplete; () when it is not
        "attacks": groups,  # one column per attack name, its budgets in the tooltip
        "any_oracle_labels": bool(board["oracle_labels"].any()) if len(board) else False,
        "any_shared_bn": bool(board["shared_bn_stats"].any()) if len(board) else False,
        "psnr_cap_db": PSNR_CAP_DB,
    }


def _attack_cells(cells: dict[str, Any], groups: list[Any]) -> dict[str, dict[str, Any]]:
    """Per attack name on a row: its worst case, the budgets that ran (the tooltip) and, when the name ran at
    several budgets in the suite, what tells this row's apart (shown under the value)."""
    out = {}
    for group in groups:
        cell = cells.get(group.name)
        if cell is None:
            continue
        out[group.name] = {
            "worst_psnr_db": cell.worst_psnr_db,
            "title": "; ".join(f"{group.name}({group.variants[label]})" for label in cell.labels),
            "budget": "; ".join(text for text in (group.differing[label] for label in cell.labels) if text),
        }
    return out


def _run_view(run: dict[str, Any]) -> dict[str, Any]:
    try:
        versions = sorted(json.loads(run["versions_json"]).items())
    except (TypeError, ValueError, AttributeError):
        versions = [("versions", str(run["versions_json"]))]
    ended = run.get("ended_utc")
    return {**run, "versions": versions, "ended_utc": None if _missing(ended) else ended}


def _data_uri(png: bytes | None) -> str | None:
    if png is None:
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _grids(results: ResultSet, images: pd.DataFrame, *, store: Store, max_images: int | None) -> list[Grid]:
    # Plain records grouped once: per-image DataFrame filtering is ~100x slower at suite scale.
    records_by_image: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in results.rows.to_dict("records"):
        records_by_image.setdefault((*(record[c] for c in GROUP_COLUMNS), record["image_id"]), []).append(record)
    grids = []
    for key, group_images in images.groupby(["victim", "defense", "protocol"], sort=False):
        ordered = group_images.sort_values("worst_psnr_db", ascending=False, na_position="last", kind="stable")
        shown = ordered if max_images is None else ordered.head(max_images)
        group_records = [r for image_id in group_images["image_id"] for r in records_by_image[(*key, image_id)]]
        present = {r["attack_label"] for r in group_records}
        group_attacks = [a for a in results.attack_labels if a in present]
        grids.append(Grid(
            victim=key[0], defense=key[1], protocol=key[2],
            oracle_labels=any(r["threat_labels"] == "known" for r in group_records),
            shared_bn_stats=any(r["threat_bn_stats"] == "shared" for r in group_records),
            attack_labels=tuple(group_attacks),
            images=tuple(
                _image_row(image, records_by_image[(*key, image["image_id"])], group_attacks, results=results,
                           store=store)
                for image in shown.to_dict("records")
            ),
            hidden=len(ordered) - len(shown),
        ))
    return grids


def _image_row(image: dict[str, Any], records: list[dict[str, Any]], attack_labels: list[str], *,
               results: ResultSet, store: Store) -> ImageRow:
    # The ground truth is the same picture in every cell that holds the image; take it from
    # the cell of the worst case (or the first row when every row failed).
    if _missing(image["best_cell_key"]):
        truth_cell, truth_slot = records[0]["cell_key"], int(records[0]["image_slot"])
    else:
        truth_cell, truth_slot = image["best_cell_key"], int(image["best_image_slot"])
    truth = store.image_png(results.suite_hash, truth_cell, TRUTH_ATTACK_KEY, truth_slot)
    cells = []
    for label in attack_labels:
        attack_records = [r for r in records if r["attack_label"] == label]
        ok = sorted((r for r in attack_records if r["status"] == "ok"), key=_psnr_descending)
        failed = [r for r in attack_records if r["status"] != "ok"]
        cells.append(AttackCell(label=label, tiles=tuple(_tile(r, image, results=results, store=store)
                                                         for r in [*ok, *failed])))
    leaked = image["leaked"]
    return ImageRow(
        image_id=str(image["image_id"]), true_label=int(image["true_label"]),
        worst_psnr_db=float(image["worst_psnr_db"]), leaked=None if _missing(leaked) else bool(leaked),
        truth_src=_data_uri(truth), attacks=tuple(cells),
    )


def _psnr_descending(record: dict[str, Any]) -> float:
    return -math.inf if _missing(record["psnr_db"]) else -record["psnr_db"]


def _tile(row: dict[str, Any], image: dict[str, Any], *, results: ResultSet, store: Store) -> Tile:
    ok = row["status"] == "ok"
    # The runner stores each reconstruction under the GROUND-TRUTH slot it was matched to
    # (leakbench.running.runner: pngs[reference_index] = recon.images[matched_index]), so the row's own
    # image_slot finds it; matched_slot is the attack's output index, kept for provenance only.
    png = store.image_png(results.suite_hash, row["cell_key"], row["attack_key"], int(row["image_slot"])) if ok else None
    best = (ok and not _missing(image["best_cell_key"]) and row["cell_key"] == image["best_cell_key"]
            and row["attack_key"] == image["best_attack_key"] and int(row["image_slot"]) == int(image["best_image_slot"]))
    return Tile(
        trial=int(row["trial"]), status=str(row["status"]), error=None if _missing(row["error"]) else str(row["error"]),
        psnr_db=row["psnr_db"], ssim=row["ssim"], lpips=row["lpips"],
        lpips_note=None if _missing(row["lpips_note"]) else str(row["lpips_note"]),
        src=_data_uri(png), best=bool(best),
    )


# --------------------------------------------------------------------------- files


def write_reports(
    store_path: str | Path, out_dir: str | Path, *, suite_hash: str | None = None,
    max_images_per_group: int | None = None, plots: bool = True,
) -> ReportPaths:
    """Write leaderboard.csv, leaderboard.md, leaderboard.json, leaderboard.html and report.html into ``out_dir``.

    All five come from one leaderboard computation, so they always agree. The CSV keeps
    full precision (numbers as numbers) for scripts, the JSON one object per row with its
    context (suite, battery, threshold, control verdict; leaderboard.json_records); the
    others are for people.
    """
    results = load_results(store_path, suite_hash=suite_hash)
    board = leaderboard(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(
        csv=out / "leaderboard.csv",
        markdown=out / "leaderboard.md",
        leaderboard_html=out / "leaderboard.html",
        report_html=out / "report.html",
        json=out / "leaderboard.json",
    )
    board.to_csv(paths.csv, index=False)
    paths.markdown.write_text(to_markdown(board, results=results), encoding="utf-8")
    paths.json.write_text(to_json(board, results=results), encoding="utf-8")
    paths.leaderboard_html.write_text(render_leaderboard_html(results, board=board), encoding="utf-8")
    paths.report_html.write_text(
        render_report(results, board=board, max_images_per_group=max_images_per_group, plots=plots), encoding="utf-8")
    log.info("reports of suite %s (%s, %d rows) written to %s", results.suite_name, results.suite_hash,
             len(results.rows), out)
    return paths


__all__ = ["ReportPaths", "environment", "render_leaderboard_html", "render_report", "write_reports"]
