"""The baseline: no defense."""

from leakbench.core import Defense
from leakbench.defenses.registry import DEFENSES


class NoDefense(Defense):
    """The client sends its update as computed."""


@DEFENSES.register("none", version="1")
def none() -> Defense:
    """No defense: the update is sent as computed."""
    return NoDefense()
