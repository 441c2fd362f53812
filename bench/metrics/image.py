"""Pixel metrics (PSNR, SSIM), one-to-one matching, and label accuracy.

All images are ``(B, C, H, W)`` tensors in [0, 1] (dataset normalization already
undone). Inputs are clamped to [0, 1] defensively; non-finite pixels (a diverged
attack) are logged and counted as 0 (NaN, -inf) or 1 (+inf), so a broken
reconstruction scores as a poor image rather than crashing the scoring.
Results are float64 tensors on the CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from leakbench.core.vocabulary import PSNR_CAP_DB

logger = logging.getLogger(__name__)

"""PSNR_CAP_DB (leakbench.core.vocabulary): the PSNR reported for identical images. True PSNR is +inf when MSE is 0; every image whose
MSE is at most ``1e-10`` (where 10·log10(1/MSE) reaches 100 dB) reports exactly this
capped value, so leaderboards stay finite and comparable."""

_MSE_FLOOR = 1e-10

SSIM_SIGMA: float = 1.5
SSIM_WINDOW: int = 11  # what skimage derives from sigma=1.5 with gaussian_weights=True


def as_unit_images(images: torch.Tensor, *, name: str = "images") -> torch.Tensor:
    """``images`` detached, as float64 on the CPU, non-finite values fixed, clamped to [0, 1]."""
    if images.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(images.shape)}")
    x = images.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        logger.warning("%s has %d non-finite pixels; scoring them as 0 (NaN, -inf) or 1 (+inf)", name, bad)
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
    return x.clamp(0.0, 1.0)


def _paired(reconstruction: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = as_unit_images(reconstruction, name="reconstruction")
    y = as_unit_images(reference, name="reference")
    if x.shape != y.shape:
        raise ValueError(
            f"paired metrics need images of one shape, got reconstruction {tuple(x.shape)} "
            f"and reference {tuple(y.shape)}; match them first (match_to_reference)"
        )
    return x, y


def psnr_db(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image pair, in dB, data range 1: ``(B,)`` float64.

    PSNR = 10·log10(1 / MSE) with the MSE over all channels and pixels of one image.
    Identical images (MSE <= 1e-10) report :data:`PSNR_CAP_DB` instead of +inf.
    """
    x, y = _paired(reconstruction, reference)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(_MSE_FLOOR))
    return psnr.clamp(max=PSNR_CAP_DB)


def ssim(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image pair (Wang et al. 2004): ``(B,)`` float64.

    scikit-image's ``structural_similarity`` with an 11-tap Gaussian window
    (sigma 1.5), population covariances and data range 1; colour images are scored per
    channel and averaged. Needs both sides >= 11 px (the window).
    """
    x, y = _paired(reconstruction, reference)
    h, w = x.shape[-2:]
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM's {SSIM_WINDOW}-px Gaussian window needs images of at least that side, got {h}x{w}")
    grey = x.shape[1] == 1
    scores = []
    for a, b in zip(x.numpy(), y.numpy()):
        if grey:
            a_img, b_img, axis = a[0], b[0], None
        else:
            a_img, b_img, axis = np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1), -1
        scores.append(
            structural_similarity(
                a_img,
                b_img,
                gaussian_weights=True,
                sigma=SSIM_SIGMA,
                use_sample_covariance=False,
                data_range=1.0,
                channel_axis=axis,
            )
        )
    return torch.tensor(scores, dtype=torch.float64)


def pairwise_mse(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """MSE between every reference image (rows) and every reconstruction (columns), float64."""
    x = as_unit_images(reconstruction, name="reconstruction").flatten(1)
    y = as_unit_images(reference, name="reference").flatten(1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"cannot match reconstructions of shape {tuple(reconstruction.shape[1:])} to references of shape "
            f"{tuple(reference.shape[1:])}"
        )
    # ||y - x||^2 = ||y||^2 + ||x||^2 - 2 y.x ; exact enough in float64 for values in [0, 1].
    sq = y.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1).unsqueeze(0) - 2.0 * (y @ x.T)
    return sq.clamp_min(0.0) / x.shape[1]


def match_to_reference(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each reference image, the index of its reconstruction: ``(B_ref,)`` int64.

    Attacks return a batch in arbitrary order, so images are paired one-to-one by the
    assignment with the least total MSE (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``) before any metric is taken. Needs at
    least as many reconstructions as references.
    """
    n_ref, n_rec = reference.shape[0], reconstruction.shape[0]
    if n_rec < n_ref:
        raise ValueError(
            f"one-to-one matching needs at least as many reconstructions as references, got {n_rec} for {n_ref}"
        )
    cost = pairwise_mse(reconstruction, reference).numpy()
    rows, cols = linear_sum_assignment(cost)
    matched = np.empty(n_ref, dtype=np.int64)
    matched[rows] = cols
    return torch.from_numpy(matched)


def label_accuracy(predicted: torch.Tensor | None, true: torch.Tensor) -> float | None:
    """Share of the true labels recovered, as multisets; ``None`` when no labels were given.

    Label-recovery attacks return a batch's labels without order, so accuracy is the
    multiset overlap: the sum over classes of min(count predicted, count true),
    divided by the batch size. Example: predicted [1, 1, 2] vs true [1, 2, 2] -> 2/3.
    """
    if predicted is None:
        return None
    true_flat = true.detach().to("cpu", torch.int64).reshape(-1)
    pred_flat = predicted.detach().to("cpu", torch.int64).reshape(-1)
    if true_flat.numel() == 0:
        raise ValueError("label accuracy needs at least one true label")
    if (true_flat < 0).any() or (pred_flat < 0).any():
        raise ValueError("labels must be non-negative class indices")
    size = int(max(true_flat.max().item(), pred_flat.max().item() if pred_flat.numel() else 0)) + 1
    counts_true = torch.bincount(true_flat, minlength=size)
    counts_pred = torch.bincount(pred_flat, minlength=size)
    overlap = int(torch.minimum(counts_true, counts_pred).sum())
    return overlap / true_flat.numel()

