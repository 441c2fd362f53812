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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from leakbench.core.vocabulary import STATUSES  # shared with the reports (torch-free)

SCHEMA_VERSION = 4
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

    def put_cell(self, suite_hash: str, cell_key: str, fields: dict[str, Any]) -> None:
        cols = ["suite_hash", "cell_key", *fields]
        with self.transaction() as c:
            c.execute(
                f"INSERT OR REPLACE INTO cells ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                (suite_hash, cell_key, *fields.values()),
            )

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
        cell_fields: dict[str, Any] | None = None,
    ) -> None:
        """All rows of one (cell, attack) and their images, atomically; ``baseline``: the attack is a floor;
        ``cell_fields``, when given, rewrites the cell's row in the same transaction (its flags, once its
        last attack is in), so no kill point leaves the rows and the cell's flags disagreeing."""
        rows = list(rows)
        with self.transaction() as c:
            if cell_fields is not None:
                cols = ["suite_hash", "cell_key", *cell_fields]
                c.execute(
                    f"INSERT OR REPLACE INTO cells ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    (suite_hash, cell_key, *cell_fields.values()),
                )
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

    def results(self, suite_hash: str) -> list[sqlite3.Row]:
        """Every result row of a suite joined with its cell's description."""
        # a store opened read-only is not migrated: columns added by a later schema are read where present
        cell_columns = {r[1] for r in self.conn.execute("PRAGMA table_info(cells)")}
        rero = "".join(f", c.{name}" for name in _RERO_COLUMNS if name in cell_columns)
        return self.conn.execute(
            "SELECT r.*, c.case_index, c.dataset, c.victim, c.victim_label, c.victim_json, c.defense, c.defense_label,"
            " c.defense_json, c.defense_info_json, c.protocol, c.protocol_json, c.batch_size, c.bn_mode, c.batch_index,"
            " c.trial, c.threat_labels, c.threat_bn_stats, c.victim_info_json, c.cell_flags_json, "
            + ", ".join(f"c.{name}" if name in cell_columns else f"{default} AS {name}"
                        for name, default in CONTROL_COLUMNS.items()) + rero +
            " FROM results r JOIN cells c ON c.suite_hash = r.suite_hash AND c.cell_key = r.cell_key"
            " WHERE r.suite_hash = ? ORDER BY c.case_index, c.victim_label, c.defense_label, c.batch_index, c.trial,"
            " r.attack, r.image_slot",
            (suite_hash,),
        ).fetchall()

    def image_png(self, suite_hash: str, cell_key: str, attack_key: str, image_slot: int) -> bytes | None:
        row = self.conn.execute(
            "SELECT png FROM images WHERE suite_hash = ? AND cell_key = ? AND attack_key = ? AND image_slot = ?",
            (suite_hash, cell_key, attack_key, image_slot),
        ).fetchone()
        return None if row is None else bytes(row[0])
