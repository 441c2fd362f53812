"""Defenses, registered by name. Each is a ``bench.core.Defense`` with three hooks (see README.md)."""

from defenses.registry import DEFENSES
from defenses import basic, dp, label_disguise, noise, quantize, sparsify  # noqa: F401  (registration)

__all__ = ["DEFENSES"]
