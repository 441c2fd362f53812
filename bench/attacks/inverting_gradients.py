"""Inverting Gradients (Geiping et al. 2020): cosine gradient matching plus total variation."""

from __future__ import annotations

from typing import Literal

import torch

from bench.attacks.common import attacker_model
from bench.attacks.fedavg import update_fn
from bench.attacks.optimize import MATCHING, Schedule, run_restarts, target_gradients, total_variation
from bench.attacks.registry import ATTACKS
from bench.core import Attack, ParamError, Reconstruction


class InvertingGradients(Attack):
    def __init__(self, *, iterations: int, restarts: int, lr: float, tv_weight: float, init: str, signed: bool):
        self.iterations = iterations
        self.restarts = restarts
        self.lr = lr
        self.tv_weight = tv_weight
        self.init = init
        self.signed = signed

    def reconstruct(self, observation, model, *, labels, generator, deadline=None, progress=None):
        if labels is None:
            raise ValueError("inverting_gradients needs labels from a label strategy")
        device = next(model.parameters()).device
        attacker = attacker_model(model, observation, device)
        # FedSGD: the candidates' gradient; FedAvg (section 6 of the paper): the clients' local
        # SGD steps unrolled on the candidates, as the pseudo-gradient -delta / lr.
        candidate = update_fn(attacker, observation)
        target = target_gradients(observation, device)
        y = labels.to(device)
        tv_weight = self.tv_weight
        distance = MATCHING["cosine"]

        def objective(state):
            x = state["x"]
            matching = distance(candidate(x, y), target)
            return matching + tv_weight * total_variation(x), matching

        shape = (self.restarts, observation.batch_size, *observation.input_shape)
        if self.init == "randn":
            x0 = torch.randn(shape, generator=generator)
        else:
            x0 = torch.rand(shape, generator=generator)
            x0 = observation.normalization.normalize(x0)
        x0 = x0.to(device)
        lo, hi = observation.normalization.box(x0)

        def project(state):
            state["x"].copy_(torch.maximum(torch.minimum(state["x"], hi), lo))

        project({"x": x0})
        result = run_restarts(
            objective,
            {"x": x0},
            schedule=Schedule(iterations=self.iterations, lr=self.lr, signed=self.signed),
            project=project,
            deadline=deadline,
            progress=progress,
        )
        images = observation.normalization.denormalize(result.state["x"]).clamp(0, 1).cpu()
        return Reconstruction(
            images=images,
            labels=labels.cpu(),
            matching_loss=float(result.matching_losses[result.best]),
            trace=result.trace,
            iterations=self.iterations,
            restarts=self.restarts,
        )


@ATTACKS.register("inverting_gradients", version="1")
def inverting_gradients(
    *,
    iterations: int = 4800,
    restarts: int = 1,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    init: Literal["randn", "rand"] = "randn",
    signed: bool = True,
) -> Attack:
    """Geiping et al. 2020: 1 - cosine(g, g*) + TV, Adam on the gradient's sign, lr x0.1 at 3/8, 5/8, 7/8; best of R restarts."""
    if iterations < 1:
        raise ParamError("iterations", f"must be >= 1, got {iterations}")
    if restarts < 1:
        raise ParamError("restarts", f"must be >= 1, got {restarts}")
    if lr <= 0:
        raise ParamError("lr", f"must be > 0, got {lr}")
    if tv_weight < 0:
        raise ParamError("tv_weight", f"must be >= 0, got {tv_weight}")
    return InvertingGradients(iterations=iterations, restarts=restarts, lr=lr, tv_weight=tv_weight, init=init, signed=signed)
