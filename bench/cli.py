"""`leakbench run | check | list | report | compare | certify`: the command line owns output and progress bars."""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INCONCLUSIVE = 3  # certify: no row fails, but some are inconclusive (not evidence of privacy)
EXIT_INTERRUPTED = 130
EXIT_BUG = 70  # an unexpected exception: a bug in leakbench (EX_SOFTWARE)

log = logging.getLogger("leakbench")


class TqdmProgress:
    """A progress bar over reconstruction-iterations (``leakbench.running.progress.planned_iterations``: each
    (cell, attack) run's restarts x iterations; one unit for attacks without iterations), moved as
    the attacks iterate, with the current call (a pack's cells included) and its iterations in its
    postfix. Work already in the store starts the bar as done; the rate and time left are the
    average since the first iteration (``leakbench.running.progress.RateEstimate``)."""

    def __init__(self, *, enabled: bool, file=None):
        self.enabled = enabled
        self.file = file
        self.bar = None
        self.description = ""
        self.last_refresh = 0.0

    def start(self, total: int, *, skipped: int) -> None:
        from tqdm import tqdm

        from leakbench.running.progress import RateEstimate

        out = self.file or sys.stderr
        if skipped:
            print(f"{skipped} of {total + skipped} reconstruction-iterations already in the store; skipping them",
                  file=out)
        estimate = RateEstimate()

        class Bar(tqdm):
            @property
            def format_dict(self):  # tqdm's rate (and so its time left) replaced by the estimate's
                d = super().format_dict
                rate = estimate.rate(d["n"])
                if rate is not None:
                    d["rate"] = rate
                return d

        self.estimate = estimate
        self.bar = Bar(total=total + skipped, initial=skipped, unit="it", unit_scale=total + skipped >= 10_000,
                       disable=not self.enabled, dynamic_ncols=True, file=out, mininterval=1.0, smoothing=0)

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

    def update(self, units: int) -> None:
        if self.bar is not None:
            self.bar.update(units)
            self.estimate.record(self.bar.n)

    def advance(self, status: str) -> None:
        """A (cell, attack) run ended: its share has come through ``update`` already."""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _default_out(suite_path: str) -> Path:
    return Path("results") / Path(suite_path).stem


