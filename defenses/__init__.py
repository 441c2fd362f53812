"""Defenses, registered by name. Each is a ``bench.core.Defense`` with three hooks."""

from defenses.registry import DEFENSES
from defenses import basic  # noqa: F401  (registration)

__all__ = ["DEFENSES"]
