"""Leaderboards from the store: per-image worst cases, averages, leak rates, a Markdown table.

Everything here is computed from the SQLite store alone (no torch), so a report can be
rebuilt anywhere from ``leakbench.sqlite``. Numbers stay numbers (units in the column
names) until :func:`to_markdown` or the HTML templates format them.

Why the worst case: an auditor must assume the strongest attack the battery has, so an
image counts by its best reconstruction over every attack and trial (AutoAttack's rule).
Failed rows (error, timeout, oom) have no metrics; they count as "no leak" for their
attack, and they are counted, never dropped.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from bench.store import STORE_FILENAME, Store, StoreError

log = logging.getLogger(__name__)

# Mirrors bench.metrics.image.PSNR_CAP_DB, which cannot be imported here (it pulls in torch).
PSNR_CAP_DB: float = 100.0
BOOTSTRAP_SEED: int = 20240611
BOOTSTRAP_RESAMPLES: int = 2000
CONFIDENCE_LEVEL: float = 0.95

THRESHOLD_METRICS = ("psnr_db", "ssim", "lpips")
FAILED_STATUSES = ("error", "timeout", "oom")
STATUSES = ("ok", *FAILED_STATUSES)

# A leaderboard row is one (victim, defense, protocol). The protocol is part of the key so
# that two cases that differ only in batch size or FL protocol are never averaged together;
# when each (victim, defense) has one protocol, it is exactly one row per (victim, defense).
GROUP_COLUMNS = ("victim_label", "defense_label", "protocol_label")
_GROUP_OUT = {"victim_label": "victim", "defense_label": "defense", "protocol_label": "protocol"}

_FLOAT_COLUMNS = ("psnr_db", "ssim", "lpips", "label_accuracy", "matching_loss", "seconds")


class ReportError(RuntimeError):
    """A report that cannot be built, with what to do about it."""


class Threshold(NamedTuple):
    """The suite's leak threshold: an image leaks when its worst case passes it."""

    metric: str  # psnr_db | ssim | lpips
    value: float

    @property
    def lower_is_worse(self) -> bool:
        """LPIPS is a distance: a reconstruction leaks when it is *below* the value."""
        return self.metric == "lpips"

    def leaks(self, worst: float) -> bool:
        return worst < self.value if self.lower_is_worse else worst > self.value

    def describe(self) -> str:
        return f"{self.metric} {'<' if self.lower_is_worse else '>'} {self.value:g}"


@dataclass(frozen=True, eq=False)
class ResultSet:
    """One suite's rows as read from a store; the input of every report function.

    ``rows`` is ``Store.results`` as a DataFrame (metrics as floats, NULL as NaN) with two
    derived columns: ``protocol_label`` (``fedsgd(batch_size=4)``) and ``attack_label``
    (the attack's name, made unique with its parameters when one name appears twice).
    """

    rows: pd.DataFrame
    runs: pd.DataFrame
    suite_name: str
    suite_hash: str
    threshold: Threshold
    store_path: Path

    @property
    def attack_labels(self) -> list[str]:
        """Attack labels in the order they first appear, the column order of every table."""
        return list(dict.fromkeys(self.rows["attack_label"]))

    @property
    def status_counts(self) -> dict[str, int]:
        counts = self.rows["status"].value_counts()
        return {status: int(counts.get(status, 0)) for status in STATUSES}

    @property
    def threat_models(self) -> list[tuple[str, str]]:
        """Distinct (labels, bn_stats) settings of the suite's cells."""
        pairs = self.rows[["threat_labels", "threat_bn_stats"]].drop_duplicates()
        return [(str(a), str(b)) for a, b in pairs.itertuples(index=False)]


# --------------------------------------------------------------------------- loading


