"""Uniform quantization of the sent update to k bits (communication-side compression).

Per tensor, symmetric: with L = 2^(k-1) - 1 levels on each side and scale s = max|u| / L,
each entry becomes s · q with q an integer in [-L, L] (2L + 1 ≤ 2^k codes). Rounding is
stochastic by default (QSGD-style: up with probability equal to the remainder), which is
unbiased and draws from the generator; ``stochastic = false`` rounds to nearest.
"""

from __future__ import annotations

from typing import Any

import torch

from leakbench.core import Defense, ParamError
from leakbench.defenses.common import uniform_like
from leakbench.defenses.registry import DEFENSES


class Quantize(Defense):
    def __init__(self, *, bits: int, stochastic: bool):
        self.bits = bits
        self.stochastic = stochastic
        self.randomized = stochastic
        self.levels = 2 ** (bits - 1) - 1

    def _quantize(self, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        peak = tensor.abs().max()
        if peak == 0:
            return tensor.clone()
        scale = peak / self.levels
        x = tensor / scale
        if self.stochastic:
            low = torch.floor(x)
            q = low + (uniform_like(x, generator=generator) < (x - low)).to(x.dtype)
        else:
            q = torch.round(x)
        return q.clamp(-self.levels, self.levels) * scale

    def transform(self, update, *, generator):
        return tuple(self._quantize(t, generator) for t in update)

    def describe(self) -> dict[str, Any]:
        return {"quantize_bits": self.bits, "quantize_stochastic": self.stochastic}


@DEFENSES.register("quantize", version="1")
def quantize(*, bits: int = 8, stochastic: bool = True) -> Defense:
    """Each update tensor quantized to ``bits`` bits (symmetric, per-tensor scale); stochastic (unbiased) rounding by default."""
    if not 2 <= bits <= 16:
        raise ParamError("bits", f"must be between 2 and 16 (1-bit sign compression is signSGD, another method), got {bits}")
    return Quantize(bits=bits, stochastic=stochastic)
