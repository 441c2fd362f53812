"""Batteries: frozen contents, resolution per batch size / threat model / victim, and suites that name one."""

import textwrap

import pytest
import torch

from leakbench.attacks import ATTACKS, LABELS
from leakbench.attacks.battery import BATTERIES, effective_battery, resolve_battery
from leakbench.suite import SuiteError, parse_suite
from leakbench.victims import build_victim


def names(tables):
    return [t["name"] for t in tables]


def test_batteries_name_registered_components_only():
    for name, entries in BATTERIES.items():
        for entry in entries:
            assert entry.attack in ATTACKS, (name, entry.attack)
            assert entry.labels_single in LABELS and entry.labels_batch in LABELS
            ATTACKS.build(entry.attack, **dict(entry.params))  # parameters valid for the factory


def test_smoke_twin_has_the_same_attacks_and_rules():
    standard, smoke = BATTERIES["standard-v1"], BATTERIES["smoke-v1"]
    assert [e.attack for e in standard] == [e.attack for e in smoke]
    assert [(e.labels_single, e.labels_batch, e.single_image_only, e.requirement) for e in standard] == \
           [(e.labels_single, e.labels_batch, e.single_image_only, e.requirement) for e in smoke]
    assert effective_battery("standard-v1", budget="smoke") == "smoke-v1"
    assert effective_battery("standard-v1") == "standard-v1"
    with pytest.raises(KeyError, match="did you mean 'standard-v1'"):
        effective_battery("standard-v2")


def test_cpu_tier_has_the_same_attacks_and_rules_and_smaller_budgets():
    standard, cpu = BATTERIES["standard-v1"], BATTERIES["cpu-v1"]
    rules = [(e.attack, e.labels_single, e.labels_batch, e.single_image_only, e.requirement, e.bn_prior_from_threat)
             for e in standard]
    assert rules == [(e.attack, e.labels_single, e.labels_batch, e.single_image_only, e.requirement,
                      e.bn_prior_from_threat) for e in cpu]
    for full, small in zip(standard, cpu):
        full_p, small_p = dict(full.params), dict(small.params)
        work = full_p.get("iterations", 0) * full_p.get("restarts", 1)
        assert small_p.get("iterations", 0) * small_p.get("restarts", 1) <= work, full.attack
    assert effective_battery("standard-v1", budget="cpu") == "cpu-v1"
    assert effective_battery("cpu-v1", budget="smoke") == "smoke-v1"  # a suite naming the tier still smokes
    assert effective_battery("cpu-v1") == "cpu-v1" == effective_battery("cpu-v1", budget="cpu")
    with pytest.raises(KeyError, match="unknown budget 'gpu'"):
        effective_battery("standard-v1", budget="gpu")


def test_labels_follow_the_batch_size():
    single = {t["name"]: t["labels"] for t in resolve_battery("standard-v1", batch_size=1)}
    batch = {t["name"]: t["labels"] for t in resolve_battery("standard-v1", batch_size=8)}
    assert single == {"dlg": "none", "idlg": "idlg", "inverting_gradients": "idlg", "gradinversion": "idlg",
                      "geng": "geng", "analytic_fc": "idlg"}
    assert "idlg" not in batch  # iDLG reads the label of a single image
    assert batch["inverting_gradients"] == "geng" and batch["analytic_fc"] == "analytic"
    assert all(t["labels"] != "idlg" for t in resolve_battery("standard-v1", batch_size=8))
    known = resolve_battery("standard-v1", batch_size=8, known_labels=True)
    assert {t["labels"] for t in known} == {"none", "known"}


def test_bn_prior_never_asks_for_more_than_granted():
    def prior(bn_stats):
        return next(t for t in resolve_battery("standard-v1", bn_stats=bn_stats) if t["name"] == "gradinversion")[
            "bn_prior"]

    assert prior("none") == "running"
    assert prior("shared") == "shared"


def test_analytic_fc_only_where_its_closed_form_exists():
    with torch.device("meta"):
        conv = build_victim("test_tiny", {}, num_classes=8, in_channels=3, side=16, seed=0)
        fc = build_victim("fc", {"hidden": 16}, num_classes=8, in_channels=3, side=16, seed=0)
        deep = build_victim("mlp", {"depth": 3}, num_classes=8, in_channels=3, side=16, seed=0)
    assert "analytic_fc" not in names(resolve_battery("standard-v1", model=conv, num_classes=8))
    assert "analytic_fc" in names(resolve_battery("standard-v1", model=fc, num_classes=8))
    assert "analytic_fc" in names(resolve_battery("standard-v1", model=deep, num_classes=8))  # batch 1: first layer
    assert "analytic_fc" not in names(resolve_battery("standard-v1", batch_size=4, model=deep, num_classes=8))
    assert "analytic_fc" in names(resolve_battery("standard-v1", batch_size=4, model=fc, num_classes=8))
    assert "analytic_fc" not in names(resolve_battery("standard-v1", batch_size=8, model=fc, num_classes=8))


