"""The engine's core: registry, frozen types, seeding. Imports nothing of the project."""

from leakbench.core.interfaces import Attack, AttackTimeout, Defense, LabelStrategy, ParamError, ThreatModelError
from leakbench.core.registry import Entry, Registry, RegistryError, close_matches, did_you_mean
from leakbench.core.seeding import derive_seed, generator, short_hash
from leakbench.core.types import Batch, BNMode, Normalization, Observation, Reconstruction, ThreatModel

__all__ = [
    "Attack",
    "AttackTimeout",
    "Defense",
    "LabelStrategy",
    "ParamError",
    "ThreatModelError",
    "Batch",
    "BNMode",
    "Entry",
    "Normalization",
    "Observation",
    "Reconstruction",
    "Registry",
    "RegistryError",
    "ThreatModel",
    "close_matches",
    "derive_seed",
    "did_you_mean",
    "generator",
    "short_hash",
]