def load_results(store_path: str | Path, *, suite_hash: str | None = None) -> ResultSet:
    """Read one suite's rows, runs and threshold from a store (read-only).

    ``suite_hash`` None takes the suite of the latest run, which is what a user who just
    ran ``leakbench run`` means. ``store_path`` may also be the run's output directory.
    """
    path = Path(store_path)
    if path.is_dir():
        path = path / STORE_FILENAME
    try:
        store = Store(path, readonly=True)
    except StoreError as err:
        raise ReportError(str(err)) from err
    with store:
        if suite_hash is None:
            suite_hash = store.latest_suite_hash()
            if suite_hash is None:
                raise ReportError(f"{path} holds no run yet; run a suite with `leakbench run SUITE` first")
        runs = [dict(r) for r in store.runs(suite_hash)]
        if not runs:
            known = sorted({r["suite_hash"] for r in store.runs()})
            raise ReportError(
                f"{path} holds no run of suite {suite_hash!r}; suites stored there: {', '.join(known) or 'none'}. "
                "Pass one of those, or leave the suite hash out to report the latest run."
            )
        rows = pd.DataFrame([dict(r) for r in store.results(suite_hash)], columns=_result_columns(store))
    runs_frame = pd.DataFrame(runs)
    latest = runs[-1]
    thresholds = {(r["leak_metric"], float(r["leak_value"])) for r in runs}
    if len(thresholds) > 1:
        log.warning("runs of suite %s disagree on the leak threshold %s; using the latest run's", suite_hash,
                    sorted(thresholds))
    threshold = Threshold(latest["leak_metric"], float(latest["leak_value"]))
    if threshold.metric not in THRESHOLD_METRICS:
        raise ReportError(f"unknown leak metric {threshold.metric!r} in {path}; expected one of {THRESHOLD_METRICS}")
    return ResultSet(rows=_prepare(rows), runs=runs_frame, suite_name=str(latest["suite_name"]),
                     suite_hash=suite_hash, threshold=threshold, store_path=path)


def _result_columns(store: Store) -> list[str]:
    """The columns of ``Store.results`` (results, then the cell's own), so an empty suite still has them."""
    results = [r[1] for r in store.conn.execute("PRAGMA table_info(results)")]
    cells = [r[1] for r in store.conn.execute("PRAGMA table_info(cells)") if r[1] not in ("suite_hash", "cell_key")]
    return results + cells


