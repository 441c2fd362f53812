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
import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# The shared vocabulary (torch-free), re-exported here for the reports.
from leakbench.core.vocabulary import FAILED_STATUSES, PSNR_CAP_DB, STATUSES, THRESHOLD_METRICS, Threshold
from leakbench.reports.rero import RERO_BOARD_COLUMNS, RERO_FLAG, RERO_NOTE, has_rero, rero_row, rero_text
from leakbench.store import CONTROL_COLUMNS, STORE_FILENAME, Store, StoreError

log = logging.getLogger(__name__)

BOOTSTRAP_SEED: int = 20240611
BOOTSTRAP_RESAMPLES: int = 2000
CONFIDENCE_LEVEL: float = 0.95

NO_BATTERY = "none (attacks listed in the suite)"
# The threat model's settings and their defaults (leakbench.core.ThreatModel); the other values
# grant the attacker oracle knowledge and are marked in every output.
THREAT_MODEL_DEFAULTS: dict[str, Any] = {"labels": "recovered", "bn_stats": "none"}
ORACLE_VALUES: dict[str, str] = {"labels": "known", "bn_stats": "shared"}

# A leaderboard row is one (victim, defense, protocol). The protocol is part of the key so
# that two cases that differ only in batch size or FL protocol are never averaged together;
# when each (victim, defense) has one protocol, it is exactly one row per (victim, defense).
GROUP_COLUMNS = ("victim_label", "defense_label", "protocol_label")
_GROUP_OUT = {"victim_label": "victim", "defense_label": "defense", "protocol_label": "protocol"}

_FLOAT_COLUMNS = ("psnr_db", "ssim", "lpips", "label_accuracy", "matching_loss", "seconds")


class ReportError(RuntimeError):
    """A report that cannot be built, with what to do about it."""


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
    # Every row, those of cells added only as positive controls too (``rows`` leaves them out:
    # they are evidence for other rows, not rows of the leaderboard). None: same as ``rows``.
    all_rows: pd.DataFrame | None = None
    # Cells a run started (their update was computed) that hold no result row yet: a run in progress or cut short.
    cells_without_results: int = 0

    @property
    def every_row(self) -> pd.DataFrame:
        return self.rows if self.all_rows is None else self.all_rows

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

    @property
    def batteries(self) -> list[str]:
        """Distinct batteries of the rows, in order; ``NO_BATTERY`` for attacks listed in the suite itself."""
        return list(dict.fromkeys(_battery_name(b) for b in self.rows["battery"]))

    @property
    def suite_threat_model(self) -> dict[str, Any]:
        """Every setting of the suite's ``[threat_model]`` table, defaults filled in (latest run's suite file).

        Settings this version of the report does not know are kept as they are, so a new
        oracle setting is still shown, never hidden. The cells' own columns win for the
        settings they record, since they are what ran.
        """
        settings: dict[str, Any] = dict(THREAT_MODEL_DEFAULTS)
        try:
            table = tomllib.loads(str(self.runs["suite_text"].iloc[-1])).get("threat_model", {})
        except (tomllib.TOMLDecodeError, IndexError, KeyError):
            table = {}
        if isinstance(table, dict):
            settings.update(table)
        cells = self.threat_models
        if len(cells) == 1:
            settings["labels"], settings["bn_stats"] = cells[0]
        return settings


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
        cells_without_results = _cells_without_results(store, suite_hash)
    runs_frame = pd.DataFrame(runs)
    latest = runs[-1]
    thresholds = {(r["leak_metric"], float(r["leak_value"])) for r in runs}
    if len(thresholds) > 1:
        log.warning("runs of suite %s disagree on the leak threshold %s; using the latest run's", suite_hash,
                    sorted(thresholds))
    if str(latest["leak_metric"]) not in THRESHOLD_METRICS:
        raise ReportError(f"unknown leak metric {latest['leak_metric']!r} in {path}; expected one of {THRESHOLD_METRICS}")
    threshold = Threshold(str(latest["leak_metric"]), float(latest["leak_value"]))
    every = _prepare(rows)
    return ResultSet(rows=every[~_control_only(every)].reset_index(drop=True), runs=runs_frame,
                     suite_name=str(latest["suite_name"]), suite_hash=suite_hash, threshold=threshold, store_path=path,
                     all_rows=every, cells_without_results=cells_without_results)


def _cells_without_results(store: Store, suite_hash: str) -> int:
    """Cells of the suite that a run wrote (when it started them) but that no result row belongs to yet."""
    return int(store.conn.execute(
        "SELECT COUNT(*) FROM cells c WHERE c.suite_hash = ? AND NOT EXISTS "
        "(SELECT 1 FROM results r WHERE r.suite_hash = c.suite_hash AND r.cell_key = c.cell_key)",
        (suite_hash,)).fetchone()[0])


