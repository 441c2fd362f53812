"""`leakbench run | check | list | report | compare | certify`: the command line owns output and progress bars."""

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
    from leakbench.suite import SuiteError, load_suite

    try:
        return load_suite(path, budget=budget)
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    from leakbench.suite import suite_summary

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
    from leakbench.runner import run_suite
    from leakbench.store import StoreError

    out = Path(args.out) if args.out else _default_out(args.suite)
    progress = TqdmProgress(enabled=not args.quiet)
    try:
        summary = run_suite(suite, out_dir=out, device=args.device, retry_failed=args.retry_failed,
                            progress=progress, argv=shlex.join(sys.argv), **_execution(args))
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
    from leakbench import reports
    from leakbench.store import StoreError

    try:
        results = reports.load_results(store, suite_hash=suite_hash)
        paths = reports.write_reports(store, out, suite_hash=results.suite_hash)
        board = reports.leaderboard(results)
    except (StoreError, reports.ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(reports.to_markdown(board, results=results))
    print()
    print(f"leaderboard: {paths.csv}")
    print(f"HTML report: {paths.report_html}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from leakbench.store import store_path

    out = Path(args.out)
    return _report(store_path(out), out, suite_hash=args.suite_hash)


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 0 when no row's leakage grew beyond the tolerance, 1 when one did, 2 on bad input."""
    from leakbench import reports
    from leakbench.reports.compare import Tolerance, compare, comparison_markdown

    new_store = args.new if args.new is not None else args.base
    if args.new is None and (args.base_hash is None or args.new_hash is None):
        print("error: give two stores (leakbench compare BASE NEW), or one store with --base-hash and --new-hash "
              "to compare two suites stored in it", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        tolerance = Tolerance(psnr_db=args.tolerance_db, leak_rate=args.tolerance_leak_rate, alpha=args.alpha)
        base = reports.load_results(args.base, suite_hash=args.base_hash)
        new = reports.load_results(new_store, suite_hash=args.new_hash)
        comparison = compare(base, new, tolerance=tolerance)
    except reports.ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not comparison.compared and len(base.rows) and len(new.rows):
        print("error: no (victim, defense, protocol) row of BASE matches one of NEW, so nothing was compared; "
              "compare results of the same suite", file=sys.stderr)
        return EXIT_BAD_INPUT
    markdown = comparison_markdown(comparison)
    if args.output:
        Path(args.output).write_text(markdown, encoding="utf-8")
    print(markdown)
    return EXIT_OK if comparison.ok else EXIT_FAILED


def _missing_work(suite, store_file: Path) -> int:
    """(cell, attack) pairs of ``suite`` that the store does not hold yet."""
    from leakbench.store import Store

    if not store_file.exists():
        return suite.work_items()
    with Store(store_file, readonly=True) as store:
        done = store.done(suite.hash)
    return sum(1 for cell in suite.cells for attack in cell.attacks if (cell.key, attack.key) not in done)


def cmd_certify(args: argparse.Namespace) -> int:
    """Exit 0 when every (victim, defense) passes, 1 when one fails, 2 on bad input."""
    try:
        from leakbench.reports.certify import Limits

        limits = Limits(max_psnr_db=args.max_psnr, max_leak_rate=args.max_leak_rate, max_ssim=args.max_ssim,
                        min_lpips=args.min_lpips, allow_failures=args.allow_failures)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    suite = _load(args.suite, args.budget)
    if suite is None:
        return EXIT_BAD_INPUT
    from leakbench import reports
    from leakbench.store import StoreError, store_path
    from leakbench.reports.certify import certificate_markdown, certify, write_certificate

    out = Path(args.out) if args.out else _default_out(args.suite)
    try:
        missing = _missing_work(suite, store_path(out))
        if missing and args.no_run:
            print(f"error: the store under {out} lacks {missing} attack run(s) of suite {suite.name!r} "
                  f"(hash {suite.hash}); run it first (leakbench run {args.suite} --out {out}"
                  f"{'' if args.budget == 'full' else ' --budget ' + args.budget}) or leave out --no-run",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        if missing:
            from leakbench.runner import run_suite

            print(f"{missing} attack run(s) of suite {suite.name!r} are not in {out}; running them", file=sys.stderr)
            run_suite(suite, out_dir=out, device=args.device, progress=TqdmProgress(enabled=not args.quiet),
                      argv=shlex.join(sys.argv), **_execution(args))
        results = reports.load_results(store_path(out), suite_hash=suite.hash)
        certificate = certify(results, limits=limits, evidence_images=args.evidence)
    except (StoreError, reports.ReportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished work is kept in {out}. Run the same command again to resume.", file=sys.stderr)
        return 130
    markdown_path, html_path = write_certificate(certificate, out)
    print(certificate_markdown(certificate))
    print(f"certificate: {markdown_path} and {html_path}")
    return EXIT_OK if certificate.passed else EXIT_FAILED


def cmd_list(args: argparse.Namespace) -> int:
    from leakbench import components

    regs = components.listable()
    kinds = [args.kind] if args.kind else sorted(regs)
    for kind in kinds:
        if kind not in regs:
            from leakbench.core import did_you_mean

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


def _execution(args: argparse.Namespace) -> dict:
    from leakbench.attacks.optimize import Acceleration

    return {"executor": args.executor, "workers": args.workers, "max_pack": args.pack_size,
            "ray_address": args.address, "acceleration": Acceleration(compile=args.compile, tf32=args.tf32,
                                                                   channels_last=args.channels_last)}


def _execution_options(parser: argparse.ArgumentParser) -> None:
    from leakbench.execute import DEFAULT_MAX_PACK
    from leakbench.executors import EXECUTORS

    group = parser.add_argument_group("execution (results do not depend on these, up to floating-point order)")
    group.add_argument("--executor", default="local", choices=EXECUTORS,
                       help="local: this process; processes: one worker per GPU (or --workers CPU workers); "
                            "ray: a Ray cluster (pip install 'leakbench[ray]')")
    group.add_argument("--workers", type=int, help="worker processes (processes: default one per GPU) or Ray tasks "
                                                   "in flight (ray: default the cluster's GPUs, else CPUs)")
    group.add_argument("--address", help="Ray cluster address for --executor ray (default: start a local Ray)")
    group.add_argument("--pack-size", type=int, default=DEFAULT_MAX_PACK,
                       help=f"cells per pack and reconstructions per batched attack call (default {DEFAULT_MAX_PACK}; "
                            "1 runs every reconstruction alone); also capped by the measured free memory (GPU, or "
                            "Linux CPU) and, for long attacks, the fastest size by timing")
    group.add_argument("--compile", default="off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                       help="torch.compile the attack step (reduce-overhead: CUDA graphs on a GPU)")
    group.add_argument("--tf32", action="store_true", help="TensorFloat-32 matmuls/convolutions (Ampere+ GPUs)")
    group.add_argument("--channels-last", action="store_true",
                       help="channels-last layout of the attacker's convolutions and candidates (for GPU tensor cores; "
                            "slower on a CPU)")


def _budget_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", default="full", choices=("full", "cpu", "smoke"),  # leakbench.suite.BUDGETS
                        help="the battery tier: full runs the batteries as named; cpu runs standard-v1 as cpu-v1 "
                             "(budgets measured to break undefended controls on a 2-core CPU, see "
                             "leakbench.attacks.battery); smoke: 2 images, 4 iterations, 1 restart, 1 epoch and "
                             "smoke-v1 — checks that every cell runs, says nothing about leakage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leakbench", description="Audit how much federated-learning updates leak.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (resumes from the store), then write its reports")
    run.add_argument("suite", help="path of a suite TOML file")
    run.add_argument("--out", help="directory of the store and reports (default: results/<suite name>)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--retry-failed", action="store_true", help="run again the attack runs that failed before")
    _budget_option(run)
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _execution_options(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a suite without running anything")
    check.add_argument("suite")
    _budget_option(check)
    check.set_defaults(func=cmd_check)

    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument("kind", nargs="?", help="victim, defense, attack, labels, protocol or dataset")
    lst.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'resnet*'")
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="write leaderboards and the HTML report from a store")
    rep.add_argument("--out", required=True, help="directory holding leakbench.sqlite; reports are written there")
    rep.add_argument("--suite-hash", help="which suite in the store (default: the latest run's)")
    rep.set_defaults(func=cmd_report)

    cmp = sub.add_parser(
        "compare", help="did leakage grow? per (victim, defense), base vs new with significance tests; exit 1 if so",
        description="Compare the worst cases of two stores (BASE NEW), or of two suites in one store (BASE "
                    "--base-hash H1 --new-hash H2). Prints Markdown for a pull-request comment. Exit 0: no row's "
                    "leakage grew beyond the tolerance; 1: one did; 2: bad input.")
    cmp.add_argument("base", help="store directory (or leakbench.sqlite) of the base results")
    cmp.add_argument("new", nargs="?", help="store directory of the new results (default: BASE, with two hashes)")
    cmp.add_argument("--base-hash", help="suite hash in BASE (default: its latest run's)")
    cmp.add_argument("--new-hash", help="suite hash in NEW (default: its latest run's)")
    cmp.add_argument("--tolerance-db", type=float, default=1.0,
                     help="tolerated growth of the mean worst-case PSNR, dB (default 1.0)")
    cmp.add_argument("--tolerance-leak-rate", type=float, default=0.10,
                     help="tolerated growth of the leak rate, as a share (default 0.10 = 10 points)")
    cmp.add_argument("--alpha", type=float, default=0.05,
                     help="a change counts only when its two-sided p-value is below this (default 0.05)")
    cmp.add_argument("--output", help="also write the Markdown to this file")
    cmp.set_defaults(func=cmd_compare)

    cert = sub.add_parser(
        "certify", help="pass/fail per (victim, defense) against leakage limits; runs the suite if needed; exit 1 on fail",
        description="Certify a suite's rows against leakage limits, reading the store under --out and running the "
                    "(cell, attack) pairs it lacks. Writes certificate.md (evidence PNGs under certificate/) and "
                    "certificate.html there. Exit 0: every row passes; 1: a row fails; 2: bad input.")
    cert.add_argument("suite", help="path of a suite TOML file")
    cert.add_argument("--out", help="directory of the store and certificate (default: results/<suite name>)")
    cert.add_argument("--max-psnr", type=float, help="every image's worst-case PSNR must be at most this, dB")
    cert.add_argument("--max-leak-rate", type=float, help="the leak rate (at the suite's threshold) must be at most this share")
    cert.add_argument("--max-ssim", type=float, help="every image's worst-case SSIM must be at most this")
    cert.add_argument("--min-lpips", type=float, help="every image's worst-case LPIPS must be at least this")
    cert.add_argument("--allow-failures", action="store_true",
                      help="pass rows with failed attack runs (they count as no leak); by default they fail as inconclusive")
    cert.add_argument("--evidence", type=int, default=3, help="most-leaking images shown per row (default 3)")
    cert.add_argument("--no-run", action="store_true", help="never run attacks: exit 2 if the store lacks some")
    cert.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _budget_option(cert)
    cert.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _execution_options(cert)
    cert.set_defaults(func=cmd_certify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2) if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
