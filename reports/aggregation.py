"""From rows to a leaderboard: per-image worst cases, averages with bootstrap intervals, leak rates,
positive controls, the defense's numbers, consistency warnings and completeness.

Why the worst case: an auditor must assume the strongest attack the battery has, so an image
counts by its best reconstruction over every attack and trial (AutoAttack's rule). Failed rows
(error, timeout, oom) have no metrics; they count as "no leak" for their attack, and they are
counted, never dropped. Numbers stay numbers (units in the column names) until the rendering
(``leakbench.reports.rendering``) or the HTML templates format them.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

# the shared vocabulary (torch-free)
from leakbench.core.vocabulary import FAILED_STATUSES, Threshold
from leakbench.reports.loading import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE_LEVEL, GROUP_COLUMNS,
                                       ORACLE_VALUES, ResultSet, _GROUP_OUT, _battery_name, _missing, _num,
                                       _params_text, baseline_rows, parse_json)
from leakbench.reports.rero import RERO_BOARD_COLUMNS, RERO_FLAG, rero_row
from leakbench.store import DEFENSE_NUMBERS

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- per image


def per_image_worst(results: ResultSet) -> pd.DataFrame:
    """One row per (victim, defense, protocol, image_id): the image's worst case for privacy.

    Worst case = best reconstruction over every attack and trial of ok rows: max PSNR,
    max SSIM, min LPIPS, max label accuracy, each taken independently. ``best_*`` name the row with the
    highest PSNR (the one the report shows first). An image whose every row failed has
    NaN metrics and ``leaked`` False; ``leaked`` is <NA> when the image has ok rows but
    none carries the threshold's metric (e.g. LPIPS unavailable), since then nobody knows.
    """
    rows = results.rows
    keys = [*GROUP_COLUMNS, "image_id"]
    threshold = results.threshold
    rows = rows.assign(_attack_ok=(rows["status"] == "ok") & ~baseline_rows(rows))
    ok_every = rows[rows["status"] == "ok"]
    ok = rows[rows["_attack_ok"]]  # baselines are floors: never a worst case
    every = rows.groupby(keys, sort=False, dropna=False).agg(
        true_label=("true_label", "first"), rows=("status", "size"),
        ok_rows=("status", lambda s: int((s == "ok").sum())), attack_ok_rows=("_attack_ok", "sum"))
    worst = ok.groupby(keys, sort=False, dropna=False).agg(
        worst_psnr_db=("psnr_db", "max"), worst_ssim=("ssim", "max"), worst_lpips=("lpips", "min"))
    # label recovery is the label strategy's, whichever image guess it came with: baselines count here
    labels = ok_every.groupby(keys, sort=False, dropna=False).agg(worst_label_accuracy=("label_accuracy", "max"))
    floor = ok_every[baseline_rows(ok_every)].groupby(keys, sort=False, dropna=False).agg(
        floor_psnr_db=("psnr_db", "max"))
    # The row behind the best PSNR: a stable sort keeps the first of equal values, like idxmax.
    best = (ok[ok["psnr_db"].notna()].sort_values("psnr_db", ascending=False, kind="stable")
            .drop_duplicates(keys).set_index(keys)[["attack_label", "attack_key", "trial", "cell_key", "image_slot"]]
            .rename(columns=lambda c: "best_" + c.removesuffix("_label")))
    frame = every.join(worst).join(labels).join(floor).join(best).reset_index().rename(columns=_GROUP_OUT)
    frame["failed_rows"] = frame["rows"] - frame["ok_rows"]
    frame["leaked"] = _leaked(frame, threshold)
    columns = [*_GROUP_OUT.values(), "image_id", "true_label", "worst_psnr_db", "worst_ssim", "worst_lpips",
               "worst_label_accuracy", "leaked", "floor_psnr_db",
               "best_attack", "best_attack_key", "best_trial", "best_cell_key", "best_image_slot", "rows", "ok_rows",
               "attack_ok_rows", "failed_rows"]
    frame = frame.reindex(columns=columns)
    for column in ("worst_psnr_db", "worst_ssim", "worst_lpips", "worst_label_accuracy", "floor_psnr_db"):
        frame[column] = frame[column].astype(float)
    for column in ("true_label", "rows", "ok_rows", "attack_ok_rows", "failed_rows"):
        frame[column] = frame[column].astype(int)
    for column in ("best_trial", "best_image_slot"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _leaked(images: pd.DataFrame, threshold: Threshold) -> pd.Series:
    """Per image: True/False, False when every attack row failed (or only baselines ran), <NA> when ok rows
    lack the threshold's metric."""
    worst = images[f"worst_{threshold.metric}"].astype(float)
    passes = worst < threshold.value if threshold.lower_is_worse else worst > threshold.value
    leaked = passes.astype("boolean")
    attack_ok = images["attack_ok_rows"] if "attack_ok_rows" in images else images["ok_rows"]
    leaked[worst.isna() & (attack_ok > 0)] = pd.NA  # nobody knows
    leaked[attack_ok == 0] = False  # every attack row failed: no reconstruction, so no leak (still counted)
    return leaked


