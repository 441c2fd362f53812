"""The shapes of pluggable components. Registries hold factories that return these."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from bench.core.types import Observation, Reconstruction


class ParamError(ValueError):
    """A component parameter with an impossible value; ``param`` names it for the error path."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class ThreatModelError(PermissionError):
    """An attack or label strategy asked for knowledge the suite's threat model does not grant."""


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Defense:
    """What a client does to protect its update. Three hooks, each a no-op by default.

    1. ``prepare(model)``: change the model the client trains (e.g. Opacus swaps BatchNorm).
    2. ``client_gradients(...)``: change how the client computes its gradient (e.g. per-example clipping).
    3. ``transform(update)``: change the update after it is computed (e.g. sparsify, add noise).
    """

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def client_gradients(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, ...]:
        params = [p for p in model.parameters() if p.requires_grad]
        loss = loss_fn(model(inputs), labels)
        return tuple(g.detach() for g in torch.autograd.grad(loss, params))

    def transform(self, update: tuple[torch.Tensor, ...], *, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return update

    def describe(self) -> dict[str, Any]:
        """Numbers to store with every row (e.g. epsilon); empty by default."""
        return {}


class LabelStrategy(ABC):
    """Recovers the labels of a batch from an observation, never from the client's data."""

    @abstractmethod
    def recover(self, observation: Observation, model: nn.Module) -> torch.Tensor:
        """Labels of shape (batch_size,), int64."""


class Attack(ABC):
    """A gradient-inversion attack: turns an observation back into images."""

    #: whether ``reconstruct`` needs labels from a label strategy
    uses_labels: bool = True

    @abstractmethod
    def reconstruct(
        self,
        observation: Observation,
        model: nn.Module,
        *,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        deadline: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Reconstruction:
        """Images in [0, 1] for every image of the observed batch.

        ``deadline`` is a ``time.monotonic()`` value after which the attack raises
        ``AttackTimeout``; ``progress(done, total)`` reports iterations.
        """


class AttackTimeout(TimeoutError):
    """An attack ran past its time budget."""
