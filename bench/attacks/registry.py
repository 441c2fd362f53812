"""Registries of attacks and label strategies."""

from bench.core import Attack, LabelStrategy, Registry

ATTACKS: Registry[Attack] = Registry("attack")
LABELS: Registry[LabelStrategy] = Registry("label strategy")
