"""Victim architectures, registered by name, and the trained-checkpoint cache (``training``).

The model a client trains. May import ``leakbench.core`` only (contract ``victims`` in
pyproject.toml). See victims/README.md to add one.
"""

from leakbench.victims.registry import CONTEXT_PARAMS, VICTIMS, build_victim
from leakbench.victims import resnet, small  # noqa: F401  (registration side effects)

__all__ = ["CONTEXT_PARAMS", "VICTIMS", "build_victim"]
