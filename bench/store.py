"""The SQLite store: provenance of every run, one row per (cell, attack, image), and PNGs.

Rows of one (cell, attack) are written in a single transaction, so a run killed at any
moment (even ``kill -9``) leaves each (cell, attack) either complete or absent; the next
run skips what is complete. The schema is versioned with ``PRAGMA user_version``; a store
written by a newer leakbench is refused. No torch here: reports read the store alone.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from leakbench.core.vocabulary import STATUSES  # shared with the reports (torch-free)

SCHEMA_VERSION = 5
STORE_FILENAME = "leakbench.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    suite_name TEXT NOT NULL,
    suite_hash TEXT NOT NULL,
    suite_text TEXT NOT NULL,
    leak_metric TEXT NOT NULL,
    leak_value REAL NOT NULL,
    git_commit TEXT,
    versions_json TEXT NOT NULL,
    device TEXT NOT NULL,
    argv TEXT,
    started_utc TEXT NOT NULL,
    ended_utc TEXT,
    status TEXT NOT NULL DEFAULT 'running'
);
CREATE TABLE IF NOT EXISTS cells (
    suite_hash TEXT NOT NULL,
    cell_key TEXT NOT NULL,
    case_index INTEGER NOT NULL,
    dataset TEXT NOT NULL,
    victim TEXT NOT NULL,
    victim_label TEXT NOT NULL,
    victim_json TEXT NOT NULL,
    defense TEXT NOT NULL,
    defense_label TEXT NOT NULL,
    defense_json TEXT NOT NULL,
    defense_info_json TEXT NOT NULL DEFAULT '{}',  -- numbers a defense reports (epsilon, utility cost, ...)
    victim_info_json TEXT NOT NULL DEFAULT '{}',   -- training state, test accuracy, effective architecture
    cell_flags_json TEXT NOT NULL DEFAULT '[]',    -- sanity flags raised for the cell (e.g. an all-zero update)
    protocol TEXT NOT NULL,
    protocol_json TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    bn_mode TEXT NOT NULL,
    batch_index INTEGER NOT NULL,
    trial INTEGER NOT NULL,
    threat_labels TEXT NOT NULL,
    threat_bn_stats TEXT NOT NULL,
    rero_kappa REAL,                 -- ReRo baseline kappa for the leak criterion, estimated on a public prior
    rero_kappa_upper REAL,           -- its one-sided Clopper-Pearson upper limit (the gammas use it)
    rero_gamma_observed REAL,        -- ReRo ceiling for what the server saw (DP rows only)
    rero_gamma_training REAL,        -- ReRo ceiling for the defense's declared training (DP rows only)
    rero_json TEXT NOT NULL DEFAULT '{}',  -- parameters, prior, method and library of the numbers above
    case_indices_json TEXT NOT NULL DEFAULT '[]',  -- every case the cell belongs to ([]: a positive control only)
    control INTEGER NOT NULL DEFAULT 0,            -- 1: the cell is a positive control (of itself or of others)
    control_json TEXT NOT NULL DEFAULT '{}',       -- the cell's control: {"cells": [keys], "attacks": [keys]}
    epsilon REAL,                    -- the defense's DP epsilon (the weakest of its accountants'), NULL: none
    delta REAL,                      -- its delta
    utility_cosine REAL,             -- cosine of the defended and the undefended update
    utility_accuracy REAL,           -- FL test accuracy after the suite's [utility] training with the defense
    utility_accuracy_undefended REAL,  -- the same training without it
    PRIMARY KEY (suite_hash, cell_key)
);
CREATE TABLE IF NOT EXISTS results (
    suite_hash TEXT NOT NULL,
    cell_key TEXT NOT NULL,
    attack_key TEXT NOT NULL,
    image_slot INTEGER NOT NULL,
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    attack TEXT NOT NULL,
    attack_version TEXT NOT NULL,
    attack_json TEXT NOT NULL,
    label_strategy TEXT NOT NULL,
    label_strategy_version TEXT NOT NULL,
    image_id TEXT NOT NULL,
    true_label INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error', 'timeout', 'oom')),
    error TEXT,
    psnr_db REAL,
    ssim REAL,
    lpips REAL,
    lpips_note TEXT,
    label_accuracy REAL,
    matched_slot INTEGER,
    matching_loss REAL,
    seconds REAL,
    iterations INTEGER,
    restarts INTEGER,
    trace_json TEXT,
    flags_json TEXT NOT NULL DEFAULT '[]',  -- sanity flags raised for this row (see bench/running/sanity.py)
    battery TEXT,                           -- the battery the attack came from, e.g. standard-v1
    created_utc TEXT NOT NULL,
    execution_json TEXT NOT NULL DEFAULT '{}',  -- how it ran: pack size, memory limit, OOM splits, attempt, worker
    baseline INTEGER NOT NULL DEFAULT 0,        -- 1: a floor (label_only's grey guess), not an attack
    PRIMARY KEY (suite_hash, cell_key, attack_key, image_slot)
);
CREATE TABLE IF NOT EXISTS images (
    suite_hash TEXT NOT NULL,
    cell_key TEXT NOT NULL,
    attack_key TEXT NOT NULL,  -- '' for the ground truth
    image_slot INTEGER NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (suite_hash, cell_key, attack_key, image_slot)
);
"""


