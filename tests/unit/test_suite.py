"""Suite validation: every kind of bad input is reported with its TOML path, before any compute."""

import textwrap

import pytest

from leakbench.suite import SuiteError, load_suite, parse_suite

GOOD = """
[suite]
name = "t"
seed = 1
images = 4

[dataset]
name = "photos"
side = 16

[[case]]
victim = "test_tiny"
protocol = { name = "fedsgd", batch_size = 2 }
[[case.attacks]]
name = "inverting_gradients"
iterations = 5
"""


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(SuiteError) as info:
        parse_suite(textwrap.dedent(text))
    return dict(info.value.problems)


def test_good_suite_expands_deterministically():
    a = parse_suite(GOOD)
    b = parse_suite(GOOD)
    assert a.hash == b.hash
    assert [c.key for c in a.cells] == [c.key for c in b.cells]
    assert len(a.case_cells()) == 2  # 4 images in batches of 2
    assert all(len(c.image_indices) == 2 for c in a.case_cells())
    # the two batches hold different images
    assert set(a.cells[0].image_indices).isdisjoint(a.cells[1].image_indices)
    # batch 2 is not its own control: one batch-1 control cell per image was added
    assert len(a.cells) == 6 and a.control_only_cells() == 4
    # defaults are filled in, so the hash names the real configuration
    assert dict(a.cells[0].attacks[0].params)["restarts"] == 1
    assert a.cells[0].attacks[0].labels.name == "idlg"


def test_seed_changes_cells():
    other = parse_suite(GOOD.replace("seed = 1", "seed = 2"))
    assert other.hash != parse_suite(GOOD).hash


def test_unknown_key_with_suggestion():
    p = problems_of(GOOD.replace('iterations = 5', 'iteratons = 5'))
    assert "case[0].attacks[0].iteratons" in p
    assert "did you mean 'iterations'" in p["case[0].attacks[0].iteratons"]


def test_unknown_top_level_and_section_keys():
    p = problems_of(GOOD.replace("seed = 1", "seeed = 1") + "\n[extra]\nx = 1\n")
    assert "did you mean 'seed'" in p["suite.seeed"]
    assert "extra" in p


@pytest.mark.parametrize(
    "old,new,path,needle",
    [
        ('victim = "test_tiny"', 'victim = "test_tinny"', "case[0].victim.name", "did you mean 'test_tiny'"),
        ('name = "photos"', 'name = "photo"', "dataset.name", "did you mean 'photos'"),
        ('name = "inverting_gradients"', 'name = "inverting_gradient"', "case[0].attacks[0].name",
         "did you mean 'inverting_gradients'"),
        ('[[case.attacks]]', 'defense = "nonee"\n[[case.attacks]]', "case[0].defense.name", "did you mean 'none'"),
    ],
)
def test_unknown_component_names(old, new, path, needle):
    p = problems_of(GOOD.replace(old, new))
    assert needle in p[path]


def test_wrong_types():
    p = problems_of(GOOD.replace("iterations = 5", 'iterations = "five"').replace("images = 4", "images = 4.5"))
    assert "must be int" in p["case[0].attacks[0].iterations"]
    assert "must be int" in p["suite.images"]


def test_impossible_values():
    p = problems_of(GOOD.replace("iterations = 5", "iterations = -5").replace("seed = 1", "seed = -1"))
    assert "impossible value" in p["case[0].attacks[0].iterations"]
    assert "impossible value" in p["suite.seed"]


def test_batch_larger_than_images():
    p = problems_of(GOOD.replace("batch_size = 2", "batch_size = 8"))
    assert "larger than the 4 images" in p["case[0].protocol.batch_size"]


def test_more_images_than_the_dataset_has():
    p = problems_of(GOOD.replace("images = 4", "images = 100000"))
    assert "has only" in p["suite.images"]


def test_victim_parameters_checked_on_meta_device():
    p = problems_of(GOOD.replace('victim = "test_tiny"', 'victim = { name = "test_tiny", norm = "batchy" }'))
    assert "norm must be one of" in p["case[0].victim"]
    p = problems_of(GOOD.replace('victim = "test_tiny"', 'victim = { name = "test_tiny", num_classes = 3 }'))
    assert "set by leakbench" in p["case[0].victim.num_classes"]


def test_oracle_labels_need_the_threat_model():
    p = problems_of(GOOD.replace('iterations = 5', 'iterations = 5\nlabels = "known"'))
    assert "does not grant" in p["case[0].attacks[0].labels"]
    granted = parse_suite(GOOD.replace('iterations = 5', 'iterations = 5\nlabels = "known"')
                          + '\n[threat_model]\nlabels = "known"\n')
    assert granted.cells[0].attacks[0].labels.name == "known"


