"""FL protocols: what a client computes and what the server receives.

The client runs on a private copy of the server's model, so nothing it does (BatchNorm
running statistics, a defense's model surgery) leaks back into the attacker's copy.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.core import Batch, Defense, Observation, ParamError, Registry, ThreatModel

PROTOCOLS: Registry["Protocol"] = Registry("protocol")


class Protocol:
    name = "protocol"

    def client_update(
        self, model: nn.Module, batch: Batch, *, defense: Defense, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Observation, nn.Module]:
        """The observation the server receives and the model the client actually trained (after ``defense.prepare``)."""
        raise NotImplementedError


def _record_bn_stats(model: nn.Module) -> tuple[list, list]:
    """Forward hooks that capture each BatchNorm layer's batch mean and variance."""
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inputs, output, store=stats):
                x = inputs[0].detach()
                dims = [d for d in range(x.dim()) if d != 1]
                store.append((x.mean(dims), x.var(dims, unbiased=False)))
            handles.append(module.register_forward_hook(hook))
    return stats, handles


class FedSGD(Protocol):
    """The client sends the gradient of its batch's mean cross-entropy at the server's weights."""

    name = "fedsgd"

    def __init__(self, *, batch_size: int, bn_mode: Literal["train", "eval"]):
        self.batch_size = batch_size
        self.bn_mode = bn_mode

    def client_update(self, model, batch, *, defense, threat, generator):
        if batch.size != self.batch_size:
            raise ValueError(f"fedsgd expects batches of {self.batch_size} images, got {batch.size}")
        client = defense.prepare(copy.deepcopy(model))
        client.train(self.bn_mode == "train")
        inputs = batch.normalization.normalize(batch.images)
        stats, handles = _record_bn_stats(client) if threat.bn_stats == "shared" else ([], [])
        try:
            grads = defense.client_gradients(client, F.cross_entropy, inputs, batch.labels, generator=generator)
        except ValueError as err:
            if "Expected more than 1 value per channel" in str(err):
                raise ValueError(
                    f"BatchNorm in train mode cannot normalize a batch of {batch.size} image(s) whose feature maps "
                    "shrink to 1x1; set protocol.bn_mode = \"eval\", use a larger batch, or a victim with "
                    "norm = \"group\""
                ) from err
            raise
        finally:
            for h in handles:
                h.remove()
        grads = defense.transform(grads, generator=generator)
        names = tuple(n for n, p in client.named_parameters() if p.requires_grad)
        obs = Observation(
            kind="gradients",
            update=tuple(g.detach() for g in grads),
            param_names=names,
            batch_size=batch.size,
            input_shape=tuple(batch.images.shape[1:]),
            num_classes=batch.num_classes,
            bn_mode=self.bn_mode,
            normalization=batch.normalization,
            protocol=self.name,
            known_labels=batch.labels.clone() if threat.labels == "known" else None,
            bn_stats=tuple(stats) if threat.bn_stats == "shared" else None,
        )
        return obs, client


@PROTOCOLS.register("fedsgd", version="1")
def fedsgd(*, batch_size: int = 1, bn_mode: Literal["train", "eval"] = "train") -> FedSGD:
    """FedSGD: one gradient of the batch's mean loss; BatchNorm in the client's ``bn_mode``."""
    if batch_size < 1:
        raise ParamError("batch_size", f"must be >= 1, got {batch_size}")
    return FedSGD(batch_size=batch_size, bn_mode=bn_mode)
