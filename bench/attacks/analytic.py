"""Analytic recovery of a fully connected layer's input (Geiping et al. 2020, proposition).

For y = Wx + b: dL/dW = (dL/dy) x^T and dL/db = dL/dy, so for one image every row j with
a nonzero bias gradient gives x = (dL/dW)_j / (dL/db)_j. We combine all rows by least
squares, x = sum_j b_j W_j / sum_j b_j^2, which is exact and better conditioned than one row.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.attacks.common import as_gradient, first_parametric, layer_update
from bench.attacks.registry import ATTACKS
from bench.core import Attack, Reconstruction


class AnalyticFC(Attack):
    uses_labels = False

    def reconstruct(self, observation, model, *, labels, generator, deadline=None, progress=None):
        prefix, layer = first_parametric(model)
        if not isinstance(layer, nn.Linear) or layer.bias is None:
            raise ValueError(
                f"analytic_fc needs a victim whose first layer is fully connected with a bias; "
                f"its first layer {prefix or '<root>'!r} is {type(layer).__name__}"
            )
        if observation.batch_size != 1:
            raise ValueError(
                f"analytic_fc recovers one image from a first linear layer; this batch has "
                f"{observation.batch_size} images, whose inputs are mixed in every row"
            )
        gw = as_gradient(observation, layer_update(observation, prefix, "weight")).double()
        gb = as_gradient(observation, layer_update(observation, prefix, "bias")).double()
        denom = gb.pow(2).sum()
        if denom <= 0:
            raise ValueError("every bias gradient of the first layer is zero: nothing to divide by")
        x = (gb[:, None] * gw).sum(0) / denom
        c, h, w = observation.input_shape
        if x.numel() != c * h * w:
            raise ValueError(f"first layer takes {x.numel()} inputs, the images have {c * h * w} values")
        x = x.reshape(1, c, h, w).float()
        images = observation.normalization.denormalize(x).clamp(0, 1).cpu()
        if progress is not None:
            progress(1, 1)
        return Reconstruction(images=images, labels=None if labels is None else labels.cpu(),
                              matching_loss=0.0, iterations=1, restarts=1)


@ATTACKS.register("analytic_fc", version="1")
def analytic_fc() -> Attack:
    """Closed-form input of a first fully connected layer from its weight and bias gradients (batch size 1)."""
    return AnalyticFC()
