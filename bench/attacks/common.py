"""Helpers every attack shares: finding layers in an observation, the functional model."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from leakbench.core import Attack, Observation, Reconstruction


def update_by_name(observation: Observation) -> dict[str, torch.Tensor]:
    return dict(zip(observation.param_names, observation.update))


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier: the last ``nn.Linear`` of the model, with its qualified name."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the victim has no linear layer to read labels from")
    return found[-1]


def first_parametric(model: nn.Module) -> tuple[str, nn.Module]:
    """The first module (in forward-registration order) that owns parameters."""
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            return name, module
    raise ValueError("the victim has no parameters")


def _qualified(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def layer_update(observation: Observation, prefix: str, leaf: str) -> torch.Tensor:
    name = _qualified(prefix, leaf)
    updates = update_by_name(observation)
    if name not in updates:
        raise ValueError(f"the observation has no update for parameter {name!r}")
    return updates[name]


def update_signature(observation: Observation) -> tuple:
    """What observations of one model must share to be reconstructed in one pack: the update's
    kind, names and shapes, the batch and input shapes and the protocol's public settings."""
    o = observation
    return (o.kind, o.param_names, tuple(tuple(u.shape) for u in o.update), o.batch_size, o.input_shape,
            o.bn_mode, o.protocol, o.local_steps, o.local_batch_size, o.local_lr, o.clients, o.normalization)


class PackedAttack(Attack):
    """An attack whose every call is a pack (``optimize.run_packed``): ``reconstruct`` is a pack
    of one, so a cell alone and a cell in a pack take the same path. Subclasses write
    ``reconstruct_many``, starting with ``self.check(observations, labels)``."""

    packable = True
    name = "attack"  # for messages

    def pack_signature(self, observation: Observation) -> tuple:
        return update_signature(observation)

    def reconstruct(self, observation, model, *, labels, generator, deadline=None, progress=None) -> Reconstruction:
        return self.reconstruct_many([observation], model, labels=[labels], generators=[generator],
                                     deadline=deadline, progress=progress)[0]

    def check(self, observations: Sequence[Observation], labels: Sequence[torch.Tensor | None]) -> None:
        """``ValueError`` for a missing label set, or observations whose pack signatures differ."""
        if self.uses_labels and any(y is None for y in labels):
            raise ValueError(f"{self.name} needs labels from a label strategy")
        first = self.pack_signature(observations[0])
        if any(self.pack_signature(o) != first for o in observations[1:]):
            raise ValueError(f"these {len(observations)} observations cannot share a pack: their updates differ in "
                             "shape or protocol settings")


def as_gradient(observation: Observation, tensor: torch.Tensor) -> torch.Tensor:
    """A FedSGD gradient as is; a weight difference turned into a pseudo-gradient (-delta / lr)."""
    if observation.kind == "gradients":
        return tensor
    lr = observation.local_lr or 1.0
    return -tensor / lr


def as_mean_gradient(observation: Observation, tensor: torch.Tensor) -> torch.Tensor:
    """A FedSGD gradient as is; a weight difference as the mean gradient of its local steps, -delta / (lr · steps).

    A FedAvg client's difference sums one gradient per local step (-delta / lr is about
    ``local_steps`` times the mean gradient while the steps move the weights little).
    Strategies that read magnitudes on the mean-loss scale (label counts) need this form.
    """
    if observation.kind == "gradients":
        return tensor
    return as_gradient(observation, tensor) / max(1, observation.local_steps)


def attacker_model(model: nn.Module, observation: Observation, device: torch.device) -> nn.Module:
    """The attacker's functional copy, in the client's BatchNorm mode.

    In train mode BatchNorm normalizes each candidate batch by its own statistics; the
    running-statistics updates are switched off so the copy can be vmapped.
    """
    attacker = copy.deepcopy(model).to(device)
    for p in attacker.parameters():
        p.requires_grad_(False)
    if observation.bn_mode == "train":
        torch.func.replace_all_batch_norm_modules_(attacker)
        attacker.train()
    else:
        attacker.eval()
    return attacker