def _prepare(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    for column in _FLOAT_COLUMNS:
        rows[column] = pd.to_numeric(rows[column], errors="coerce").astype(float)
    rows["protocol_label"] = [_protocol_label(name, text) for name, text in zip(rows["protocol"], rows["protocol_json"])]
    rows["attack_label"] = rows["attack_key"].map(_attack_labels(rows))
    return rows


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _protocol_label(name: str, identity_json: str) -> str:
    try:
        params = json.loads(identity_json).get("params", {})
    except (TypeError, ValueError, AttributeError):
        params = {}
    return f"{name}({_params_text(params)})" if params else str(name)


def _attack_labels(rows: pd.DataFrame) -> dict[str, str]:
    """A readable, unique label per attack key: the name, plus only what tells same-named entries apart."""
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows.drop_duplicates("attack_key").itertuples(index=False):
        try:
            params = json.loads(row.attack_json)
        except (TypeError, ValueError):
            params = {}
        by_name.setdefault(row.attack, {})[row.attack_key] = {**params, "labels": row.label_strategy}
    labels: dict[str, str] = {}
    for name, entries in by_name.items():
        if len(entries) == 1:
            labels.update({key: name for key in entries})
            continue
        names = list(dict.fromkeys(k for described in entries.values() for k in described))
        differing = [k for k in names if len({repr(d.get(k)) for d in entries.values()}) > 1]
        for key, described in entries.items():
            labels[key] = f"{name}({_params_text({k: described.get(k) for k in differing})})"
    if len(set(labels.values())) < len(labels):  # same identity shown, e.g. only the timeout differs
        labels = {key: f"{label} #{key}" for key, label in labels.items()}
    return labels


# --------------------------------------------------------------------------- per image


def per_image_worst(results: ResultSet) -> pd.DataFrame:
    """One row per (victim, defense, protocol, image_id): the image's worst case for privacy.

    Worst case = best reconstruction over every attack and trial of ok rows: max PSNR,
    max SSIM, min LPIPS, each taken independently. ``best_*`` name the row with the
    highest PSNR (the one the report shows first). An image whose every row failed has
    NaN metrics and ``leaked`` False; ``leaked`` is <NA> when the image has ok rows but
    none carries the threshold's metric (e.g. LPIPS unavailable), since then nobody knows.
    """
    rows = results.rows
    keys = [*GROUP_COLUMNS, "image_id"]
    threshold = results.threshold
    ok = rows[rows["status"] == "ok"]
    every = rows.groupby(keys, sort=False, dropna=False).agg(
        true_label=("true_label", "first"), rows=("status", "size"),
        ok_rows=("status", lambda s: int((s == "ok").sum())))
    worst = ok.groupby(keys, sort=False, dropna=False).agg(
        worst_psnr_db=("psnr_db", "max"), worst_ssim=("ssim", "max"), worst_lpips=("lpips", "min"))
    # The row behind the best PSNR: a stable sort keeps the first of equal values, like idxmax.
    best = (ok[ok["psnr_db"].notna()].sort_values("psnr_db", ascending=False, kind="stable")
            .drop_duplicates(keys).set_index(keys)[["attack_label", "attack_key", "trial", "cell_key", "image_slot"]]
            .rename(columns=lambda c: "best_" + c.removesuffix("_label")))
    frame = every.join(worst).join(best).reset_index().rename(columns=_GROUP_OUT)
    frame["failed_rows"] = frame["rows"] - frame["ok_rows"]
    frame["leaked"] = _leaked(frame, threshold)
    columns = [*_GROUP_OUT.values(), "image_id", "true_label", "worst_psnr_db", "worst_ssim", "worst_lpips", "leaked",
               "best_attack", "best_attack_key", "best_trial", "best_cell_key", "best_image_slot", "rows", "ok_rows",
               "failed_rows"]
    frame = frame.reindex(columns=columns)
    for column in ("worst_psnr_db", "worst_ssim", "worst_lpips"):
        frame[column] = frame[column].astype(float)
    for column in ("true_label", "rows", "ok_rows", "failed_rows"):
        frame[column] = frame[column].astype(int)
    for column in ("best_trial", "best_image_slot"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _leaked(images: pd.DataFrame, threshold: Threshold) -> pd.Series:
    """Per image: True/False, False when every row failed, <NA> when ok rows lack the threshold's metric."""
    worst = images[f"worst_{threshold.metric}"].astype(float)
    passes = worst < threshold.value if threshold.lower_is_worse else worst > threshold.value
    leaked = passes.astype("boolean")
    leaked[worst.isna() & (images["ok_rows"] > 0)] = pd.NA  # nobody knows
    leaked[images["ok_rows"] == 0] = False  # every row failed: no reconstruction, so no leak (still counted)
    return leaked


# --------------------------------------------------------------------------- leaderboard


def bootstrap_mean_interval(
    values: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES, level: float = CONFIDENCE_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over images.

    The seed is fixed so the same store always gives the same interval, whatever was
    computed before (no global RNG). Resamples are drawn in chunks to bound memory.
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    if n == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 1_000_000 // n))
    means = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        means.append(values[rng.integers(0, n, size=(size, n))].mean(axis=1))
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.concatenate(means), [tail, 1.0 - tail])
    return float(lo), float(hi)


def attack_column(label: str) -> str:
    """The leaderboard column of one attack's worst-case PSNR."""
    return f"psnr_db[{label}]"


BOARD_COLUMNS = (
    "victim", "defense", "protocol", "batch_size", "images",
    "worst_psnr_db", "worst_psnr_db_lo", "worst_psnr_db_hi", "worst_ssim", "worst_lpips",
    "avg_psnr_db", "avg_ssim", "avg_lpips", "label_accuracy",
    "leak_rate", "leaked_images", "rows", "failed_rows", "oracle_labels", "shared_bn_stats", "lpips_note",
)


def leaderboard(results: ResultSet) -> pd.DataFrame:
    """One row per (victim, defense[, protocol]) in case order: worst case, average, leak rate, counts.

    ``worst_*`` are means over images of each image's worst case (images whose every row
    failed have none and are left out of those means, but stay in ``images`` and in the
    leak rate's denominator). ``avg_*`` are means over all ok rows. ``psnr_db[<attack>]``
    is each attack's own worst case (over trials), so a reader sees which attack leads.
    ``leak_rate`` is NaN when the threshold's metric is missing (LPIPS unavailable).
    """
    rows = results.rows
    images = per_image_worst(results)
    attacks = results.attack_labels
    images_by_group = dict(iter(images.groupby(list(_GROUP_OUT.values()), sort=False)))
    records = []
    for key, group in rows.groupby(list(GROUP_COLUMNS), sort=False):
        group_images = images_by_group[key]
        ok = group[group["status"] == "ok"]
        worst_psnr = group_images["worst_psnr_db"].dropna().to_numpy()
        lo, hi = bootstrap_mean_interval(worst_psnr)
        leaked = group_images["leaked"]
        record = dict(zip(_GROUP_OUT.values(), key))
        record.update(
            batch_size=int(group["batch_size"].max()),  # the protocol's size; a last, partial batch may be smaller
            images=len(group_images),
            worst_psnr_db=_mean(group_images["worst_psnr_db"]),
            worst_psnr_db_lo=lo,
            worst_psnr_db_hi=hi,
            worst_ssim=_mean(group_images["worst_ssim"]),
            worst_lpips=_mean(group_images["worst_lpips"]),
            avg_psnr_db=_mean(ok["psnr_db"]),
            avg_ssim=_mean(ok["ssim"]),
            avg_lpips=_mean(ok["lpips"]),
            label_accuracy=_mean(ok["label_accuracy"]),
            leak_rate=math.nan if leaked.isna().any() or len(leaked) == 0 else float(leaked.sum()) / len(leaked),
            leaked_images=int(leaked.fillna(False).sum()),
            rows=len(group),
            failed_rows=int((group["status"] != "ok").sum()),
            oracle_labels=bool((group["threat_labels"] == "known").any()),
            shared_bn_stats=bool((group["threat_bn_stats"] == "shared").any()),
            lpips_note=_lpips_note(ok),
        )
        for label in attacks:
            by_attack = ok[ok["attack_label"] == label]
            record[attack_column(label)] = _mean(by_attack.groupby("image_id")["psnr_db"].max())
        records.append(record)
    columns = [*BOARD_COLUMNS, *(attack_column(a) for a in attacks)]
    board = pd.DataFrame.from_records(records, columns=columns)
    float_columns = [c for c in columns if c.startswith(("worst_", "avg_", "psnr_db[")) or c in ("label_accuracy", "leak_rate")]
    board[float_columns] = board[float_columns].astype(float)
    board[["batch_size", "images", "leaked_images", "rows", "failed_rows"]] = board[
        ["batch_size", "images", "leaked_images", "rows", "failed_rows"]].astype(int)
    board[["oracle_labels", "shared_bn_stats"]] = board[["oracle_labels", "shared_bn_stats"]].astype(bool)
    return board


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def _lpips_note(ok: pd.DataFrame) -> str:
    """Why LPIPS is missing for some or all ok rows of a group ('' when it is complete)."""
    missing = ok[ok["lpips"].isna()]
    if missing.empty:
        return ""
    reasons = "; ".join(dict.fromkeys(str(n) for n in missing["lpips_note"].dropna())) or "no reason recorded"
    if len(missing) == len(ok):
        return reasons
    return f"missing for {len(missing)} of {len(ok)} rows: {reasons}"


# --------------------------------------------------------------------------- markdown

_MARK_ORACLE_LABELS = "†"
_MARK_SHARED_BN = "‡"
_MARK_LPIPS = "¹"


def to_markdown(board: pd.DataFrame, *, results: ResultSet) -> str:
    """A GitHub-flavoured table under a one-line header naming the suite, hash and threshold.

    This is the only place where leaderboard numbers get decimals; missing values print as
    ``n/a`` (never 0), and oracle settings get a marker on the row and in the header.
    """
    attacks = [c for c in board.columns if c.startswith("psnr_db[")]
    oracle = bool(board["oracle_labels"].any()) if len(board) else False
    shared_bn = bool(board["shared_bn_stats"].any()) if len(board) else False
    header = (f"**leakbench leaderboard** · suite {_md(results.suite_name)} · hash `{results.suite_hash}` · "
              f"leak threshold: worst-case {results.threshold.describe()}")
    if oracle:
        header += f" · {_MARK_ORACLE_LABELS} ORACLE labels granted on marked rows"
    if shared_bn:
        header += f" · {_MARK_SHARED_BN} BN statistics shared on marked rows"
    titles = ["victim", "defense", "protocol", "batch", "images", "worst PSNR (dB)", "95% CI", "worst SSIM",
              "worst LPIPS", "avg PSNR (dB)", "avg SSIM", "avg LPIPS", "label acc.", "leak rate", "rows (failed)",
              *(f"PSNR (dB) {c[len('psnr_db['):-1]}" for c in attacks)]
    lines = [header, "", _md_row(titles), "|" + "|".join(["---"] * 3 + ["---:"] * (len(titles) - 3)) + "|"]
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
            _num(row["worst_psnr_db"], 2),
            "n/a" if _missing(row["worst_psnr_db_lo"]) else f"[{row['worst_psnr_db_lo']:.2f}, {row['worst_psnr_db_hi']:.2f}]",
            _num(row["worst_ssim"], 3), _num(row["worst_lpips"], 3) + lpips_mark,
            _num(row["avg_psnr_db"], 2), _num(row["avg_ssim"], 3), _num(row["avg_lpips"], 3) + lpips_mark,
            _pct(row["label_accuracy"]),
            ("n/a" if _missing(row["leak_rate"]) else f"{_pct(row['leak_rate'])} ({row['leaked_images']}/{row['images']})"),
            f"{row['rows']} ({row['failed_rows']})",
            *(_num(row[c], 2) for c in attacks),
        ]
        lines.append(_md_row(cells))
    lines.append("")
    lines.append(
        "Worst case = best reconstruction per image over all attacks and trials (max PSNR, max SSIM, min LPIPS), "
        "averaged over images; 95% CI: bootstrap over images. Averages are over all ok rows. Failed rows "
        "(error, timeout, oom) count as no leak and are counted in rows (failed); an image with only failed rows "
        f"counts as not leaked. PSNR is capped at {PSNR_CAP_DB:g} dB for identical images."
    )
    if oracle:
        lines.append(f"{_MARK_ORACLE_LABELS} oracle labels: the attacks were given the true labels "
                     "(threat_model.labels = \"known\").")
    if shared_bn:
        lines.append(f"{_MARK_SHARED_BN} the server saw the client's BatchNorm statistics (threat_model.bn_stats = \"shared\").")
    for note in notes:
        lines.append(f"{_MARK_LPIPS} LPIPS n/a: {_md(note)}")
    return "\n".join(lines) + "\n"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _num(value: Any, digits: int) -> str:
    return "n/a" if _missing(value) else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "n/a" if _missing(value) else f"{100 * value:.1f}%"


def _md(text: Any) -> str:
    """Text that cannot break a table cell or inject HTML into a rendered Markdown page."""
    text = str(text).replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"
