"""Sanity flags: signs that a number in the store should not be trusted as it stands.

In the spirit of AutoAttack's ``flags_doc.md``: a flag does not change any number; it is
stored beside it (per row in ``results.flags_json``, per cell in ``cells.cell_flags_json``)
so that a report can say "look here". Each flag below: when it is raised, and why it
matters.

``zero_update`` (cell)
    Raised if: every tensor of the observed update is exactly zero.
    Explanation: nothing can be reconstructed from a zero update, so every attack "fails"
    and the cell looks perfectly private. Usually a defense that destroys the update (a
    sparsifier keeping 0 entries, an overflowing quantizer) or a protocol bug, rarely a
    real property of the training setup. Check the defense's parameters.

``no_leak_undefended`` (cell)
    Raised if: the cell has no defense, batch size 1, and no attack of the cell produced a
    reconstruction scoring more than ``NO_LEAK_MARGIN_DB`` above what a constant grey image
    (0.5 everywhere) scores against the same image, including the case where every attack
    failed. That grey image is the floor; baselines (``label_only``, which returns it) are
    not counted as attacks here.
    Explanation: a single undefended image is the easiest case there is; published attacks
    recover it on most victims. If none beats a blank guess, an attack is probably broken
    (wrong labels, a budget far too small, a loss scaled differently from the client's)
    and every defended cell of the same victim is suspect too. On some victims (wide
    trained ReLU networks at small budgets) the flag can be a true negative; it asks for
    a look, it does not decide.

``pixel_range`` (row)
    Raised if: more than ``PIXEL_RANGE_SHARE`` of the values of the chosen reconstruction
    lay more than ``PIXEL_RANGE_TOLERANCE`` outside [0, 1] before the attack clamped them
    (attacks report this as ``Reconstruction.raw_images``; those that project onto the box
    every step cannot raise it).
    Explanation: the optimization ran outside the valid image box (L-BFGS attacks have no
    projection, a closed form can be ill conditioned), so the scored image is the clamp of
    something that is not an image; its score may flatter or wrong the attack. A high rate
    of this flag for one attack suggests a box penalty or a smaller learning rate.

``rero_exceeded`` (leaderboard row; the reports raise it from the store)
    Raised if: the row's defense declares a differential-privacy guarantee and the measured
    leak rate exceeds its ReRo ceiling γ for what the server saw beyond the rate's sampling
    interval: the one-sided 95% Clopper–Pearson lower limit of leaked / images is above γ
    (``leakbench.privacy.rero.exceeds_ceiling``).
    Explanation: no attack can beat γ if the guarantee holds, so the defense does not do
    what it declares (less noise, no clipping), a parameter is wrong, or κ̂ underestimates
    the prior's best guess. The guarantee of that row cannot be relied on until it is found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from leakbench.core import Observation, Reconstruction

NO_LEAK_MARGIN_DB = 1.0
PIXEL_RANGE_TOLERANCE = 2 / 255
PIXEL_RANGE_SHARE = 0.01
GREY = 0.5


@dataclass(frozen=True)
class Flag:
    name: str
    level: str  # "cell" or "row"
    raised_if: str
    explanation: str


FLAGS: dict[str, Flag] = {
    "zero_update": Flag("zero_update", "cell", "every tensor of the observed update is exactly zero",
                        "nothing can leak from a zero update: a defense or protocol bug makes the cell look private"),
    "no_leak_undefended": Flag(
        "no_leak_undefended", "cell",
        f"no defense, batch size 1, and no attack scored more than {NO_LEAK_MARGIN_DB:g} dB PSNR above a constant "
        "grey image (or every attack failed)",
        "the easiest case leaked nothing: an attack is probably broken"),
    "pixel_range": Flag(
        "pixel_range", "row",
        f"more than {PIXEL_RANGE_SHARE:.0%} of the reconstruction's values were more than {PIXEL_RANGE_TOLERANCE:.3f} "
        "outside [0, 1] before clamping",
        "the attack optimized outside the image box; the scored image is a clamp"),
    "rero_exceeded": Flag(
        "rero_exceeded", "leaderboard row",
        "the measured leak rate's one-sided 95% Clopper-Pearson lower limit lies above the row's ReRo ceiling gamma "
        "for what the server saw",
        "no attack beats a true guarantee: the defense does not do what it declares, or a parameter is wrong"),
}


def update_flags(observation: Observation) -> list[str]:
    """Cell flags that the observation alone decides (before any attack runs)."""
    if all(not bool(torch.any(u != 0)) for u in observation.update):
        return ["zero_update"]
    return []


def reconstruction_flags(reconstruction: Reconstruction, index: int) -> list[str]:
    """Row flags of image ``index`` of a reconstruction (the image matched to the row's ground truth)."""
    raw = reconstruction.raw_images
    if raw is None:
        return []
    image = raw[index].float()
    outside = (image < -PIXEL_RANGE_TOLERANCE) | (image > 1 + PIXEL_RANGE_TOLERANCE) | ~torch.isfinite(image)
    return ["pixel_range"] if float(outside.float().mean()) > PIXEL_RANGE_SHARE else []


def checks_leak(*, defense: str, batch_size: int) -> bool:
    """Whether a cell is the easy case that ``no_leak_undefended`` watches."""
    return defense == "none" and batch_size == 1


def grey_psnr_db(images: torch.Tensor) -> list[float]:
    """PSNR of a constant grey guess against each image (the bar ``no_leak_undefended`` compares with)."""
    mse = (images.detach().float().cpu() - GREY).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return [float(v) for v in (-10 * torch.log10(mse))]


def leak_flags(psnrs_db: Iterable[float | None], *, grey_db: float) -> list[str]:
    """``no_leak_undefended`` from the PSNRs of every attack's row of the cell's image (None: the attack failed)."""
    scored = [p for p in psnrs_db if p is not None]
    if not scored or max(scored) <= grey_db + NO_LEAK_MARGIN_DB:
        return ["no_leak_undefended"]
    return []
