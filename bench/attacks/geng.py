"""Geng et al. 2021 ("Towards general deep leakage in federated learning"), FedSGD and FedAvg forms.

Images are reconstructed with the labels restored by the zero-shot count method (label
strategy ``geng``, which the battery pairs with this attack), by L-BFGS (lr 0.1) from a
uniform pixel initialization, minimizing

    Σ_layers ||g(x̂, ŷ) - g*||²  +  tv_weight · TV(x̂)
    + clip_weight · mean squared excursion of x̂ outside the pixel box
    + scale_weight · ||x̂||₂

L-BFGS cannot project onto the box, so the box is a penalty ("clipping"); the scale term
keeps the candidates' magnitude bounded. The penalty weights are leakbench's reading of
the paper, which names the terms without values in our notes; the iteration count
follows the paper (about 600) with DLG's inner-step convention (``LBFGSSchedule``).

What g and g* are depends on the observation (``TARGETS``, ``CANDIDATES``):

- FedSGD (``kind = "gradients"``): g* is the observed gradient, g the candidates' gradient.
- FedAvg (``kind = "weight_delta"``): g* is the weight difference turned into the
  pseudo-gradient -Δ/η (``common.as_gradient``; η the public local lr). The parameter
  ``fedavg`` chooses g:

  - ``"pseudo_gradient"`` (the paper's FedAvg form, the default): the candidates' gradients
    at the server's weights, one per public local step (mini-batches of b in slot order),
    summed (``fedavg.frozen_training_fn``): the update the client would send if its steps
    did not move the weights. Exact for one local step; with several it is an
    approximation that degrades as the steps move the weights. Summing the steps, rather
    than matching one gradient against -Δ/η, keeps both sides on the same scale: -Δ/η is
    about T times the mean gradient after T steps, which a Euclidean match cannot absorb.
  - ``"unrolled"``: the attacker simulates the clients' local SGD steps on the candidates,
    differentiably (``fedavg.update_fn``, Geiping et al.'s section 6), with the public
    step count, local batch size and lr, and matches the simulated -Δ/η. The paper's
    other variant matches each step's gradient at the intermediate models, which the
    server never sees; unrolling reaches the same models from the candidates instead.

Either way the labels are the label strategy's (``geng`` counts them from the mean step
gradient -Δ/(η·T)), one per candidate slot; the client's per-step labels are never part of the observation.
"""

from __future__ import annotations

import typing
from typing import Callable, Literal

import torch

from leakbench.attacks.common import attacker_model
from leakbench.attacks.fedavg import CandidateFn, frozen_training_fn, update_fn
from leakbench.attacks.optimize import (
    LBFGSSchedule,
    State,
    box_penalty,
    gradient_fn,
    initial_images,
    l2_norm,
    run_lbfgs,
    squared_distance,
    target_gradients,
    to_pixels,
    total_variation,
)
from leakbench.attacks.registry import ATTACKS
from leakbench.core import Attack, Observation, ParamError, Reconstruction


FedAvgForm = Literal["pseudo_gradient", "unrolled"]

#: what the attack matches against, per kind of observed update (in gradient units)
TARGETS: dict[str, Callable[[Observation, torch.device], tuple[torch.Tensor, ...]]] = {
    "gradients": target_gradients,
    "weight_delta": target_gradients,  # -delta / local lr (common.as_gradient)
}

#: the candidates' counterpart of the target, per (kind of observation, FedAvg form)
CANDIDATES: dict[tuple[str, str | None], Callable[..., CandidateFn]] = {
    ("gradients", None): gradient_fn,
    ("weight_delta", "pseudo_gradient"): frozen_training_fn,
    ("weight_delta", "unrolled"): update_fn,
}


