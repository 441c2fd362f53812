"""Score one reconstruction against its client's batch: the per-image rows of a report."""

from __future__ import annotations

from dataclasses import dataclass

from leakbench.core.types import Batch, Reconstruction
from leakbench.metrics.image import label_accuracy, match_to_reference, psnr_db, ssim
from leakbench.metrics.perceptual import LPIPSScorer, get_lpips


@dataclass(frozen=True)
class ImageScore:
    """Metrics of one ground-truth image against the reconstruction matched to it."""

    reference_index: int  # index into Batch.images
    matched_index: int  # index into Reconstruction.images
    psnr_db: float  # capped at PSNR_CAP_DB for identical images
    ssim: float
    lpips: float | None  # None when LPIPS is unavailable (see BatchScore.lpips_reason)


@dataclass(frozen=True)
class BatchScore:
    """Per-image scores of a batch, its label accuracy, and why LPIPS is missing (if it is)."""

    images: tuple[ImageScore, ...]
    label_accuracy: float | None  # None when the attack returned no labels
    lpips_reason: str | None


def score(
    reconstruction: Reconstruction,
    batch: Batch,
    *,
    lpips_scorer: LPIPSScorer | None = None,
) -> BatchScore:
    """Match the reconstructed images to the batch one-to-one, then score every batch image.

    Matching (Hungarian on per-pair MSE) comes first because attacks return images in
    arbitrary order; each reference image is then scored against its own match.
    Labels are compared as multisets. ``lpips_scorer`` defaults to the process-wide
    scorer for the batch's device.
    """
    scorer = lpips_scorer if lpips_scorer is not None else get_lpips(batch.images.device)
    reference = batch.images
    matched = match_to_reference(reconstruction.images, reference)
    aligned = reconstruction.images[matched.to(reconstruction.images.device)]
    psnr = psnr_db(aligned, reference)
    sim = ssim(aligned, reference)
    perceptual = scorer(aligned, reference)
    images = tuple(
        ImageScore(
            reference_index=i,
            matched_index=int(matched[i]),
            psnr_db=float(psnr[i]),
            ssim=float(sim[i]),
            lpips=None if perceptual is None else float(perceptual[i]),
        )
        for i in range(batch.size)
    )
    return BatchScore(
        images=images,
        label_accuracy=label_accuracy(reconstruction.labels, batch.labels),
        lpips_reason=None if scorer.available else scorer.reason,
    )
