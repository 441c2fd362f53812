"""Attacks and label strategies, registered by name."""

from bench.attacks.registry import ATTACKS, LABELS
from bench.attacks import analytic, inverting_gradients, labels  # noqa: F401  (registration)

__all__ = ["ATTACKS", "LABELS"]