#: the numbers a defense reports that are cells columns of their own (schema 5), for the reports
#: to read and compare as numbers; everything else a defense reports stays in ``defense_info_json``
DEFENSE_NUMBERS = ("epsilon", "delta", "utility_cosine", "utility_accuracy", "utility_accuracy_undefended")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def defense_numbers(info: Any) -> dict[str, float | None]:
    """The ``DEFENSE_NUMBERS`` of a cell from what its defense reported (``defense_info``).

    ``epsilon`` is the defense's own ``epsilon`` or, without one, the largest finite
    ``epsilon_<accountant>`` (rdp, prv: the weakest of the guarantees); None where there is no
    finite value (no DP, or noise 0: no guarantee). The others are the reported number or None.
    """
    info = info if isinstance(info, dict) else {}
    out = {name: _number(info.get(name)) for name in DEFENSE_NUMBERS}
    if out["epsilon"] is None and "epsilon" not in info:
        by_accountant = [v for k, value in info.items() if k.startswith("epsilon_")
                         if (v := _number(value)) is not None]
        out["epsilon"] = max(by_accountant) if by_accountant else None
    return out


def _fill_defense_numbers(conn: sqlite3.Connection) -> None:
    rows = conn.execute("SELECT suite_hash, cell_key, defense_info_json FROM cells").fetchall()
    for suite_hash, cell_key, text in rows:
        try:
            info = json.loads(text)
        except (TypeError, ValueError):
            info = {}
        numbers = defense_numbers(info)
        conn.execute(f"UPDATE cells SET {', '.join(f'{k} = ?' for k in numbers)} WHERE suite_hash = ? AND cell_key = ?",
                     (*numbers.values(), suite_hash, cell_key))


#: Python steps a migration names among its statements
_MIGRATION_STEPS = {"fill_defense_numbers": _fill_defense_numbers}


#: statements that take a store from schema version i to i + 1 (old rows keep their numbers)
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE results ADD COLUMN execution_json TEXT NOT NULL DEFAULT '{}'",),
    2: ("ALTER TABLE cells ADD COLUMN rero_kappa REAL", "ALTER TABLE cells ADD COLUMN rero_kappa_upper REAL",
        "ALTER TABLE cells ADD COLUMN rero_gamma_observed REAL", "ALTER TABLE cells ADD COLUMN rero_gamma_training REAL",
        "ALTER TABLE cells ADD COLUMN rero_json TEXT NOT NULL DEFAULT '{}'"),
    # cells shared by cases, positive controls, baselines (old cells keep their one case; no
    # control was run for them; label_only was the one baseline)
    3: ("ALTER TABLE cells ADD COLUMN case_indices_json TEXT NOT NULL DEFAULT '[]'",
        "UPDATE cells SET case_indices_json = '[' || case_index || ']'",
        "ALTER TABLE cells ADD COLUMN control INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE cells ADD COLUMN control_json TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE results ADD COLUMN baseline INTEGER NOT NULL DEFAULT 0",
        "UPDATE results SET baseline = 1 WHERE attack = 'label_only'"),
    # epsilon, delta and utility as numeric columns, filled from each cell's defense_info_json
    # (the same rule as new cells: ``defense_numbers``)
    4: (*(f"ALTER TABLE cells ADD COLUMN {name} REAL" for name in DEFENSE_NUMBERS), "fill_defense_numbers"),
}


