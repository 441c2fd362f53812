"""Attacks and label strategies, registered by name."""

from bench.attacks.registry import ATTACKS, LABELS
from bench.attacks import analytic, dlg, geng, gradinversion, inverting_gradients, label_only, labels  # noqa: F401  (registration)
from bench.attacks import gias, giml  # noqa: F401,E402  (registration: generative-prior attacks)

__all__ = ["ATTACKS", "LABELS"]
