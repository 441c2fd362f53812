"""Frozen types that cross package lines.

They hold tensors, so "frozen" means the fields cannot be rebound; the tensors are
treated as read-only by convention (nobody writes into a Batch's images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

BNMode = Literal["train", "eval"]
UpdateKind = Literal["gradients", "weight_delta"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std a data set's images are normalized with before the model."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _shape(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1,) * (x.dim() - 3) + (len(self.mean), 1, 1)
        m = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(view)
        s = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(view)
        return m, s

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self._shape(x)
        return (x - m) / s

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self._shape(x)
        return x * s + m

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds of the valid pixel box [0, 1] in normalized space."""
        m, s = self._shape(x)
        return (0 - m) / s, (1 - m) / s


@dataclass(frozen=True)
class Batch:
    """A client's private batch: images in [0, 1], labels, and stable image ids."""

    images: torch.Tensor  # (B, C, H, W), float, in [0, 1]
    labels: torch.Tensor  # (B,), int64
    image_ids: tuple[str, ...]
    normalization: Normalization
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"Batch.images must be (B, C, H, W), got shape {tuple(self.images.shape)}")
        b = self.images.shape[0]
        if self.labels.shape != (b,):
            raise ValueError(f"Batch.labels must have shape ({b},), got {tuple(self.labels.shape)}")
        if len(self.image_ids) != b:
            raise ValueError(f"Batch has {b} images but {len(self.image_ids)} image ids")

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker is granted beyond the protocol's messages (suite setting)."""

    labels: Literal["recovered", "known"] = "recovered"
    bn_stats: Literal["none", "shared"] = "none"


@dataclass(frozen=True)
class Observation:
    """Exactly what the server receives from one client, and nothing else.

    ``update`` follows the order of ``model.named_parameters()`` (``param_names``).
    Oracle fields (``known_labels``, ``bn_stats``) are filled only when the suite's
    threat model grants them, and are ``None`` otherwise.
    """

    kind: UpdateKind
    update: tuple[torch.Tensor, ...]
    param_names: tuple[str, ...]
    batch_size: int
    input_shape: tuple[int, int, int]  # (C, H, W), public: the model's input
    num_classes: int
    bn_mode: BNMode
    normalization: Normalization
    protocol: str = "fedsgd"
    # FedAvg metadata the server knows (public): local steps, local batch size, local lr.
    local_steps: int = 1
    local_batch_size: int | None = None
    local_lr: float | None = None
    # Secure aggregation: the update is the mean of ``clients`` clients' updates, each over
    # ``batch_size // clients`` consecutive images of the batch (public).
    clients: int = 1
    # Oracle knowledge, only when granted by the threat model.
    known_labels: torch.Tensor | None = None
    bn_stats: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None

    def __post_init__(self) -> None:
        if len(self.update) != len(self.param_names):
            raise ValueError("Observation.update and param_names differ in length")


@dataclass(frozen=True)
class Reconstruction:
    """An attack's answer: images in [0, 1] and the labels it used (if any)."""

    images: torch.Tensor  # (B, C, H, W) in [0, 1]
    labels: torch.Tensor | None
    matching_loss: float  # attacker-side score of the chosen candidate (lower is better)
    trace: tuple[tuple[int, float], ...] = field(default_factory=tuple)  # (iteration, loss)
    iterations: int = 0
    restarts: int = 1
    # The chosen candidate in [0, 1] space *before* clamping, where the attack can leave the
    # box (L-BFGS, closed forms); None where it projects every step. Feeds the pixel-range
    # sanity flag (bench/running/sanity.py); never scored.
    raw_images: torch.Tensor | None = None
