"""DLG (Zhu et al. 2019) and iDLG (Zhao et al. 2020): Euclidean gradient matching with L-BFGS.

DLG optimizes the images and the labels together: the labels are soft, the softmax of
free logits, both started from a standard normal draw. iDLG is the same attack with the
labels read from the gradient first (a label strategy, ``idlg`` at batch 1), so only the
images are optimized. Both run ``torch.optim.LBFGS``'s update with lr 1 and no line
search, ``iterations`` calls of 20 inner updates each as in DLG's code (see
``LBFGSSchedule``), with no projection onto the pixel box: what leaves the box is
reported (``Reconstruction.raw_images``) and clamped for scoring.
"""

from __future__ import annotations

from typing import Literal

import torch

from leakbench.attacks.common import attacker_model
from leakbench.attacks.optimize import (
    LBFGSSchedule,
    State,
    gradient_fn,
    initial_images,
    run_lbfgs,
    squared_distance,
    target_gradients,
    to_pixels,
)
from leakbench.attacks.registry import ATTACKS
from leakbench.core import Attack, Observation, ParamError, Reconstruction


class DLG(Attack):
    """Both DLG (``joint_labels``: soft labels optimized with the images) and iDLG (labels given)."""

    def __init__(self, *, name: str, joint_labels: bool, schedule: LBFGSSchedule, restarts: int, init: str):
        self.name = name
        self.joint_labels = joint_labels
        self.uses_labels = not joint_labels
        self.schedule = schedule
        self.restarts = restarts
        self.init = init

    def initial_state(self, observation: Observation, *, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> State:
        """The restarts' starting point: images (and, for DLG, label logits), standard normal as in DLG's code."""
        state = {"x": initial_images(observation, restarts=self.restarts, init=self.init, generator=generator,
                                     device=torch.device(device))}
        if self.joint_labels:
            shape = (self.restarts, observation.batch_size, observation.num_classes)
            state["y"] = torch.randn(shape, generator=generator).to(device)
        return state

    def reconstruct(self, observation, model, *, labels, generator, deadline=None, progress=None):
        if not self.joint_labels and labels is None:
            raise ValueError(f"{self.name} needs labels from a label strategy (idlg at batch size 1)")
        device = next(model.parameters()).device
        attacker = attacker_model(model, observation, device)
        candidate = gradient_fn(attacker, observation, acceleration=self.acceleration)
        target = target_gradients(observation, device)
        given = None if self.joint_labels else labels.to(device)

        def objective(state: State):
            y = torch.softmax(state["y"], dim=-1) if given is None else given
            matching = squared_distance(candidate(state["x"], y), target)
            return matching, matching

        result = run_lbfgs(objective, self.initial_state(observation, generator=generator, device=device),
                           schedule=self.schedule, deadline=deadline, progress=progress)
        images, raw = to_pixels(result.state["x"], observation)
        used = result.state["y"].argmax(-1).cpu() if given is None else labels.cpu()
        return Reconstruction(
            images=images, labels=used.to(torch.int64), matching_loss=float(result.matching_losses[result.best]),
            trace=result.trace, iterations=self.schedule.updates, restarts=self.restarts, raw_images=raw,
        )


def _schedule(*, iterations: int, lr: float, inner_steps: int, history_size: int, restarts: int,
              line_search: str) -> LBFGSSchedule:
    for param, value in (("iterations", iterations), ("inner_steps", inner_steps), ("history_size", history_size),
                         ("restarts", restarts)):
        if value < 1:
            raise ParamError(param, f"must be >= 1, got {value}")
    if lr <= 0:
        raise ParamError("lr", f"must be > 0, got {lr}")
    return LBFGSSchedule(iterations=iterations, lr=lr, inner_steps=inner_steps, history_size=history_size,
                         line_search=line_search)


@ATTACKS.register("dlg", version="2")
def dlg(
    *,
    iterations: int = 300,
    lr: float = 1.0,
    inner_steps: int = 20,
    history_size: int = 100,
    restarts: int = 1,
    init: Literal["randn", "rand"] = "randn",
    line_search: Literal["strong_wolfe", "none"] = "strong_wolfe",
) -> Attack:
    """Zhu et al. 2019: Euclidean gradient matching, images and soft labels jointly, L-BFGS lr 1, 300 x 20 updates."""
    schedule = _schedule(iterations=iterations, lr=lr, inner_steps=inner_steps, history_size=history_size,
                         restarts=restarts, line_search=line_search)
    return DLG(name="dlg", joint_labels=True, schedule=schedule, restarts=restarts, init=init)


@ATTACKS.register("idlg", version="2")
def idlg(
    *,
    iterations: int = 300,
    lr: float = 1.0,
    inner_steps: int = 20,
    history_size: int = 100,
    restarts: int = 1,
    init: Literal["randn", "rand"] = "randn",
    line_search: Literal["strong_wolfe", "none"] = "strong_wolfe",
) -> Attack:
    """Zhao et al. 2020: DLG with the labels read first (a label strategy), images only, L-BFGS lr 1."""
    schedule = _schedule(iterations=iterations, lr=lr, inner_steps=inner_steps, history_size=history_size,
                         restarts=restarts, line_search=line_search)
    return DLG(name="idlg", joint_labels=False, schedule=schedule, restarts=restarts, init=init)
