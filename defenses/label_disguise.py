"""Label disguising (Jeon et al. 2021, GIAS appendix F), two variants that can be combined.

1. Batch composition (the paper's proposal): the client builds its batch so that the
   number of distinct labels is smaller than the batch but not tiny. Label strategies
   that assume distinct labels then fail, and those that count duplicates face many
   plausible count vectors; a wrong count ruins the reconstruction (Geng et al.).
2. Last-layer perturbation: Gaussian noise on the classifier's weight and bias update
   only, with a standard deviation relative to that layer's own RMS, which flips the
   signs label strategies read (iDLG's row sums, the bias entries) at a small cost to
   the rest of the update.

The composition keeps as many of the cell's own images as it can: it keeps the images of
the most frequent labels of the cell's batch and fills the other slots with data-set
images of those labels, in a seeded order.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Callable

import torch
from torch import nn

from leakbench.core import Defense, ParamError
from leakbench.defenses.common import gaussian_like
from leakbench.defenses.registry import DEFENSES

log = logging.getLogger(__name__)


def auto_distinct(batch_size: int) -> int:
    """round(sqrt(B)), at least 2 and below B: 2 labels for B = 4, 3 for 8, 4 for 16, 8 for 64."""
    if batch_size <= 2:
        return 1
    return max(2, min(batch_size - 1, round(math.sqrt(batch_size))))


class LabelDisguise(Defense):
    def __init__(self, *, compose: bool, distinct_labels: int, last_layer_sigma: float):
        self.compose = compose
        self.distinct_labels = distinct_labels
        self.last_layer_sigma = last_layer_sigma
        self.randomized = last_layer_sigma > 0
        self._classifier: tuple[int, ...] | None = None
        self._composition: dict[str, Any] = {}

    # -- variant 1: which images train together ------------------------------------------

    def compose_batch(self, indices, *, label_of: Callable[[int], int], pool_size: int, generator):
        size = len(indices)
        if not self.compose:
            return indices
        if size < 2:
            self._composition = {"composition_note": "a batch of one image has one label: nothing to disguise"}
            return indices
        target = self.distinct_labels or auto_distinct(size)
        if target >= size:
            raise ValueError(
                f"label_disguise: distinct_labels = {target} is not smaller than the batch of {size}; "
                "choose fewer distinct labels than images (or 0 for round(sqrt(batch)))"
            )
        own = {i: label_of(i) for i in indices}
        counts = Counter(own.values())
        # Most frequent labels of the cell's own batch first (ties in a seeded order), so
        # most of the cell's images stay.
        labels = list(counts)
        tie = {labels[j]: r for r, j in enumerate(torch.randperm(len(labels), generator=generator).tolist())}
        ranked = sorted(labels, key=lambda lab: (-counts[lab], tie[lab]))
        chosen = ranked[:target]
        quota = _quotas(size, len(chosen))
        kept: dict[int, list[int]] = {lab: [] for lab in chosen}
        for i in indices:
            lab = own[i]
            if lab in kept and len(kept[lab]) < quota[chosen.index(lab)]:
                kept[lab].append(i)
        missing = {lab: quota[chosen.index(lab)] - len(kept[lab]) for lab in chosen}
        used = set(indices)
        for i in torch.randperm(pool_size, generator=generator).tolist():
            if not any(missing.values()):
                break
            if i in used:
                continue
            lab = label_of(i)
            if missing.get(lab, 0) > 0:
                kept[lab].append(i)
                missing[lab] -= 1
                used.add(i)
        short = sum(missing.values())
        if short:
            raise ValueError(
                f"label_disguise: the data set has too few images of labels {chosen} to build a batch of {size} "
                f"with {target} distinct labels ({short} missing); use a smaller batch or more distinct labels"
            )
        grouped = [i for lab in chosen for i in kept[lab]]
        composed = tuple(grouped[j] for j in torch.randperm(size, generator=generator).tolist())
        self._composition = {
            "distinct_labels_before": len(counts),
            "distinct_labels": len(chosen),
            "images_replaced": len(set(composed) - set(indices)),
        }
        return composed

    # -- variant 2: noise on the classifier's update ------------------------------------

    def prepare(self, model: nn.Module) -> nn.Module:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("label_disguise perturbs the last linear layer (the classifier); this victim has none")
        trainable = [p for p in model.parameters() if p.requires_grad]
        ids = {id(p) for p in linears[-1].parameters() if p.requires_grad}
        self._classifier = tuple(k for k, p in enumerate(trainable) if id(p) in ids)
        return model

    def transform(self, update, *, generator):
        if self.last_layer_sigma == 0:
            return update
        if self._classifier is None:
            raise RuntimeError("label_disguise.transform needs prepare(model) first, to find the classifier's update")
        out = list(update)
        for k in self._classifier:
            t = out[k]
            rms = float(t.double().pow(2).mean().sqrt())
            out[k] = t + gaussian_like(t, self.last_layer_sigma * rms, generator=generator)
        return tuple(out)

    def describe(self) -> dict[str, Any]:
        return {"compose": self.compose, "distinct_labels_target": self.distinct_labels,
                "last_layer_sigma": self.last_layer_sigma, **self._composition}


def _quotas(size: int, labels: int) -> list[int]:
    """Images per label, as equal as possible, summing to ``size``."""
    base, extra = divmod(size, labels)
    return [base + (1 if r < extra else 0) for r in range(labels)]


@DEFENSES.register("label_disguise", version="1")
def label_disguise(*, compose: bool = True, distinct_labels: int = 0, last_layer_sigma: float = 0.0) -> Defense:
    """GIAS appendix F: batches with fewer distinct labels than images (compose; 0 = round(sqrt(batch))), and/or noise on the classifier's update (last_layer_sigma x its RMS)."""
    if distinct_labels < 0:
        raise ParamError("distinct_labels", f"must be >= 0 (0 picks round(sqrt(batch))), got {distinct_labels}")
    if last_layer_sigma < 0:
        raise ParamError("last_layer_sigma", f"a relative standard deviation is >= 0, got {last_layer_sigma}")
    if not compose and last_layer_sigma == 0:
        raise ParamError("last_layer_sigma", "with compose = false and last_layer_sigma = 0 the defense does nothing; "
                                             "set one of them")
    return LabelDisguise(compose=compose, distinct_labels=distinct_labels, last_layer_sigma=last_layer_sigma)
