"""Plug-ins: a suite's own modules and installed entry points register components that every executor finds."""

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from leakbench.store import store_path
from leakbench.suite import SuiteError, load_suite

PLUGIN = '''
"""A user's own components, registered on import (no edit of leakbench)."""
from torch import nn

from leakbench.core import Defense
from leakbench.defenses import DEFENSES
from leakbench.victims import VICTIMS


@VICTIMS.register("plugin_fc", version="1")
def plugin_fc(*, num_classes: int, in_channels: int, side: int, hidden: int = 16) -> nn.Module:
    """A two-layer FC victim from a plug-in."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


class Halve(Defense):
    def transform(self, update, *, generator):
        return tuple(t * 0.5 for t in update)


@DEFENSES.register("plugin_halve", version="1")
def plugin_halve() -> Defense:
    """Halves the update (a plug-in defense)."""
    return Halve()
'''

SUITE = '''
[suite]
name = "plugged"
seed = 3
images = 2
plugins = ["{module}"]

[dataset]
name = "photos"
side = 16

[[case]]
victim = {{ name = "plugin_fc", hidden = 8 }}
defense = ["none", "plugin_halve"]
protocol = {{ name = "fedsgd", batch_size = 1 }}
labels = "idlg"
[[case.attacks]]
name = "inverting_gradients"
iterations = 3
restarts = 1
'''


def test_plugin_victim_and_defense_run_under_the_process_executor(tmp_path, monkeypatch):
    from leakbench.running.runner import run_suite

    module = "leakbench_test_plugin_demo"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{module}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))  # spawned workers start with the driver's sys.path
    suite_file = tmp_path / "plugged.toml"
    suite_file.write_text(SUITE.format(module=module))
    suite = load_suite(suite_file)
    assert suite.plugins == (module,)
    assert {c.victim.name for c in suite.cells} == {"plugin_fc"}
    summary = run_suite(suite, out_dir=tmp_path / "out", device="cpu", executor="processes", workers=1, max_pack=1)
    # a worker that had not imported the plug-in itself would fail every cell (unknown victim): error rows
    assert summary.statuses == {"ok": 4}
    with sqlite3.connect(store_path(tmp_path / "out")) as conn:
        cells = conn.execute("SELECT victim, defense FROM cells ORDER BY defense").fetchall()
        executors = {r[0] for r in conn.execute("SELECT json_extract(execution_json, '$.executor') FROM results")}
    assert cells == [("plugin_fc", "none"), ("plugin_fc", "none"), ("plugin_fc", "plugin_halve"),
                     ("plugin_fc", "plugin_halve")]
    assert executors == {"processes"}


def test_a_plugin_that_does_not_import_is_a_suite_problem(tmp_path):
    suite_file = tmp_path / "bad.toml"
    suite_file.write_text(SUITE.format(module="no_such_module_for_leakbench"))
    with pytest.raises(SuiteError) as err:
        load_suite(suite_file)
    assert any(path == "suite.plugins[0]" and "not importable" in msg for path, msg in err.value.problems)
    suite_file.write_text(SUITE.format(module="x").replace('plugins = ["x"]', "plugins = 3"))
    with pytest.raises(SuiteError, match="suite.plugins: must be a list of module names"):
        load_suite(suite_file)


def test_entry_point_plugins_load_without_a_suite_key(tmp_path):
    """An installed distribution's ``leakbench.plugins`` entry point: its victim is listed and usable."""
    (tmp_path / "ep_leakbench_demo.py").write_text(PLUGIN.replace("plugin_fc", "ep_fc").replace("plugin_halve",
                                                                                                "ep_halve"))
    info = tmp_path / "ep_leakbench_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-leakbench-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[leakbench.plugins]\ndemo = ep_leakbench_demo\n")
    suite_file = tmp_path / "ep.toml"
    suite_file.write_text(SUITE.format(module="x").replace('plugins = ["x"]\n', "").replace("plugin_", "ep_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "leakbench", "list", "victim", "ep_*"], capture_output=True,
                            text=True, env=env, timeout=120, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "ep_fc (v1): A two-layer FC victim from a plug-in." in listed.stdout
    checked = subprocess.run([sys.executable, "-m", "leakbench", "check", str(suite_file)], capture_output=True,
                             text=True, env=env, timeout=120, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "4 cells" in checked.stdout
