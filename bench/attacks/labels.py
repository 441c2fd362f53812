"""Label strategies: the labels of a batch from the observation alone (or, when granted, the oracle).

Every strategy reads the last linear layer's update (the classifier), never the client's
data. With L the batch's mean cross-entropy, p_i the softmax output of image i, y_i its
one-hot label and O_i >= 0 its penultimate features (the classifier's input):

    dL/dW_j = (1/B) sum_i (p_ij - y_ij) O_i          dL/db_j = (1/B) sum_i (p_ij - y_ij)

| name      | batch        | reads                                   | duplicates |
|-----------|--------------|-----------------------------------------|------------|
| `idlg`    | 1            | sign of the weight-gradient row sums    | -          |
| `analytic`| B <= classes | the B most negative bias gradients      | no         |
| `yin`     | B <= classes | the B most negative row minima of dL/dW | no         |
| `wainakh` | any          | bias (or row-sum) gradients, counted    | yes        |
| `geng`    | any          | row sums of dL/dW, zero-shot counts     | yes        |
| `known`   | any          | the true labels (oracle, threat model)  | yes        |
| `none`    | -            | nothing: for attacks that need no labels| -          |

A FedAvg weight difference Δ after T local steps at lr η is read as the mean step
gradient -Δ/(η·T) (``classifier_gradients``); iDLG reads only signs, which need no scale.

``wainakh`` and ``geng`` estimate the mean softmax output (and, for ``geng``, the mean
L1 norm of the penultimate features) by running the model on dummy inputs drawn from the
``generator``: uniform pixels in [0, 1], normalized like the data. That is a property of
the model, which the server holds, not of the client's data. On trained models the
estimate from noise can be far from the softmax on real images, which is why both get
worse there (Geng et al. and iLRG report the same).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from leakbench.attacks.common import as_gradient, as_mean_gradient, attacker_model, last_linear, layer_update
from leakbench.attacks.registry import LABELS
from leakbench.core import LabelStrategy, Observation, ParamError, ThreatModelError


# --------------------------------------------------------------------------- what the strategies read


def classifier_gradients(observation: Observation, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last linear layer's weight gradient (classes, features) and bias gradient (or None), on the CPU.

    A FedAvg weight difference is read as the mean gradient of its local steps,
    -delta / (lr · local_steps) (``as_mean_gradient``): the counting strategies compare these
    entries with the mean-loss scale (1/B per image), which -delta / lr overshoots by the
    number of steps. The orderings the other strategies read do not depend on the factor.
    """
    prefix, layer = last_linear(model)
    grad_w = as_mean_gradient(observation, layer_update(observation, prefix, "weight")).detach().double().cpu()
    grad_b = None
    if layer.bias is not None:
        grad_b = as_mean_gradient(observation, layer_update(observation, prefix, "bias")).detach().double().cpu()
    if grad_w.shape[0] != observation.num_classes:
        raise ValueError(
            f"the last linear layer {prefix!r} has {grad_w.shape[0]} outputs but the data set has "
            f"{observation.num_classes} classes; label strategies read the classifier's rows"
        )
    return grad_w, grad_b


@torch.no_grad()
def dummy_statistics(
    observation: Observation, model: nn.Module, *, generator: torch.Generator | None, samples: int, strategy: str
) -> tuple[torch.Tensor, float]:
    """Mean softmax output (classes,) and mean L1 norm of the penultimate features on dummy inputs.

    The inputs are uniform pixels in [0, 1] (normalized like the data) drawn from
    ``generator``; the model runs in the client's BatchNorm mode on one batch of
    ``samples`` dummies, on a copy, so its running statistics stay untouched.
    """
    if generator is None:
        raise ValueError(
            f"label strategy {strategy!r} draws dummy inputs and needs a torch.Generator "
            "(recover(..., generator=...)); the runner passes one seeded from the cell"
        )
    device = next(model.parameters()).device
    probe = attacker_model(model, observation, device)
    _, classifier = last_linear(probe)
    features: list[torch.Tensor] = []
    handle = classifier.register_forward_hook(lambda mod, inputs, out: features.append(inputs[0].detach()))
    try:
        pixels = torch.rand((samples, *observation.input_shape), generator=generator)
        logits = probe(observation.normalization.normalize(pixels).to(device))
    finally:
        handle.remove()
    softmax = torch.softmax(logits.double(), dim=1).mean(0).cpu()
    feature_norm = float(features[0].double().flatten(1).abs().sum(1).mean())
    return softmax, feature_norm


