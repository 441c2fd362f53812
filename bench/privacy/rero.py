"""Reconstruction robustness (ReRo): γ = 1 − f(κ) from a mechanism's trade-off function f.

Balle, Cherubin, Hayes 2022 ("Reconstructing Training Data with Informed Adversaries"),
tighter for DP-SGD in Hayes, Mahloujifar, Balle 2023 ("Bounding Training Data
Reconstruction in DP-SGD"): against a mechanism that is f-DP (f the trade-off between the
type I error α and the smallest type II error of any test), no reconstruction attacker, even
one who knows every other example, succeeds with probability above γ = 1 − f(κ), where κ
is the success probability of the best attacker that ignores the release (one fixed guess).

Two cases, both for the Gaussian mechanism on a sum of clipped per-example gradients
(sensitivity = the clipping norm, add/remove one example), noise multiplier σ, T steps:

- every step sees the example (q = 1): the composition is μ-GDP with μ = √T/σ, and
  f(α) = Φ(Φ⁻¹(1 − α) − μ), so γ = Φ(Φ⁻¹(κ) + μ) in closed form;
- Poisson subsampling at rate q < 1: f comes from the privacy loss distribution (PLD) of the
  subsampled Gaussian, built and composed by ``dp_accounting`` (pessimistic discretization,
  so the PLD dominates the true one) and turned into the trade-off curve by ``riskcal``.
  Subsampled mechanisms are not symmetric: the remove pair gives f, the add pair its
  inverse f⁻¹; γ takes the worse of the two, 1 − min(f(κ), f⁻¹(κ)).

No torch here: reports and the CLI call it on stored numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from scipy import stats

#: the PLD's discretization of the privacy loss (dp_accounting's ``value_discretization_interval``);
#: pessimistic rounding keeps the answer an upper bound at any step
PLD_GRID = 1e-3
NEIGHBOURING = "add/remove one example (sensitivity = the clipping norm)"


@dataclass(frozen=True)
class DPGuarantee:
    """What a defense declares: Gaussian noise ``noise_multiplier`` × ``clipping_norm`` on a sum of
    per-example gradients clipped to ``clipping_norm``, over ``steps`` steps that each sample an
    example with probability ``sample_rate`` (the training the defense states), for ``delta``."""

    noise_multiplier: float
    clipping_norm: float
    sample_rate: float
    steps: int
    delta: float
    mechanism: str = "subsampled_gaussian"
    neighbouring: str = NEIGHBOURING

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier: a DP guarantee needs noise > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate: a probability in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReroBound:
    """γ for one (σ, q, T) and κ, with how it was computed."""

    gamma: float
    kappa: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    method: str
    library: str
    mu: float | None = None  # the GDP parameter, when the closed form applies

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_kappa(kappa: float) -> float:
    kappa = float(kappa)
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa: a success probability in [0, 1], got {kappa}")
    return kappa


def gamma_gdp(kappa: float, mu: float) -> float:
    """γ = Φ(Φ⁻¹(κ) + μ) for a μ-GDP mechanism."""
    kappa = _check_kappa(kappa)
    if not mu >= 0:
        raise ValueError(f"mu: the GDP parameter is >= 0, got {mu}")
    if kappa in (0.0, 1.0):
        return kappa
    return float(stats.norm.cdf(stats.norm.ppf(kappa) + mu))


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=256)
def _subsampled_pld_rates(kappa: float, noise_multiplier: float, sample_rate: float, steps: int,
                          grid: float) -> tuple[float, float]:
    """(f(κ), f⁻¹(κ)) of ``steps`` Poisson-subsampled Gaussian steps, from dp_accounting's PLD and riskcal.

    riskcal's PLRVs of a two-sided PLD are the remove pair (P, Q) exactly: the privacy loss
    under P from the remove PMF, under Q from the add PMF reversed. Its direct trade-off
    function gives T(P, Q)(κ) = f(κ) and its inverse gives T(Q, P)(κ) = f⁻¹(κ) (the add pair).
    """
    import numpy as np
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from riskcal.analysis import _plrv
    from riskcal.analysis.conversions import pld_to_plrvs

    pld = pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sensitivity=1.0, sampling_prob=sample_rate,
        value_discretization_interval=grid, pessimistic_estimate=True, use_connect_dots=True,
    ).self_compose(steps)
    plrvs = pld_to_plrvs(pld)
    alpha = np.array([kappa])
    forward = float(_plrv._tradeoff_function(plrvs, alpha)[0])
    inverse = float(_plrv._inverse_tradeoff_function(plrvs, alpha)[0])
    return forward, inverse


def gamma_subsampled_gaussian(kappa: float, *, noise_multiplier: float, sample_rate: float, steps: int,
                              grid: float = PLD_GRID) -> ReroBound:
    """γ for ``steps`` Gaussian steps of noise multiplier σ, each sampling the example with probability q.

    q = 1: the closed form at μ = √T/σ. q < 1: the PLD (dp_accounting) and its trade-off
    curve (riskcal), the worse of the two directions.
    """
    kappa = _check_kappa(kappa)
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier: must be > 0 for a bound, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate: a probability in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps: a whole number >= 1, got {steps}")
    steps = int(steps)
    if sample_rate == 1.0:
        mu = math.sqrt(steps) / noise_multiplier
        return ReroBound(gamma=gamma_gdp(kappa, mu), kappa=kappa, noise_multiplier=noise_multiplier,
                         sample_rate=1.0, steps=steps, mu=mu,
                         method="closed form: mu-GDP, gamma = Phi(Phi^-1(kappa) + sqrt(T)/sigma)",
                         library=f"scipy {_version('scipy')}")
    if kappa in (0.0, 1.0):
        worse = 1.0 - kappa
    else:
        forward, inverse = _subsampled_pld_rates(kappa, float(noise_multiplier), float(sample_rate), steps,
                                                 float(grid))
        worse = min(forward, inverse)
    # Every trade-off function lies below 1 - alpha, so gamma >= kappa; clamp away rounding.
    gamma = min(1.0, max(kappa, 1.0 - worse))
    return ReroBound(gamma=gamma, kappa=kappa, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                     steps=steps,
                     method=(f"PLD of the Poisson-subsampled Gaussian (pessimistic, grid {grid:g}), trade-off curve "
                             "in both directions, the worse one"),
                     library=f"dp-accounting {_version('dp-accounting')}, riskcal {_version('riskcal')}")


def rero_bound(guarantee: DPGuarantee, kappa: float, *, steps: int | None = None,
               sample_rate: float | None = None) -> ReroBound:
    """γ of a declared guarantee; ``steps``/``sample_rate`` override the declared training
    (e.g. the updates the attack saw, every one containing the target: q = 1)."""
    return gamma_subsampled_gaussian(
        kappa, noise_multiplier=guarantee.noise_multiplier,
        sample_rate=guarantee.sample_rate if sample_rate is None else sample_rate,
        steps=guarantee.steps if steps is None else steps)


def clopper_pearson(successes: int, trials: int, *, confidence: float = 0.95, side: str = "upper") -> float:
    """One-sided Clopper–Pearson limit of a binomial proportion at ``confidence``."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: in (0, 1), got {confidence}")
    if side == "upper":
        return 1.0 if successes == trials else float(stats.beta.ppf(confidence, successes + 1, trials - successes))
    if side == "lower":
        return 0.0 if successes == 0 else float(stats.beta.ppf(1 - confidence, successes, trials - successes + 1))
    raise ValueError(f"side: 'upper' or 'lower', got {side!r}")


#: confidence of the one-sided test behind the ``rero_exceeded`` sanity flag
FLAG_CONFIDENCE = 0.95


def exceeds_ceiling(leaked: int, images: int, gamma: float, *, confidence: float = FLAG_CONFIDENCE) -> bool:
    """Whether ``leaked`` of ``images`` is more than the ceiling γ allows: the one-sided Clopper–Pearson
    lower limit of the measured rate lies above γ. A true guarantee makes this happen with probability
    at most 1 − ``confidence``; more often, the defense does not do what it declares (or a parameter is wrong)."""
    if images < 1 or math.isnan(gamma):
        return False
    return clopper_pearson(leaked, images, confidence=confidence, side="lower") > gamma
