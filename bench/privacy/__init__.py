"""Provable ceilings on reconstruction success for defenses with a differential-privacy guarantee.

``rero`` (no torch): reconstruction robustness (Balle, Cherubin, Hayes 2022; Hayes,
Mahloujifar, Balle 2023). A mechanism whose trade-off function is f lets no attacker,
however informed, reconstruct a target with probability above γ = 1 − f(κ), where κ is
the success probability of the best guess that ignores the release. ``kappa`` (torch, lazy)
estimates κ for the suite's leak criterion on a public prior.
"""

from leakbench.privacy.rero import (
    DPGuarantee,
    ReroBound,
    clopper_pearson,
    gamma_gdp,
    gamma_subsampled_gaussian,
    rero_bound,
)

__all__ = ["DPGuarantee", "ReroBound", "clopper_pearson", "gamma_gdp", "gamma_subsampled_gaussian", "rero_bound"]
