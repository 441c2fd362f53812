"""GradInversion (Yin et al. 2021, "See through gradients"): gradient matching plus image priors.

Objective per restart (images x̂ in normalized space):

    grad_weight · Σ_layers ||g(x̂) - g*||²                  Euclidean matching, scaled
  + bn_weight   · Σ_BN (||μ_l(x̂) - μ_l||₂ + ||σ²_l(x̂) - σ²_l||₂)   BatchNorm prior
  + group_weight· ||x̂ - mean over restarts of x̂||₂         group consistency
  + tv_weight   · TV(x̂) + l2_weight · ||x̂||₂

Adam (lr 0.1, not signed) with linear warm-up and cosine decay, x̂ clamped to the pixel
box after each step, and the restart with the lowest matching loss kept. Defaults: the
scales of the Euclidean term (1e-4), TV (1e-4) and L2 (1e-6), the optimizer and the
20 000 iterations with 50 warm-up steps are those of METHODS.md and public
re-implementations; ``bn_weight`` and ``group_weight`` (1e-2 each) are leakbench's
choices, the paper's values being tuned for ResNet-50 on ImageNet.

The BatchNorm targets (``bn_prior``):

- ``"shared"`` (the paper's setting): the client's batch statistics, which the server has
  only when the suite's threat model says ``bn_stats = "shared"``; otherwise the attack
  fails with ``ThreatModelError`` (a row with status error, "threat model: ...").
- ``"running"``: the model's running statistics as a public proxy (the server owns the
  model); meaningful for a trained model, a generic zero-mean unit-variance prior for an
  untrained one.
- ``"none"``: no BatchNorm prior.

A victim without BatchNorm has an empty prior whatever ``bn_prior`` says.

Packable: observations of one model with the same shape of update and of BatchNorm
statistics run as one vectorized computation (``optimize.run_packed``); each keeps its own
targets, labels, seeded initialization and group consensus (the mean over its own
restarts), so a pack gives what the separate calls give.

Simplifications, stated: the group's consensus is the plain mean over restarts, updated
every step (the paper registers the restarts to each other first, and adds Langevin
noise); labels come from the case's label strategy (Yin's own, ``yin``, assumes distinct
labels, so the battery uses ``geng`` at batch sizes above 1).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from leakbench.attacks.common import PackedAttack, attacker_model, update_signature
from leakbench.attacks.optimize import (
    Schedule,
    State,
    bn_prior,
    bn_statistics_fn,
    box_projection,
    group_distance,
    initial_images,
    l2_norm,
    restart_mean,
    run_packed,
    squared_distance,
    stack_inputs,
    target_gradients,
    to_pixels,
    total_variation,
)
from leakbench.attacks.registry import ATTACKS
from leakbench.core import Attack, Observation, ParamError, Reconstruction, ThreatModelError

BNPrior = Literal["shared", "running", "none"]


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _shared_targets(observation: Observation, model: nn.Module) -> tuple:
    if observation.bn_stats is None:
        raise ThreatModelError(
            "gradinversion with bn_prior = \"shared\" needs the client's BatchNorm batch statistics, which this "
            "threat model does not grant (threat_model.bn_stats = \"none\"); set [threat_model] bn_stats = "
            "\"shared\" (an oracle setting shown in every report), or bn_prior = \"running\" (the model's running "
            "statistics, a public proxy) or \"none\""
        )
    return observation.bn_stats


def _running_targets(observation: Observation, model: nn.Module) -> tuple:
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_mean is None or module.running_var is None:
                raise ValueError(f"gradinversion with bn_prior = \"running\": BatchNorm layer {name!r} keeps no "
                                 "running statistics; use bn_prior = \"shared\" or \"none\"")
            targets.append((module.running_mean.detach().clone(), module.running_var.detach().clone()))
    return tuple(targets)


def _no_targets(observation: Observation, model: nn.Module) -> tuple:
    return ()


BN_TARGETS = {"shared": _shared_targets, "running": _running_targets, "none": _no_targets}


class GradInversion(PackedAttack):
    name = "gradinversion"

    def __init__(self, *, schedule: Schedule, restarts: int, grad_weight: float, bn_weight: float, bn_prior: BNPrior,
                 group_weight: float, tv_weight: float, l2_weight: float, init: str):
        self.schedule = schedule
        self.restarts = restarts
        self.grad_weight = grad_weight
        self.bn_weight = bn_weight
        self.bn_prior = bn_prior
        self.group_weight = group_weight
        self.tv_weight = tv_weight
        self.l2_weight = l2_weight
        self.init = init

    def bn_targets(self, observation: Observation, model: nn.Module) -> tuple:
        """The BatchNorm statistics the prior pulls toward; raises ``ThreatModelError`` where they are not granted."""
        if not _has_batchnorm(model) or self.bn_weight == 0:
            return ()
        return BN_TARGETS[self.bn_prior](observation, model)

    def pack_signature(self, observation: Observation) -> tuple:
        shared = None if observation.bn_stats is None else tuple(tuple(m.shape) for m, _ in observation.bn_stats)
        return (*update_signature(observation), shared)

    def initial_state(self, observation: Observation, *, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> State:
        return {"x": initial_images(observation, restarts=self.restarts, init=self.init, generator=generator,
                                    device=torch.device(device))}

    def reconstruct_many(self, observations: Sequence[Observation], model, *, labels, generators, deadline=None,
                         progress=None) -> list[Reconstruction]:
        self.check(observations, labels)
        # before any compute: a threat-model error is immediate
        bn_targets = [self.bn_targets(o, model) for o in observations]
        first = observations[0]
        device = next(model.parameters()).device
        attacker = attacker_model(model, first, device)
        candidate = bn_statistics_fn(attacker, first, acceleration=self.acceleration)
        layers, bn_layers = len(first.update), len(bn_targets[0])
        rows = []
        for o, y, bn in zip(observations, labels, bn_targets):
            row = {"y": y.to(device), **{f"t{i}": t for i, t in enumerate(target_gradients(o, device))}}
            for j, (mean, var) in enumerate(bn):
                row[f"mean{j}"], row[f"var{j}"] = mean.to(device), var.to(device)
            rows.append(row)
        coupled = self.restarts > 1 and self.group_weight > 0
        weights = self

        def objective(state: State, given: State):
            x = state["x"]
            grads, stats = candidate(x, given["y"])
            matching = squared_distance(grads, tuple(given[f"t{i}"] for i in range(layers)))
            total = weights.grad_weight * matching + weights.tv_weight * total_variation(x)
            total = total + weights.l2_weight * l2_norm(x)
            if bn_layers:
                targets = tuple((given[f"mean{j}"], given[f"var{j}"]) for j in range(bn_layers))
                total = total + weights.bn_weight * bn_prior(stats, targets)
            if coupled:
                total = total + weights.group_weight * group_distance(x, given["group_mean"])
            return total, matching

        init = torch.cat([self.initial_state(o, generator=g, device=device)["x"]
                          for o, g in zip(observations, generators)])
        results = run_packed(objective, {"x": init}, groups=len(observations), inputs=stack_inputs(rows),
                             schedule=self.schedule, project=box_projection(first, init), deadline=deadline,
                             progress=progress, consensus=restart_mean if coupled else None,
                             acceleration=self.acceleration)
        out = []
        for o, y, r in zip(observations, labels, results):
            images, raw = to_pixels(r.state["x"], o)
            out.append(Reconstruction(
                images=images, labels=y.cpu(), matching_loss=float(r.matching_losses[r.best]), trace=r.trace,
                iterations=self.schedule.iterations, restarts=self.restarts, raw_images=raw,
            ))
        return out


@ATTACKS.register("gradinversion", version="1")
def gradinversion(
    *,
    iterations: int = 20000,
    restarts: int = 4,
    lr: float = 0.1,
    warmup: int = 50,
    grad_weight: float = 1e-4,
    bn_weight: float = 1e-2,
    bn_prior: BNPrior = "shared",
    group_weight: float = 1e-2,
    tv_weight: float = 1e-4,
    l2_weight: float = 1e-6,
    init: Literal["randn", "rand"] = "randn",
) -> Attack:
    """Yin et al. 2021: scaled Euclidean matching + BatchNorm prior + group consistency + TV + L2; Adam, cosine decay."""
    for param, value in (("iterations", iterations), ("restarts", restarts)):
        if value < 1:
            raise ParamError(param, f"must be >= 1, got {value}")
    if lr <= 0:
        raise ParamError("lr", f"must be > 0, got {lr}")
    if warmup < 0:
        raise ParamError("warmup", f"must be >= 0, got {warmup}")
    for param, value in (("grad_weight", grad_weight), ("bn_weight", bn_weight), ("group_weight", group_weight),
                         ("tv_weight", tv_weight), ("l2_weight", l2_weight)):
        if value < 0:
            raise ParamError(param, f"must be >= 0, got {value}")
    if grad_weight == 0:
        raise ParamError("grad_weight", "must be > 0: without gradient matching nothing is inverted")
    schedule = Schedule(iterations=iterations, lr=lr, signed=False, decay="cosine", warmup=warmup)
    return GradInversion(schedule=schedule, restarts=restarts, grad_weight=grad_weight, bn_weight=bn_weight,
                         bn_prior=bn_prior, group_weight=group_weight, tv_weight=tv_weight, l2_weight=l2_weight,
                         init=init)