class Geng(Attack):
    def __init__(self, *, schedule: LBFGSSchedule, restarts: int, tv_weight: float, clip_weight: float,
                 scale_weight: float, init: str, fedavg: FedAvgForm = "pseudo_gradient"):
        self.schedule = schedule
        self.fedavg = fedavg
        self.restarts = restarts
        self.tv_weight = tv_weight
        self.clip_weight = clip_weight
        self.scale_weight = scale_weight
        self.init = init

    def initial_state(self, observation: Observation, *, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> State:
        return {"x": initial_images(observation, restarts=self.restarts, init=self.init, generator=generator,
                                    device=torch.device(device))}

    def reconstruct(self, observation, model, *, labels, generator, deadline=None, progress=None):
        if observation.kind not in TARGETS:
            raise ValueError(f"geng matches gradients or weight differences; it has no form for observations of "
                             f"kind {observation.kind!r} (known: {', '.join(TARGETS)})")
        if labels is None:
            raise ValueError("geng needs labels from a label strategy (its own: labels = \"geng\")")
        device = next(model.parameters()).device
        attacker = attacker_model(model, observation, device)
        form = self.fedavg if observation.kind == "weight_delta" else None
        candidate = CANDIDATES[(observation.kind, form)](attacker, observation, acceleration=self.acceleration)
        target = TARGETS[observation.kind](observation, device)
        y = labels.to(device)
        init = self.initial_state(observation, generator=generator, device=device)
        lo, hi = observation.normalization.box(init["x"][0])
        weights = self

        def objective(state: State):
            x = state["x"]
            matching = squared_distance(candidate(x, y), target)
            total = matching + weights.tv_weight * total_variation(x) + weights.clip_weight * box_penalty(x, lo, hi)
            return total + weights.scale_weight * l2_norm(x), matching

        result = run_lbfgs(objective, init, schedule=self.schedule, deadline=deadline, progress=progress)
        images, raw = to_pixels(result.state["x"], observation)
        return Reconstruction(
            images=images, labels=labels.cpu(), matching_loss=float(result.matching_losses[result.best]),
            trace=result.trace, iterations=self.schedule.updates, restarts=self.restarts, raw_images=raw,
        )


@ATTACKS.register("geng", version="2")
def geng(
    *,
    iterations: int = 600,
    lr: float = 0.1,
    inner_steps: int = 20,
    history_size: int = 100,
    restarts: int = 1,
    tv_weight: float = 1e-4,
    clip_weight: float = 1e-2,
    scale_weight: float = 1e-6,
    init: Literal["rand", "randn"] = "rand",
    line_search: Literal["none", "strong_wolfe"] = "none",
    fedavg: FedAvgForm = "pseudo_gradient",
) -> Attack:
    """Geng et al. 2021: L2 matching + TV, clipping and scale penalties; L-BFGS lr 0.1, uniform init; zero-shot labels.

    FedAvg updates are matched as the pseudo-gradient -delta / lr, by the candidates' single gradient
    (``fedavg = "pseudo_gradient"``) or by their unrolled local steps (``"unrolled"``).
    """
    for param, value in (("iterations", iterations), ("inner_steps", inner_steps), ("history_size", history_size),
                         ("restarts", restarts)):
        if value < 1:
            raise ParamError(param, f"must be >= 1, got {value}")
    if lr <= 0:
        raise ParamError("lr", f"must be > 0, got {lr}")
    for param, value in (("tv_weight", tv_weight), ("clip_weight", clip_weight), ("scale_weight", scale_weight)):
        if value < 0:
            raise ParamError(param, f"must be >= 0, got {value}")
    if fedavg not in typing.get_args(FedAvgForm):
        raise ParamError("fedavg", f"must be one of {', '.join(typing.get_args(FedAvgForm))}, got {fedavg!r}")
    schedule = LBFGSSchedule(iterations=iterations, lr=lr, inner_steps=inner_steps, history_size=history_size,
                             line_search=line_search)
    return Geng(schedule=schedule, restarts=restarts, tv_weight=tv_weight, clip_weight=clip_weight,
                scale_weight=scale_weight, init=init, fedavg=fedavg)