#: the cells columns of the ReRo bound (schema 3; leakbench.privacy.cells fills them)
_RERO_COLUMNS = ("rero_kappa", "rero_kappa_upper", "rero_gamma_observed", "rero_gamma_training", "rero_json")


#: the controls' cell columns (schema 4), with what a read-only, unmigrated older store reads instead
CONTROL_COLUMNS: dict[str, str] = {
    "case_indices_json": "'[' || c.case_index || ']'",
    "control": "0",
    "control_json": "'{}'",
}


class StoreError(RuntimeError):
    """A store that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class ResultRow:
    """One (cell, attack, image) outcome; metric columns are None unless status is ok."""

    image_slot: int
    image_id: str
    true_label: int
    status: str
    error: str | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    lpips: float | None = None
    lpips_note: str | None = None
    label_accuracy: float | None = None
    matched_slot: int | None = None
    matching_loss: float | None = None
    seconds: float | None = None
    iterations: int | None = None
    restarts: int | None = None
    trace: Sequence[tuple[int, float]] = ()
    flags: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass(frozen=True)
class CellRow:
    """One cell's row of the ``cells`` table, as the worker describes the cell: typed values, which
    the store alone turns into columns (``columns``), JSON and the numeric defense columns included."""

    case_index: int
    dataset: str
    victim: str
    victim_label: str
    defense: str
    defense_label: str
    protocol: str
    batch_size: int
    bn_mode: str
    batch_index: int
    trial: int
    threat_labels: str
    threat_bn_stats: str
    victim_identity: Mapping[str, Any] = field(default_factory=dict)
    defense_identity: Mapping[str, Any] = field(default_factory=dict)
    protocol_identity: Mapping[str, Any] = field(default_factory=dict)
    defense_info: Mapping[str, Any] = field(default_factory=dict)  # what the defense and the utility training report
    victim_info: Mapping[str, Any] = field(default_factory=dict)   # training state, test accuracy, architecture
    flags: tuple[Any, ...] = ()                                    # the cell's sanity flags
    case_indices: tuple[int, ...] = ()                             # every case it belongs to; (): a control only
    control: bool = False
    control_cells: tuple[str, ...] = ()
    control_attacks: tuple[str, ...] = ()
    rero_kappa: float | None = None
    rero_kappa_upper: float | None = None
    rero_gamma_observed: float | None = None
    rero_gamma_training: float | None = None
    rero: Mapping[str, Any] = field(default_factory=dict)          # the ReRo numbers' parameters, prior, method

    def with_flags(self, flags: Iterable[Any]) -> "CellRow":
        """This row with ``flags`` added to its sanity flags."""
        return replace(self, flags=(*self.flags, *flags))

    def columns(self) -> dict[str, Any]:
        """The ``cells`` columns (but the suite hash and the cell key) of this row."""
        return {
            "case_index": self.case_index, "dataset": self.dataset,
            "victim": self.victim, "victim_label": self.victim_label, "victim_json": _json(dict(self.victim_identity)),
            "defense": self.defense, "defense_label": self.defense_label,
            "defense_json": _json(dict(self.defense_identity)), "defense_info_json": _json(dict(self.defense_info)),
            "victim_info_json": _json(dict(self.victim_info)), "cell_flags_json": _json(list(self.flags)),
            "protocol": self.protocol, "protocol_json": _json(dict(self.protocol_identity)),
            "batch_size": self.batch_size, "bn_mode": self.bn_mode, "batch_index": self.batch_index,
            "trial": self.trial, "threat_labels": self.threat_labels, "threat_bn_stats": self.threat_bn_stats,
            "rero_kappa": self.rero_kappa, "rero_kappa_upper": self.rero_kappa_upper,
            "rero_gamma_observed": self.rero_gamma_observed, "rero_gamma_training": self.rero_gamma_training,
            "rero_json": _json(dict(self.rero)),
            "case_indices_json": _json(list(self.case_indices)), "control": int(self.control),
            "control_json": _json({"cells": list(self.control_cells), "attacks": list(self.control_attacks)}
                                  if self.control_cells else {}),
            **defense_numbers(dict(self.defense_info)),
        }


def store_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / STORE_FILENAME


@contextmanager
def run_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold the store's run lock: one run writes to a store at a time.

    The lock is an advisory ``flock`` on ``leakbench.lock`` beside the store; the kernel
    drops it when the process dies, so a killed run never leaves a stale lock behind.
    """
    import fcntl
    import os

    path = Path(out_dir) / "leakbench.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise StoreError(
                f"another leakbench run (pid {owner}) is writing to {Path(out_dir)}; wait for it to finish, "
                "or pass another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: the tables and, for each, columns every leakbench store holds (from schema version 1 on)
