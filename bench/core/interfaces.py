"""The shapes of pluggable components. Registries hold factories that return these."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from leakbench.core.acceleration import NO_ACCELERATION, Acceleration
from leakbench.core.types import Observation, Reconstruction

if TYPE_CHECKING:
    from leakbench.privacy.rero import DPGuarantee


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
       FedAvg clients call it once per local step.
    3. ``transform(update)``: change the update after it is computed (e.g. sparsify, add noise).

    One more, for defenses that choose *which* images a client trains on together
    (label disguising): ``compose_batch``, called by the runner where the batch is built.
    """

    #: whether the update depends on the ``generator`` (noise, stochastic rounding); the
    #: contract tests check that another generator then gives another update.
    randomized: bool = False

    def compose_batch(
        self,
        indices: tuple[int, ...],
        *,
        label_of: Callable[[int], int],
        pool_size: int,
        generator: torch.Generator,
    ) -> tuple[int, ...]:
        """The data-set indices the client trains on; by default the cell's own images.

        ``label_of(i)`` is the label of data-set image ``i``; ``pool_size`` the data set's
        length (indices ``0 .. pool_size - 1`` may be drawn). Must return as many indices.
        """
        return indices

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

    #: why ``dp_guarantee`` is None, shown in the row (override with the defense's own reason)
    no_dp_reason: str = "declares no differential-privacy guarantee"

    def dp_guarantee(self) -> "DPGuarantee | None":
        """The differential-privacy guarantee this defense declares (``leakbench.privacy.DPGuarantee``:
        noise multiplier, clipping norm, sample rate, steps, δ), or None; every row's ReRo bound comes from it."""
        return None


class LabelStrategy(ABC):
    """Recovers the labels of a batch from an observation, never from the client's data."""

    @abstractmethod
    def recover(
        self, observation: Observation, model: nn.Module, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Labels of shape (batch_size,), int64, on the CPU.

        ``generator`` feeds strategies that query the model on random dummy inputs (Geng et
        al.'s zero-shot counts); strategies that draw nothing ignore it.
        """


class Attack(ABC):
    """A gradient-inversion attack: turns an observation back into images."""

    #: whether ``reconstruct`` needs labels from a label strategy
    uses_labels: bool = True

    #: the optimization step's speed-ups (compilation, TF32, memory layout); the worker that
    #: builds the attack hands it the run's (``--compile``, ``--tf32``, ``--channels-last``),
    #: and the attack passes it to the optimization core. Plain fp32 unless handed another.
    acceleration: Acceleration = NO_ACCELERATION

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

    #: whether ``reconstruct_many`` advances several reconstructions as one batched computation
    packable: bool = False

    def pack_signature(self, observation: Observation) -> tuple | None:
        """What must be equal for observations to share a pack (with the same model), or
        None when this observation cannot be packed. Only for ``packable`` attacks."""
        return None

    def reconstruct_many(
        self,
        observations: Sequence[Observation],
        model: nn.Module,
        *,
        labels: Sequence[torch.Tensor | None],
        generators: Sequence[torch.Generator],
        deadline: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Reconstruction]:
        """``reconstruct`` for several observations of the same model at once (one pack).

        Each reconstruction draws its initialization from its own generator, exactly as
        ``reconstruct`` would, so a pack gives the same answers as the sequential calls up
        to floating-point order. The default runs them one after the other.
        """
        return [self.reconstruct(o, model, labels=y, generator=g, deadline=deadline, progress=progress)
                for o, y, g in zip(observations, labels, generators)]


class AttackTimeout(TimeoutError):
    """An attack ran past its time budget."""
