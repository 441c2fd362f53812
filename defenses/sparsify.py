"""Top-k sparsification (Lin et al. 2018, as used against inversion by the GIAS paper).

Each parameter tensor of the update keeps its ``ceil(fraction · numel)`` entries of
largest magnitude (at least one) and zeroes the rest. Per layer rather than over the
whole update, so that small layers (biases, the classifier) are not wiped out by large
convolutions. The count is exact: ties at the threshold are broken by ``torch.topk``'s
index choice, never by keeping every tied entry.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from leakbench.core import Defense, ParamError
from leakbench.defenses.registry import DEFENSES


def kept_count(numel: int, fraction: float) -> int:
    """Entries a tensor of ``numel`` entries keeps: ceil(fraction · numel), between 1 and numel.

    A relative tolerance of 1e-9 keeps float error (0.1 · 30 = 3.0000000000000004) from
    adding an entry.
    """
    return max(1, min(numel, math.ceil(fraction * numel * (1 - 1e-9))))


def keep_largest(tensor: torch.Tensor, fraction: float) -> torch.Tensor:
    """``tensor`` with all but its ``kept_count`` largest-magnitude entries set to zero."""
    k = kept_count(tensor.numel(), fraction)
    if k == tensor.numel():
        return tensor.clone()
    flat = tensor.reshape(-1)
    index = torch.topk(flat.abs(), k, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[index] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(tensor.shape)


class TopK(Defense):
    """Keep the largest fraction of each layer's update entries by magnitude."""

    def __init__(self, *, fraction: float):
        self.fraction = fraction

    def transform(self, update, *, generator):
        return tuple(keep_largest(t, self.fraction) for t in update)

    def describe(self) -> dict[str, Any]:
        return {"topk_fraction": self.fraction}


@DEFENSES.register("topk", version="1")
def topk(*, fraction: float = 0.1) -> Defense:
    """Top-k sparsification: each layer keeps ceil(fraction · entries) entries of largest magnitude, the rest are zeroed."""
    if not 0 < fraction <= 1:
        raise ParamError("fraction", f"must be in (0, 1] (1 keeps everything), got {fraction}")
    return TopK(fraction=fraction)