def apportion(estimates: torch.Tensor, total: int) -> torch.Tensor:
    """Integer counts that sum to exactly ``total``, from real-valued estimates.

    Negative estimates become 0; the floors are taken, then the remainder is filled one at
    a time by the largest residual (estimate - count), recomputed after every assignment;
    a surplus is removed from the smallest residuals the same way.
    """
    estimates = estimates.double().clamp_min(0)
    counts = torch.floor(estimates)
    while counts.sum() < total:
        j = int(torch.argmax(estimates - counts))
        counts[j] += 1
    while counts.sum() > total:
        residual = torch.where(counts > 0, estimates - counts, torch.full_like(counts, math.inf))
        j = int(torch.argmin(residual))
        counts[j] -= 1
    return counts.to(torch.int64)


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    """Class counts (classes,) as a sorted label vector; the order of a batch's labels carries no information."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts).to(torch.int64)


def _distinct(observation: Observation, strategy: str) -> int:
    b = observation.batch_size
    if b > observation.num_classes:
        raise ValueError(
            f"label strategy {strategy!r} assumes distinct labels, so at most {observation.num_classes} images "
            f"(one per class); this batch has {b}. Use 'geng' or 'wainakh', which count duplicates"
        )
    return b


# --------------------------------------------------------------------------- strategies


class IDLGLabels(LabelStrategy):
    """iDLG (Zhao et al. 2020): for one image with non-negative penultimate features, only
    the true class's row of the last layer's weight gradient sums to a negative value (p - 1 < 0)."""

    def recover(self, observation, model, *, generator=None):
        if observation.batch_size != 1:
            raise ValueError(
                f"idlg recovers the label of a single image; this batch has {observation.batch_size}. "
                "Choose a batch-level label strategy or batch_size = 1"
            )
        prefix, _ = last_linear(model)
        grad_w = as_gradient(observation, layer_update(observation, prefix, "weight"))
        return torch.argmin(grad_w.sum(dim=1)).reshape(1).to(torch.int64).cpu()


class AnalyticLabels(LabelStrategy):
    """The B most negative entries of the last bias gradient (distinct labels).

    dL/db_j = p̄_j - n_j / B is negative for a class in the batch as long as its share of
    the batch exceeds its mean softmax output, and positive for every absent class.
    """

    def recover(self, observation, model, *, generator=None):
        b = _distinct(observation, "analytic")
        _, grad_b = classifier_gradients(observation, model)
        if grad_b is None:
            raise ValueError("label strategy 'analytic' reads the last layer's bias gradient, but the victim's "
                             "classifier has no bias; use 'yin' or 'geng'")
        return torch.sort(torch.argsort(grad_b)[:b]).values.to(torch.int64)


class YinLabels(LabelStrategy):
    """Yin et al. 2021: the B classes whose weight-gradient rows have the most negative minimum (distinct labels).

    With non-negative features, a present class's row is (p_ij - 1) O_i plus small
    positive terms, so its minimum is strongly negative; an absent class's row is >= 0.
    """

    def recover(self, observation, model, *, generator=None):
        b = _distinct(observation, "yin")
        grad_w, _ = classifier_gradients(observation, model)
        row_minima = grad_w.amin(dim=1)
        return torch.sort(torch.argsort(row_minima)[:b]).values.to(torch.int64)


class WainakhLabels(LabelStrategy):
    """Bias-corrected counting (Wainakh et al. 2022, LLG with an offset), duplicates allowed.

    The signal s_j is the bias gradient (or, without a bias, the weight-gradient row sum).
    Each occurrence of class j moves s_j by -m, the impact: m = 1/B for the bias (exact
    for the mean loss), m = Ō/B for row sums. The offset o_j that the softmax adds is
    p̄_j (bias) or Ō·p̄_j (row sums), estimated on dummy inputs. Then, as in LLG: every
    class with s_j < 0 gets one label first (it must be present), and the rest are
    assigned one at a time to the class with the most negative corrected residual
    r_j = s_j - o_j + m·(labels given to j). The argmin is recomputed after every
    assignment: a known re-implementation bug decrements an index computed before the
    previous assignment changed the residuals.
    """

    def __init__(self, *, dummy_samples: int):
        self.dummy_samples = dummy_samples

    def recover(self, observation, model, *, generator=None):
        b = observation.batch_size
        grad_w, grad_b = classifier_gradients(observation, model)
        softmax, feature_norm = dummy_statistics(observation, model, generator=generator,
                                                 samples=self.dummy_samples, strategy="wainakh")
        if grad_b is not None:
            signal, impact, offset = grad_b, 1.0 / b, softmax
        else:
            signal, impact, offset = grad_w.sum(1), feature_norm / b, feature_norm * softmax
        residual = signal - offset
        counts = torch.zeros_like(signal, dtype=torch.int64)
        for j in torch.argsort(signal)[: b].tolist():
            if signal[j] >= 0:
                break
            counts[j] += 1
            residual[j] += impact
        while int(counts.sum()) < b:
            j = int(torch.argmin(residual))
            counts[j] += 1
            residual[j] += impact
        return counts_to_labels(counts)


class GengLabels(LabelStrategy):
    """Geng et al. 2021's zero-shot label counts, duplicates allowed, exactly B labels.

    Summing dL/dW_j over the features gives (1/B) sum_i (p_ij - y_ij) ||O_i||_1; replacing
    p_ij by the mean softmax p̄_j and ||O_i||_1 by its mean Ō (both estimated on dummy
    inputs) gives n_j = B·p̄_j - (B/Ō)·sum_k dL/dW_jk, rounded to integers that sum to B
    (``apportion``: floors, then the largest residuals).
    """

    def __init__(self, *, dummy_samples: int):
        self.dummy_samples = dummy_samples

    def recover(self, observation, model, *, generator=None):
        b = observation.batch_size
        grad_w, _ = classifier_gradients(observation, model)
        softmax, feature_norm = dummy_statistics(observation, model, generator=generator,
                                                 samples=self.dummy_samples, strategy="geng")
        if feature_norm <= 0:
            raise ValueError("label strategy 'geng' divides by the mean L1 norm of the penultimate features, "
                             "which is 0 on the dummy inputs (a dead classifier input)")
        estimates = b * softmax - (b / feature_norm) * grad_w.sum(1)
        return counts_to_labels(apportion(estimates, b))


class KnownLabels(LabelStrategy):
    """The client's true labels: an oracle, allowed only when the threat model grants labels."""

    def recover(self, observation, model, *, generator=None):
        if observation.known_labels is None:
            raise ThreatModelError(
                "label strategy 'known' needs the client's labels, which this threat model does not grant "
                "(threat_model.labels = \"recovered\")"
            )
        return observation.known_labels.clone().cpu()