def _load(path: str, budget: str = "full", max_cells: int | None = None):
    from leakbench.suite import DEFAULT_MAX_CELLS, SuiteError, load_suite

    if max_cells is not None and max_cells < 1:
        print(f"error: --max-cells must be at least 1, got {max_cells}", file=sys.stderr)
        return None
    try:
        return load_suite(path, budget=budget, max_cells=DEFAULT_MAX_CELLS if max_cells is None else max_cells)
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    from leakbench.suite import suite_summary

    suite = _load(args.suite, args.budget, args.max_cells)
    if suite is None:
        return EXIT_BAD_INPUT
    info = suite_summary(suite)
    controls = f" ({info['control_cells']} of them positive controls added)" if info["control_cells"] else ""
    print(f"{args.suite}: ok — suite {info['name']!r} (hash {info['hash']}, budget {info['budget']}), "
          f"{info['cells']} cells{controls}, {info['attack_runs']} attack runs on {info['dataset']}; threat model "
          f"labels={info['threat_model']['labels']}, bn_stats={info['threat_model']['bn_stats']}; leak threshold "
          f"{info['leak_threshold']}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    suite = _load(args.suite, args.budget, args.max_cells)
    if suite is None:
        return EXIT_BAD_INPUT
    from leakbench.running.runner import run_suite
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
        print(f"\ninterrupted; every finished attack run is kept in {out}. Resume with: "
              f"{shlex.join(['leakbench', 'run', args.suite, '--out', str(out)])} (finished runs are skipped)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
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

    if args.out and args.dir and Path(args.out) != Path(args.dir):
        print(f"error: two results directories given ({args.dir} and --out {args.out}); give one", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not (args.out or args.dir):
        print("error: name the results directory: leakbench report --out DIR (as given to leakbench run --out)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out or args.dir)
    return _report(store_path(out), out, suite_hash=args.suite_hash)


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 0 when no row's leakage grew beyond the tolerance, 1 when one did, 2 on bad input."""
    from leakbench import reports
    from leakbench.reports.compare import Tolerance, compare, comparison_markdown

    if not _merge_compare_dirs(args):
        return EXIT_BAD_INPUT
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


def _merge_compare_dirs(args: argparse.Namespace) -> bool:
    """``--base DIR`` / ``--out DIR`` fill BASE / NEW (the positional forms keep working); False on a clash."""
    if args.base_dir is not None and args.base is not None and args.new is None:
        args.base, args.new = None, args.base  # `compare --base OLD NEW`: the one positional is NEW
    for flag, dest, given in (("--base", "base", args.base_dir), ("--out", "new", args.new_dir)):
        current = getattr(args, dest)
        if given is None:
            continue
        if current is not None and Path(current) != Path(given):
            print(f"error: {dest.upper()} given twice ({current} and {flag} {given}); give it once", file=sys.stderr)
            return False
        setattr(args, dest, given)
    if args.base is None:
        print("error: name the base results: leakbench compare BASE NEW, or --base DIR --out DIR", file=sys.stderr)
        return False
    return True


def _missing_work(suite, store_file: Path) -> int:
    """(cell, attack) pairs of ``suite`` that the store does not hold yet."""
    from leakbench.store import Store

    if not store_file.exists():
        return suite.work_items()
    with Store(store_file, readonly=True) as store:
        done = store.done(suite.hash)
    return sum(1 for cell in suite.cells for attack in cell.attacks if (cell.key, attack.key) not in done)


def cmd_certify(args: argparse.Namespace) -> int:
    """Exit 0 when every (victim, defense) passes, 1 when one fails, 3 when none fails but some are
    inconclusive, 2 on bad input."""
    try:
        from leakbench.reports.certify import Limits

        limits = Limits(max_psnr_db=args.max_psnr, max_leak_rate=args.max_leak_rate, max_ssim=args.max_ssim,
                        min_lpips=args.min_lpips, allow_failures=args.allow_failures, max_rero=args.max_rero,
                        control_share=args.control_share)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    suite = _load(args.suite, args.budget, max_cells=args.max_cells)
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
            from leakbench.running.runner import run_suite

            print(f"{missing} attack run(s) of suite {suite.name!r} are not in {out}; running them", file=sys.stderr)
            run_suite(suite, out_dir=out, device=args.device, progress=TqdmProgress(enabled=not args.quiet),
                      argv=shlex.join(sys.argv), **_execution(args))
        results = reports.load_results(store_path(out), suite_hash=suite.hash)
        certificate = certify(results, limits=limits, evidence_images=args.evidence)
    except (StoreError, reports.ReportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"\ninterrupted; every finished attack run is kept in {out}. Run the same command again to resume "
              "(finished runs are skipped)", file=sys.stderr)
        return EXIT_INTERRUPTED
    markdown_path, html_path = write_certificate(certificate, out)
    print(certificate_markdown(certificate))
    print(f"certificate: {markdown_path}, {html_path} and {markdown_path.with_suffix('.json')}")
    if certificate.passed:
        return EXIT_OK
    return EXIT_FAILED if certificate.verdict == "fail" else EXIT_INCONCLUSIVE


def cmd_list(args: argparse.Namespace) -> int:
    if args.kind in ("suites", "suite"):
        return cmd_list_suites(args)
    from leakbench import components

    regs = components.listable()
    kinds = [args.kind] if args.kind else sorted(regs)
    for kind in kinds:
        if kind not in regs:
            from leakbench.core import did_you_mean

            print(f"error: unknown kind {kind!r}{did_you_mean(kind, regs)}; kinds: {', '.join(sorted(regs))}",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        from leakbench.core.frozen import thaw

        print(f"{kind}:")
        for entry in regs[kind].entries(args.pattern):
            params = ", ".join(
                f"{n}={thaw(p.default)!r}" if p.default is not p.empty else n  # frozen tables shown as tables
                for n, p in entry.parameters(exclude=("num_classes", "in_channels", "side") if kind == "victim" else ()).items()
            )
            print(f"  {entry.name} (v{entry.version}): {entry.summary}")
            if params:
                print(f"      {params}")
    return EXIT_OK


def cmd_list_suites(args: argparse.Namespace) -> int:
    """The built-in suites (``leakbench.suites``): name, cell count at the full budget, description."""
    import fnmatch

    from leakbench import catalog
    from leakbench.suite import SuiteError, load_suite

    print("suites (built in; run one by name: leakbench run NAME):")
    for builtin in catalog.builtin_suites():
        if not fnmatch.fnmatchcase(builtin.stem, args.pattern):
            continue
        try:
            cells = f"{len(load_suite(builtin.path).cells)} cells"
        except SuiteError as err:
            cells = f"does not load here: {err.problems[0][1] if err.problems else err}"
        alias = f" ({builtin.name})" if builtin.name != builtin.stem else ""
        print(f"  {builtin.stem}{alias}: {cells}")
        if builtin.description:
            print(f"      {builtin.description}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented starter suite: ``NAME.toml`` in this directory (or the path given)."""
    from leakbench import catalog

    target = Path(args.name if args.name.endswith(".toml") else f"{args.name}.toml")
    if target.exists():
        print(f"error: {target} exists; leakbench init does not overwrite a file: choose another name or remove it",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if not target.parent.is_dir():
        print(f"error: {target.parent} is not a directory; create it first or give another path", file=sys.stderr)
        return EXIT_BAD_INPUT
    target.write_text(catalog.starter_text(target.stem, path=str(target)), encoding="utf-8")
    print(f"wrote {target}: check it with `leakbench check {target}`, try it with "
          f"`leakbench run {target} --budget smoke`")
    return EXIT_OK


def _execution(args: argparse.Namespace) -> dict:
    from leakbench.core.acceleration import Acceleration

    return {"executor": args.executor, "workers": args.workers, "max_pack": args.pack_size,
            "ray_address": args.address, "acceleration": Acceleration(compile=args.compile, tf32=args.tf32,
                                                                   channels_last=args.channels_last)}


# Copies of leakbench.running.executors.EXECUTORS and leakbench.running.packs.DEFAULT_MAX_PACK, so that building the
# parser (and `--help`) imports no torch; tests/unit/test_cli.py checks that they agree.
EXECUTORS = ("local", "processes", "ray")
DEFAULT_MAX_PACK = 8
DEFAULT_MAX_CELLS = 100_000  # leakbench.suite.DEFAULT_MAX_CELLS
BUDGET_HELP = ("the battery tier. full (default): the suite as written, batteries as named; cpu: standard-v1 runs as "
               "cpu-v1 (budgets measured to break undefended controls on a 2-core CPU, see leakbench.attacks.battery), "
               "listed attacks as written; smoke: one batch per case and 1 trial, listed attacks capped "
               "at 4 iterations and 1 restart, training at 1 epoch, batteries swapped for their smoke twins: checks "
               "that every cell runs, says nothing about leakage (budgets: leakbench.attacks.battery.BUDGET_SWAPS)")


def budget_choice(value: str) -> str:
    """``--budget``: one of the budgets of ``leakbench.attacks.battery.BUDGET_SWAPS`` (imported when a
    command is parsed, never for ``--help``)."""
    from leakbench.attacks.battery import BUDGET_SWAPS

    if value not in BUDGET_SWAPS:
        from leakbench.core import did_you_mean

        raise argparse.ArgumentTypeError(f"unknown budget {value!r}{did_you_mean(value, BUDGET_SWAPS)}; "
                                         f"one of {', '.join(BUDGET_SWAPS)}")
    return value


def _budget_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", default="full", type=budget_choice, metavar="BUDGET", help=BUDGET_HELP)


def _output_options(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q`` after the subcommand too (``leakbench run quick -v``); summed with the ones before it."""
    parser.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=0,
                        help="log more: -v info, -vv debug (leakbench's own messages)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar; log errors only")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream of the first
    call): a caller that swaps stderr (a test's capture, a notebook) never gets a closed stream."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: int, *, quiet: bool = False) -> None:
    """leakbench's own loggers (``leakbench.*``) to stderr: warnings by default, -v info, -vv debug, -q errors.
    The root logger is left alone, so other libraries (PIL, matplotlib, ...) stay at their own levels."""
    logger = logging.getLogger("leakbench")
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logger.setLevel(level)
    if not any(getattr(h, "leakbench_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.leakbench_cli = True
        logger.addHandler(handler)
    logger.propagate = False


def finite_float(text: str) -> float:
    """argparse type: a finite number (inf and nan cannot be meant as a limit or tolerance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _max_cells_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-cells", type=int, metavar="N",
                        help=f"refuse a suite that expands to more than N cells (default {DEFAULT_MAX_CELLS:,})")


def _execution_options(parser: argparse.ArgumentParser) -> None:
    _max_cells_option(parser)
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
    group.add_argument("--compile", default="auto", choices=("auto", "off", "default", "reduce-overhead", "max-autotune"),
                       help="torch.compile the attack step (reduce-overhead: CUDA graphs on a GPU); auto (the "
                            "default): per pack, only where a probe measures that compiling repays its cost")
    group.add_argument("--tf32", action="store_true", help="TensorFloat-32 matmuls/convolutions (Ampere+ GPUs)")
    group.add_argument("--channels-last", action="store_true",
                       help="channels-last layout of the attacker's convolutions and candidates (for GPU tensor cores; "
                            "slower on a CPU)")


def build_parser() -> argparse.ArgumentParser:
    from leakbench import __version__

    parser = argparse.ArgumentParser(prog="leakbench", description="Audit how much federated-learning updates leak.")
    parser.add_argument("--version", action="version", version=f"leakbench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v info, -vv debug (leakbench's own messages; also after the subcommand)")
    parser.add_argument("-q", "--quiet", dest="top_quiet", action="store_true",
                        help="no progress bar; log errors only (also after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (resumes from the store), then write its reports")
    run.add_argument("suite", help="a built-in suite's name (leakbench list suites) or the path of a suite TOML file")
    run.add_argument("--out", help="directory of the store and reports (default: results/<suite name>)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--retry-failed", action="store_true", help="run again the attack runs that failed before")
    _budget_option(run)
    _output_options(run)
    _execution_options(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a suite without running anything")
    check.add_argument("suite", help="a built-in suite's name (leakbench list suites) or the path of a suite TOML file")
    _budget_option(check)
    _output_options(check)
    _max_cells_option(check)
    check.set_defaults(func=cmd_check)

    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument("kind", nargs="?", help="suites (the built-in suites), or a registry: victim, defense, attack, "
                                             "labels, protocol, dataset, generator or prior_data; all registries "
                                             "when left out")
    lst.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'resnet*'")
    _output_options(lst)
    lst.set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="write leaderboards and the HTML report from a store")
    rep.add_argument("dir", nargs="?", metavar="OUT", help="the results directory (as --out)")
    rep.add_argument("--out", help="the results directory, as run's --out: it holds leakbench.sqlite; reports are "
                                   "written there")
    _output_options(rep)
    rep.add_argument("--suite-hash", help="which suite in the store (default: the latest run's)")
    rep.set_defaults(func=cmd_report)

    cmp = sub.add_parser(
        "compare", help="did leakage grow? per (victim, defense), base vs new with significance tests; exit 1 if so",
        description="Compare the worst cases of two stores (BASE NEW), or of two suites in one store (BASE "
                    "--base-hash H1 --new-hash H2). Prints Markdown for a pull-request comment. Exit 0: no row's "
                    "leakage grew beyond the tolerance; 1: one did; 2: bad input.")
    cmp.add_argument("base", nargs="?", help="results directory (or leakbench.sqlite) of the base results")
    cmp.add_argument("new", nargs="?", help="results directory of the new results (default: BASE, with two hashes)")
    cmp.add_argument("--base", dest="base_dir", metavar="DIR", help="the base results directory (as BASE)")
    cmp.add_argument("--out", dest="new_dir", metavar="DIR",
                     help="the new results directory, as run's --out (as NEW): leakbench compare --base OLD --out NEW")
    _output_options(cmp)
    cmp.add_argument("--base-hash", help="suite hash in BASE (default: its latest run's)")
    cmp.add_argument("--new-hash", help="suite hash in NEW (default: its latest run's)")
    cmp.add_argument("--tolerance-db", type=finite_float, default=1.0,
                     help="tolerated growth of the mean worst-case PSNR, dB (default 1.0)")
    cmp.add_argument("--tolerance-leak-rate", type=finite_float, default=0.10,
                     help="tolerated growth of the leak rate, as a share (default 0.10 = 10 points)")
    cmp.add_argument("--alpha", type=finite_float, default=0.05,
                     help="a change counts only when its two-sided p-value is below this (default 0.05)")
    cmp.add_argument("--output", help="also write the Markdown to this file")
    cmp.set_defaults(func=cmd_compare)

    cert = sub.add_parser(
        "certify", help="pass/fail per (victim, defense) against leakage limits; runs the suite if needed; exit 1 on fail",
        description="Certify a suite's rows against leakage limits, reading the store under --out and running the "
                    "(cell, attack) pairs it lacks. Writes certificate.md (evidence PNGs under certificate/) and "
                    "certificate.html and certificate.json there. Each row is judged with its positive control (the "
                    "same victim and images, no defense, FedSGD batch 1, the same attacks; added to the run when the "
                    "suite lacks it): a row passes only when its control leaks. Exit 0: every row passes; 1: a row "
                    "fails; 3: no row fails but some are inconclusive; 2: bad input.")
    cert.add_argument("suite", help="a built-in suite's name (leakbench list suites) or the path of a suite TOML file")
    cert.add_argument("--out", help="directory of the store and certificate (default: results/<suite name>)")
    cert.add_argument("--max-psnr", type=finite_float, help="every image's worst-case PSNR must be at most this, dB")
    cert.add_argument("--max-leak-rate", type=finite_float, help="the leak rate (at the suite's threshold) must be at most this share")
    cert.add_argument("--max-ssim", type=finite_float, help="every image's worst-case SSIM must be at most this")
    cert.add_argument("--min-lpips", type=finite_float, help="every image's worst-case LPIPS must be at least this")
    cert.add_argument("--max-rero", type=finite_float, metavar="GAMMA",
                      help="pass a row whose defense declares a DP guarantee when its ReRo ceiling gamma for what the "
                           "server saw is at most GAMMA (certified by the guarantee, whatever the attacks did)")
    cert.add_argument("--allow-failures", action="store_true",
                      help="pass rows with failed attack runs (they count as no leak); by default they fail as inconclusive")
    cert.add_argument("--control-share", type=float, default=0.5,
                      help="a row passes only if its positive control's worst case passes the suite's leak threshold "
                           "on at least this share of images (default 0.5)")
    cert.add_argument("--evidence", type=int, default=3, help="most-leaking images shown per row (default 3)")
    cert.add_argument("--no-run", action="store_true", help="never run attacks: exit 2 if the store lacks some")
    cert.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _budget_option(cert)
    _output_options(cert)
    _execution_options(cert)
    cert.set_defaults(func=cmd_certify)

    init = sub.add_parser("init", help="write a commented starter suite NAME.toml (never overwrites a file)")
    init.add_argument("name", help="the suite's name (writes NAME.toml here), or a path ending in .toml")
    _output_options(init)
    init.set_defaults(func=cmd_init)
    return parser


#: the arguments that name files or folders, in the order a message names them
_PATH_ARGS = ("suite", "out", "base", "new", "output")


def _named_paths(args: argparse.Namespace) -> str:
    paths = [f"{getattr(args, a)}" for a in _PATH_ARGS if getattr(args, a, None)]
    return ", ".join(paths) or "the command line"


def guarded(args: argparse.Namespace) -> int:
    """Run a subcommand inside the CLI's one error boundary.

    Every foreseeable failure of input or environment (a bad suite, store, image or folder; a
    file that cannot be read or written; memory) becomes exit 2 with one message that names the
    file or TOML path and what to do; Ctrl-C becomes exit 130. Anything else is a bug: its
    traceback is shown, with a line saying so, and the exit status is 70.
    """
    import sqlite3

    from leakbench.reports import ReportError
    from leakbench.store import StoreError
    from leakbench.suite import SuiteError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; stores keep only whole (cell, attack) results, so nothing half-written is left. "
              f"Run the same command again to resume ({_named_paths(args)})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SuiteError, StoreError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
    except sqlite3.DatabaseError as err:
        print(f"error: a store could not be read or written ({err}); inputs: {_named_paths(args)}. "
              "Pass another --out directory, or move the damaged store away", file=sys.stderr)
    except UnicodeDecodeError as err:
        print(f"error: an input is not UTF-8 text ({err}); inputs: {_named_paths(args)}", file=sys.stderr)
    except RecursionError:
        print(f"error: an input is nested too deeply to read; inputs: {_named_paths(args)}", file=sys.stderr)
    except MemoryError:
        print(f"error: out of memory for {_named_paths(args)}; lower the suite's image side, images or "
              "--pack-size, or run on a machine with more memory", file=sys.stderr)
    except OSError as err:
        target = err.filename or _named_paths(args)
        extra = f" and {err.filename2}" if err.filename2 else ""
        print(f"error: {target}{extra}: {err.strerror or err}; check that the path exists, is of the right kind "
              "(file or folder) and that you may read or write it", file=sys.stderr)
    except Exception as err:
        import traceback

        traceback.print_exc()
        print(f"\nThis is a bug in leakbench, not a problem with your input ({type(err).__name__}). Please report "
              "it with the command line and the traceback above.", file=sys.stderr)
        return EXIT_BUG
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a bad option (2), already explained
        return exit_.code if isinstance(exit_.code, int) else EXIT_BAD_INPUT
    args.verbose += getattr(args, "sub_verbose", 0)
    args.quiet = getattr(args, "quiet", False) or args.top_quiet
    configure_logging(args.verbose, quiet=args.quiet)
    return guarded(args)


if __name__ == "__main__":
    sys.exit(main())