def _control_only(rows: pd.DataFrame) -> pd.Series:
    """Rows of cells that no case names: positive controls leakbench added for other rows."""
    control = pd.to_numeric(rows["control"], errors="coerce").fillna(0).astype(int) == 1
    no_case = rows["case_indices_json"].map(lambda text: parse_json(text, [None]) == [])
    return control & no_case


def baseline_rows(rows: pd.DataFrame) -> pd.Series:
    """Rows of baselines (floors such as label_only's grey guess, as the registry declared when they ran)."""
    if "baseline" not in rows:
        return rows["attack"] == "label_only"
    return pd.to_numeric(rows["baseline"], errors="coerce").fillna(0).astype(int) == 1


def _result_columns(store: Store) -> list[str]:
    """The columns of ``Store.results`` (results, then the cell's own), so an empty suite still has them."""
    results = [r[1] for r in store.conn.execute("PRAGMA table_info(results)")]
    cells = [r[1] for r in store.conn.execute("PRAGMA table_info(cells)") if r[1] not in ("suite_hash", "cell_key")]
    # an unmigrated older store (read-only) reads defaults for the controls' columns (Store.results)
    cells += [name for name in CONTROL_COLUMNS if name not in cells]
    return results + cells


def _prepare(rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.copy()
    for column in _FLOAT_COLUMNS:
        rows[column] = pd.to_numeric(rows[column], errors="coerce").astype(float)
    rows["protocol_label"] = [_protocol_label(name, text) for name, text in zip(rows["protocol"], rows["protocol_json"])]
    for column in GROUP_COLUMNS:  # no machine paths or client UUIDs in what a reader sees (and groups by)
        rows[column] = rows[column].map(readable_labels(rows[column].astype(str)))
    rows["attack_label"] = rows["attack_key"].map(_attack_labels(rows))
    return rows


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


# Parameters that pin provenance (a recording's content hash), not a setting a reader compares: left out of labels.
_PROVENANCE_PARAMS = ("sha256",)


def _protocol_label(name: str, identity_json: str) -> str:
    try:
        params = json.loads(identity_json).get("params", {})
    except (TypeError, ValueError, AttributeError):
        params = {}
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if k not in _PROVENANCE_PARAMS}
    return f"{name}({_params_text(params)})" if params else str(name)


# An absolute path (POSIX, or a Windows drive): at the start or after a space, "=", "(", "[", a quote, ",",
# ":" or ";", so ratios ("2/4"), "n/a", closing tags, URLs and base64 stay as they are.
_ABSOLUTE_PATH = re.compile(r"(?<![^\s=(\[\"',:;])(?:/|[A-Za-z]:\\)(?:[^\s/\\'\"<>()\[\],;=|]+[/\\]?)+")
# A UUID (with or without dashes) or a long hex identifier given as a parameter value: ``client=c711...``;
# it has a letter, so a long number (a seed) stays a number.
_HEX_ID_PARAM = re.compile(r"\b(\w+)=(?=[-0-9]*[a-fA-F])([0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
                           r"|[0-9a-fA-F]{16,})\b")


def shorten_paths(text: str) -> str:
    """``text`` with every absolute path of the machine replaced by ``…/`` and its last component."""
    def last(match: re.Match[str]) -> str:
        parts = [p for p in re.split(r"[/\\]", match.group(0)) if p and not p.endswith(":")]
        return "…/" + parts[-1] if parts else "…/"
    return _ABSOLUTE_PATH.sub(last, text)


def readable_labels(labels: Any) -> dict[str, str]:
    """A short, stable, unique label for each distinct label: machine paths cut to their last component and
    UUID-like identifiers (a Flower client's id) numbered per parameter (``client=#1``, in sorted order).

    Two labels that would read the same get ``#k`` (k in the sorted order of the full labels), so
    shortening never merges two rows.
    """
    distinct = list(dict.fromkeys(str(label) for label in labels))
    ids: dict[str, set[str]] = {}
    for label in distinct:
        for key, value in _HEX_ID_PARAM.findall(label):
            ids.setdefault(key, set()).add(value.lower())
    numbers = {key: {value: i + 1 for i, value in enumerate(sorted(values))} for key, values in ids.items()}

    def short(label: str) -> str:
        text = _HEX_ID_PARAM.sub(lambda m: f"{m.group(1)}=#{numbers[m.group(1)][m.group(2).lower()]}", label)
        return shorten_paths(text)

    shortened = {label: short(label) for label in distinct}
    by_short: dict[str, list[str]] = {}
    for label, text in shortened.items():
        by_short.setdefault(text, []).append(label)
    for text, fulls in by_short.items():
        if len(fulls) > 1:
            for index, label in enumerate(sorted(fulls)):
                shortened[label] = f"{text} #{index + 1}"
    return shortened


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

