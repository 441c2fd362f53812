"""The optimization core every gradient-matching attack shares.

An attack describes its candidate state (images, and whatever else it optimizes) as a
dict of tensors and an objective over one restart's state; this module runs all R
restarts as one vectorized computation (``torch.func.vmap``), with the optimizer, the
step schedule, the pixel box, the time budget and the attacker-side choice of the
winning restart. Selection never looks at the ground truth.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks.common import as_gradient
from bench.core import AttackTimeout, Observation

State = dict[str, torch.Tensor]
# objective(state of one restart) -> (total loss, matching loss); both scalars
Objective = Callable[[State], tuple[torch.Tensor, torch.Tensor]]
Projection = Callable[[State], None]


@dataclass(frozen=True)
class Schedule:
    """Adam with a step-decay schedule (lr x ``gamma`` at the given fractions of the budget)."""

    iterations: int
    lr: float
    milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)
    gamma: float = 0.1
    signed: bool = True  # step on the sign of the gradient (Geiping et al.)

    def milestone_steps(self) -> list[int]:
        return sorted({max(1, int(math.floor(f * self.iterations))) for f in self.milestones})


@dataclass(frozen=True)
class RestartResult:
    state: State  # the winning restart's state (no leading restart dimension)
    matching_losses: torch.Tensor  # (R,) final attacker-side loss of every restart
    best: int
    trace: tuple[tuple[int, float], ...]  # (iteration, best matching loss so far over restarts)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (Geiping et al.'s TV prior)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def target_gradients(observation: Observation, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(as_gradient(observation, u).to(device) for u in observation.update)


def gradient_fn(attacker: nn.Module, observation: Observation) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """Candidate gradient g(x, y) of the mean cross-entropy, in the observation's parameter order.

    ``y`` is either class indices (B,) or soft labels (B, classes). Functional, so it can
    be differentiated again with respect to x and vmapped over restarts.
    """
    named = dict(attacker.named_parameters())
    missing = [n for n in observation.param_names if n not in named]
    if missing:
        raise ValueError(f"the observation has parameters the attacker's model lacks: {missing[:3]}")
    params = {n: named[n].detach() for n in observation.param_names}
    buffers = {n: b for n, b in attacker.named_buffers()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(attacker, (p, buffers), (x,))
        return F.cross_entropy(out, y)

    grad = torch.func.grad(loss)

    def candidate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g = grad(params, x, y)
        return tuple(g[n] for n in observation.param_names)

    return candidate


def cosine_distance(g: tuple[torch.Tensor, ...], t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """1 - cosine similarity of all layers' gradients concatenated."""
    dot = sum((a * b).sum() for a, b in zip(g, t))
    gn = sum(a.pow(2).sum() for a in g)
    tn = sum(b.pow(2).sum() for b in t)
    return 1 - dot / (gn.sqrt() * tn.sqrt() + 1e-12)


def squared_distance(g: tuple[torch.Tensor, ...], t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Sum over layers of the squared Euclidean distance (DLG)."""
    return sum((a - b).pow(2).sum() for a, b in zip(g, t))


MATCHING = {"cosine": cosine_distance, "euclidean": squared_distance}


def run_restarts(
    objective: Objective,
    init: State,
    *,
    schedule: Schedule,
    project: Projection | None = None,
    deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    trace_points: int = 50,
) -> RestartResult:
    """Optimize R restarts at once; every tensor of ``init`` has the restart dimension first.

    Adam is elementwise, so one optimizer over the stacked restarts behaves exactly as R
    independent optimizers.
    """
    state = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
    restarts = next(iter(state.values())).shape[0]
    step = torch.func.vmap(torch.func.grad_and_value(objective, has_aux=True))
    optimizer = torch.optim.Adam(list(state.values()), lr=schedule.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=schedule.milestone_steps(), gamma=schedule.gamma)
    stride = max(1, schedule.iterations // max(1, trace_points))
    trace: list[tuple[int, float]] = []
    report_every = max(1, schedule.iterations // 100)
    for it in range(schedule.iterations):
        if deadline is not None and time.monotonic() > deadline:
            raise AttackTimeout(f"time budget ran out after {it} of {schedule.iterations} iterations")
        grads, (_, matching) = step({k: v.detach() for k, v in state.items()})
        for k, v in state.items():
            g = grads[k]
            v.grad = g.sign() if schedule.signed else g
        optimizer.step()
        scheduler.step()
        if project is not None:
            with torch.no_grad():
                project(state)
        if it % stride == 0 or it == schedule.iterations - 1:
            trace.append((it, float(matching.min())))
        if progress is not None and (it % report_every == 0 or it == schedule.iterations - 1):
            progress(it + 1, schedule.iterations)
    with torch.no_grad():
        final = {k: v.detach() for k, v in state.items()}
        _, matching = torch.func.vmap(objective)(final)
    losses = torch.nan_to_num(matching.detach(), nan=float("inf"))
    best = int(torch.argmin(losses))
    return RestartResult(
        state={k: v[best] for k, v in final.items()},
        matching_losses=losses.cpu(),
        best=best,
        trace=tuple(trace),
    )
