"""``label_only``: no image attack at all, a measuring device for label recovery.

It returns a constant grey image (0.5 everywhere) for every slot and the labels of the
case's label strategy, so its rows carry the strategy's label accuracy and, as PSNR, the
floor that any real attack must beat (the bar of the ``no_leak_undefended`` sanity flag).
``suites/labels.toml`` runs it to compare label strategies without paying for attacks.
It is registered as a baseline: reports show its PSNR as the row's floor and never count
it in a worst case, an average or a leak rate.
"""

from __future__ import annotations

import torch

from leakbench.attacks.registry import ATTACKS
from leakbench.core import Attack, Reconstruction


class LabelOnly(Attack):
    uses_labels = True

    def reconstruct(self, observation, model, *, labels, generator, deadline=None, progress=None):
        if labels is None:
            raise ValueError("label_only reports a label strategy's labels; the case must name one")
        images = torch.full((observation.batch_size, *observation.input_shape), 0.5)
        if progress is not None:
            progress(1, 1)
        return Reconstruction(images=images, labels=labels.cpu(), matching_loss=float("inf"), iterations=0, restarts=1)


@ATTACKS.register("label_only", version="1", baseline=True)
def label_only() -> Attack:
    """No image attack: a constant grey guess with the label strategy's labels (label accuracy and the PSNR floor)."""
    return LabelOnly()
