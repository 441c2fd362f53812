"""One freeze/thaw (leakbench.core.frozen) for the suite, the factories, identities and caches."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from leakbench.core.frozen import FrozenDict, freeze, freeze_params, thaw, thaw_params
from leakbench.suite import load_suite

NESTED = {"b": [1, {"y": [2, 3], "x": {}}], "a": {"epochs": 0, "dataset": {"name": "photos", "split": "public"}},
          "c": 0.5, "d": None, "e": [], "f": "s"}


def test_freeze_round_trips_nested_dicts_and_lists() -> None:
    frozen = freeze(NESTED)
    assert thaw(frozen) == NESTED
    assert hash(frozen) == hash(freeze(dict(reversed(list(NESTED.items())))))  # order-free and hashable
    assert isinstance(frozen, FrozenDict) and isinstance(dict(frozen)["a"], FrozenDict)
    assert dict(frozen)["b"] == (1, FrozenDict((("x", FrozenDict()), ("y", (2, 3)))))
    assert thaw_params(freeze_params(NESTED)) == NESTED
    assert thaw_params((("width", (1, 2)),)) == {"width": [1, 2]}  # plain pairs (a spec built by hand)
    assert freeze(frozen) is frozen


SUITE = textwrap.dedent('''
    [suite]
    name = "pinned"
    seed = 3
    images = 2

    [dataset]
    name = "photos"
    side = 16

    [[case]]
    victim = { name = "fc", hidden = 32 }
    defense = { name = "gaussian_noise", sigma = 0.01 }
    protocol = { name = "fedsgd", batch_size = 1 }
    labels = "idlg"
    [[case.attacks]]
    name = "inverting_gradients"
    iterations = 20
    restarts = 2
    [[case.attacks]]
    name = "analytic_fc"
''')


def test_identity_hashes_are_unchanged(tmp_path: Path) -> None:
    """Keys computed before the freeze/thaw was shared: stores keep resuming the same rows."""
    path = tmp_path / "pinned.toml"
    path.write_text(SUITE)
    suite = load_suite(path)
    # the cases' cells and attacks keep their keys; the suite's hash (a9561f866d4a04b3 before) changed
    # once, when the positive controls of its defended case became cells of the suite
    assert suite.hash == "149ede22b3ef006c"
    assert [c.key for c in suite.case_cells()] == ["e378b86ed2d839ba", "e080d3ff80e25601"]
    assert sorted({a.key for c in suite.cells for a in c.attacks}) == ["d9a52ad2d3f127a9", "f004ef9c3f8d8e5d"]


def test_a_table_parameter_reaches_factory_and_identity_as_a_table(tmp_path: Path) -> None:
    path = tmp_path / "gias.toml"
    path.write_text(SUITE.replace('name = "analytic_fc"', textwrap.dedent('''\
        name = "gias"
        mode = "z"
        restarts = 1
        prior = { generator = { name = "dcgan", width = 8 }, epochs = 0 }
        latent = { iterations = 5, lr = 0.03 }''')))
    suite = load_suite(path)
    spec = next(a for a in suite.cells[0].attacks if a.name == "gias")
    kwargs = spec.kwargs()
    assert kwargs["prior"]["generator"] == {"name": "dcgan", "width": 8}
    assert kwargs["latent"] == {"iterations": 5, "lr": 0.03}
    assert kwargs["weights"] == {"iterations": 5000, "lr": 0.001}  # the factory's default, thawed to a table
    stored = json.loads(json.dumps(spec.identity(), sort_keys=True))  # what the store writes
    assert stored["params"]["prior"]["generator"] == {"name": "dcgan", "width": 8}
    assert "prior={'epochs': 0, 'generator': {'name': 'dcgan', 'width': 8}}" in spec.label()  # not [[k, v], ...]