def test_all_problems_reported_at_once():
    bad = GOOD.replace("seed = 1", "seeed = 1").replace("iterations = 5", "iterations = -5")
    p = problems_of(bad.replace('victim = "test_tiny"', 'victim = "nope"'))
    assert {"suite.seeed", "case[0].attacks[0].iterations", "case[0].victim.name"} <= set(p)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(SuiteError, match="not valid TOML"):
        parse_suite("[suite\nname=")
    with pytest.raises(SuiteError, match="no such file"):
        load_suite(tmp_path / "missing.toml")


def test_victim_and_defense_lists_expand():
    text = GOOD.replace('victim = "test_tiny"', 'victim = ["test_tiny", { name = "test_tiny", width = 2 }]')
    suite = parse_suite(text)
    assert len(suite.case_cells()) == 4
    assert len({c.victim.label() for c in suite.cells}) == 2


def test_shipped_suites_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[2].joinpath("suites").glob("*.toml")):
        assert load_suite(path).cells, path


def test_smoke_budget_shrinks_work_but_keeps_structure():
    text = GOOD.replace("iterations = 5", "iterations = 500\nrestarts = 8")
    full = parse_suite(text)
    smoke = parse_suite(text, budget="smoke")
    assert smoke.budget == "smoke" and smoke.hash != full.hash
    params = dict(smoke.cells[0].attacks[0].params)
    assert params["iterations"] == 4 and params["restarts"] == 1
    assert sum(len(c.image_indices) for c in smoke.case_cells()) == 2
    assert {c.victim.name for c in smoke.cells} == {c.victim.name for c in full.cells}
    with pytest.raises(SuiteError, match="unknown budget"):
        parse_suite(text, budget="tiny")
    # bad types are still reported, not hidden by the caps
    with pytest.raises(SuiteError, match="must be int"):
        parse_suite(text.replace("iterations = 500", 'iterations = "500"'), budget="smoke")


def test_smoke_budget_keeps_enough_images_for_the_largest_batch():
    text = GOOD.replace("images = 4", "images = 8").replace("batch_size = 2", "batch_size = 4")
    smoke = parse_suite(text, budget="smoke")
    assert len(smoke.case_cells()) == 1 and len(smoke.cells[0].image_indices) == 4


def test_smoke_budget_attacks_one_batch_per_case():
    text = GOOD.replace("images = 4", "images = 8")
    assert len(parse_suite(text).case_cells()) == 4
    assert len(parse_suite(text, budget="smoke").case_cells()) == 1


CONTROLLED = GOOD.replace('protocol = { name = "fedsgd", batch_size = 2 }',
                          'defense = { name = "gaussian_noise", sigma = 0.1 }\nprotocol = { name = "fedsgd", batch_size = 1 }')


def test_defended_cells_get_positive_controls_named_and_marked():
    suite = parse_suite(CONTROLLED)
    defended = suite.case_cells()
    controls = [c for c in suite.cells if not c.case_indices]
    assert len(defended) == 4 and len(controls) == 4 and suite.control_only_cells() == 4
    by_key = {c.key: c for c in suite.cells}
    for cell in defended:
        assert not cell.control and len(cell.control_cells) == 1
        control = by_key[cell.control_cells[0]]
        assert control.control and control.defense.name == "none"
        assert control.protocol.kwargs()["batch_size"] == 1
        assert control.image_indices == cell.image_indices and control.trial == cell.trial
        assert control.victim_seed_parts == cell.victim_seed_parts  # the same server weights
        assert cell.control_attacks == tuple(a.key for a in control.attacks) == tuple(a.key for a in cell.attacks)
    # an undefended FedSGD batch-1 case is its own control: nothing is added
    own = parse_suite(GOOD.replace("batch_size = 2", "batch_size = 1"))
    assert own.control_only_cells() == 0
    assert all(c.control and c.control_cells == (c.key,) for c in own.cells)


def test_a_cell_shared_by_two_cases_is_one_cell_that_remembers_both():
    two = CONTROLLED + """
[[case]]
victim = "test_tiny"
protocol = { name = "fedsgd", batch_size = 1 }
[[case.attacks]]
name = "dlg"
iterations = 3
"""
    suite = parse_suite(two)
    keys = [c.key for c in suite.cells]
    assert len(keys) == len(set(keys)) == 8  # 4 defended + 4 undefended, which are also the controls
    assert suite.control_only_cells() == 0
    shared = [c for c in suite.cells if c.case_indices == (0, 1)]
    # the undefended cells belong to case 1 and serve as case 0's controls: both attacks run on them, once
    assert len(shared) == 0 and all(c.case_indices in ((0,), (1,)) for c in suite.cells)
    undefended = [c for c in suite.cells if c.defense.name == "none"]
    assert len(undefended) == 4 and all(c.control for c in undefended)
    assert all({a.name for a in c.attacks} == {"inverting_gradients", "dlg"} for c in undefended)
    assert suite.work_items() == 4 * 1 + 4 * 2
