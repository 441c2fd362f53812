"""Measures attack budgets against the positive controls, to size a CPU battery tier.

Not a test (tests/perf is outside the default test run): one measurement takes minutes.
A *control* is a victim with no defense, FedSGD at batch size 1, the photos at 32x32,
labels recovered (never given). Each measurement writes a one-case suite, runs it with
leakbench's own runner (``leakbench.running.runner.run_suite``, packing as ``leakbench run``
does) into ``--work``, and reads the rows back from the store: per image the best PSNR
over the measurement's attacks, the share of images above the threshold, the matching
loss, and the seconds (the run's wall time and each attack's share of its packed calls).

    .venv/bin/python tests/perf/measure_cpu_tier.py --victim convnet --bn-mode eval \\
        --attack inverting_gradients --param iterations=4800 --param tv_weight=0.05
    .venv/bin/python tests/perf/measure_cpu_tier.py --victim lenet --battery cpu-v1
    .venv/bin/python tests/perf/measure_cpu_tier.py --from-store results/quick   # a run's own controls
    .venv/bin/python tests/perf/measure_cpu_tier.py --table      # print the table measured so far

On a machine shared with other jobs, ``OMP_WAIT_POLICY=PASSIVE`` keeps the two compute
threads from spinning while they wait for each other (it changes timings; results differ
only where a pack size chosen by timing differs, as between any two runs).

Resumable twice over: a measurement already in ``--json`` is skipped (``--again`` reruns
it), and an interrupted one (Ctrl-C, SIGTERM, ``timeout``) resumes from its store, its
seconds adding up over the invocations. Every entry records the machine's
load (``os.getloadavg``) before and after, since a shared machine inflates the wall
times, and the process's CPU time, which a loaded machine inflates much less.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from leakbench.attacks.battery import describe
from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import parse_suite

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "measured" / "cpu_tier.json"
DEFAULT_WORK = HERE.parents[1] / "results" / "cpu_tier"
log = logging.getLogger("measure_cpu_tier")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def control_suite(*, victim: str, victim_params: dict[str, Any], bn_mode: str, images: int, seed: int,
                  attacks: list[dict[str, Any]] | None, battery: str | None, threshold: float) -> str:
    """The TOML of a one-case suite: the control of ``victim`` against the attacks (or the battery)."""
    lines = ["[suite]", 'name = "cpu_tier_control"', f"seed = {seed}", f"images = {images}",
             f'leak_threshold = {{ metric = "psnr_db", value = {threshold!r} }}', "",
             "[threat_model]", 'labels = "recovered"', 'bn_stats = "none"', "",
             "[dataset]", 'name = "photos"', "side = 32", "", "[[case]]"]
    victim_table = ", ".join([f'name = "{victim}"'] + [f"{k} = {_toml_value(v)}" for k, v in victim_params.items()])
    lines.append(f"victim = {{ {victim_table} }}")
    lines.append(f'protocol = {{ name = "fedsgd", batch_size = 1, bn_mode = "{bn_mode}" }}')
    if battery is not None:
        lines.append(f'battery = "{battery}"')
    for table in attacks or ():
        lines.append("[[case.attacks]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: write KEY=VALUE, e.g. iterations=4800")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw, raw)


class _Spent:
    """Seconds spent on one measurement, kept beside its store so that a resumed run adds to them."""

    def __init__(self, path: Path):
        self.path = path
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.wall, self.cpu, self.loads = data.get("wall", 0.0), data.get("cpu", 0.0), data.get("loads", [])

    def add(self, *, wall: float, cpu: float, load: tuple[float, float, float]) -> None:
        self.wall += wall
        self.cpu += cpu
        self.loads.append([round(x, 2) for x in load])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"wall": self.wall, "cpu": self.cpu, "loads": self.loads}), encoding="utf-8")


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def _rows(out: Path, suite_hash: str) -> list[sqlite3.Row]:
    with sqlite3.connect(store_path(out)) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT attack, attack_json, cell_key, image_slot, image_id, status, psnr_db, label_accuracy, "
                          "matching_loss, seconds, battery, execution_json FROM results WHERE suite_hash = ?", (suite_hash,)).fetchall()


def tabulate(rows: list[sqlite3.Row], *, threshold: float) -> tuple[dict[str, Any], list[str], list[float | None]]:
    """Per attack: PSNR per image, leak share, seconds; and per image the best PSNR over the attacks (no baseline)."""
    per_attack: dict[str, dict[str, Any]] = {}
    best: dict[str, float] = {}
    images = sorted({r["image_id"] for r in rows})
    n = len(images)
    for r in rows:
        name = r["attack"]
        entry = per_attack.setdefault(name, {"psnr_db": {}, "seconds": 0.0, "matching_loss": [], "errors": 0,
                                             "label_accuracy": [], "battery": r["battery"], "packs": []})
        entry["packs"].append(json.loads(r["execution_json"] or "{}").get("pack"))
        if r["status"] != "ok" or r["psnr_db"] is None:
            entry["errors"] += 1
            continue
        entry["psnr_db"][r["image_id"]] = round(r["psnr_db"], 2)
        entry["seconds"] += r["seconds"] or 0.0
        if r["matching_loss"] is not None:
            entry["matching_loss"].append(r["matching_loss"])
        if r["label_accuracy"] is not None:
            entry["label_accuracy"].append(r["label_accuracy"])
        if name != "label_only":
            best[r["image_id"]] = max(best.get(r["image_id"], float("-inf")), r["psnr_db"])
    for entry in per_attack.values():
        psnrs = list(entry["psnr_db"].values())
        entry["leak_share"] = sum(p > threshold for p in psnrs) / n
        entry["seconds_per_image"] = round(entry["seconds"] / n, 2)
        losses = sorted(entry.pop("matching_loss"))
        entry["median_matching_loss"] = losses[len(losses) // 2] if losses else None
        accs = entry.pop("label_accuracy")
        entry["label_accuracy"] = sum(accs) / len(accs) if accs else None
        entry["psnr_db"] = [entry["psnr_db"].get(i) for i in images]
        entry["seconds"] = round(entry["seconds"], 2)
    worst = [round(best[i], 2) if i in best else None for i in images]
    return per_attack, images, worst


def from_store(directory: str, *, threshold: float) -> dict[str, Any]:
    """The control table of an existing store (e.g. ``make run``'s): per victim and BatchNorm mode, undefended
    FedSGD batch-1 cells only, from the latest run's suite."""
    with sqlite3.connect(store_path(Path(directory))) as db:
        db.row_factory = sqlite3.Row
        run = db.execute("SELECT suite_name, suite_hash FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
        rows = db.execute(
            "SELECT r.attack, r.image_id, r.status, r.psnr_db, r.label_accuracy, r.matching_loss, r.seconds, "
            "r.battery, r.execution_json, c.victim_label, c.bn_mode FROM results r JOIN cells c "
            "ON c.suite_hash = r.suite_hash AND c.cell_key = r.cell_key WHERE r.suite_hash = ? "
            "AND c.defense = 'none' AND c.protocol = 'fedsgd' AND c.batch_size = 1", (run["suite_hash"],)).fetchall()
    table: dict[str, Any] = {}
    for victim, bn_mode in sorted({(r["victim_label"], r["bn_mode"]) for r in rows}):
        mine = [r for r in rows if (r["victim_label"], r["bn_mode"]) == (victim, bn_mode)]
        per_attack, images, worst = tabulate(mine, threshold=threshold)
        n = len(images)
        table[f"{run['suite_name']}:{victim}-{bn_mode}"] = {
            "victim": victim, "bn_mode": bn_mode, "battery": ",".join(sorted({r["battery"] or "-" for r in mine})),
            "store": str(directory), "suite_hash": run["suite_hash"], "images": n, "image_ids": images,
            "threshold_db": threshold, "worst_case_psnr_db": worst,
            "leak_share": sum(p is not None and p > threshold for p in worst) / n,
            "seconds_per_image": round(sum(a["seconds"] for a in per_attack.values()) / n, 1),
            "per_attack": per_attack,
        }
    return table


def measure(args: argparse.Namespace, key: str, text: str) -> dict[str, Any]:
    suite = parse_suite(text, source=f"<{key}>")
    out = Path(args.work) / key
    load_before = os.getloadavg()
    spent = _Spent(out / "spent.json")  # wall and CPU seconds over every invocation, resumed ones included
    cpu0 = time.process_time()
    t0 = time.monotonic()
    try:
        summary = run_suite(suite, out_dir=out, device="cpu", argv=" ".join(sys.argv))
    finally:
        spent.add(wall=time.monotonic() - t0, cpu=time.process_time() - cpu0, load=os.getloadavg())
    wall, cpu = spent.wall, spent.cpu
    load_after = os.getloadavg()
    rows = _rows(out, suite.hash)
    n = suite.images
    per_attack, images, worst = tabulate(rows, threshold=args.threshold)
    return {
        "key": key, "victim": args.victim, "victim_params": dict(args.victim_param or []), "bn_mode": args.bn_mode,
        "battery": args.battery, "attacks": args.attack_tables,
        "battery_contents": describe(args.battery) if args.battery else None, "images": n, "seed": args.seed,
        "threshold_db": args.threshold,
        "leak_share": sum(p is not None and p > args.threshold for p in worst) / n,
        "image_ids": images, "worst_case_psnr_db": worst, "wall_seconds": round(wall, 1), "seconds_per_image": round(wall / n, 1),
        # CPU time of this process, all its threads, over every invocation
        "cpu_seconds": round(cpu, 1), "cpu_seconds_per_image": round(cpu / n, 1),
        "statuses": summary.statuses, "per_attack": per_attack,
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
        "invocations": len(spent.loads), "loads_at_end_of_each_invocation": spent.loads,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _load_table(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def print_table(table: dict[str, Any]) -> None:
    for entry in table.values():
        what = entry["battery"] or "; ".join(
            f"{a['name']}(" + ", ".join(f"{k}={v}" for k, v in a.items() if k != "name") + ")" for a in entry["attacks"])
        load = entry.get("load_before"), entry.get("load_after")
        print(f"{entry['victim']:8s} bn {entry['bn_mode']:5s} {what}: leak {entry['leak_share']:.2f} "
              f"({entry['images']} images), {entry['seconds_per_image']} s/image (cpu "
              f"{entry.get('cpu_seconds_per_image')} s), load {load[0] and load[0][0]}->{load[1] and load[1][0]}; "
              f"worst {entry['worst_case_psnr_db']}")
        if len(entry["per_attack"]) > 1:
            for name, a in entry["per_attack"].items():
                print(f"    {name:20s} leak {a['leak_share']:.2f}  {a['seconds_per_image']:7.2f} s/image  "
                      f"loss {a['median_matching_loss']}  {a['psnr_db']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim", default="convnet")
    parser.add_argument("--victim-param", action="append", type=_parse_param, metavar="KEY=VALUE")
    parser.add_argument("--bn-mode", default="train", choices=("train", "eval"))
    parser.add_argument("--attack", help="one attack (with --param), or use --battery")
    parser.add_argument("--param", action="append", type=_parse_param, default=[], metavar="KEY=VALUE")
    parser.add_argument("--labels", default="idlg", help="label strategy of --attack (dlg takes none)")
    parser.add_argument("--battery", help="run a whole battery (e.g. cpu-v1) instead of --attack")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=20.0, help="PSNR (dB) above which an image leaks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="the table, one entry per measurement")
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="where the measurements' stores go")
    parser.add_argument("--again", action="store_true", help="measure again even if the table holds it")
    parser.add_argument("--table", action="store_true", help="print the table and exit")
    parser.add_argument("--from-store", metavar="DIR",
                        help="add the control rows of an existing store (e.g. results/quick) to the table and exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    path = Path(args.json)
    table = _load_table(path)
    if args.table:
        print_table(table)
        return
    if args.from_store:
        found = from_store(args.from_store, threshold=args.threshold)
        _save(path, found)
        print_table(found)
        return
    if (args.attack is None) == (args.battery is None):
        parser.error("give exactly one of --attack or --battery")
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _terminate)  # `timeout` ends a measurement: keep its seconds for the resume
    args.attack_tables = None
    if args.attack is not None:
        attack = {"name": args.attack, **dict(args.param)}
        if args.attack != "dlg":
            attack.setdefault("labels", args.labels)
        args.attack_tables = [attack]
    text = control_suite(victim=args.victim, victim_params=dict(args.victim_param or []), bn_mode=args.bn_mode,
                         images=args.images, seed=args.seed, attacks=args.attack_tables, battery=args.battery,
                         threshold=args.threshold)
    # a battery's contents are part of what is measured (a candidate tier changes while it is sized)
    contents = json.dumps(describe(args.battery), sort_keys=True, default=str) if args.battery else ""
    digest = hashlib.sha256((text + contents).encode()).hexdigest()[:10]
    key = f"{args.victim}-{args.bn_mode}-{args.battery or args.attack}-{digest}"
    if key in table and not args.again:
        log.info("%s: already measured (--again to rerun)", key)
        print_table({key: table[key]})
        return
    log.info("%s: measuring\n%s", key, text)
    entry = measure(args, key, text)
    _save(path, {key: entry})
    print_table({key: entry})


def _save(path: Path, entries: dict[str, Any]) -> None:
    table = _load_table(path)  # another measurement may have finished meanwhile
    table.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    main()