# --------------------------------------------------------------------------- positive controls


CONTROL_DEFENSE = "none"
CONTROL_PROTOCOL = "fedsgd"


@dataclass(frozen=True)
class ControlFigures:
    """A row's positive control: the same victim and images, no defense, FedSGD batch 1, the same attacks.

    ``own``: the row is its own control (undefended FedSGD at batch size 1). Per image, the
    worst case over the control's ok attack rows (baselines left out) leaks when it passes the
    suite's threshold; ``leak_rate`` is NaN when the threshold's metric is missing.
    """

    victim: str
    protocol: str
    own: bool
    images: int
    leaked_images: int
    leak_rate: float
    worst_psnr_db: float  # mean over images of the per-image worst case
    max_psnr_db: float
    failed_rows: int
    attacks: tuple[str, ...]

    def describe(self) -> str:
        where = "the row itself" if self.own else f"{self.victim} · {CONTROL_DEFENSE} · {self.protocol}"
        rate = "n/a" if _missing(self.leak_rate) else f"{100 * self.leak_rate:.1f}%"
        return (f"{where}: {rate} of images leak ({self.leaked_images}/{self.images}), worst-case PSNR mean "
                f"{_num(self.worst_psnr_db, 2)} dB, max {_num(self.max_psnr_db, 2)} dB")

    def as_dict(self) -> dict[str, Any]:
        def number(value: float) -> float | None:
            return None if _missing(value) else float(value)

        return {"victim": self.victim, "defense": CONTROL_DEFENSE, "protocol": self.protocol, "own": self.own,
                "images": self.images, "leaked_images": self.leaked_images, "leak_rate": number(self.leak_rate),
                "worst_psnr_db_mean": number(self.worst_psnr_db), "worst_psnr_db_max": number(self.max_psnr_db),
                "failed_rows": self.failed_rows, "attacks": list(self.attacks)}


def _is_control_form(group: pd.DataFrame) -> bool:
    """Whether every cell of a row is undefended FedSGD of one client at batch size 1 (its own control)."""
    def one_client(text: Any) -> bool:
        identity = parse_json(text, {})
        params = identity.get("params", {}) if isinstance(identity, dict) else {}
        return isinstance(params, dict) and params.get("clients", 1) == 1
    return bool(len(group)) and bool((group["defense"] == CONTROL_DEFENSE).all()
                                     and (group["protocol"] == CONTROL_PROTOCOL).all()
                                     and (group["batch_size"].astype(int) == 1).all()
                                     and group["protocol_json"].map(one_client).all())


def control_figures(results: ResultSet) -> dict[tuple[str, str, str], ControlFigures | None]:
    """Per leaderboard row (victim, defense, protocol): its positive control's figures, None when none is stored.

    The control is read from the cells' ``control_json`` (the control cells and the attacks
    run on them for this row); a row without one whose cells are all undefended FedSGD at
    batch size 1 is its own control (stores from before controls, hand-made stores).
    """
    every = results.every_row
    out: dict[tuple[str, str, str], ControlFigures | None] = {}
    for key, group in results.rows.groupby(list(GROUP_COLUMNS), sort=False):
        cells = group.drop_duplicates("cell_key")
        named = [parse_json(text, {}) for text in cells["control_json"]]
        named = [n for n in named if isinstance(n, dict) and n.get("cells")]
        own = _is_control_form(group)
        if named:
            cell_keys = {k for n in named for k in n.get("cells", [])}
            attack_keys = {k for n in named for k in n.get("attacks", [])}
            control = every[every["cell_key"].isin(cell_keys) & every["attack_key"].isin(attack_keys)]
            own = own and cell_keys <= set(cells["cell_key"])
        elif own:
            control = group
        else:
            out[key] = None
            continue
        control = control[~baseline_rows(control)]
        if control.empty:
            out[key] = None
            continue
        out[key] = _control_figures(control, results=results, own=own)
    return out


