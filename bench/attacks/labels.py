"""Label strategies: labels from the observation alone (or, when granted, the oracle)."""

from __future__ import annotations

import torch
from torch import nn

from bench.attacks.common import as_gradient, last_linear, layer_update
from bench.attacks.registry import LABELS
from bench.core import LabelStrategy, Observation, ThreatModelError


class IDLGLabels(LabelStrategy):
    """iDLG (Zhao et al. 2020): for one image with non-negative penultimate features, only
    the true class's row of the last layer's weight gradient sums to a negative value (p - 1 < 0)."""

    def recover(self, observation: Observation, model: nn.Module) -> torch.Tensor:
        if observation.batch_size != 1:
            raise ValueError(
                f"idlg recovers the label of a single image; this batch has {observation.batch_size}. "
                "Choose a batch-level label strategy or batch_size = 1"
            )
        prefix, _ = last_linear(model)
        grad_w = as_gradient(observation, layer_update(observation, prefix, "weight"))
        return torch.argmin(grad_w.sum(dim=1)).reshape(1).to(torch.int64).cpu()


class KnownLabels(LabelStrategy):
    """The client's true labels: an oracle, allowed only when the threat model grants labels."""

    def recover(self, observation: Observation, model: nn.Module) -> torch.Tensor:
        if observation.known_labels is None:
            raise ThreatModelError(
                "label strategy 'known' needs the client's labels, which this threat model does not grant "
                "(threat_model.labels = \"recovered\")"
            )
        return observation.known_labels.clone()


@LABELS.register("idlg", version="1")
def idlg() -> LabelStrategy:
    """iDLG: the label of a single image from the sign of the last layer's weight gradient."""
    return IDLGLabels()


@LABELS.register("known", version="1")
def known() -> LabelStrategy:
    """Oracle labels (threat model must grant them; shown in every report)."""
    return KnownLabels()
