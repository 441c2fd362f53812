"""Registries of attacks and label strategies."""

from leakbench.core import Attack, LabelStrategy, Registry

ATTACKS: Registry[Attack] = Registry("attack")
LABELS: Registry[LabelStrategy] = Registry("label strategy")