def _control_figures(control: pd.DataFrame, *, results: ResultSet, own: bool) -> ControlFigures:
    threshold = results.threshold
    ok = control[control["status"] == "ok"]
    per_image = control.groupby("image_id", sort=False).agg(rows=("status", "size"))
    per_image["attack_ok_rows"] = ok.groupby("image_id", sort=False)["status"].size()
    per_image["attack_ok_rows"] = per_image["attack_ok_rows"].fillna(0).astype(int)
    per_image["ok_rows"] = per_image["attack_ok_rows"]
    worst = ok.groupby("image_id", sort=False).agg(worst_psnr_db=("psnr_db", "max"), worst_ssim=("ssim", "max"),
                                                    worst_lpips=("lpips", "min"))
    per_image = per_image.join(worst)
    leaked = _leaked(per_image, threshold)
    rate = _leak_rate(leaked)
    psnr = per_image["worst_psnr_db"].astype(float).dropna()
    protocols = list(dict.fromkeys(control["protocol_label"]))
    return ControlFigures(
        victim=str(control["victim_label"].iloc[0]), protocol=", ".join(protocols), own=own,
        images=len(per_image), leaked_images=int(rate["leaked_images"]), leak_rate=float(rate["leak_rate"]),
        worst_psnr_db=float(psnr.mean()) if len(psnr) else math.nan,
        max_psnr_db=float(psnr.max()) if len(psnr) else math.nan,
        failed_rows=int((control["status"] != "ok").sum()),
        attacks=tuple(dict.fromkeys(str(a) for a in control["attack_label"])),
    )


# --------------------------------------------------------------------------- leaderboard


