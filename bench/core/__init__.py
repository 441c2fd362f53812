"""The engine's core: registry, frozen types, seeding, files, freeze/thaw of parameters (``frozen``),
the shared vocabulary (``vocabulary``: metrics, statuses, thresholds), the machine's memory
(``memory``) and the optimization step's speed-ups (``acceleration``).

Imports nothing of the project (contract ``core`` in pyproject.toml). The names below load
on first use, so ``leakbench.core.vocabulary`` (plain Python) can be imported by the store and
the reports without loading torch, which the types and interfaces need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the core module that defines it
_EXPORTS = {
    "Acceleration": "acceleration", "NO_ACCELERATION": "acceleration",
    "Attack": "interfaces", "AttackTimeout": "interfaces", "Defense": "interfaces", "LabelStrategy": "interfaces",
    "ParamError": "interfaces", "ThreatModelError": "interfaces",
    "Entry": "registry", "Registry": "registry", "RegistryError": "registry", "close_matches": "registry",
    "did_you_mean": "registry",
    "derive_seed": "seeding", "generator": "seeding", "short_hash": "seeding",
    "Batch": "types", "BNMode": "types", "Normalization": "types", "Observation": "types",
    "Reconstruction": "types", "ThreatModel": "types",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from leakbench.core.acceleration import NO_ACCELERATION, Acceleration
    from leakbench.core.interfaces import Attack, AttackTimeout, Defense, LabelStrategy, ParamError, ThreatModelError
    from leakbench.core.registry import Entry, Registry, RegistryError, close_matches, did_you_mean
    from leakbench.core.seeding import derive_seed, generator, short_hash
    from leakbench.core.types import Batch, BNMode, Normalization, Observation, Reconstruction, ThreatModel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'leakbench.core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"leakbench.core.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
