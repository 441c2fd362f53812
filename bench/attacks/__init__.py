"""Attacks and label strategies, registered by name: what turns an observed update back into images and labels.

May import: ``leakbench.core`` and ``leakbench.generators`` (the generative priors of GIAS and
GIML), nothing else of the project (contract ``attacks`` in pyproject.toml). See README.md here.
"""

from leakbench.attacks.registry import ATTACKS, LABELS
from leakbench.attacks import analytic, dlg, geng, gradinversion, inverting_gradients, label_only, labels  # noqa: F401  (registration)
from leakbench.attacks import gias, giml  # noqa: F401,E402  (registration: generative-prior attacks)

__all__ = ["ATTACKS", "LABELS"]
