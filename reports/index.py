"""The front page of the published leaderboards: one table per study, with its battery, hardware and time.

``make leaderboards`` runs each reference suite into ``results/<suite>`` (resuming), copies its
leaderboard files into ``reports/leaderboards/<suite>/``, and calls::

    python -m leakbench.reports.index record <suite> --results results/<suite> --out reports/leaderboards/<suite>
    python -m leakbench.reports.index build reports/leaderboards

``record`` writes ``run.json`` beside the copied leaderboard: what ran and on what, read from the
store (read-only): the suite's hash, the batteries of its rows, the machine, and the wall time,
the sum of the store's finished runs (so a resumed run adds the time it worked and a run with
nothing left to do adds seconds). ``build`` reads only committed files (``run.json``,
``leaderboard.csv``, the label study's ``labels.json``) and writes ``index.md`` and a
self-contained ``index.html``, so the front page can be rebuilt from a clone without the stores.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from leakbench.reports.aggregation import CONTROL_SHARE
from leakbench.store import store_path

#: the leaderboard columns the front page shows, with their headings
COLUMNS: tuple[tuple[str, str], ...] = (
    ("victim", "victim"), ("victim_state", "state (test acc.)"), ("defense", "defense"), ("protocol", "protocol"),
    ("worst_psnr_db", "worst PSNR dB"), ("avg_psnr_db", "mean PSNR dB"), ("leak_rate", "leak rate"),
    ("control", "control"), ("utility_accuracy", "FL acc. (undefended)"), ("epsilon", "ε"),
    ("rero_gamma_observed", "ReRo γ (seen)"), ("rero_kappa", "κ"),
)
LABEL_STRATEGIES = ("idlg", "analytic", "yin", "wainakh", "geng")


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no store there; run the suite first (leakbench run <suite> --out ...)")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _seconds(started: str | None, finished: str | None) -> float:
    if not started or not finished:
        return 0.0
    return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()


def record(suite: str, *, results: Path, out: Path, load: str = "") -> dict[str, Any]:
    """``run.json`` for ``suite`` from the store in ``results``; returns what it wrote."""
    with _read_only(store_path(results)) as conn:
        conn.row_factory = sqlite3.Row
        runs = [dict(r) for r in conn.execute("SELECT * FROM runs WHERE suite_name = ? ORDER BY run_id", (suite,))]
        names = {r[0] for r in conn.execute("SELECT DISTINCT suite_name FROM runs")}
        if not runs and len(names) == 1:  # a suite named by its file (generative_cpu) stored as its [suite] name
            runs = [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY run_id")]
        if not runs:
            raise ValueError(f"{results}: the store holds no run of suite {suite!r}")
        suite_hash = runs[-1]["suite_hash"]  # the latest run: what `make leaderboards` just ran
        batteries = sorted({r[0] for r in conn.execute(
            "SELECT DISTINCT battery FROM results WHERE suite_hash = ? AND battery IS NOT NULL", (suite_hash,))})
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM results WHERE suite_hash = ? GROUP BY status",
                                     (suite_hash,)).fetchall())
        cells = conn.execute("SELECT COUNT(*) FROM cells WHERE suite_hash = ?", (suite_hash,)).fetchone()[0]
    mine = [r for r in runs if r["suite_hash"] == suite_hash]
    info = {
        "suite": suite,
        "suite_hash": suite_hash,
        "batteries": batteries,
        "cells": cells,
        "attack_runs": statuses,
        "wall_seconds": round(sum(_seconds(r.get("started_utc"), r.get("ended_utc")) for r in mine)),
        "runs": [{k: r.get(k) for k in ("started_utc", "ended_utc", "status", "device", "git_commit")}
                 for r in mine],
        "versions": json.loads(mine[-1].get("versions_json") or "{}"),
        "load_average": load,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return info


def _number(value: str, digits: int = 1, pct: bool = False) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return value or ""
    if math.isnan(x):
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.{digits}f}"


def control_text(row: dict[str, str]) -> str:
    """``leaks 8/8`` when the row's control leaked on at least CONTROL_SHARE of its images; else ``inconclusive``
    unless the row leaks itself (then its leak is a result whatever the control did)."""
    try:
        rate = float(row.get("control_leak_rate", "nan"))
    except ValueError:
        return "n/a"
    if math.isnan(rate):
        return "n/a"
    share = f"{row.get('control_leaked_images', '?')}/{row.get('control_images', '?')}"
    if rate >= CONTROL_SHARE:
        return f"leaks {share}"
    if row.get("leaked_images", "0") not in ("", "0"):  # the row leaks itself: a weak control changes nothing
        return f"weak ({share}); the row leaks"
    return f"inconclusive ({share})"


def _cell(row: dict[str, str], key: str) -> str:
    if key == "control":
        return control_text(row)
    if key == "victim_state":
        acc = row.get("victim_test_accuracy", "")
        return row.get("victim_state", "") + (f" ({100 * float(acc):.1f}%)" if _number(acc) not in ("", "n/a") else "")
    if key == "leak_rate":
        return f"{_number(row.get(key, ''), pct=True)} ({row.get('leaked_images', '?')}/{row.get('images', '?')})"
    if key == "utility_accuracy":
        acc, base = row.get(key, ""), row.get("utility_accuracy_undefended", "")
        if _number(acc) in ("", "n/a"):
            return ""
        return _number(acc, pct=True) + (f" ({_number(base, pct=True)})" if _number(base) not in ("", "n/a") else "")
    if key in ("epsilon", "rero_gamma_observed", "rero_kappa"):
        text = _number(row.get(key, ""), 3)
        return "" if text == "n/a" else text
    if key.endswith("psnr_db"):
        return _number(row.get(key, ""))
    return row.get(key, "")


def suite_table(folder: Path) -> tuple[list[str], list[list[str]]]:
    """The front page's columns (those with a value somewhere) and rows for one suite's leaderboard.csv."""
    with open(folder / "leaderboard.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    table = [[_cell(r, key) for key, _ in COLUMNS] for r in rows]
    keep = [j for j in range(len(COLUMNS)) if any(t[j] not in ("", "n/a") for t in table)]
    return [COLUMNS[j][1] for j in keep], [[t[j] for j in keep] for t in table]


def label_table(folder: Path) -> tuple[list[str], list[list[str]], dict[str, Any]]:
    """Label accuracy (%) per (victim, state, distribution, batch size), a column per strategy."""
    data = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    rows = data["rows"]
    strategies = [s for s in LABEL_STRATEGIES if any(r["strategy"] == s for r in rows)]
    keyed: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        state = r["state"] + (f" ({100 * r['test_accuracy']:.1f}%)" if r.get("test_accuracy") is not None else "")
        key = (r["victim"], state, r["distribution"], str(r["batch_size"]))
        keyed.setdefault(key, {})[r["strategy"]] = r["accuracy"]
    body = [[*key, *("n/a" if v.get(s) is None else f"{100 * v[s]:.0f}" for s in strategies)]
            for key, v in keyed.items()]
    return ["victim", "state (test acc.)", "labels", "B", *strategies], body, data.get("meta", {})


def _markdown(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    def esc(x: str) -> str:
        return str(x).replace("|", "\\|")
    return ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(esc, r)) + " |" for r in body)]


def _html_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _run_line(run: dict[str, Any]) -> str:
    device = run["runs"][-1].get("device", "?") if run.get("runs") else "?"
    minutes = run.get("wall_seconds", 0) / 60
    load = f"; load average when recorded {run['load_average']}" if run.get("load_average") else ""
    return (f"battery {', '.join(run.get('batteries') or ['n/a'])}; {run.get('cells')} cells; "
            f"{device}; {minutes:.1f} min wall{load}; torch {run.get('versions', {}).get('torch', '?')}; "
            f"suite hash {run.get('suite_hash')}")


def build(root: Path) -> list[Path]:
    """``index.md`` and ``index.html`` in ``root`` from every study folder under it."""
    md = ["# leakbench reference leaderboards", "",
          "Each study's worst case per row (highest PSNR over the battery's attacks and the row's images), its "
          "leak rate at the suite's threshold, and whether the row's positive control (no defense, FedSGD batch 1, "
          "same images) leaked: a row whose control did not leak says nothing about its defense. The reading "
          "against the papers is in [README.md](README.md). Regenerate with `make leaderboards`.", ""]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>leakbench reference leaderboards</title>"
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 8px}th{background:#eee}"
             ".meta{color:#555}</style></head><body><h1>leakbench reference leaderboards</h1>",
             f"<p>{html.escape(md[2])}</p>"]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name
        if (folder / "leaderboard.csv").is_file():
            head, body = suite_table(folder)
            run = json.loads((folder / "run.json").read_text(encoding="utf-8")) if (folder / "run.json").is_file() else {}
            meta = _run_line(run) if run else "no run.json"
            links = [f for f in ("leaderboard.html", "leaderboard.md", "leaderboard.csv", "leaderboard.json")
                     if (folder / f).is_file()]
        elif (folder / "labels.json").is_file():
            head, body, info = label_table(folder)
            meta = (f"`{info.get('command', '')}`; {info.get('seconds', '?')} s on {info.get('machine', '?')}; "
                    f"{info.get('trials', '?')} batches per grid point")
            links = [f for f in ("labels.html", "labels.md", "labels.csv", "labels.json") if (folder / f).is_file()]
        else:
            continue
        md += [f"## {name}", "", meta, "", " · ".join(f"[{f}]({name}/{f})" for f in links), "",
               *_markdown(head, body), ""]
        parts += [f"<h2>{html.escape(name)}</h2><p class='meta'>{html.escape(meta)}</p><p>"
                  + " · ".join(f"<a href='{html.escape(name)}/{html.escape(f)}'>{html.escape(f)}</a>" for f in links)
                  + "</p>", _html_table(head, body)]
    parts.append("</body></html>\n")
    written = [root / "index.md", root / "index.html"]
    written[0].write_text("\n".join(md), encoding="utf-8")
    written[1].write_text("".join(parts), encoding="utf-8")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leakbench.reports.index", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="write run.json for one suite from its store")
    rec.add_argument("suite")
    rec.add_argument("--results", required=True, type=Path, help="the folder holding the suite's store")
    rec.add_argument("--out", required=True, type=Path, help="the suite's folder under reports/leaderboards")
    rec.add_argument("--load", default="", help="the machine's load average to record beside the time")
    bld = sub.add_parser("build", help="write index.md and index.html from the study folders")
    bld.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "record":
            info = record(args.suite, results=args.results, out=args.out, load=args.load)
            print(f"{args.out / 'run.json'}: {info['cells']} cells, {info['wall_seconds']} s wall")
        else:
            for path in build(args.root):
                print(path)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