# Keys of cells.defense_info_json that have a column of their own (the others land in
# ``defense_info[<key>]`` columns when numeric, and in ``defense_notes`` always). Without an
# ``epsilon`` key, ``epsilon`` is the largest ``epsilon_<accountant>`` (e.g. rdp, prv).
# ``utility_accuracy`` (and its undefended twin) is the test accuracy after the suite's short
# FL training with the defense ([utility], bench/fl/accuracy.py), present only where a suite asks.
DEFENSE_NUMBER_COLUMNS = ("epsilon", "delta", "utility_cosine", "utility_accuracy", "utility_accuracy_undefended")
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
        defense = _defense_info(cells["defense_info_json"])
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


def parse_json(text: Any, default: Any) -> Any:
    """A JSON column's value, or ``default`` when it is NULL or unreadable (old stores, hand-made rows)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return default
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return default
    return default if value is None else value


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


def _defense_info(texts: pd.Series) -> dict[str, Any]:
    """Per row: ε, δ and utility as numbers, other numbers under their key, everything as text in ``defense_notes``.

    Keys are read generically: a defense that reports a new number gets a
    ``defense_info[<key>]`` column and a mention in the notes without a change here.
    """
    per_key: dict[str, list[Any]] = {}
    for text in texts:
        info = parse_json(text, {})
        if not isinstance(info, dict):
            continue
        for key, value in _flatten(info).items():
            per_key.setdefault(key, []).append(value)
    out: dict[str, Any] = {k: math.nan for k in DEFENSE_NUMBER_COLUMNS}
    notes = []
    for key, values in per_key.items():
        numbers = [float(v) for v in values if _is_number(v)]
        if numbers and len(numbers) == len(values):
            out[key] = max(numbers) if key in _DEFENSE_WORST_OF else float(np.mean(numbers))
        if key not in DEFENSE_NUMBER_COLUMNS:
            notes.append(_describe_values(key, values))
    if "epsilon" not in per_key:
        # One ε per accountant (epsilon_rdp, epsilon_prv, ...): the column shows the largest,
        # the weakest guarantee; each stays in the notes and in its own column.
        by_accountant = [float(v) for k, vs in per_key.items() if k.startswith("epsilon_") for v in vs
                         if _is_number(v) and math.isfinite(v)]
        if by_accountant:
            out["epsilon"] = max(by_accountant)
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


def _battery_name(value: Any) -> str:
    return NO_BATTERY if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) \
        or value == "" else str(value)


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
    lines = [header, ""]
    warnings = consistency_warnings(results)
    for warning in warnings:
        lines.append(f"> {WARNING_SIGN} **Warning:** this leaderboard {_md(warning)}")
    problems = completeness(results).problems
    for problem in problems:
        lines.append(f"> {WARNING_SIGN} **Incomplete store:** {_md(problem)}")
    if warnings or problems:
        lines.append("")
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
    lines += [_md_row(titles), "|" + "|".join(["---"] * 3 + ["---:"] * (len(titles) - 3)) + "|"]
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
        lines.append(_md_row(cells))
    lines.append("")
    lines.append(
        "Worst case = best reconstruction per image over all attacks and trials (max PSNR, max SSIM, min LPIPS, "
        "max label accuracy), averaged over images. Averages are over all ok rows. [brackets]: 95% percentile "
        f"bootstrap interval over images ({BOOTSTRAP_RESAMPLES} resamples, fixed seed). Leak rate: share of images "
        f"whose worst case has {threshold}. Failed rows (error, timeout, oom) count as no leak and are counted in "
        "rows (failed); cells (failed) counts the cells with any failed row; an image with only failed rows counts "
        f"as not leaked. PSNR is capped at {PSNR_CAP_DB:g} dB for identical images."
    )
    lines.append(CONTROL_NOTE)
    if groups:
        lines.append("Attack columns: each attack's own worst case over its budgets and trials (mean over images; "
                     "in parentheses the budget, when an attack ran at several). Budgets: "
                     + _md(shorten_paths(" · ".join(group.describe() for group in groups))) + ".")
    if show["floor"]:
        lines.append(FLOOR_NOTE)
    if show["accuracy"]:
        lines.append(ACCURACY_NOTE)
    if show["rero"]:
        lines.append(RERO_NOTE)
    if oracle:
        lines.append(f"{_MARK_ORACLE_LABELS} oracle labels: the attacks were given the true labels "
                     "(threat_model.labels = \"known\").")
    if shared_bn:
        lines.append(f"{_MARK_SHARED_BN} the server saw the client's BatchNorm statistics (threat_model.bn_stats = \"shared\").")
    for note in notes:
        lines.append(f"{_MARK_LPIPS} LPIPS n/a: {_md(note)}")
    lines.append(f"Provenance: {_md(provenance_text(results))}.")
    return "\n".join(lines) + "\n"


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


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _num(value: Any, digits: int) -> str:
    return "n/a" if _missing(value) else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "n/a" if _missing(value) else f"{100 * value:.1f}%"


def _md(text: Any) -> str:
    """Text that cannot break a table cell or inject HTML into a rendered Markdown page."""
    text = shorten_paths(str(text)).replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"