class NoLabels(LabelStrategy):
    """For attacks that need no labels (DLG optimizes its own soft labels; analytic attacks need none)."""

    def recover(self, observation, model, *, generator=None):
        raise ValueError(
            "label strategy 'none' gives no labels, but this attack needs them; choose a recovery "
            "strategy such as 'idlg' (batch 1), 'geng' or 'wainakh' (any batch)"
        )


def _check_samples(dummy_samples: int) -> None:
    if dummy_samples < 2:
        raise ParamError("dummy_samples", f"must be >= 2 (BatchNorm in train mode needs a batch), got {dummy_samples}")


@LABELS.register("idlg", version="1")
def idlg() -> LabelStrategy:
    """iDLG: the label of a single image from the sign of the last layer's weight gradient."""
    return IDLGLabels()


@LABELS.register("analytic", version="1")
def analytic() -> LabelStrategy:
    """Distinct labels: the B most negative entries of the last layer's bias gradient."""
    return AnalyticLabels()


@LABELS.register("yin", version="1")
def yin() -> LabelStrategy:
    """Yin et al. 2021, distinct labels: the B most negative row minima of the last layer's weight gradient."""
    return YinLabels()


@LABELS.register("wainakh", version="2")
def wainakh(*, dummy_samples: int = 64) -> LabelStrategy:
    """Wainakh et al. 2022: bias-corrected counting with duplicates (LLG with a softmax offset from dummy inputs)."""
    _check_samples(dummy_samples)
    return WainakhLabels(dummy_samples=dummy_samples)


@LABELS.register("geng", version="2")
def geng(*, dummy_samples: int = 64) -> LabelStrategy:
    """Geng et al. 2021: zero-shot label counts from weight-gradient row sums, exactly B labels."""
    _check_samples(dummy_samples)
    return GengLabels(dummy_samples=dummy_samples)


@LABELS.register("known", version="1")
def known() -> LabelStrategy:
    """Oracle labels (threat model must grant them; shown in every report)."""
    return KnownLabels()


@LABELS.register("none", version="1")
def none() -> LabelStrategy:
    """No labels: for attacks that need none (dlg, which optimizes soft labels itself)."""
    return NoLabels()
