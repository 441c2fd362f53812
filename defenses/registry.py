"""The defense registry."""

from bench.core import Defense, Registry

DEFENSES: Registry[Defense] = Registry("defense")
