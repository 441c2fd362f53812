"""The suite language's types: a validated suite, its cells, and the specs of their components.

Frozen dataclasses: once a TOML suite is validated (``leakbench.suite.loading``), the rest of
leakbench sees these, never raw dicts.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from leakbench.core import ThreatModel, short_hash
from leakbench.core.frozen import thaw, thaw_params
from leakbench.core.vocabulary import Threshold

if typing.TYPE_CHECKING:
    from leakbench.privacy.cells import ReroSpec
    from leakbench.suite.utility_table import UtilitySpec
    from leakbench.victims.training import Recipe


class SuiteError(ValueError):
    """A suite that cannot run; ``problems`` lists every (path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component with its parameters as given in the suite (defaults filled)."""

    name: str
    version: str
    params: tuple[tuple[str, Any], ...] = ()
    given: tuple[str, ...] = ()  # the parameters the suite set (the rest are defaults)

    def kwargs(self) -> dict[str, Any]:
        return thaw_params(self.params)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": self.kwargs()}

    def label(self) -> str:
        """Short human-readable form naming the parameters the suite set: ``convnet(width=32)``."""
        shown = ", ".join(f"{k}={thaw(v)}" for k, v in self.params if k in self.given)
        return f"{self.name}({shown})" if shown else self.name


@dataclass(frozen=True)
class AttackSpec(ComponentSpec):
    labels: ComponentSpec = field(default_factory=lambda: ComponentSpec("none", "0"))
    timeout_s: float | None = None
    battery: str | None = None  # the battery this attack came from (bench/attacks/battery.py), if any

    def identity(self) -> dict[str, Any]:
        identity = {**super().identity(), "labels": self.labels.identity(), "timeout_s": self.timeout_s}
        if self.battery is not None:  # absent for listed attacks, so their keys are what they were
            identity["battery"] = self.battery
        return identity

    @property
    def key(self) -> str:
        return short_hash(self.identity())


@dataclass(frozen=True)
class VictimSpec(ComponentSpec):
    """A victim and its training state: ``"init"`` (seeded initialization) or ``"trained"`` under ``recipe``.

    An untrained victim's identity is its component's, so cell keys and seeds of suites
    without training states are what they were; a trained one adds the state and the
    whole recipe, so another recipe (fewer epochs under a smoke budget) is another victim.
    """

    state: str = "init"
    recipe: Recipe | None = None

    def identity(self) -> dict[str, Any]:
        if self.recipe is None:
            return super().identity()
        return {**super().identity(), "state": self.state, "recipe": self.recipe.identity()}

    def label(self) -> str:
        base = super().label()
        return base if self.recipe is None else f"{base} trained[{self.recipe.label()}]"


#: The suite's leak threshold (one definition, shared with the reports: leakbench.core.vocabulary).
LeakThreshold = Threshold


@dataclass(frozen=True)
class Cell:
    """One client update to attack: (victim, defense, protocol, batch of images, trial)."""

    suite_seed: int
    case_index: int
    dataset: ComponentSpec
    victim: ComponentSpec
    defense: ComponentSpec
    protocol: ComponentSpec
    threat: ThreatModel
    batch_index: int
    image_indices: tuple[int, ...]
    trial: int
    attacks: tuple[AttackSpec, ...]
    # Not part of the identity: every case the cell belongs to (cases that share a cell share
    # its rows; empty for a cell added only as a positive control), whether it is a positive
    # control (of itself or of other cells), and the keys of its own control's cells and attacks.
    case_indices: tuple[int, ...] = ()
    control: bool = False
    control_cells: tuple[str, ...] = ()
    control_attacks: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        return {
            "seed": self.suite_seed,
            "dataset": self.dataset.identity(),
            "victim": self.victim.identity(),
            "defense": self.defense.identity(),
            "protocol": self.protocol.identity(),
            "threat": {"labels": self.threat.labels, "bn_stats": self.threat.bn_stats},
            "images": list(self.image_indices),
            "trial": self.trial,
        }

    @property
    def key(self) -> str:
        return short_hash(self.identity())

    @property
    def victim_seed_parts(self) -> tuple[Any, ...]:
        """The server's weights depend on the victim and trial only, so every defense and batch faces the same model."""
        return (self.suite_seed, "victim", self.victim.identity(), self.trial)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    seed: int
    images: int
    trials: int
    threat: ThreatModel
    leak_threshold: LeakThreshold
    dataset: ComponentSpec
    cells: tuple[Cell, ...]
    source_text: str
    hash: str
    budget: str = "full"
    # The [utility] table: a short FL training per (victim, defense, protocol) whose test
    # accuracy goes into the cells' defense info (leakbench.fl.accuracy); None without the table.
    utility: UtilitySpec | None = None
    # [suite] plugins: modules imported before validation and in every worker (leakbench.plugins)
    plugins: tuple[str, ...] = ()
    # The [rero] table: the prior kappa is estimated on (leakbench.privacy.cells); None: the default prior.
    rero: ReroSpec | None = None

    def work_items(self) -> int:
        return sum(len(c.attacks) for c in self.cells)

    def case_cells(self) -> tuple[Cell, ...]:
        """The cells the suite's cases name (without the positive controls leakbench added)."""
        return tuple(c for c in self.cells if c.case_indices)

    def control_only_cells(self) -> int:
        """Cells that no case names: added as positive controls of defended or harder cells."""
        return sum(1 for c in self.cells if not c.case_indices)


# --------------------------------------------------------------------------- helpers
