"""The defense registry."""

from leakbench.core import Defense, Registry

DEFENSES: Registry[Defense] = Registry("defense")
