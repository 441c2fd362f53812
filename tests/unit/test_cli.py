"""CLI conventions: built-in suites by name, init, --version, -v/-q anywhere, fast --help, one results flag."""

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from leakbench import catalog, cli


def test_help_imports_no_torch():
    code = ("import sys\nfrom leakbench.cli import build_parser\ntry:\n    build_parser().parse_args(['--help'])\n"
            "except SystemExit:\n    pass\nfor cmd in ('run', 'certify', 'check'):\n    try:\n"
            "        build_parser().parse_args([cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_parser_constants_match_the_engine():
    from leakbench.running.packs import DEFAULT_MAX_PACK
    from leakbench.running.executors import EXECUTORS

    assert cli.EXECUTORS == EXECUTORS
    assert cli.DEFAULT_MAX_PACK == DEFAULT_MAX_PACK
    from leakbench.suite import DEFAULT_MAX_CELLS

    assert cli.DEFAULT_MAX_CELLS == DEFAULT_MAX_CELLS


def test_version(capsys):
    import leakbench

    assert cli.main(["--version"]) == 0  # argparse's exit, returned by the CLI's boundary
    assert capsys.readouterr().out.strip() == f"leakbench {leakbench.__version__}"


def test_budget_choices_come_from_the_battery():
    from leakbench.attacks.battery import BUDGET_SWAPS

    for budget in BUDGET_SWAPS:
        assert cli.build_parser().parse_args(["check", "quick", "--budget", budget]).budget == budget
    with pytest.raises(argparse.ArgumentTypeError, match="did you mean 'smoke'"):
        cli.budget_choice("smok")


def test_verbosity_after_the_subcommand_sets_leakbench_loggers_only(monkeypatch, tmp_path):
    root_level = logging.getLogger().level
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "s1", "-v"]) == 0
    assert logging.getLogger("leakbench").level == logging.INFO
    assert cli.main(["-v", "init", "s2", "-v"]) == 0
    assert logging.getLogger("leakbench").level == logging.DEBUG
    assert logging.getLogger("leakbench.running.runner").getEffectiveLevel() == logging.DEBUG
    assert cli.main(["init", "s3", "-q"]) == 0
    assert logging.getLogger("leakbench").level == logging.ERROR
    assert logging.getLogger().level == root_level
    assert logging.getLogger("PIL").getEffectiveLevel() == root_level
    cli.configure_logging(0)


def test_builtin_suites_resolve_by_name_and_list(capsys):
    names = catalog.builtin_names()
    assert "quick" in names
    assert {p.stem for p in Path(__file__).resolve().parents[2].joinpath("suites").glob("*.toml")} == set(names)
    assert catalog.resolve("quick") == catalog.resolve("quick.toml") == catalog.find_builtin("quick").path
    assert catalog.resolve("generative-cpu").name == "generative_cpu.toml"  # the [suite] name works too
    assert catalog.resolve("no-such-suite") is None
    assert cli.main(["check", "quick", "--budget", "smoke"]) == 0
    assert "suite 'quick'" in capsys.readouterr().out
    assert cli.main(["check", "quikc"]) == 2
    err = capsys.readouterr().err
    assert "no built-in suite" in err and "quick" in err and "labels" in err
    assert cli.main(["list", "suites", "qu*"]) == 0
    out = capsys.readouterr().out
    from leakbench.suite import load_suite

    assert f"quick: {len(load_suite('quick').cells)} cells" in out
    assert load_suite("quick").description in out


def test_init_writes_a_checkable_starter_and_never_overwrites(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "mine"]) == 0
    text = (tmp_path / "mine.toml").read_text()
    assert 'name = "mine"' in text and text.count("\n#") >= 3  # commented
    assert cli.main(["check", "mine.toml", "--budget", "smoke"]) == 0
    (tmp_path / "mine.toml").write_text("keep me")
    assert cli.main(["init", "mine"]) == 2
    assert "does not overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine.toml").read_text() == "keep me"


def test_list_shows_every_registry_with_generators(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("victim:", "defense:", "attack:", "labels:", "protocol:", "dataset:", "generator:", "prior_data:"):
        assert kind in out
    assert "  dcgan " in out


def test_one_results_directory_flag(tmp_path, capsys):
    parse = cli.build_parser().parse_args
    args = parse(["compare", "--base", "a", "--out", "b"])
    assert cli._merge_compare_dirs(args) and (args.base, args.new) == ("a", "b")
    args = parse(["compare", "a", "b"])
    assert cli._merge_compare_dirs(args) and (args.base, args.new) == ("a", "b")
    args = parse(["compare", "--base", "a", "b"])
    assert cli._merge_compare_dirs(args) and (args.base, args.new) == ("a", "b")
    args = parse(["compare", "a", "--out", "b"])
    assert cli._merge_compare_dirs(args) and (args.base, args.new) == ("a", "b")
    assert not cli._merge_compare_dirs(parse(["compare", "a", "b", "--out", "c"]))
    assert cli.main(["report"]) == 2
    assert "--out DIR" in capsys.readouterr().err
    # report takes the directory as --out (as run does) or positionally; both name the same missing store
    assert cli.main(["report", str(tmp_path / "none")]) == cli.main(["report", "--out", str(tmp_path / "none")]) == 2
