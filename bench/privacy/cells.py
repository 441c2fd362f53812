"""The ReRo numbers of one cell: κ for the suite's criterion, γ for what the server saw and for the declared training.

A suite may name the prior κ is estimated on in a ``[rero]`` table::

    [rero]
    prior = { name = "photos", split = "public" }   # default: the attacked data set's public split
    confidence = 0.95                               # of the one-sided Clopper-Pearson limit on kappa
    max_images = 512                                # the first images of the prior

Without the table the attacked data set's public split is the prior (photos: ``public``;
cifar10, cifar100, mnist: ``train``); where there is none, κ and γ stay empty and the row says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from leakbench.privacy.kappa import DEFAULT_CONFIDENCE, default_prior, kappa_for
from leakbench.privacy.rero import NEIGHBOURING, rero_bound

log = logging.getLogger(__name__)

RERO_KEYS = ("prior", "confidence", "max_images")
#: the cells columns this module fills (bench/store.py)
RERO_COLUMNS = ("rero_kappa", "rero_kappa_upper", "rero_gamma_observed", "rero_gamma_training", "rero_json")


@dataclass(frozen=True)
class ReroSpec:
    prior: str | None = None  # None: the attacked data set's public split
    prior_params: dict[str, Any] = field(default_factory=dict)
    confidence: float = DEFAULT_CONFIDENCE
    max_images: int = 512

    def identity(self) -> dict[str, Any]:
        return {"prior": self.prior, "prior_params": self.prior_params, "confidence": self.confidence,
                "max_images": self.max_images}


def parse_rero(checker, raw: Any, path: str, reg: Mapping, *, dataset, dataset_spec) -> ReroSpec | None:
    """Validate a suite's ``[rero]`` table (``leakbench.suite`` calls this; ``checker`` collects the problems)."""
    _join = checker.join  # leakbench.suite's checker: no import of leakbench.suite from here (no cycle)
    before = len(checker.problems)
    t = checker.table(raw, path, allowed=RERO_KEYS)
    confidence = checker.value(t, "confidence", path, float, DEFAULT_CONFIDENCE, check=lambda v: 0 < v < 1,
                               hint="a confidence level in (0, 1), e.g. 0.95")
    max_images = checker.value(t, "max_images", path, int, 512, check=lambda v: v >= 2,
                               hint="kappa needs at least 2 prior images")
    prior = params = None
    if "prior" in t:
        prior_spec, params, _ = checker.training_set(
            t["prior"], _join(path, "prior"), reg, dataset=dataset, dataset_spec=dataset_spec,
            purpose="kappa is the success of a guess at the attacked images from a prior of the same kind",
            same_images="kappa would be estimated on the attacked images themselves")
        prior = None if prior_spec is None else prior_spec.name
    if len(checker.problems) > before:
        return None
    return ReroSpec(prior=prior, prior_params=dict(params or {}), confidence=float(confidence),
                    max_images=int(max_images))


def _prior(spec: ReroSpec | None, dataset_name: str, dataset_params: dict[str, Any]) -> tuple[str, dict] | None:
    if spec is not None and spec.prior is not None:
        return spec.prior, spec.prior_params
    params = default_prior(dataset_name, dataset_params)
    return None if params is None else (dataset_name, params)


def cell_rero(defense, *, local_steps: int, threshold, dataset_name: str, dataset_params: dict[str, Any],
              spec: ReroSpec | None = None) -> dict[str, Any]:
    """The cell's ReRo numbers (``CellRow``'s ``rero_*`` fields; ``rero``: their parameters, prior and method). ``local_steps``: the DP steps inside the observed update
    (FedSGD 1, FedAvg its local steps); each sees the target, so q = 1 for what the server saw."""
    guarantee = defense.dp_guarantee()
    if guarantee is None:
        return {"rero": {"dp": False, "note": defense.no_dp_reason}}
    info: dict[str, Any] = {"dp": True, "guarantee": guarantee.as_dict(), "neighbouring": NEIGHBOURING,
                            "bound": "ReRo: gamma = 1 - f(kappa) (Balle, Cherubin, Hayes 2022; Hayes, Mahloujifar, "
                                     "Balle 2023)"}
    prior = _prior(spec, dataset_name, dataset_params)
    if prior is None:
        info["note"] = (f"no public prior for {dataset_name}: name one in the suite's [rero] table "
                        "(prior = { name = ..., split = ... }) to get kappa and gamma")
        return {"rero": info}
    confidence = spec.confidence if spec is not None else DEFAULT_CONFIDENCE
    max_images = spec.max_images if spec is not None else 512
    try:
        kappa = kappa_for(prior[0], prior[1], metric=threshold.metric, value=threshold.value,
                          confidence=confidence, max_images=max_images)
        observed = rero_bound(guarantee, kappa.kappa_upper, steps=local_steps, sample_rate=1.0)
        training = rero_bound(guarantee, kappa.kappa_upper)
    except Exception as err:  # a bound that cannot be computed is recorded, never fatal to the cell
        log.warning("ReRo bound failed: %s: %s", type(err).__name__, err)
        info["note"] = f"the bound could not be computed: {type(err).__name__}: {err}"
        return {"rero": info}
    info.update(kappa=kappa.as_dict(), observed=observed.as_dict(), training=training.as_dict(),
                kappa_used="the Clopper-Pearson upper limit (gamma grows with kappa)",
                observed_note=(f"T = {local_steps} Gaussian step(s) inside the observed update, each containing "
                               "the target (q = 1)"))
    return {"rero_kappa": kappa.kappa, "rero_kappa_upper": kappa.kappa_upper,
            "rero_gamma_observed": observed.gamma, "rero_gamma_training": training.gamma,
            "rero": info}
