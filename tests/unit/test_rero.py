"""The ReRo bound (leakbench.privacy): closed form, monotonicity, a Monte Carlo check of the library path, κ."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from leakbench.privacy import clopper_pearson, gamma_gdp, gamma_subsampled_gaussian
from leakbench.privacy.kappa import estimate_kappa
from leakbench.privacy.rero import _subsampled_pld_rates

N = NormalDist()


@pytest.mark.parametrize("kappa, sigma, steps", [(0.125, 1.0, 1), (0.125, 2.0, 4), (0.01, 0.5, 3), (0.5, 4.0, 100)])
def test_q1_is_the_closed_form_and_the_library_agrees(kappa, sigma, steps):
    expected = N.cdf(N.inv_cdf(kappa) + math.sqrt(steps) / sigma)
    bound = gamma_subsampled_gaussian(kappa, noise_multiplier=sigma, sample_rate=1.0, steps=steps)
    assert abs(bound.gamma - expected) < 1e-6
    assert bound.mu == pytest.approx(math.sqrt(steps) / sigma)
    # dp_accounting's PLD and riskcal's trade-off curve at q = 1 land on it too, up to the
    # discretization (grid 1e-4)
    forward, inverse = _subsampled_pld_rates(kappa, sigma, 1.0, steps, 1e-4)
    assert abs(1 - min(forward, inverse) - expected) < 1e-5


def test_sanity_reference_subsampled():
    """κ = 0.125, q = 0.01, σ = 1, T = 1000: an independent estimate gave γ ≈ 0.23."""
    bound = gamma_subsampled_gaussian(0.125, noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    assert 0.22 < bound.gamma < 0.24
    assert "dp-accounting" in bound.library and "riskcal" in bound.library


@pytest.mark.parametrize("q, steps", [(1.0, 1), (1.0, 10), (0.01, 1000), (0.2, 5)])
def test_gamma_at_least_kappa_and_falls_with_sigma(q, steps):
    for kappa in (0.0, 1e-4, 0.05, 0.125, 0.5, 0.9, 1.0):
        gammas = [gamma_subsampled_gaussian(kappa, noise_multiplier=s, sample_rate=q, steps=steps).gamma
                  for s in (0.5, 1.0, 2.0, 4.0, 8.0)]
        assert all(kappa - 1e-12 <= g <= 1.0 for g in gammas), (kappa, gammas)
        assert all(a >= b - 1e-12 for a, b in zip(gammas, gammas[1:])), gammas
        if 0 < kappa < 1:
            assert gammas[0] > gammas[-1]  # strictly lower at the strongest noise


def _monte_carlo_gamma(kappa: float, sigma: float, q: float, steps: int, n: int, seed: int) -> float:
    """The best test's power at level κ between T steps of (1 - q) N(0, σ²) + q N(1, σ²) and N(0, σ²)^T,
    both ways round, from the exact per-step likelihood ratio on sampled outputs."""
    rng = np.random.default_rng(seed)

    def llr(x):  # log [((1 - q) N(0) + q N(1)) / N(0)], summed over steps
        return np.log1p(q * np.expm1((2 * x - 1) / (2 * sigma ** 2))).sum(axis=1)

    without = llr(rng.normal(0.0, sigma, size=(n, steps)))
    present = rng.binomial(1, q, size=(n, steps)).astype(float)
    with_target = llr(rng.normal(present, sigma))
    # level κ under "without", power under "with"; and the other way round
    power_a = float((with_target > np.quantile(without, 1 - kappa)).mean())
    power_b = float((without < np.quantile(with_target, kappa)).mean())
    return max(power_a, power_b)


def test_subsampled_gamma_agrees_with_monte_carlo():
    kappa, sigma, q, steps, n = 0.1, 1.0, 0.2, 20, 200_000
    library = gamma_subsampled_gaussian(kappa, noise_multiplier=sigma, sample_rate=q, steps=steps).gamma
    estimate = _monte_carlo_gamma(kappa, sigma, q, steps, n, seed=7)
    # binomial error of the power, plus the error of the estimated threshold (of the same order)
    tolerance = 5 * math.sqrt(estimate * (1 - estimate) / n) + 5 * math.sqrt(kappa * (1 - kappa) / n)
    assert abs(library - estimate) < tolerance, (library, estimate, tolerance)
    assert library > kappa + 0.05  # the case is not trivial


def test_gdp_edges_and_errors():
    assert gamma_gdp(0.0, 3.0) == 0.0 and gamma_gdp(1.0, 3.0) == 1.0
    assert gamma_gdp(0.2, 0.0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="kappa"):
        gamma_gdp(1.5, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        gamma_subsampled_gaussian(0.1, noise_multiplier=0.0, sample_rate=1.0, steps=1)


def test_clopper_pearson():
    n = 40
    assert clopper_pearson(0, n, confidence=0.95) == pytest.approx(1 - 0.05 ** (1 / n))
    assert clopper_pearson(n, n) == 1.0 and clopper_pearson(0, n, side="lower") == 0.0
    assert clopper_pearson(n, n, side="lower", confidence=0.95) == pytest.approx(0.05 ** (1 / n))
    assert clopper_pearson(5, n, side="lower") < 5 / n < clopper_pearson(5, n)


def test_kappa_of_one_image_repeated_is_one():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    estimate = estimate_kappa(image.expand(12, -1, -1, -1), torch.zeros(12, dtype=torch.long),
                              metric="psnr_db", value=20.0)
    assert estimate.kappa == 1.0 and estimate.kappa_upper == 1.0
    assert estimate.sample_size == 12 and "Clopper-Pearson" in estimate.method


def test_kappa_of_distinct_noise_images_is_small_and_its_limit_above():
    images = torch.rand(30, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    estimate = estimate_kappa(images, torch.arange(30) % 3, metric="psnr_db", value=20.0, confidence=0.9)
    assert estimate.kappa == 0.0  # independent uniform noise: no guess comes within 20 dB
    assert estimate.kappa_upper == pytest.approx(1 - 0.1 ** (1 / estimate.trials))
    # a loose criterion: the mean image is the best guess
    loose = estimate_kappa(images, None, metric="psnr_db", value=7.0)
    assert loose.best_guess == "mean image" and loose.kappa > 0.5


SUITE = """
[suite]
name = "rero_table"
images = 2
[dataset]
name = "photos"
side = 16
{rero}
[[case]]
victim = "fc"
defense = {{ name = "dp_sgd", noise_multiplier = 1.0 }}
protocol = {{ name = "fedsgd", batch_size = 1 }}
labels = "idlg"
[[case.attacks]]
name = "analytic_fc"
"""


def test_rero_table_names_the_prior_and_is_checked():
    from leakbench.suite import SuiteError, parse_suite

    plain = parse_suite(SUITE.format(rero=""))
    named = parse_suite(SUITE.format(rero='[rero]\nprior = { name = "photos", split = "public" }\nconfidence = 0.9'))
    assert plain.rero is None
    assert named.rero.prior == "photos" and named.rero.prior_params == {"split": "public", "side": 16}
    assert named.rero.confidence == 0.9 and named.hash != plain.hash
    with pytest.raises(SuiteError) as err:
        parse_suite(SUITE.format(rero='[rero]\nprior = { name = "photos", split = "attack" }\nconfidence = 2.0'))
    text = str(err.value)
    assert "rero.confidence" in text and "rero.prior" in text and "attacked images" in text