SUITE = """
[suite]
name = "battery"
seed = 1
images = 4

[dataset]
name = "photos"
side = 16

[[case]]
victim = ["test_tiny", { name = "fc", hidden = 8 }]
protocol = { name = "fedsgd", batch_size = 2 }
battery = "standard-v1"
"""


def test_suite_expands_a_battery_per_victim_and_budget():
    suite = parse_suite(textwrap.dedent(SUITE))
    by_victim = {c.victim.name: c.attacks for c in suite.case_cells()}  # the cases' cells, not their controls
    assert names_of(by_victim["test_tiny"]) == ["dlg", "inverting_gradients", "gradinversion", "geng"]
    assert names_of(by_victim["fc"]) == ["dlg", "inverting_gradients", "gradinversion", "geng", "analytic_fc"]
    spec = by_victim["fc"][1]
    assert spec.battery == "standard-v1" and spec.identity()["battery"] == "standard-v1"
    assert dict(spec.params)["iterations"] == 4800 and spec.labels.name == "geng"
    smoke = parse_suite(textwrap.dedent(SUITE), budget="smoke")
    assert {a.battery for c in smoke.cells for a in c.attacks} == {"smoke-v1"}
    assert smoke.hash != suite.hash
    cpu = parse_suite(textwrap.dedent(SUITE), budget="cpu")
    assert {a.battery for c in cpu.cells for a in c.attacks} == {"cpu-v1"}
    assert cpu.budget == "cpu" and len({suite.hash, smoke.hash, cpu.hash}) == 3
    assert dict(cpu.cells[0].attacks[1].params)["iterations"] == dict(BATTERIES["cpu-v1"][2].params)["iterations"]
    # listed attacks keep their keys: no battery field in their identity
    listed = parse_suite(textwrap.dedent(SUITE).replace('battery = "standard-v1"',
                                                        '[[case.attacks]]\nname = "inverting_gradients"'))
    assert "battery" not in listed.cells[0].attacks[0].identity()


def names_of(specs):
    return [s.name for s in specs]


def test_suite_reports_bad_batteries():
    with pytest.raises(SuiteError) as info:
        parse_suite(textwrap.dedent(SUITE).replace("standard-v1", "standard-v2"))
    problems = dict(info.value.problems)
    assert "did you mean 'standard-v1'" in problems["case[0].battery"]
    with pytest.raises(SuiteError) as info:
        parse_suite(textwrap.dedent(SUITE).replace('battery = "standard-v1"', ""))
    assert "battery" in dict(info.value.problems)["case[0].attacks"]


def test_budget_flag_on_run_check_and_certify():
    from leakbench.cli import build_parser

    parser = build_parser()
    for argv in (["run", "s.toml"], ["check", "s.toml"], ["certify", "s.toml", "--max-psnr", "20"]):
        assert parser.parse_args(argv).budget == "full"
        assert parser.parse_args(argv + ["--budget", "cpu"]).budget == "cpu"
        with pytest.raises(SystemExit):
            parser.parse_args(argv + ["--budget", "gpu"])


def test_cpu_budget_leaves_listed_attacks_as_written():
    text = textwrap.dedent(SUITE).replace('battery = "standard-v1"',
                                          '[[case.attacks]]\nname = "inverting_gradients"\niterations = 500')
    full, cpu = parse_suite(text), parse_suite(text, budget="cpu")
    assert [a.params for c in cpu.cells for a in c.attacks] == [a.params for c in full.cells for a in c.attacks]
    assert all(a.battery is None for c in cpu.cells for a in c.attacks)


def test_certify_loads_the_suite_at_its_budget(tmp_path, capsys):
    from leakbench.cli import main

    suite = tmp_path / "battery.toml"
    suite.write_text(textwrap.dedent(SUITE), encoding="utf-8")
    hashes = {}
    for budget in ("full", "cpu", "smoke"):
        code = main(["certify", str(suite), "--max-psnr", "20", "--no-run", "--out", str(tmp_path / "out"),
                     "--budget", budget])
        err = capsys.readouterr().err
        assert code == 2 and "lacks" in err
        assert ("--budget" in err) == (budget != "full")  # the hint runs the same budget
        hashes[budget] = err.split("(hash ")[1].split(")")[0]
    assert hashes["cpu"] == parse_suite(textwrap.dedent(SUITE), budget="cpu").hash
    assert len(set(hashes.values())) == 3
