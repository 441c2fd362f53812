"""Loading a suite's rows from the store for the reports: ``load_results`` and its ``ResultSet``.

Everything the reports show is computed from the SQLite store alone (no torch), so a report can
be rebuilt anywhere from ``leakbench.sqlite``. Labels are made readable here (machine paths cut,
client ids numbered), once, so every table groups by the same text.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

# the shared vocabulary (torch-free)
from leakbench.core.vocabulary import STATUSES, THRESHOLD_METRICS, Threshold
from leakbench.store import STORE_FILENAME, Store, StoreError

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
        rows = pd.DataFrame(store.results(suite_hash), columns=store.result_columns())
        cells_without_results = store.cells_without_results(suite_hash)
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


# --------------------------------------------------------------------------- shared helpers


def parse_json(text: Any, default: Any) -> Any:
    """A JSON column's value, or ``default`` when it is NULL or unreadable (old stores, hand-made rows)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return default
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return default
    return default if value is None else value


def _battery_name(value: Any) -> str:
    return NO_BATTERY if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) \
        or value == "" else str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _num(value: Any, digits: int) -> str:
    return "n/a" if _missing(value) else f"{value:.{digits}f}"
