"""The victim registry and the one way to build a victim with seeded weights."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from leakbench.core import Registry

VICTIMS: Registry[nn.Module] = Registry("victim")

# Parameters leakbench fills from the data set; a suite may not set them.
CONTEXT_PARAMS = ("num_classes", "in_channels", "side")


def build_victim(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    num_classes: int,
    in_channels: int,
    side: int,
    seed: int,
) -> nn.Module:
    """Build a registered victim with weights initialized from ``seed``.

    PyTorch's initializers draw from the global generator; the draw is fenced with
    ``fork_rng`` so the caller's global state is untouched and the weights depend on
    ``seed`` alone.
    """
    entry = VICTIMS.get(name)
    params = dict(params or {})
    problems = entry.check_params(params, reserved=CONTEXT_PARAMS)
    if problems:
        raise ValueError(f"victim {name!r}: " + "; ".join(problems))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.factory(num_classes=num_classes, in_channels=in_channels, side=side, **params)
    return model
