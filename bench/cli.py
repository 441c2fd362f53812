"""`leakbench run | check | list | report`: the command line owns output and progress bars."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

log = logging.getLogger("leakbench")


class TqdmProgress:
    """A progress bar over attack runs, with the current attack's iterations in its postfix."""

    def __init__(self, *, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.description = ""
        self.last_refresh = 0.0

    def start(self, total: int, *, skipped: int) -> None:
        from tqdm import tqdm

        if skipped:
            print(f"{skipped} attack run(s) already in the store; skipping them", file=sys.stderr)
        self.bar = tqdm(total=total, unit="attack", disable=not self.enabled, dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0)

    def task(self, description: str) -> None:
        self.description = description
        if self.bar is not None:
            self.bar.set_postfix_str(description, refresh=True)

    def iterations(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.bar is not None and total > 1 and (now - self.last_refresh >= 1.0 or done == total):
            self.last_refresh = now
            self.bar.set_postfix_str(f"{self.description} | it {done}/{total}", refresh=False)
            self.bar.refresh()

    def advance(self, status: str) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _default_out(suite_path: str) -> Path:
    return Path("results") / Path(suite_path).stem


def _load(path: str, budget: str = "full"):
    from bench.suite import SuiteError, load_suite

    try:
        return load_suite(path, budget=budget)
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    from bench.suite import suite_summary

    suite = _load(args.suite, args.budget)
    if suite is None:
        return EXIT_BAD_INPUT
    info = suite_summary(suite)
    print(f"{args.suite}: ok — suite {info['name']!r} (hash {info['hash']}, budget {info['budget']}), {info['cells']} cells, "
          f"{info['attack_runs']} attack runs on {info['dataset']}; threat model labels={info['threat_model']['labels']}, "
          f"bn_stats={info['threat_model']['bn_stats']}; leak threshold {info['leak_threshold']}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    suite = _load(args.suite, args.budget)
    if suite is None:
        return EXIT_BAD_INPUT
    from bench.runner import run_suite
    from bench.store import StoreError

    out = Path(args.out) if args.out else _default_out(args.suite)
    progress = TqdmProgress(enabled=not args.quiet)
    try:
        summary = run_suite(suite, out_dir=out, device=args.device, retry_failed=args.retry_failed,
                            progress=progress, argv=shlex.join(sys.argv))
    except (StoreError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished work is kept in {out}. Run the same command again to resume.", file=sys.stderr)
        return 130
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.statuses.items())) or "nothing new"
    print(f"run {summary.run_id}: {summary.attack_runs - summary.skipped} attack run(s) done ({counts}), "
          f"{summary.skipped} reused from the store, {summary.seconds:.1f} s", file=sys.stderr)
    return _report(summary.store, out, suite_hash=suite.hash)


def _report(store: Path, out: Path, *, suite_hash: str | None) -> int:
    import reports
    from bench.store import StoreError

    try:
        results = reports.load_results(store, suite_hash=suite_hash)
        paths = reports.write_reports(store, out, suite_hash=results.suite_hash)
        board = reports.leaderboard(results)
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(reports.to_markdown(board, results=results))
    print()
    print(f"leaderboard: {paths.csv}")
    print(f"HTML report: {paths.report_html}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from bench.store import store_path

    out = Path(args.out)
    return _report(store_path(out), out, suite_hash=args.suite_hash)


def cmd_list(args: argparse.Namespace) -> int:
    from bench import components

    regs = components.listable()
    kinds = [args.kind] if args.kind else sorted(regs)
    for kind in kinds:
        if kind not in regs:
            from bench.core import did_you_mean

            print(f"error: unknown kind {kind!r}{did_you_mean(kind, regs)}; kinds: {', '.join(sorted(regs))}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{kind}:")
        for entry in regs[kind].entries(args.pattern):
            params = ", ".join(
                f"{n}={p.default!r}" if p.default is not p.empty else n
                for n, p in entry.parameters(exclude=("num_classes", "in_channels", "side") if kind == "victim" else ()).items()
            )
            print(f"  {entry.name} (v{entry.version}): {entry.summary}")
            if params:
                print(f"      {params}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leakbench", description="Audit how much federated-learning updates leak.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (resumes from the store), then write its reports")
    run.add_argument("suite", help="path of a suite TOML file")
    run.add_argument("--out", help="directory of the store and reports (default: results/<suite name>)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--retry-failed", action="store_true", help="run again the attack runs that failed before")
    run.add_argument("--budget", default="full", choices=("full", "smoke"),
                     help="smoke: 2 images, 4 iterations, 1 restart, 1 epoch — checks that every cell runs, says nothing about leakage")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a suite without running anything")
    check.add_argument("suite")
    check.add_argument("--budget", default="full", choices=("full", "smoke"))
    check.set_defaults(func=cmd_check)

    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument("kind", nargs="?", help="victim, defense, attack, labels, protocol or dataset")
    lst.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'resnet*'")
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="write leaderboards and the HTML report from a store")
    rep.add_argument("--out", required=True, help="directory holding leakbench.sqlite; reports are written there")
    rep.add_argument("--suite-hash", help="which suite in the store (default: the latest run's)")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2) if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
