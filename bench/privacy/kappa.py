"""κ: the success probability of the best reconstruction that ignores the release.

ReRo's baseline (``leakbench.privacy.rero``) is κ = sup over fixed guesses z₀ of
Pr_{Z~π}[success(z₀, Z)], for the suite's success criterion (its leak threshold: PSNR above
τ, SSIM above s, or LPIPS below d) and a prior π. κ is *estimated*: on a public prior (the
data set's public split, or a prior the suite names; never the attacked images), each
candidate guess is scored against every prior image, and κ̂ is the largest share of prior
images one guess passes. Candidates: the prior's mean image, each class's mean image, and
each prior image (scored against the others only: an image always matches itself). A
one-sided Clopper–Pearson upper limit at a stated confidence bounds the best candidate's
rate; γ is computed at that limit, so the bound holds with that confidence for these
candidates. A guess outside the candidates could do better: κ̂ is an estimate, and reports
say so.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from leakbench.privacy.rero import clopper_pearson

log = logging.getLogger(__name__)

DEFAULT_CONFIDENCE = 0.95
METHOD = ("largest share of the prior's images that one guess passes the leak threshold against; guesses: the "
          "prior's mean image, its class means, each prior image (leave-one-out); one-sided Clopper-Pearson upper "
          "limit")


@dataclass(frozen=True)
class KappaEstimate:
    kappa: float          # the best candidate's share
    kappa_upper: float    # its one-sided Clopper-Pearson upper limit
    successes: int
    trials: int
    confidence: float
    best_guess: str
    criterion: str
    prior: str
    sample_size: int
    method: str = METHOD

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _passes(metric: str, value: float, scores: np.ndarray) -> np.ndarray:
    return scores < value if metric == "lpips" else scores > value


def _psnr_matrix(guesses: torch.Tensor, prior: torch.Tensor) -> np.ndarray:
    """PSNR (dB, data range 1, capped like the scored rows) of every guess (rows) against every prior image."""
    from leakbench.metrics import image as image_metrics

    mse = image_metrics.pairwise_mse(prior, guesses)  # rows: the references (here the guesses)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=image_metrics.PSNR_CAP_DB).numpy()


def _scores(metric: str, guess: torch.Tensor, prior: torch.Tensor, lpips: Any) -> np.ndarray:
    from leakbench.metrics import image as image_metrics

    guesses = guess.unsqueeze(0).expand_as(prior).contiguous()
    if metric == "ssim":
        return image_metrics.ssim(guesses, prior).numpy()
    if metric == "lpips":
        scores = lpips(guesses, prior)
        if scores is None:
            raise RuntimeError(f"LPIPS is unavailable ({lpips.reason}); kappa for an LPIPS threshold needs it")
        return scores.detach().double().cpu().numpy()
    raise ValueError(f"unknown leak metric {metric!r}; expected psnr_db, ssim or lpips")


def estimate_kappa(images: torch.Tensor, labels: torch.Tensor | None, *, metric: str, value: float,
                   confidence: float = DEFAULT_CONFIDENCE, prior: str = "prior", lpips: Any = None) -> KappaEstimate:
    """κ̂ and its upper limit for the criterion ``metric`` vs ``value`` on prior ``images`` (N, C, H, W) in [0, 1]."""
    images = images.detach().float().cpu()
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"the prior {prior} holds {n} image(s); kappa needs at least 2")
    if metric == "lpips" and lpips is None:
        from leakbench.metrics import get_lpips

        lpips = get_lpips("cpu")
    candidates: list[tuple[str, torch.Tensor, np.ndarray]] = [("mean image", images.mean(0), np.ones(n, bool))]
    if labels is not None:
        labels = torch.as_tensor(labels).cpu()
        for label in sorted({int(v) for v in labels}):
            candidates.append((f"mean of class {label}", images[labels == label].mean(0), np.ones(n, bool)))
    for i in range(n):
        others = np.ones(n, bool)
        others[i] = False
        candidates.append((f"prior image {i}", images[i], others))
    if metric == "psnr_db":
        matrix = _psnr_matrix(torch.stack([guess for _, guess, _ in candidates]), images)
        scores = lambda index, guess: matrix[index]  # noqa: E731
    else:
        scores = lambda index, guess: _scores(metric, guess, images, lpips)  # noqa: E731
    best = ("", -1.0, 0, 0)
    for index, (name, guess, scored) in enumerate(candidates):
        passes = _passes(metric, value, scores(index, guess))[scored]
        rate = float(passes.mean())
        if rate > best[1]:
            best = (name, rate, int(passes.sum()), int(scored.sum()))
    name, rate, successes, trials = best
    op = "<" if metric == "lpips" else ">"
    return KappaEstimate(kappa=rate, kappa_upper=clopper_pearson(successes, trials, confidence=confidence),
                         successes=successes, trials=trials, confidence=confidence, best_guess=name,
                         criterion=f"{metric} {op} {value:g}", prior=prior, sample_size=n)


def default_prior(dataset_name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The public split of the attacked data set, or None when there is none to take."""
    if dataset_name == "photos":
        return {**params, "split": "public"} if params.get("split", "attack") == "attack" else None
    if dataset_name == "mnist5k":
        return {**params, "split": "train"} if params.get("split", "attack") == "attack" else None
    if dataset_name in ("cifar10", "cifar100", "mnist"):
        return {**params, "split": "train"} if params.get("split", "test") == "test" else None
    return None


@functools.lru_cache(maxsize=4)
def _prior_images(name: str, params_json: str, max_images: int):
    import json

    from leakbench.data import DATASETS  # plug-in data sets register here too

    dataset = DATASETS.build(name, **json.loads(params_json))
    return dataset.batch(list(range(min(len(dataset), max_images))))


@functools.lru_cache(maxsize=16)
def _kappa_cached(name: str, params_json: str, metric: str, value: float, confidence: float,
                  max_images: int) -> KappaEstimate:
    import json

    params = json.loads(params_json)
    batch = _prior_images(name, params_json, max_images)
    count = batch.images.shape[0]
    described = f"{name}({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})"
    log.info("estimating kappa for %s %s on %d images of %s", metric, value, count, described)
    return estimate_kappa(batch.images, batch.labels, metric=metric, value=value, confidence=confidence,
                          prior=described)


def kappa_for(prior_name: str, prior_params: dict[str, Any], *, metric: str, value: float,
              confidence: float = DEFAULT_CONFIDENCE, max_images: int = 512) -> KappaEstimate:
    """κ̂ on the first ``max_images`` images of a registered data set (cached per process)."""
    import json

    return _kappa_cached(prior_name, json.dumps(prior_params, sort_keys=True), metric, float(value),
                         float(confidence), int(max_images))
