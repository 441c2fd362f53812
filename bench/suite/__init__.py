"""The suite language: TOML suites, validated strictly before any compute, then expanded
deterministically into cells.

- ``leakbench.suite.types``: what a validated suite is (``Suite``, ``Cell`` and the specs of
  their components), frozen dataclasses.
- ``leakbench.suite.checker``: the checker that walks raw tables and collects every problem
  with its TOML path and close matches; a component's table becomes a spec of its registry.
- ``leakbench.suite.loading``: ``load_suite`` / ``parse_suite``: the suite's tables, its cases
  and batteries, the budgets, and the expansion into cells.
- ``leakbench.suite.controls``: the positive control of every cell, and cells shared by cases.
- ``leakbench.suite.utility_table``: the ``[utility]`` table (the training itself is
  ``leakbench.fl.accuracy``).

May import: ``leakbench.core`` and, to check names and build probes, the registries the
loader is handed; the attacks' battery table and the victims' training recipe by name.
"""

from leakbench.suite.controls import (CONTROL_DEFENSE, CONTROL_PROTOCOL, NO_CONTROL_PROTOCOLS, control_protocol,
                                      is_control_form, merge_shared_cells, with_control)
from leakbench.suite.loading import (BUDGETS, DEFAULT_MAX_CELLS, SMOKE_CAPS, SMOKE_IMAGES, dumps, load_suite,
                                     parse_suite, suite_summary)
from leakbench.suite.types import AttackSpec, Cell, ComponentSpec, LeakThreshold, Suite, SuiteError, VictimSpec

__all__ = [
    "AttackSpec", "BUDGETS", "CONTROL_DEFENSE", "CONTROL_PROTOCOL", "Cell", "ComponentSpec", "DEFAULT_MAX_CELLS",
    "LeakThreshold", "NO_CONTROL_PROTOCOLS", "SMOKE_CAPS", "SMOKE_IMAGES", "Suite", "SuiteError", "VictimSpec",
    "control_protocol", "dumps", "is_control_form", "load_suite", "merge_shared_cells", "parse_suite",
    "suite_summary", "with_control",
]