def bootstrap_mean_interval(
    values: np.ndarray, *, weights: np.ndarray | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = CONFIDENCE_LEVEL, seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over images.

    ``weights`` (one per image) make it the interval of a pooled mean: with ``values`` the
    per-image means of an image's rows and ``weights`` their row counts, each resample's
    statistic is the mean over the rows of the resampled images, so an average over rows
    still resamples *images*, the independent unit. The seed is fixed so the same store
    always gives the same interval, whatever was computed before (no global RNG).
    Resamples are drawn in chunks to bound memory.
    """
    values = np.asarray(values, dtype=float)
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    if n == 1 or np.all(values == values[0]):
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 1_000_000 // n))
    weighted = values * w
    means = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        index = rng.integers(0, n, size=(size, n))
        means.append(weighted[index].sum(axis=1) / w[index].sum(axis=1))
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.concatenate(means), [tail, 1.0 - tail])
    return float(lo), float(hi)


def attack_column(label: str) -> str:
    """The leaderboard column of one attack's worst-case PSNR."""
    return f"psnr_db[{label}]"


def defense_info_column(key: str) -> str:
    """The leaderboard column of a number a defense reports that has no column of its own."""
    return f"defense_info[{key}]"


# The columns that get a 95% interval (``<name>_lo``, ``<name>_hi``): every worst-case and
# average column, and the leak rate.
WORST_COLUMNS = ("worst_psnr_db", "worst_ssim", "worst_lpips", "worst_label_accuracy")
AVERAGE_COLUMNS = {"avg_psnr_db": "psnr_db", "avg_ssim": "ssim", "avg_lpips": "lpips",
                   "label_accuracy": "label_accuracy"}
INTERVAL_COLUMNS = (*WORST_COLUMNS, *AVERAGE_COLUMNS, "leak_rate")

# The numbers a defense reports that the store keeps as numeric columns (leakbench.store.DEFENSE_NUMBERS;
# the others land in ``defense_info[<key>]`` columns when numeric, and in ``defense_notes`` always).
# ``epsilon`` is the defense's own or the largest ``epsilon_<accountant>`` (e.g. rdp, prv), as the store
# computes it; ``utility_accuracy`` (and its undefended twin) is the test accuracy after the suite's short
# FL training with the defense ([utility], bench/fl/accuracy.py), present only where a suite asks.
DEFENSE_NUMBER_COLUMNS = DEFENSE_NUMBERS
# Over the cells of a row, the privacy budget takes the weakest guarantee (largest ε, δ);
# other numbers are averaged.
_DEFENSE_WORST_OF = ("epsilon", "delta")


def _with_interval(name: str) -> tuple[str, str, str]:
    return name, f"{name}_lo", f"{name}_hi"


BOARD_COLUMNS = (
    "victim", "defense", "protocol", "batch_size", "images", "cells",
    *(c for name in WORST_COLUMNS for c in _with_interval(name)),
    *(c for name in AVERAGE_COLUMNS for c in _with_interval(name)),
    *_with_interval("leak_rate"), "leaked_images", "leak_threshold",
    "floor_psnr_db", "gain_over_floor_db",
    "control_leak_rate", "control_leaked_images", "control_images", "control_worst_psnr_db", "control",
    "control_verdict",
    *DEFENSE_NUMBER_COLUMNS, *RERO_BOARD_COLUMNS, "defense_notes", "victim_state", "victim_test_accuracy", "victim_notes",
    "rows", "failed_rows", "failed_cells", "flagged_rows", "flagged_cells", "flags",
    "battery", "oracle_labels", "shared_bn_stats", "lpips_note",
)
_INT_COLUMNS = ("batch_size", "images", "cells", "leaked_images", "rows", "failed_rows", "failed_cells",
                "flagged_rows", "flagged_cells", "control_leaked_images", "control_images")
_TEXT_COLUMNS = ("victim", "defense", "protocol", "leak_threshold", "control", "control_verdict", "rero_note", "defense_notes", "victim_state",
                 "victim_notes", "flags", "battery", "lpips_note")
_BOOL_COLUMNS = ("oracle_labels", "shared_bn_stats", "rero_exceeded")


def leaderboard(results: ResultSet) -> pd.DataFrame:
    """One row per (victim, defense[, protocol]) in case order: worst case, average, leak rate, counts.

    ``worst_*`` are means over images of each image's worst case (images whose every row
    failed have none and are left out of those means, but stay in ``images`` and in the
    leak rate's denominator). ``avg_*`` and ``label_accuracy`` are means over all ok rows.
    Each has a 95% percentile bootstrap interval over images (``_lo``, ``_hi``).
    ``psnr_db[<attack>]`` is each attack's own worst case (over trials), so a reader sees
    which attack leads. ``leak_rate`` is NaN when the threshold's metric is missing (LPIPS
    unavailable). Defense numbers (ε, utility), the victim's training state and test
    accuracy, sanity flags and failed cells come from the cells' and rows' JSON columns.
    """
    rows = results.rows
    images = per_image_worst(results)
    attacks = results.attack_labels
    images_by_group = dict(iter(images.groupby(list(_GROUP_OUT.values()), sort=False)))
    controls = control_figures(results)
    records = []
    extra_defense_keys: dict[str, None] = {}
    for key, group in rows.groupby(list(GROUP_COLUMNS), sort=False):
        group_images = images_by_group[key]
        ok_every = group[group["status"] == "ok"]
        ok = ok_every[~baseline_rows(ok_every)]  # baselines are floors: not in the averages
        cells = group.drop_duplicates("cell_key")
        record: dict[str, Any] = dict(zip(_GROUP_OUT.values(), key))
        record.update(
            batch_size=int(group["batch_size"].max()),  # the protocol's size; a last, partial batch may be smaller
            images=len(group_images),
            cells=len(cells),
        )
        for column in WORST_COLUMNS:
            values = group_images[column].dropna().to_numpy()
            record[column] = float(values.mean()) if len(values) else math.nan
            record[f"{column}_lo"], record[f"{column}_hi"] = bootstrap_mean_interval(values)
        for column, metric in AVERAGE_COLUMNS.items():
            record[column], record[f"{column}_lo"], record[f"{column}_hi"] = _pooled_mean(ok, metric)
        record.update(_leak_rate(group_images["leaked"]))
        record["leak_threshold"] = results.threshold.describe()
        if "label_accuracy" in AVERAGE_COLUMNS:  # label recovery counts the baselines' labels too
            record["label_accuracy"], record["label_accuracy_lo"], record["label_accuracy_hi"] = _pooled_mean(
                ok_every, "label_accuracy")
        floors = group_images["floor_psnr_db"].dropna()
        record["floor_psnr_db"] = float(floors.mean()) if len(floors) else math.nan
        gains = (group_images["worst_psnr_db"] - group_images["floor_psnr_db"]).dropna()
        record["gain_over_floor_db"] = float(gains.mean()) if len(gains) else math.nan
        control = controls.get(key)
        record.update(
            control_leak_rate=math.nan if control is None else control.leak_rate,
            control_leaked_images=0 if control is None else control.leaked_images,
            control_images=0 if control is None else control.images,
            control_worst_psnr_db=math.nan if control is None else control.worst_psnr_db,
            control="" if control is None else control.describe(),
        )
        record["control_verdict"] = control_verdict(record)
        defense = _defense_info(cells)
        extra_defense_keys.update(dict.fromkeys(k for k in defense if k not in DEFENSE_NUMBER_COLUMNS
                                                and k != "defense_notes"))
        record.update(defense)
        record.update(rero_row(cells, group_images["leaked"]))  # the DP rows' ReRo ceiling (reports/rero.py)
        record.update(_victim_info(cells["victim_info_json"]))
        failed = group[group["status"] != "ok"]
        row_flags = [_flag_names(text) for text in group["flags_json"]]
        cell_flags = [_flag_names(text) for text in cells["cell_flags_json"]]
        record.update(
            rows=len(group),
            failed_rows=len(failed),
            failed_cells=int(failed["cell_key"].nunique()),
            flagged_rows=sum(1 for names in row_flags if names),
            flagged_cells=sum(1 for names in cell_flags if names),
            flags=_flag_summary(row_flags, cell_flags),
            battery=", ".join(dict.fromkeys(_battery_name(b) for b in group["battery"])),
            oracle_labels=bool((group["threat_labels"] == ORACLE_VALUES["labels"]).any()),
            shared_bn_stats=bool((group["threat_bn_stats"] == ORACLE_VALUES["bn_stats"]).any()),
            lpips_note=_lpips_note(ok),
        )
        if record["rero_exceeded"]:  # measured above the ReRo ceiling: the row's guarantee is in doubt
            record["flags"] = "; ".join(f for f in (record["flags"], f"{RERO_FLAG}: measured leak rate above the "
                                                     "ReRo ceiling gamma") if f)
        for label in attacks:
            by_attack = ok_every[ok_every["attack_label"] == label]  # a baseline's own column shows its floor
            record[attack_column(label)] = _mean(by_attack.groupby("image_id")["psnr_db"].max())
        records.append(record)
    extra = [defense_info_column(k) for k in extra_defense_keys]
    for record in records:
        for k in extra_defense_keys:
            record[defense_info_column(k)] = record.pop(k, math.nan)
    columns = [*BOARD_COLUMNS, *extra, *(attack_column(a) for a in attacks)]
    board = pd.DataFrame.from_records(records, columns=columns)
    float_columns = [c for c in columns if c not in (*_INT_COLUMNS, *_TEXT_COLUMNS, *_BOOL_COLUMNS)]
    board[float_columns] = board[float_columns].astype(float)
    board[list(_INT_COLUMNS)] = board[list(_INT_COLUMNS)].astype(int)
    board[list(_BOOL_COLUMNS)] = board[list(_BOOL_COLUMNS)].astype(bool)
    board[list(_TEXT_COLUMNS)] = board[list(_TEXT_COLUMNS)].fillna("").astype(str)
    return board


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else math.nan


def _pooled_mean(ok: pd.DataFrame, metric: str) -> tuple[float, float, float]:
    """Mean of ``metric`` over ok rows, and its interval resampling images (not rows)."""
    present = ok[ok[metric].notna()]
    if present.empty:
        return math.nan, math.nan, math.nan
    per_image = present.groupby("image_id", sort=False)[metric].agg(["mean", "size"])
    lo, hi = bootstrap_mean_interval(per_image["mean"].to_numpy(), weights=per_image["size"].to_numpy())
    return float(present[metric].mean()), lo, hi


def _leak_rate(leaked: pd.Series) -> dict[str, Any]:
    leaked_images = int(leaked.fillna(False).sum())
    if leaked.isna().any() or len(leaked) == 0:
        return {"leak_rate": math.nan, "leak_rate_lo": math.nan, "leak_rate_hi": math.nan,
                "leaked_images": leaked_images}
    values = leaked.astype(float).to_numpy()
    lo, hi = bootstrap_mean_interval(values)
    return {"leak_rate": float(values.mean()), "leak_rate_lo": lo, "leak_rate_hi": hi, "leaked_images": leaked_images}


def _lpips_note(ok: pd.DataFrame) -> str:
    """Why LPIPS is missing for some or all ok rows of a group ('' when it is complete)."""
    missing = ok[ok["lpips"].isna()]
    if missing.empty:
        return ""
    reasons = "; ".join(dict.fromkeys(str(n) for n in missing["lpips_note"].dropna())) or "no reason recorded"
    if len(missing) == len(ok):
        return reasons
    return f"missing for {len(missing)} of {len(ok)} rows: {reasons}"


# --------------------------------------------------------------------------- JSON columns


def _flatten(info: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_value(value: Any) -> str:
    if _is_number(value):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return str(value)


def _describe_values(key: str, values: list[Any]) -> str:
    """``key=value``; a number that differs between cells as its mean and range, other values listed."""
    shown = list(dict.fromkeys(_format_value(v) for v in values))
    if len(shown) > 1 and all(_is_number(v) for v in values):
        return f"{key}={_format_value(float(np.mean(values)))} (mean; {_format_value(min(values))}–{_format_value(max(values))})"
    return f"{key}={' | '.join(shown)}"


def _defense_info(cells: pd.DataFrame) -> dict[str, Any]:
    """Per row: ε, δ and utility from the store's numeric columns (``DEFENSE_NUMBERS``), other numbers
    a defense reports under their key, everything as text in ``defense_notes``.

    Over the row's cells, ε and δ take the weakest guarantee (the largest), the others their mean.
    Other keys of ``defense_info_json`` are read generically: a defense that reports a new number
    gets a ``defense_info[<key>]`` column and a mention in the notes without a change here.
    """
    out: dict[str, Any] = {}
    for name in DEFENSE_NUMBER_COLUMNS:
        values = pd.to_numeric(cells[name], errors="coerce").dropna() if name in cells else pd.Series(dtype=float)
        out[name] = math.nan if values.empty else (float(values.max()) if name in _DEFENSE_WORST_OF
                                                    else float(values.mean()))
    per_key: dict[str, list[Any]] = {}
    for text in cells["defense_info_json"]:
        info = parse_json(text, {})
        if not isinstance(info, dict):
            continue
        for key, value in _flatten(info).items():
            per_key.setdefault(key, []).append(value)
    notes = []
    for key, values in per_key.items():
        if key in DEFENSE_NUMBER_COLUMNS:
            continue
        numbers = [float(v) for v in values if _is_number(v)]
        if numbers and len(numbers) == len(values):
            out[key] = float(np.mean(numbers))
        notes.append(_describe_values(key, values))
    out["defense_notes"] = "; ".join(notes)
    return out


def _victim_info(texts: pd.Series) -> dict[str, Any]:
    """The victim's training state and test accuracy (cells.victim_info_json); other keys as text."""
    states: list[str] = []
    accuracies: list[float] = []
    per_key: dict[str, list[Any]] = {}
    for text in texts:
        info = parse_json(text, {})
        if not isinstance(info, dict):
            continue
        for key, value in _flatten(info).items():
            if key == "state":
                states.append(str(value))
            elif key == "test_accuracy" and _is_number(value):
                accuracies.append(float(value))
            else:
                per_key.setdefault(key, []).append(value)
    return {
        "victim_state": ", ".join(dict.fromkeys(states)),
        "victim_test_accuracy": float(np.mean(accuracies)) if accuracies else math.nan,
        "victim_notes": "; ".join(_describe_values(k, v) for k, v in per_key.items()),
    }


def _flag_names(text: Any) -> list[str]:
    """Names of the sanity flags in a ``flags_json`` value: strings, or objects with a name."""
    flags = parse_json(text, [])
    if isinstance(flags, (str, dict)):
        flags = [flags]
    if not isinstance(flags, list):
        return []
    names = []
    for flag in flags:
        if isinstance(flag, dict):
            names.append(str(flag.get("name") or flag.get("flag") or flag.get("code") or json.dumps(flag, sort_keys=True)))
        else:
            names.append(str(flag))
    return names


def _flag_summary(row_flags: list[list[str]], cell_flags: list[list[str]]) -> str:
    rows = Counter(name for names in row_flags for name in dict.fromkeys(names))
    cells = Counter(name for names in cell_flags for name in dict.fromkeys(names))
    parts = [f"{name}: {n} cell(s)" for name, n in cells.items()]
    parts += [f"{name}: {n} row(s)" for name, n in rows.items()]
    return "; ".join(parts)


def flag_counts(results: ResultSet) -> list[tuple[str, str, int]]:
    """(flag, 'cell' | 'row', count) over the whole suite, for the report's header."""
    rows = Counter(n for text in results.rows["flags_json"] for n in dict.fromkeys(_flag_names(text)))
    cell_texts = results.rows.drop_duplicates("cell_key")["cell_flags_json"]
    cells = Counter(n for text in cell_texts for n in dict.fromkeys(_flag_names(text)))
    return [(n, "cell", c) for n, c in cells.items()] + [(n, "row", c) for n, c in rows.items()]


# --------------------------------------------------------------------------- consistency


def component_versions(results: ResultSet) -> dict[tuple[str, str], list[str]]:
    """(kind, name) -> the distinct versions found in the rows (attacks, label strategies, victims, defenses, protocols)."""
    rows = results.rows
    found: dict[tuple[str, str], dict[str, None]] = {}

    def add(kind: str, name: Any, version: Any) -> None:
        if version is None or (isinstance(version, float) and math.isnan(version)):
            return
        found.setdefault((kind, str(name)), {})[str(version)] = None

    for name, version in rows[["attack", "attack_version"]].drop_duplicates().itertuples(index=False):
        add("attack", name, version)
    for name, version in rows[["label_strategy", "label_strategy_version"]].drop_duplicates().itertuples(index=False):
        add("label strategy", name, version)
    for kind in ("victim", "defense", "protocol"):
        for text in rows[f"{kind}_json"].drop_duplicates():
            identity = parse_json(text, {})
            if isinstance(identity, dict) and "name" in identity:
                add(kind, identity["name"], identity.get("version"))
    return {key: list(versions) for key, versions in found.items()}


def consistency_warnings(results: ResultSet) -> list[str]:
    """Why the rows of this leaderboard may not be comparable; [] when they are.

    A leaderboard mixing batteries, component versions, threat models or leak thresholds
    compares numbers that were not measured the same way (a resumed run after a version
    bump is the common case); every output shows these warnings where a reader sees them.
    """
    warnings = []
    batteries = results.batteries
    if len(batteries) > 1:
        warnings.append(f"mixes batteries ({', '.join(batteries)}): worst cases taken over different attack "
                        "sets are not comparable")
    for (kind, name), versions in component_versions(results).items():
        if len(versions) > 1:
            warnings.append(f"mixes versions of {kind} {name!r} ({', '.join(versions)}): rows were computed by "
                            "different code; run the suite again into a fresh --out directory")
    threat_models = results.threat_models
    if len(threat_models) > 1:
        shown = "; ".join(f"labels={a}, bn_stats={b}" for a, b in threat_models)
        warnings.append(f"mixes threat models ({shown}): rows granted different oracle knowledge")
    runs = results.runs
    if len(runs):
        thresholds = list(dict.fromkeys(zip(runs["leak_metric"], runs["leak_value"].astype(float))))
        if len(thresholds) > 1:
            warnings.append("runs disagree on the leak threshold ("
                            + ", ".join(Threshold(m, v).describe() for m, v in thresholds)
                            + f"); leak rates use the latest run's ({results.threshold.describe()})")
        packages = list(dict.fromkeys(
            str(parse_json(text, {}).get("leakbench", "unknown")) for text in runs["versions_json"]
            if isinstance(parse_json(text, {}), dict)))
        if len(packages) > 1:
            warnings.append(f"rows come from runs of different leakbench versions ({', '.join(packages)})")
    return warnings


# --------------------------------------------------------------------------- attacks by name


@dataclass(frozen=True)
class AttackGroup:
    """One attack name's column: every variant of that name (budget, label strategy) the suite ran.

    ``variants`` maps each attack label of the name (its ``psnr_db[<label>]`` board column) to its
    parameters and label strategy in words; ``differing`` to only what tells it apart from the
    name's other variants ('' when the name has one variant).
    """

    name: str
    variants: dict[str, str]
    differing: dict[str, str]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.variants)

    def describe(self) -> str:
        """The name's budgets, one per variant: ``dlg(iterations=300, restarts=1, labels=idlg)``."""
        return "; ".join(f"{self.name}({text})" if text else self.name for text in self.variants.values())


@dataclass(frozen=True)
class AttackCell:
    """One row's value in an attack name's column: the worst case over the variants that ran on the row."""

    worst_psnr_db: float  # mean over images of each image's best PSNR over every variant and trial of the name
    labels: tuple[str, ...]  # the variants (attack labels) that ran on the row


def attack_groups(results: ResultSet) -> list[AttackGroup]:
    """One group per attack name, in the order the names first appear: the report's per-attack columns."""
    rows = results.rows.drop_duplicates("attack_label")
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows.itertuples(index=False):
        params = parse_json(row.attack_json, {})
        params = params if isinstance(params, dict) else {}
        by_name.setdefault(str(row.attack), {})[str(row.attack_label)] = {**params, "labels": row.label_strategy}
    groups = []
    for name, entries in by_name.items():
        keys = list(dict.fromkeys(k for described in entries.values() for k in described))
        differing = [k for k in keys if len({repr(d.get(k)) for d in entries.values()}) > 1]
        groups.append(AttackGroup(
            name=name,
            variants={label: _params_text(described) for label, described in entries.items()},
            differing={label: _params_text({k: described.get(k) for k in differing}) if len(entries) > 1 else ""
                       for label, described in entries.items()},
        ))
    return groups


def attacks_by_name(results: ResultSet) -> dict[tuple[str, str, str], dict[str, AttackCell]]:
    """Per leaderboard row (victim, defense, protocol), per attack name that ran on it: its worst case.

    Like the ``psnr_db[<label>]`` columns (ok rows, baselines in their own column), but over every
    variant of the name, so a suite whose cases run one attack at different budgets has one column
    per attack, not one per budget.
    """
    rows = results.rows
    keys = [*GROUP_COLUMNS, "attack"]
    ok = rows[rows["status"] == "ok"]
    per_image = ok.groupby([*keys, "image_id"], sort=False)["psnr_db"].max()
    worst = per_image.groupby(level=list(range(len(keys))), sort=False).mean() if len(per_image) else per_image
    out: dict[tuple[str, str, str], dict[str, AttackCell]] = {}
    for key, group in rows.groupby(keys, sort=False):
        value = worst.get(key, math.nan) if len(worst) else math.nan
        out.setdefault(key[:3], {})[str(key[3])] = AttackCell(
            worst_psnr_db=math.nan if _missing(value) else float(value),
            labels=tuple(dict.fromkeys(str(label) for label in group["attack_label"])))
    return out


# --------------------------------------------------------------------------- completeness


@dataclass(frozen=True)
class Completeness:
    """Whether a store holds every result of its suite, as far as the store can tell, and what is missing.

    The store learns of a cell when a run starts it, so cells no run has reached are seen only
    through the latest run's status (not ``finished``).
    """

    problems: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.problems


def completeness(results: ResultSet) -> Completeness:
    """What a reader must know before trusting the numbers: a run not finished, started cells without results,
    failed attack runs."""
    problems = []
    runs = results.runs
    if len(runs):
        latest = runs.iloc[-1]
        status = str(latest.get("status", "finished"))
        if status == "running":
            problems.append(f"run {latest['run_id']} (started {latest['started_utc']} UTC) has not ended: it is still "
                            "running, or it was killed. The numbers are partial; run the same command again to resume "
                            "(finished results are kept)")
        elif status == "interrupted":
            problems.append(f"run {latest['run_id']} was interrupted before every (cell, attack) ran: the numbers are "
                            "partial; run the same command again to resume")
        elif status != "finished":
            problems.append(f"run {latest['run_id']} ended with status {status!r}: results may be missing")
    if results.cells_without_results:
        problems.append(f"{results.cells_without_results} started cell(s) hold no result yet (pending or running)")
    every = results.every_row
    failed = every[every["status"] != "ok"] if len(every) else every
    if len(failed):
        counts = failed["status"].value_counts()
        shown = ", ".join(f"{status}: {int(counts[status])}" for status in FAILED_STATUSES if status in counts)
        pairs = failed.drop_duplicates(["cell_key", "attack_key"])
        problems.append(f"{len(pairs)} attack run(s) failed ({len(failed)} rows; {shown}): they count as no leak. "
                        "`leakbench run SUITE --retry-failed` runs them again")
    return Completeness(problems=tuple(problems))


# --------------------------------------------------------------------------- the control's verdict


CONTROL_SHARE = 0.5


def control_unbroken(row: dict[str, Any]) -> bool:
    """A row that leaks nothing while its control leaks on less than ``CONTROL_SHARE`` of its images:
    its "no leak" says only that the attacks did not work (certify calls it inconclusive)."""
    rate = row["control_leak_rate"]
    return not _missing(rate) and rate < CONTROL_SHARE and not row["leaked_images"]


CONTROL_VERDICTS = ("pass", "fail", "inconclusive")


def control_verdict(row: dict[str, Any]) -> str:
    """The positive control's verdict: ``pass`` when it leaks on at least ``CONTROL_SHARE`` of its images (the
    battery breaks the undefended victim, so the row's "no leak" is evidence), ``fail`` when it leaks on fewer,
    ``inconclusive`` when none is stored or its threshold metric is missing."""
    rate = row["control_leak_rate"]
    if _missing(rate):
        return "inconclusive"
    return "pass" if rate >= CONTROL_SHARE else "fail"