_REQUIRED = {
    "runs": {"run_id", "suite_name", "suite_hash", "leak_metric", "leak_value", "status"},
    "cells": {"suite_hash", "cell_key", "victim", "defense", "cell_flags_json"},
    "results": {"suite_hash", "cell_key", "attack_key", "image_slot", "run_id", "status", "psnr_db"},
    "images": {"suite_hash", "cell_key", "attack_key", "image_slot", "png"},
}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_store(path: str | Path) -> bool:
    """Whether ``path`` is a leakbench store (True) or holds nothing yet (False: absent, zero bytes,
    or an SQLite file without a single table, as a run killed while creating it leaves).

    Raises ``StoreError`` for anything else (not SQLite, damaged, another program's tables, a
    leakbench store missing tables or columns), having only read the file: a store that is
    refused is never modified.
    """
    path = Path(path)
    what = (f"leave {path} alone and pass another --out directory, or move the file away if it is not needed")
    if not path.exists():
        return False
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a leakbench store file; {what}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(100)
    except OSError as err:
        raise StoreError(f"cannot read the store {path}: {err.strerror}; check its permissions") from None
    if not head:
        return False
    if not head.startswith(_SQLITE_MAGIC):
        raise StoreError(f"{path} is not a leakbench store (not an SQLite file); {what}")
    if len(head) < 100:
        raise StoreError(f"{path} is not a leakbench store (a truncated SQLite file); {what}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in _REQUIRED if t in tables}
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path} is not a readable leakbench store ({err}); {what}") from None
    tables.discard("sqlite_sequence")
    if version == 0 and not tables:
        return False
    if version == 0:
        raise StoreError(f"{path} is an SQLite file of another program (tables {', '.join(sorted(tables))}, "
                         f"no leakbench schema version); it is not a leakbench store, and is left unchanged; {what}")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by a newer leakbench (store schema {version}; this version reads "
            f"schema {SCHEMA_VERSION}). Upgrade leakbench, or pass another --out directory."
        )
    missing = [t for t in _REQUIRED if t not in tables]
    if missing:
        raise StoreError(f"{path} is not a leakbench store: it lacks the table(s) {', '.join(missing)} "
                         f"(schema version {version}); {what}")
    for table, need in _REQUIRED.items():
        lacking = sorted(need - columns[table])
        if lacking:
            raise StoreError(f"{path} is not a leakbench store: its table {table} lacks the column(s) "
                             f"{', '.join(lacking)}; {what}")
    return True


