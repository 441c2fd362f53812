"""Gaussian noise on the sent update, alone (the noise defense of the DLG and GIAS papers).

Unlike DP-SGD there is no clipping, so σ is absolute (in the update's own units) and
gives no differential-privacy guarantee; it is here to compare with ``dp_sgd``.
"""

from __future__ import annotations

from typing import Any

from leakbench.core import Defense, ParamError
from leakbench.defenses.common import gaussian_like
from leakbench.defenses.registry import DEFENSES


class GaussianNoise(Defense):
    """Adds N(0, σ²) to every entry of the update the client sends."""

    no_dp_reason = ("no clipping: the noise is not calibrated to a sensitivity, so it gives no differential-privacy "
                    "guarantee (and no ReRo bound)")

    def __init__(self, *, sigma: float):
        self.sigma = sigma
        self.randomized = sigma > 0

    def transform(self, update, *, generator):
        if self.sigma == 0:
            return update
        return tuple(t + gaussian_like(t, self.sigma, generator=generator) for t in update)

    def describe(self) -> dict[str, Any]:
        return {"noise_sigma": self.sigma}


@DEFENSES.register("gaussian_noise", version="1")
def gaussian_noise(*, sigma: float = 1e-3) -> Defense:
    """Gaussian noise of standard deviation ``sigma`` on every entry of the sent update (no clipping, no DP guarantee)."""
    if not sigma >= 0:
        raise ParamError("sigma", f"a standard deviation is >= 0, got {sigma}")
    return GaussianNoise(sigma=sigma)
