"""Defenses, registered by name. Each is a ``leakbench.core.Defense`` with three hooks (see README.md).

What a client does to its update before sending it. May import ``leakbench.core`` only
(contract ``defenses`` in pyproject.toml).
"""

from leakbench.defenses.registry import DEFENSES
from leakbench.defenses import basic, dp, label_disguise, noise, quantize, sparsify  # noqa: F401  (registration)

__all__ = ["DEFENSES"]
