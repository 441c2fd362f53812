"""Analytic recovery of a fully connected layer's input (Geiping et al. 2020, proposition).

Batch size 1: for y = Wx + b, dL/dW = (dL/dy) x^T and dL/db = dL/dy, so every row j with a
nonzero bias gradient gives x = (dL/dW)_j / (dL/db)_j. We combine all rows by least
squares, x = sum_j b_j W_j / sum_j b_j^2, which is exact and better conditioned than one
row. Any victim whose first layer is fully connected with a bias.

Batch size B > 1 with distinct labels (METHODS.md): the classifier's per-class rows give
per-image features the same way, h_i ≈ (dL/dW)_{y_i} / (dL/db)_{y_i}. That ratio is exact
only when every other image's softmax on class y_i is negligible (a confident model); on
an untrained model it mixes the batch. So the rows are only the start: with
M = softmax(H W^T + b) - Y (B x classes, computable from H and the server's weights),
dL/dW = (1/B) M^T H is linear in H, and H <- B · lstsq(M^T, dL/dW) is iterated to a fixed
point. Among the iterates, the one whose implied gradient (dL/dW, dL/db) matches the
observed one best is kept (an attacker-side score). Exact up to float error where it
converges; needs classes > B: every row of M sums to 0, so at B = classes the system is
singular (the rows' start is all that is left there).

The features are the images when the classifier is the first layer (a softmax
regression). For a linear-activation-linear victim (``fc``), one more closed form: the
first layer's gradient is (1/B) Δ^T X with δ_i = (m_i W_2) ⊙ act'(z_i), and act'(z_i) is a
function of the recovered h_i = act(z_i) for the activations in ``_DERIVATIVE_FROM_OUTPUT``;
X = B · lstsq(Δ^T, dL/dW_1). Deeper victims at B > 1 are refused with the reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.attacks.common import as_gradient, first_parametric, last_linear, layer_update
from leakbench.attacks.registry import ATTACKS
from leakbench.core import Attack, Observation, ParamError, Reconstruction



def _active(h: torch.Tensor) -> torch.Tensor:
    """Where a ReLU-like unit is active; recovered zeros come back as +-1e-8, hence a relative tolerance."""
    return h > 1e-6 * h.abs().max()


# act'(z) written as a function of act(z), per activation module type.
_DERIVATIVE_FROM_OUTPUT = {
    nn.ReLU: lambda h: _active(h).to(h.dtype),
    nn.Sigmoid: lambda h: h * (1 - h),
    nn.Tanh: lambda h: 1 - h * h,
    nn.ELU: lambda h: torch.where(_active(h), torch.ones_like(h), h + 1),  # alpha = 1, torch's default
}
_NO_OP = (nn.Flatten, nn.Identity, nn.Dropout)


class AnalyticFC(Attack):
    uses_labels = True  # batch > 1: which rows belong to which image; batch 1 ignores them

    def __init__(self, *, refine_steps: int):
        self.refine_steps = refine_steps

    def reconstruct(self, observation, model, *, labels, generator, deadline=None, progress=None):
        c, h, w = observation.input_shape
        if observation.batch_size == 1:
            x, residual = _first_layer_input(observation, model)
        else:
            x, residual = self._batch_inputs(observation, model, labels)
        if x.shape[1] != c * h * w:
            raise ValueError(f"the recovered inputs have {x.shape[1]} values, the images have {c * h * w}")
        raw = observation.normalization.denormalize(x.reshape(-1, c, h, w).float()).cpu()
        if progress is not None:
            progress(1, 1)
        return Reconstruction(images=raw.clamp(0, 1), labels=None if labels is None else labels.cpu(),
                              matching_loss=float(residual), iterations=1, restarts=1, raw_images=raw)

    def _batch_inputs(self, observation: Observation, model: nn.Module, labels) -> tuple[torch.Tensor, float]:
        b = observation.batch_size
        if labels is None:
            raise ValueError("analytic_fc at batch size > 1 needs the labels (which classifier row is whose)")
        labels = labels.cpu().to(torch.int64)
        if labels.unique().numel() != b:
            raise ValueError(
                f"analytic_fc at batch size {b} needs distinct labels (one classifier row per image); the label "
                f"strategy gave {labels.tolist()}. Use a distinct-label strategy ('analytic', 'yin') or batch size 1"
            )
        layers = _linear_chain(model)
        features, residual = _classifier_features(observation, model, labels, refine_steps=self.refine_steps)
        if len(layers) == 1:
            return features, residual
        return _first_of_two_layers(observation, layers, features, labels)


def _first_layer_input(observation: Observation, model: nn.Module) -> tuple[torch.Tensor, float]:
    prefix, layer = first_parametric(model)
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        raise ValueError(
            f"analytic_fc needs a victim whose first layer is fully connected with a bias; "
            f"its first layer {prefix or '<root>'!r} is {type(layer).__name__}"
        )
    gw = as_gradient(observation, layer_update(observation, prefix, "weight")).double().cpu()
    gb = as_gradient(observation, layer_update(observation, prefix, "bias")).double().cpu()
    denom = gb.pow(2).sum()
    if denom <= 0:
        raise ValueError("every bias gradient of the first layer is zero: nothing to divide by")
    x = (gb[:, None] * gw).sum(0) / denom
    residual = (gw - gb[:, None] * x[None, :]).norm() / gw.norm().clamp_min(1e-30)
    return x[None, :], float(residual)


def _linear_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The victim as [linear] or [linear, activation, linear] (plus flattening), or a ValueError saying why not."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    kept = [(n, m) for n, m in leaves if not isinstance(m, _NO_OP)]
    kinds = [type(m) for _, m in kept]
    if kinds == [nn.Linear] or (len(kinds) == 3 and kinds[0] is nn.Linear and kinds[2] is nn.Linear
                                and kinds[1] in _DERIVATIVE_FROM_OUTPUT):
        if any(m.bias is None for _, m in kept if isinstance(m, nn.Linear)):
            raise ValueError("analytic_fc at batch size > 1 divides by bias gradients; the victim's linear layers "
                             "need biases")
        return kept
    shown = ", ".join(t.__name__ for t in kinds[:6]) + (", ..." if len(kinds) > 6 else "")
    raise ValueError(
        "analytic_fc at batch size > 1 solves victims that are one linear layer or linear-activation-linear "
        f"(activations: {', '.join(t.__name__ for t in _DERIVATIVE_FROM_OUTPUT)}); this victim is [{shown}]. "
        "Use batch size 1 (any victim with a fully connected first layer) or an optimization attack"
    )


def _classifier_features(observation: Observation, model: nn.Module, labels: torch.Tensor, *,
                         refine_steps: int) -> tuple[torch.Tensor, float]:
    """Per-image inputs of the classifier: per-class rows, then the fixed point of the exact linear system."""
    b = observation.batch_size
    prefix, layer = last_linear(model)
    if layer.bias is None:
        raise ValueError(f"analytic_fc at batch size > 1 divides by the classifier's bias gradient; {prefix!r} has no bias")
    if layer.out_features < b:
        raise ValueError(f"analytic_fc at batch size {b} needs at least {b} classes; the classifier has {layer.out_features}")
    gw = as_gradient(observation, layer_update(observation, prefix, "weight")).double().cpu()
    gb = as_gradient(observation, layer_update(observation, prefix, "bias")).double().cpu()
    weight, bias = layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()
    if (gb[labels] == 0).any():
        raise ValueError("a labelled class has a zero bias gradient: its row cannot be divided")
    onehot = F.one_hot(labels, layer.out_features).double()

    def residual(h: torch.Tensor) -> float:
        m = torch.softmax(h @ weight.T + bias, dim=1) - onehot
        fit = (m.T @ h / b - gw).norm().pow(2) + (m.sum(0) / b - gb).norm().pow(2)
        return float(fit.sqrt() / (gw.norm().pow(2) + gb.norm().pow(2)).sqrt().clamp_min(1e-30))

    h = gw[labels] / gb[labels][:, None]
    best, best_fit = h, residual(h)
    for _ in range(refine_steps):
        m = torch.softmax(h @ weight.T + bias, dim=1) - onehot
        h = b * torch.linalg.pinv(m.T) @ gw
        if not torch.isfinite(h).all():
            break
        fit = residual(h)
        if fit < best_fit:
            best, best_fit = h, fit
    return best, best_fit


def _first_of_two_layers(observation: Observation, layers: list, hidden: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Inputs of linear-activation-linear from the recovered hidden activations (see the module docstring)."""
    b = observation.batch_size
    (first_name, _), (_, act), (last_name, last) = layers
    gw1 = as_gradient(observation, layer_update(observation, first_name, "weight")).double().cpu()
    gb1 = as_gradient(observation, layer_update(observation, first_name, "bias")).double().cpu()
    w2, b2 = last.weight.detach().double().cpu(), last.bias.detach().double().cpu()
    m = torch.softmax(hidden @ w2.T + b2, dim=1) - F.one_hot(labels, w2.shape[0]).double()
    delta = (m @ w2) * _DERIVATIVE_FROM_OUTPUT[type(act)](hidden)
    x = b * torch.linalg.pinv(delta.T) @ gw1
    fit = ((delta.T @ x / b - gw1).norm().pow(2) + (delta.sum(0) / b - gb1).norm().pow(2)).sqrt()
    return x, float(fit / (gw1.norm().pow(2) + gb1.norm().pow(2)).sqrt().clamp_min(1e-30))


@ATTACKS.register("analytic_fc", version="2")
def analytic_fc(*, refine_steps: int = 50) -> Attack:
    """Closed-form input of a fully connected first layer (batch 1); per-class rows solved exactly for batches with distinct labels."""
    if refine_steps < 0:
        raise ParamError("refine_steps", f"must be >= 0, got {refine_steps}")
    return AnalyticFC(refine_steps=refine_steps)
