"""Reconstruction metrics: PSNR, SSIM, LPIPS (AlexNet v0.1, real ImageNet trunk), label accuracy.

Definitions are fixed here and named in every report (see DESIGN.md, "Metrics"):
images in [0, 1]; reconstructions matched to the batch one-to-one (Hungarian on MSE);
PSNR capped at :data:`PSNR_CAP_DB` for identical images; SSIM from scikit-image
(Gaussian window 11, sigma 1.5, data range 1); LPIPS ``None`` with a reason when no
ImageNet AlexNet weights are available offline. Imports only ``leakbench.core`` (contract ``metrics``).
"""

from leakbench.metrics.image import PSNR_CAP_DB, label_accuracy, match_to_reference, psnr_db, ssim
from leakbench.metrics.perceptual import LPIPS_MIN_SIDE, LPIPSScorer, get_lpips
from leakbench.metrics.scoring import BatchScore, ImageScore, score

__all__ = [
    "LPIPS_MIN_SIDE",
    "PSNR_CAP_DB",
    "BatchScore",
    "ImageScore",
    "LPIPSScorer",
    "get_lpips",
    "label_accuracy",
    "match_to_reference",
    "psnr_db",
    "score",
    "ssim",
]