def _write_cell(conn: sqlite3.Connection, suite_hash: str, cell_key: str, row: CellRow) -> None:
    columns = {"suite_hash": suite_hash, "cell_key": cell_key, **row.columns()}
    conn.execute(f"INSERT OR REPLACE INTO cells ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                 tuple(columns.values()))


class Store:
    """A connection to one SQLite store file, checked (``check_store``) before it is used."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise StoreError(f"no store at {self.path}; run a suite with `leakbench run SUITE --out {self.path.parent}` first")
        exists = check_store(self.path)
        if readonly and not exists:
            raise StoreError(f"{self.path} holds no leakbench store yet (an empty file); run a suite with "
                             f"`leakbench run SUITE --out {self.path.parent}` first")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=60)
        self.conn.row_factory = sqlite3.Row
        self._check_version(readonly)

    def _check_version(self, readonly: bool) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self.conn.close()
            raise StoreError(
                f"{self.path} was written by a newer leakbench (store schema {version}; this version reads "
                f"schema {SCHEMA_VERSION}). Upgrade leakbench, or pass another --out directory."
            )
        if readonly:
            if version == 0:
                raise StoreError(f"{self.path} is not a leakbench store (no schema version)")
            return
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        if version == 0:
            with self.transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version < SCHEMA_VERSION:
            with self.transaction():
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        if statement in _MIGRATION_STEPS:
                            _MIGRATION_STEPS[statement](self.conn)
                        else:
                            self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # ---------------------------------------------------------------- runs

    def start_run(self, *, suite_name: str, suite_hash: str, suite_text: str, leak_metric: str,
                  leak_value: float, git_commit: str | None,
                  versions: dict[str, str], device: str, argv: str, started_utc: str) -> int:
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO runs (suite_name, suite_hash, suite_text, leak_metric, leak_value, git_commit, versions_json,"
                " device, argv, started_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (suite_name, suite_hash, suite_text, leak_metric, leak_value, git_commit, json.dumps(versions, sort_keys=True), device, argv, started_utc),
            )
            return int(cur.lastrowid)

    def end_run(self, run_id: int, *, status: str, ended_utc: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET status = ?, ended_utc = ? WHERE run_id = ?", (status, ended_utc, run_id))

    def runs(self, suite_hash: str | None = None) -> list[sqlite3.Row]:
        if suite_hash is None:
            return self.conn.execute("SELECT * FROM runs ORDER BY run_id").fetchall()
        return self.conn.execute("SELECT * FROM runs WHERE suite_hash = ? ORDER BY run_id", (suite_hash,)).fetchall()

    def latest_suite_hash(self) -> str | None:
        row = self.conn.execute("SELECT suite_hash FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
        return None if row is None else row[0]

    # ---------------------------------------------------------------- cells and results

    def put_cell(self, suite_hash: str, cell_key: str, row: CellRow) -> None:
        with self.transaction() as c:
            _write_cell(c, suite_hash, cell_key, row)

    def attack_psnrs(self, suite_hash: str, cell_key: str) -> list[float | None]:
        """The PSNR of every stored row of the cell's attacks (baselines left out; None where a row failed)."""
        rows = self.conn.execute("SELECT psnr_db FROM results WHERE suite_hash = ? AND cell_key = ? AND baseline = 0",
                                 (suite_hash, cell_key)).fetchall()
        return [r[0] for r in rows]

    def cells_without_results(self, suite_hash: str) -> int:
        """Cells of the suite that a run wrote (when it started them) but that no result row belongs to yet."""
        return int(self.conn.execute(
            "SELECT COUNT(*) FROM cells c WHERE c.suite_hash = ? AND NOT EXISTS "
            "(SELECT 1 FROM results r WHERE r.suite_hash = c.suite_hash AND r.cell_key = c.cell_key)",
            (suite_hash,)).fetchone()[0])

    def result_columns(self) -> list[str]:
        """The columns of ``results`` rows (the results', then the cell's own), also for a store with no rows."""
        results = [r[1] for r in self.conn.execute("PRAGMA table_info(results)")]
        cells = [r[1] for r in self.conn.execute("PRAGMA table_info(cells)") if r[1] not in ("suite_hash", "cell_key")]
        # an unmigrated older store (read-only) reads what ``results`` gives in place of later columns
        cells += [name for name in (*CONTROL_COLUMNS, *DEFENSE_NUMBERS) if name not in cells]
        return results + cells

    def done(self, suite_hash: str) -> set[tuple[str, str]]:
        """(cell_key, attack_key) pairs that already have their rows."""
        rows = self.conn.execute("SELECT DISTINCT cell_key, attack_key FROM results WHERE suite_hash = ?", (suite_hash,))
        return {(r[0], r[1]) for r in rows}

    def forget_failed(self, suite_hash: str) -> int:
        """Delete the rows of every (cell, attack) with a failed image, so they run again."""
        with self.transaction() as c:
            failed = c.execute(
                "SELECT DISTINCT cell_key, attack_key FROM results WHERE suite_hash = ? AND status != 'ok'", (suite_hash,)
            ).fetchall()
            for cell_key, attack_key in failed:
                for table in ("results", "images"):
                    c.execute(f"DELETE FROM {table} WHERE suite_hash = ? AND cell_key = ? AND attack_key = ?",
                              (suite_hash, cell_key, attack_key))
        return len(failed)

    def put_results(
        self,
        *,
        suite_hash: str,
        cell_key: str,
        attack_key: str,
        run_id: int,
        attack: dict[str, Any],
        rows: Iterable[ResultRow],
        truth_pngs: dict[int, bytes],
        reconstruction_pngs: dict[int, bytes],
        created_utc: str,
        execution: dict[str, Any] | None = None,
        baseline: bool = False,
        cell_row: CellRow | None = None,
    ) -> None:
        """All rows of one (cell, attack) and their images, atomically; ``baseline``: the attack is a floor;
        ``cell_row``, when given, rewrites the cell's row in the same transaction (its flags, once its
        last attack is in), so no kill point leaves the rows and the cell's flags disagreeing."""
        rows = list(rows)
        with self.transaction() as c:
            if cell_row is not None:
                _write_cell(c, suite_hash, cell_key, cell_row)
            for slot, png in truth_pngs.items():
                c.execute("INSERT OR IGNORE INTO images VALUES (?, ?, '', ?, ?)", (suite_hash, cell_key, slot, png))
            for slot, png in reconstruction_pngs.items():
                c.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)", (suite_hash, cell_key, attack_key, slot, png))
            for r in rows:
                c.execute(
                    "INSERT INTO results (suite_hash, cell_key, attack_key, image_slot, run_id, attack, attack_version,"
                    " attack_json, label_strategy, label_strategy_version, image_id, true_label, status, error, psnr_db,"
                    " ssim, lpips, lpips_note, label_accuracy, matched_slot, matching_loss, seconds, iterations, restarts,"
                    " trace_json, flags_json, battery, created_utc, execution_json, baseline) VALUES ("
                    + ", ".join("?" * 30) + ")",
                    (
                        suite_hash, cell_key, attack_key, r.image_slot, run_id, attack["name"], attack["version"],
                        json.dumps(attack["params"], sort_keys=True), attack["labels"]["name"],
                        attack["labels"]["version"], r.image_id, r.true_label, r.status, r.error, r.psnr_db, r.ssim,
                        r.lpips, r.lpips_note, r.label_accuracy, r.matched_slot, r.matching_loss, r.seconds,
                        r.iterations, r.restarts, json.dumps(list(r.trace)), json.dumps(list(r.flags)),
                        attack.get("battery"), created_utc, json.dumps(execution or {}, sort_keys=True),
                        int(baseline),
                    ),
                )

    def results(self, suite_hash: str) -> list[dict[str, Any]]:
        """Every result row of a suite joined with its cell's description, as dicts."""
        # a store opened read-only is not migrated: columns added by a later schema are read where present,
        # the defense's numbers computed from its defense_info_json as the migration would
        cell_columns = {r[1] for r in self.conn.execute("PRAGMA table_info(cells)")}
        rero = "".join(f", c.{name}" for name in _RERO_COLUMNS if name in cell_columns)
        numbers = [name for name in DEFENSE_NUMBERS if name in cell_columns]
        rows = self.conn.execute(
            "SELECT r.*, c.case_index, c.dataset, c.victim, c.victim_label, c.victim_json, c.defense, c.defense_label,"
            " c.defense_json, c.defense_info_json, c.protocol, c.protocol_json, c.batch_size, c.bn_mode, c.batch_index,"
            " c.trial, c.threat_labels, c.threat_bn_stats, c.victim_info_json, c.cell_flags_json, "
            + ", ".join(f"c.{name}" if name in cell_columns else f"{default} AS {name}"
                        for name, default in CONTROL_COLUMNS.items()) + rero
            + "".join(f", c.{name}" for name in numbers) +
            " FROM results r JOIN cells c ON c.suite_hash = r.suite_hash AND c.cell_key = r.cell_key"
            " WHERE r.suite_hash = ? ORDER BY c.case_index, c.victim_label, c.defense_label, c.batch_index, c.trial,"
            " r.attack, r.image_slot",
            (suite_hash,),
        ).fetchall()
        out = [dict(r) for r in rows]
        if len(numbers) < len(DEFENSE_NUMBERS):
            for row in out:
                try:
                    info = json.loads(row["defense_info_json"])
                except (TypeError, ValueError):
                    info = {}
                row.update(defense_numbers(info))
        return out

    def image_png(self, suite_hash: str, cell_key: str, attack_key: str, image_slot: int) -> bytes | None:
        row = self.conn.execute(
            "SELECT png FROM images WHERE suite_hash = ? AND cell_key = ? AND attack_key = ? AND image_slot = ?",
            (suite_hash, cell_key, attack_key, image_slot),
        ).fetchone()
        return None if row is None else bytes(row[0])
