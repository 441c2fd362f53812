"""Inverting Gradients (Geiping et al. 2020): cosine gradient matching plus total variation.

Packable: observations of the same model with the same shape of update (``pack_signature``)
are reconstructed together, restarts × observations as one vectorized computation
(``optimize.run_packed``); each observation keeps its own target, labels and seeded
initialization, so a pack gives what the separate calls give. On a plain sequential victim
(LeNet, ConvNet, the fully connected ones) the candidates' gradient comes from the victim's
backward pass written out for all rows at once (``layerwise``), the same numbers up to
floating-point order at about half the cost of differentiating autograd's own backward
per row (measured on 8 packed ConvNet and LeNet reconstructions); any other victim, FedAvg's
unrolled local steps, and a call of a single row (where plain autograd was a few per cent
faster) take the general path.
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import torch

from leakbench.attacks.common import PackedAttack, attacker_model
from leakbench.attacks.fedavg import update_fn
from leakbench.attacks.layerwise import LayerwiseGradients, Unsupported
from leakbench.attacks.tangent import CosineMatching
from leakbench.attacks.optimize import (
    MATCHING,
    MATCHING_ROWS,
    Schedule,
    box_projection,
    flat_targets,
    initial_images,
    run_packed,
    stack_inputs,
    target_gradients,
    total_variation,
    total_variation_rows,
    total_variation_rows_and_gradient,
)
from leakbench.attacks.registry import ATTACKS
from leakbench.core import Attack, Observation, ParamError, Reconstruction

log = logging.getLogger(__name__)


class InvertingGradients(PackedAttack):
    name = "inverting_gradients"

    def __init__(self, *, iterations: int, restarts: int, lr: float, tv_weight: float, init: str, signed: bool,
                 distance: str = "cosine"):
        self.distance = distance  # a key of MATCHING
        self.iterations = iterations
        self.restarts = restarts
        self.lr = lr
        self.tv_weight = tv_weight
        self.init = init
        self.signed = signed

    def reconstruct_many(self, observations: Sequence[Observation], model, *, labels, generators, deadline=None,
                         progress=None) -> list[Reconstruction]:
        self.check(observations, labels)
        first = observations[0]
        device = next(model.parameters()).device
        attacker = attacker_model(model, first, device)
        layers = len(first.update)
        inputs = stack_inputs([{"y": y.to(device), **{f"t{i}": t for i, t in enumerate(target_gradients(o, device))}}
                               for o, y in zip(observations, labels)])
        tv_weight = self.tv_weight
        rows_gradients = gradient = None
        if len(observations) * self.restarts > 1:  # one row: plain autograd measured a few % faster
            try:  # a plain sequential victim: its backward written out, all rows at once (``layerwise``)
                rows_gradients = LayerwiseGradients.build(attacker, first)
            except Unsupported as why:
                log.debug("%s: the general path (%s)", self.name, why)
        if rows_gradients is None:
            # FedSGD: the candidates' gradient; FedAvg (section 6 of the paper): the clients' local
            # SGD steps unrolled on the candidates, as the pseudo-gradient -delta / lr.
            candidate = update_fn(attacker, first, acceleration=self.acceleration)
            distance = MATCHING[self.distance]

            def objective(state, given):
                x = state["x"]
                matching = distance(candidate(x, given["y"]), tuple(given[f"t{i}"] for i in range(layers)))
                return matching + tv_weight * total_variation(x), matching
        else:
            distance = MATCHING_ROWS[self.distance]
            restarts = self.restarts
            targets = flat_targets(tuple(inputs[f"t{i}"] for i in range(layers)))  # once, not every iteration
            labels = inputs["y"].repeat_interleave(restarts, 0)

            def objective(state, given):
                x = state["x"]
                matching = distance(rows_gradients(x, labels), targets)
                return matching + tv_weight * total_variation_rows(x), matching

            if self.distance == "cosine":
                try:  # the second pass written out too (``tangent``): no autograd graph at all
                    written = CosineMatching.build(attacker, first)
                except Unsupported as why:
                    log.debug("%s: autograd over the explicit backward (%s)", self.name, why)
                else:
                    rows_targets = targets.repeat_interleave(restarts, 0)

                    def gradient(state, given):
                        x = state["x"]
                        matching, dx = written.grad_and_value(x, labels, rows_targets)
                        tv, dtv = total_variation_rows_and_gradient(x)
                        return {"x": dx.add_(dtv, alpha=tv_weight)}, (matching + tv_weight * tv, matching)

        x0 = torch.cat([initial_images(o, restarts=self.restarts, init=self.init, generator=g, device=device)
                        for o, g in zip(observations, generators)])
        project = box_projection(first, x0)
        project({"x": x0})
        results = run_packed(
            objective, {"x": x0}, groups=len(observations), inputs=inputs,
            schedule=Schedule(iterations=self.iterations, lr=self.lr, signed=self.signed),
            project=project, deadline=deadline, progress=progress, acceleration=self.acceleration,
            vectorized=rows_gradients is not None, gradient=gradient,
        )
        return [
            Reconstruction(
                images=o.normalization.denormalize(r.state["x"]).clamp(0, 1).cpu(),
                labels=y.cpu(),
                matching_loss=float(r.matching_losses[r.best]),
                trace=r.trace,
                iterations=self.iterations,
                restarts=self.restarts,
            )
            for o, y, r in zip(observations, labels, results)
        ]


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


@ATTACKS.register("inverting_gradients_euclidean", version="1")
def inverting_gradients_euclidean(
    *,
    iterations: int = 4800,
    restarts: int = 1,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    init: Literal["randn", "rand"] = "randn",
    signed: bool = True,
) -> Attack:
    """The ablation of Geiping et al. 2020 (their section 4): Inverting Gradients' optimizer, schedule and TV prior
    with DLG's squared Euclidean matching ||g - g*||^2 instead of the cosine, so the two differ in the distance only."""
    attack = inverting_gradients(iterations=iterations, restarts=restarts, lr=lr, tv_weight=tv_weight, init=init,
                                 signed=signed)
    attack.name = "inverting_gradients_euclidean"
    attack.distance = "euclidean"
    return attack
