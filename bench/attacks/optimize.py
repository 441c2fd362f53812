"""The optimization core every gradient-matching attack shares.

An attack describes its candidate state (images, and whatever else it optimizes) as a
dict of tensors and an objective over one restart's state; this module runs all R
restarts as one vectorized computation (``torch.func.vmap``), with the optimizer, the
step schedule, the pixel box, the time budget and the attacker-side choice of the
winning restart. Selection never looks at the ground truth.

Two optimizers:

- ``run_restarts``: Adam (optionally on the gradient's sign), with a step or cosine
  learning-rate schedule (``Schedule.decay``) and an optional ``consensus`` that couples
  the restarts (GradInversion's group consistency).
- ``run_lbfgs``: ``torch.optim.LBFGS``'s update (which DLG, iDLG and Geng et al. call).
  One optimizer over the concatenated restarts would be wrong, because L-BFGS's inner
  products would mix the restarts. Without line search the restarts are batched but
  independent: every restart keeps its own curvature memory, step and stopping state;
  only the evaluation of the objective is one vectorized call. With the strong-Wolfe line
  search, whose control flow differs per restart, the restarts run one after the other
  through ``torch.optim.LBFGS`` itself.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from leakbench.attacks.common import as_gradient
from leakbench.core.acceleration import NO_ACCELERATION, Acceleration
from leakbench.core import AttackTimeout, Observation

State = dict[str, torch.Tensor]
# objective(state of one restart) -> (total loss, matching loss); both scalars
Objective = Callable[[State], tuple[torch.Tensor, torch.Tensor]]
Projection = Callable[[State], None]
# consensus(states of one reconstruction's restarts, restart dimension first) -> shared tensors, detached
Consensus = Callable[[State], State]


@dataclass(frozen=True)
class Schedule:
    """Adam with a step-decay schedule (lr x ``gamma`` at the given fractions of the budget)."""

    iterations: int
    lr: float
    milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)
    gamma: float = 0.1
    signed: bool = True  # step on the sign of the gradient (Geiping et al.)
    decay: Literal["step", "cosine"] = "step"  # cosine: GradInversion's schedule (to 0 at the end)
    warmup: int = 0  # iterations of linear warm-up before the decay (cosine only)

    def milestone_steps(self) -> list[int]:
        return sorted({max(1, int(math.floor(f * self.iterations))) for f in self.milestones})

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return LR_DECAYS[self.decay](self, optimizer)

    def factor(self, it: int) -> float:
        """The learning rate of iteration ``it`` (0-based) over ``lr``: what ``scheduler`` sets."""
        if self.decay == "step":
            return self.gamma ** sum(1 for m in self.milestone_steps() if m <= it)
        return _cosine_factor(self)(it)


def _step_decay(schedule: Schedule, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=schedule.milestone_steps(), gamma=schedule.gamma)


def _cosine_decay(schedule: Schedule, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup`` iterations, then cosine decay to zero at the last iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_factor(schedule))


def _cosine_factor(schedule: Schedule) -> Callable[[int], float]:
    warmup = max(0, min(schedule.warmup, schedule.iterations - 1))
    span = max(1, schedule.iterations - warmup)

    def factor(it: int) -> float:
        if it < warmup:
            return (it + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(it - warmup, span) / span))

    return factor


LR_DECAYS = {"step": _step_decay, "cosine": _cosine_decay}


@dataclass(frozen=True)
class RestartResult:
    state: State  # the winning restart's state (no leading restart dimension)
    matching_losses: torch.Tensor  # (R,) final attacker-side loss of every restart
    best: int
    trace: tuple[tuple[int, float], ...]  # (iteration, best matching loss so far over restarts)
    iterations: int = 0  # iterations its restarts ran (fewer than the budget when they stopped early)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (Geiping et al.'s TV prior)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def target_gradients(observation: Observation, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(as_gradient(observation, u).to(device) for u in observation.update)


def attacker_params(attacker: nn.Module, observation: Observation, *,
                    acceleration: Acceleration = NO_ACCELERATION) -> tuple[dict, dict]:
    """The attacker's parameters (detached, those the observation names, in ``acceleration``'s memory
    layout) and buffers, for ``functional_call``."""
    named = dict(attacker.named_parameters())
    missing = [n for n in observation.param_names if n not in named]
    if missing:
        raise ValueError(f"the observation has parameters the attacker's model lacks: {missing[:3]}")
    return ({n: acceleration.lay_out(named[n].detach()) for n in observation.param_names},
            dict(attacker.named_buffers()))


def functional_grad(attacker: nn.Module, observation: Observation, *,
                    acceleration: Acceleration = NO_ACCELERATION) -> tuple[dict, Callable]:
    """The attacker's parameters and ``grad(p, x, y)``: the mean cross-entropy's gradient at any parameters ``p``."""
    params, buffers = attacker_params(attacker, observation, acceleration=acceleration)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(attacker, (p, buffers), (x,))
        return F.cross_entropy(out, y)

    transformed = torch.func.grad(loss)

    def grad(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        if any(_wrapped(t) for t in (x, y, *p.values())):
            return transformed(p, x, y)  # inside vmap or torch.func.grad
        # plain autograd (a pack of one): the same numbers without the transforms' fixed cost
        # parameters that depend on the candidate (FedAvg's unrolled local steps) stay in the graph
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in p.items()}
        differentiable = x.requires_grad or y.requires_grad or any(v.requires_grad for v in p.values())
        with torch.enable_grad():
            value = loss(leaves, x, y)
            grads = torch.autograd.grad(value, list(leaves.values()), create_graph=differentiable,
                                        allow_unused=True, materialize_grads=True)  # zeros, as torch.func
        return dict(zip(leaves, grads))

    return params, grad


def _wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def autograd_grad_and_value(objective: Callable) -> Callable:
    """``torch.func.grad_and_value(objective, has_aux=True)`` by plain autograd, for a call outside any transform.

    The objective's first argument (a state) is differentiated; the rest are passed as
    they are. Used where nothing is vectorized (one restart of one reconstruction): the
    functional transforms' fixed cost per call made such a step about 1.4x slower on a CPU.
    """

    def fn(state: State, *rest):
        leaves = {k: v.detach().requires_grad_(True) for k, v in state.items()}
        with torch.enable_grad():
            value, aux = objective(leaves, *rest)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True,
                                        materialize_grads=True)  # unused leaves get zeros, as torch.func's
        return dict(zip(leaves, grads)), (value.detach(), tree_map(lambda t: t.detach(), aux))

    return fn


def gradient_fn(attacker: nn.Module, observation: Observation, *,
                acceleration: Acceleration = NO_ACCELERATION) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """Candidate gradient g(x, y) of the mean cross-entropy, in the observation's parameter order.

    ``y`` is either class indices (B,) or soft labels (B, classes). Functional, so it can
    be differentiated again with respect to x and vmapped over restarts.
    """
    params, grad = functional_grad(attacker, observation, acceleration=acceleration)

    def candidate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        g = grad(params, x, y)
        return tuple(g[n] for n in observation.param_names)

    return candidate


def stack_inputs(rows: list[State]) -> State:
    """Per-reconstruction inputs of ``run_packed``: each key's tensors stacked, reconstructions first."""
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


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


def total_variation_rows(x: torch.Tensor) -> torch.Tensor:
    """``total_variation`` of every row of ``x`` (rows first): one value per row."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def flat_targets(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The groups' target gradients, all layers concatenated (groups × values), as ``_by_group`` lays them out:
    made once per pack and handed to the rows distances in place of the tuple, it is not rebuilt every iteration."""
    groups = t[0].shape[0]
    return torch.cat([b.reshape(groups, -1) for b in t], 1)


def total_variation_rows_and_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``total_variation_rows(x)`` and the gradient of its sum with respect to x, written out from the same
    differences (the sign of each over its count, 0 where neighbours are equal, as autograd's derivative of
    ``abs``)."""
    grad = torch.zeros_like(x)
    value = None
    for dim in (-1, -2):
        n = x.shape[dim]
        diff = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)
        mean = diff.abs().flatten(1).mean(1)
        value = mean if value is None else value + mean
        s = torch.sign(diff) / (diff[0].numel())
        grad.narrow(dim, 1, n - 1).add_(s)
        grad.narrow(dim, 0, n - 1).sub_(s)
    return value, grad


def _by_group(g: tuple[torch.Tensor, ...], t: tuple[torch.Tensor, ...] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' gradients, all layers concatenated, as groups × restarts × values, and the groups' targets as
    groups × 1 × values (``t`` per layer, or already ``flat_targets``). One concatenation instead of a product, a
    sum and their derivatives per layer: on a 2-core CPU that measured 3 % faster for a ConvNet pack of 8 and 9 %
    for one row."""
    flat_t = t if isinstance(t, torch.Tensor) else flat_targets(t)
    groups = flat_t.shape[0]
    rows = g[0].shape[0]
    flat_g = torch.cat([a.reshape(rows, -1) for a in g], 1)
    return flat_g.view(groups, rows // groups, -1), flat_t.unsqueeze(1)


def cosine_distance_rows(g: tuple[torch.Tensor, ...], t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``cosine_distance`` of every row: ``g`` holds G·R rows' gradients (reconstruction by reconstruction, as
    ``run_packed`` orders them), ``t`` the G targets; one value per row."""
    g, t = _by_group(g, t)
    dot = (g * t).sum(-1)
    gn = g.pow(2).sum(-1)
    tn = t.pow(2).sum(-1)
    return (1 - dot / (gn.sqrt() * tn.sqrt() + 1e-12)).reshape(-1)


def squared_distance_rows(g: tuple[torch.Tensor, ...], t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``squared_distance`` of every row (see ``cosine_distance_rows``)."""
    g, t = _by_group(g, t)
    return (g - t).pow(2).sum(-1).reshape(-1)


#: the same distances for all rows of a pack at once (``run_packed(vectorized=True)``)
MATCHING_ROWS = {"cosine": cosine_distance_rows, "euclidean": squared_distance_rows}


def run_restarts(
    objective: Objective,
    init: State,
    *,
    schedule: Schedule,
    project: Projection | None = None,
    deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    trace_points: int = 50,
    consensus: Consensus | None = None,
    stop_loss: float | None = None,
    acceleration: Acceleration = NO_ACCELERATION,
) -> RestartResult:
    """Optimize R restarts of one reconstruction at once; every tensor of ``init`` has the restart dimension first.

    See ``run_packed`` (one reconstruction, ``groups = 1``) for the rest.
    """
    return run_packed(objective, init, groups=1, schedule=schedule, project=project, deadline=deadline,
                      progress=progress, trace_points=trace_points, consensus=consensus, stop_loss=stop_loss,
                      acceleration=acceleration)[0]


def run_packed(
    objective: Callable,
    init: State,
    *,
    groups: int,
    schedule: Schedule,
    inputs: State | None = None,
    lr_scale: torch.Tensor | None = None,
    project: Projection | None = None,
    deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    trace_points: int = 50,
    consensus: Consensus | None = None,
    stop_loss: float | None = None,
    acceleration: Acceleration = NO_ACCELERATION,
    vectorized: bool = False,
    gradient: Callable | None = None,
) -> list[RestartResult]:
    """Optimize ``groups`` independent reconstructions of R restarts each as one vectorized computation.

    Every tensor of ``init`` has G·R rows first (reconstruction g's restarts in rows
    g·R .. g·R + R − 1). ``inputs`` holds what differs between reconstructions but is not
    optimized (the target update, the labels), G rows first; the objective is then
    ``objective(state, inputs_of_its_reconstruction)``, else ``objective(state)``. Each
    reconstruction is normalized over its own candidates only (BatchNorm in train mode
    included), so a pack gives what G separate runs give, up to floating-point order.

    Adam (on the gradient's sign when ``schedule.signed``) is written out elementwise so
    that each reconstruction keeps its own learning rate (``schedule.lr`` × ``lr_scale[g]``)
    and its own stopping: a restart whose matching loss falls below ``stop_loss`` is frozen,
    and the pack ends when every restart is. The winner of each reconstruction is its
    restart with the lowest final matching loss (attacker-side; never the ground truth).

    With ``consensus``, the restarts of each reconstruction are coupled on purpose: every
    iteration, ``consensus(that reconstruction's restarts' states)`` (detached) is added
    to what its objective is given, ``objective(state, given)``; GradInversion pulls each
    restart toward its group's mean this way. Reconstructions stay independent of each other.

    With ``vectorized``, the objective is already written for all rows at once:
    ``objective(state, inputs)`` gets the G·R rows and the G rows of inputs and returns the
    total and the matching loss of every row (two tensors of G·R values); nothing is mapped,
    and each row's gradient is that of the sum of the totals, rows being independent (the
    explicit backpropagation of ``layerwise`` is used this way). No consensus then. With ``gradient`` as well,
    the rows' gradients come from it instead of autograd: ``gradient(state, inputs)`` returns what autograd's
    pass would, ``({name: gradient}, (totals, matching))`` (``tangent`` writes the second pass out this way);
    ``objective`` still gives the final losses.
    """
    state = {k: acceleration.lay_out(v.detach().clone()) for k, v in init.items()}
    rows = next(iter(state.values())).shape[0]
    if groups < 1 or rows % groups:
        raise ValueError(f"{rows} candidate rows cannot be split into {groups} reconstructions")
    restarts = rows // groups
    device = next(iter(state.values())).device
    if inputs is not None:
        inputs = {k: v.detach() for k, v in inputs.items()}
        if any(v.shape[0] != groups for v in inputs.values()):
            raise ValueError(f"every per-reconstruction input must have {groups} rows first")
    if gradient is not None and not vectorized:
        raise ValueError("a written-out gradient is for a vectorized objective")
    if vectorized:
        if consensus is not None:
            raise ValueError("a vectorized objective takes no consensus")
        evaluate = objective if inputs is None else functools.partial(_with_inputs, objective, inputs)
        if gradient is not None:
            step = acceleration.wrap(gradient if inputs is None else functools.partial(_with_inputs, gradient, inputs))
        else:
            step = acceleration.wrap(_summed_grad_and_value(evaluate))
    else:
        plain = groups == 1 and restarts == 1 and not acceleration.compiles
        value_and_grad = (autograd_grad_and_value(objective) if plain
                          else torch.func.grad_and_value(objective, has_aux=True))
        step = acceleration.wrap(_mapped(value_and_grad, groups, restarts, inputs, consensus))
        evaluate = _mapped(objective, groups, restarts, inputs, consensus)
    scale = torch.ones(groups, device=device) if lr_scale is None else lr_scale.to(device=device, dtype=torch.float32)
    lr_rows = (schedule.lr * scale).repeat_interleave(restarts)
    adam = _Adam(state)
    active = torch.ones(rows, dtype=torch.bool, device=device)
    ran = torch.zeros(rows, dtype=torch.long)
    stride = max(1, schedule.iterations // max(1, trace_points))
    traces: list[list[tuple[int, float]]] = [[] for _ in range(groups)]
    report_every = max(1, schedule.iterations // 100)
    # A written-out gradient needs no autograd at all: inference mode skips autograd's bookkeeping on every
    # operation of the loop (4 % of an 8-image ConvNet step on a 2-core CPU). Off, it changes nothing.
    with torch.inference_mode(gradient is not None):
        for it in range(schedule.iterations):
            if deadline is not None and time.monotonic() > deadline:
                raise AttackTimeout(f"time budget ran out after {it} of {schedule.iterations} iterations")
            grads, (_, matching) = step(state)
            if stop_loss is not None:
                active &= ~(matching.detach() < stop_loss)
                if not bool(active.any()):
                    break
                ran += active.cpu().long()
            else:  # every row moves: no mask to apply or count (a few operations fewer per iteration)
                ran += 1
            adam.step(state, {k: g.sign() if schedule.signed else g for k, g in grads.items()},
                      lr=lr_rows * schedule.factor(it), active=None if stop_loss is None else active)
            if project is not None:
                with torch.no_grad():
                    project(state)
            if it % stride == 0 or it == schedule.iterations - 1:
                best_so_far = matching.detach().view(groups, restarts).min(1).values.tolist()
                for g in range(groups):
                    traces[g].append((it, float(best_so_far[g])))
            if progress is not None and (it % report_every == 0 or it == schedule.iterations - 1):
                progress(it + 1, schedule.iterations)
    with torch.no_grad():
        _, matching = evaluate(state)
    losses = torch.nan_to_num(matching.detach(), nan=float("inf")).view(groups, restarts).cpu()
    results = []
    for g in range(groups):
        best = int(torch.argmin(losses[g]))
        results.append(RestartResult(
            state={k: v[g * restarts + best].detach() for k, v in state.items()},
            matching_losses=losses[g].clone(), best=best, trace=tuple(traces[g]),
            iterations=int(ran[g * restarts:(g + 1) * restarts].max()),
        ))
    return results


class _Adam:
    """Adam (β 0.9, 0.999, ε 1e-8) with one learning rate per leading row and a mask of rows to move.

    The same arithmetic as ``torch.optim.Adam``; a frozen row keeps its moments and its state.
    """

    def __init__(self, state: State, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = {k: torch.zeros_like(v) for k, v in state.items()}
        self.v = {k: torch.zeros_like(v) for k, v in state.items()}

    @torch.no_grad()
    def step(self, state: State, grads: State, *, lr: torch.Tensor, active: torch.Tensor | None) -> None:
        """One step; ``active`` None moves every row (the same numbers as an all-true mask, without it)."""
        self.t += 1
        b1, b2 = self.betas
        c1 = 1 - b1 ** self.t
        c2 = math.sqrt(1 - b2 ** self.t)
        for k, x in state.items():
            g = grads[k]
            shape = (-1,) + (1,) * (x.dim() - 1)
            if active is None:  # torch.optim.Adam's own sequence of operations, with a learning rate per row
                m = self.m[k].lerp_(g, 1 - b1)
                v = self.v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                x.addcdiv_(m * (lr / -c1).view(shape), v.sqrt().div_(c2).add_(self.eps))
                continue
            m = torch.where(active.view(shape), self.m[k].lerp(g, 1 - b1), self.m[k])
            v = torch.where(active.view(shape), self.v[k] * b2 + (1 - b2) * g * g, self.v[k])
            self.m[k], self.v[k] = m, v
            denom = (v.sqrt() / c2).add_(self.eps)
            move = (lr / c1).view(shape) * active.view(shape)
            x.sub_(move * m / denom)


def _with_inputs(objective: Callable, inputs: State, states: State):
    return objective(states, inputs)


def _summed_grad_and_value(objective: Callable) -> Callable:
    """Every row's gradient of a vectorized objective (``run_packed(vectorized=True)``), by one autograd pass
    over the sum of its rows' totals; returns what the mapped path returns, (gradients, (totals, matching))."""

    def fn(states: State):
        leaves = {k: v.detach().requires_grad_(True) for k, v in states.items()}
        with torch.enable_grad():
            total, matching = objective(leaves)
            grads = torch.autograd.grad(total.sum(), list(leaves.values()), allow_unused=True, materialize_grads=True)
        return dict(zip(leaves, grads)), (total.detach(), matching.detach())

    return fn


def _mapped(fn: Callable, groups: int, restarts: int, inputs: State | None, consensus: Consensus | None) -> Callable:
    """``fn`` of one restart's state, applied to the G·R stacked rows of ``state``.

    ``fn``'s second argument, when there are inputs or a consensus, is its reconstruction's
    inputs together with the consensus of its restarts. One reconstruction: over its
    restarts (``torch.func.vmap``; a plain call for a single restart, whose numbers are the
    same without vmap's fixed cost, which made a one-restart L-BFGS step 2-5x slower on a
    CPU), that argument passed unbatched. Several: an outer vmap over reconstructions (their
    inputs and consensus batched) around the inner one, so each reconstruction's inputs are
    shared by its restarts without being copied.
    """
    given = inputs is not None or consensus is not None
    if groups == 1:
        inner = over_restarts(fn, restarts=restarts, shared=given)
        if not given:
            return inner
        one = {k: v[0] for k, v in (inputs or {}).items()}

        def apply_one(states: State):
            return inner(states, _with_consensus(one, consensus, states))

        return apply_one
    inner = fn if restarts == 1 else torch.func.vmap(fn, in_dims=(0, None))
    outer = torch.func.vmap(inner, in_dims=(0, 0))
    per_group = None if consensus is None else torch.func.vmap(consensus)

    def apply(states: State):
        split = {k: v.reshape(groups, restarts, *v.shape[1:]) for k, v in states.items()}
        out = outer(split if restarts > 1 else states, _with_consensus(inputs or {}, per_group, split))
        return tree_map(lambda t: t.reshape(groups * restarts, *t.shape[2:]) if restarts > 1 else t, out)

    return apply


def _with_consensus(inputs: State, consensus: Consensus | None, states: State) -> State:
    if consensus is None:
        return inputs
    shared = {k: v.detach() for k, v in consensus(states).items()}
    clash = shared.keys() & inputs.keys()
    if clash:
        raise ValueError(f"the consensus and the inputs both name {sorted(clash)}")
    return {**inputs, **shared}


def over_restarts(fn: Callable, *, restarts: int, shared: bool = False) -> Callable:
    """``fn`` of one restart's state, mapped over the leading restart dimension.

    ``torch.func.vmap`` for several restarts; for one, a plain call on the squeezed state
    (the same numbers: vmap's fixed cost made a one-restart L-BFGS step 2-5x slower on a
    CPU). With ``shared``, ``fn``'s second argument is passed to every restart unbatched.
    """
    if restarts > 1:
        return torch.func.vmap(fn, in_dims=(0, None) if shared else 0)

    def single(states, *rest):
        out = fn({k: v[0] for k, v in states.items()}, *rest)
        return tree_map(lambda t: t.unsqueeze(0), out)

    return single


# --------------------------------------------------------------------------- priors and helpers


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of the candidate images (GradInversion's L2 prior); smooth at zero."""
    return (x.pow(2).sum() + 1e-12).sqrt()


def box_penalty(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Mean squared excursion outside the pixel box: a soft clamp for optimizers that cannot project (L-BFGS)."""
    return (F.relu(x - hi).pow(2) + F.relu(lo - x).pow(2)).mean()


def group_distance(x: torch.Tensor, group_mean: torch.Tensor) -> torch.Tensor:
    """GradInversion's group consistency: the L2 distance of one restart's images to the group's mean."""
    return ((x - group_mean).pow(2).sum() + 1e-12).sqrt()


def restart_mean(states: State) -> State:
    """The consensus of GradInversion: the mean image over restarts (no registration step, see gradinversion.py)."""
    return {"group_mean": states["x"].mean(0)}


def initial_images(
    observation: Observation, *, restarts: int, init: str, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Random candidates in normalized space, one set per restart: ``randn`` (normal in the
    model's input space) or ``rand`` (uniform pixels in [0, 1], then normalized)."""
    shape = (restarts, observation.batch_size, *observation.input_shape)
    return INITS[init](shape, observation, generator).to(device)


def _randn_init(shape, observation: Observation, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _rand_init(shape, observation: Observation, generator: torch.Generator) -> torch.Tensor:
    return observation.normalization.normalize(torch.rand(shape, generator=generator))


INITS = {"randn": _randn_init, "rand": _rand_init}


def box_projection(observation: Observation, like: torch.Tensor) -> Projection:
    """Clamps the candidate images ``state["x"]`` into the valid pixel box after every step."""
    lo, hi = observation.normalization.box(like)

    def project(state: State) -> None:
        state["x"].clamp_(lo, hi)

    return project


def to_pixels(x: torch.Tensor, observation: Observation) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate images in [0, 1] (clamped) and before clamping (for the pixel-range sanity flag), on the CPU."""
    raw = observation.normalization.denormalize(x.detach()).cpu()
    return raw.clamp(0, 1), raw


def bn_statistics_fn(attacker: nn.Module, observation: Observation, *,
                     acceleration: Acceleration = NO_ACCELERATION) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """Like ``gradient_fn``, but also returns each BatchNorm layer's input batch mean and
    (biased) variance, in ``model.modules()`` order: the statistics a client shares under
    ``bn_stats = "shared"`` (see ``leakbench.fl``), differentiable with respect to the candidates.

    The statistics come from the same forward pass as the gradient (``has_aux``), so the
    prior costs no second forward pass.
    """
    params, buffers = attacker_params(attacker, observation, acceleration=acceleration)
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        recorded.append((x.mean(dims), x.var(dims, unbiased=False)))

    for module in attacker.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_hook(hook)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        recorded.clear()
        out = torch.func.functional_call(attacker, (p, buffers), (x,))
        stats = tuple(recorded)
        recorded.clear()
        return F.cross_entropy(out, y), stats

    grad = torch.func.grad(loss, has_aux=True)

    def candidate(x: torch.Tensor, y: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple]:
        g, stats = grad(params, x, y)
        return tuple(g[n] for n in observation.param_names), stats

    return candidate


def bn_prior(stats: tuple, targets: tuple) -> torch.Tensor:
    """GradInversion's BatchNorm prior: sum over layers of ||mu - mu*||_2 + ||var - var*||_2."""
    if len(stats) != len(targets):
        raise ValueError(f"the candidate has {len(stats)} BatchNorm layers, the statistics {len(targets)}")
    return sum(
        ((mu - mu_t).pow(2).sum() + 1e-12).sqrt() + ((var - var_t).pow(2).sum() + 1e-12).sqrt()
        for (mu, var), (mu_t, var_t) in zip(stats, targets)
    )


# --------------------------------------------------------------------------- L-BFGS


@dataclass(frozen=True)
class LBFGSSchedule:
    """L-BFGS as DLG's code runs it: ``torch.optim.LBFGS(lr=lr)`` (no line search), whose
    ``step`` makes up to ``inner_steps`` (``max_iter``, default 20) updates, called
    ``iterations`` times. So ``iterations = 300`` means up to 6 000 updates, each one
    evaluation of the objective."""

    iterations: int
    lr: float = 1.0
    inner_steps: int = 20
    history_size: int = 100
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    line_search: Literal["none", "strong_wolfe"] = "none"

    @property
    def updates(self) -> int:
        return self.iterations * self.inner_steps


def run_lbfgs(
    objective: Objective,
    init: State,
    *,
    schedule: LBFGSSchedule,
    deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    trace_points: int = 50,
) -> RestartResult:
    """Minimize R independent restarts with L-BFGS; every tensor of ``init`` has the restart dimension first.

    Each restart returns its best iterate by its own objective; the restarts are then
    compared by their matching loss, never by the ground truth.
    """
    return LINE_SEARCHES[schedule.line_search](objective, init, schedule=schedule, deadline=deadline,
                                               progress=progress, trace_points=trace_points)


def _lbfgs_batched(
    objective: Objective,
    init: State,
    *,
    schedule: LBFGSSchedule,
    deadline: float | None,
    progress: Callable[[int, int], None] | None,
    trace_points: int,
) -> RestartResult:
    """L-BFGS without line search, all restarts in one batched evaluation per update.

    Each restart follows ``torch.optim.LBFGS(lr=lr, line_search_fn=None)`` called
    ``iterations`` times with ``max_iter = inner_steps``, with its own memory: the first
    update scaled by min(1, 1/||g||_1); a curvature pair with y.s <= 1e-10 skipped without
    taking a memory slot; a call that ends early for lack of progress (max |t d| or the
    change of the objective below ``tolerance_change``) gives up the rest of its updates,
    the next call going on from there. Differences, all deliberate and without effect on a
    finite run's path: the restarts advance one update each per batched evaluation; a
    restart whose direction stops descending or whose gradient vanishes stops for good
    (torch's optimizer would then spend every later call on that same point); one whose
    objective turns non-finite stops where it is (torch's would carry the NaN on); each
    returns its best iterate by its own objective (the fixed step is not monotone).
    """
    keys = list(init)
    restarts = init[keys[0]].shape[0]
    shapes = {k: tuple(init[k].shape[1:]) for k in keys}
    sizes = [math.prod(shapes[k]) for k in keys]
    value_and_grad = (autograd_grad_and_value(objective) if restarts == 1
                      else torch.func.grad_and_value(objective, has_aux=True))
    step = over_restarts(value_and_grad, restarts=restarts)

    def unflatten(flat: torch.Tensor) -> State:
        parts = torch.split(flat, sizes, dim=1)
        return {k: p.reshape(restarts, *shapes[k]) for k, p in zip(keys, parts)}

    def flatten(state: State) -> torch.Tensor:
        return torch.cat([state[k].reshape(restarts, -1) for k in keys], dim=1)

    def evaluate(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads, (total, matching) = step(unflatten(flat))
        return total.detach(), matching.detach(), flatten(grads).detach()

    x = flatten({k: v.detach() for k, v in init.items()}).clone()
    loss, matching, g = evaluate(x)
    finite = torch.isfinite(loss) & torch.isfinite(g).all(1)
    best_x, best_loss = x.clone(), torch.where(finite, loss, torch.full_like(loss, math.inf))
    active = finite & (g.abs().amax(1) > schedule.tolerance_grad)
    memory = _Memory(restarts, x.shape[1], schedule.history_size, x.dtype, x.device)
    d = -g
    t = schedule.lr * torch.clamp(1.0 / g.abs().sum(1).clamp_min(1e-30), max=1.0)
    prev_g = g
    # torch's budget: ``iterations`` calls of ``step``, each up to ``inner_steps`` updates
    calls_left = torch.full((restarts,), schedule.iterations, device=x.device)
    inner = torch.zeros(restarts, dtype=torch.long, device=x.device)
    total = schedule.updates
    stride = max(1, total // max(1, trace_points))
    report_every = max(1, total // 100)
    trace: list[tuple[int, float]] = []
    done = 0
    for it in range(total):
        if deadline is not None and time.monotonic() > deadline:
            raise AttackTimeout(f"time budget ran out after {it} of {total} L-BFGS updates")
        if it > 0:
            y, s = g - prev_g, d * t[:, None]
            memory.add(y, s, active)
            d = memory.direction(-g)
            t = torch.full_like(t, schedule.lr)
        prev_g = g
        active = active & ((g * d).sum(1) <= -schedule.tolerance_change)
        if not bool(active.any()):
            break
        step_size = torch.where(active, t, torch.zeros_like(t))
        move = step_size[:, None] * d
        x_new = x + move
        loss_new, matching_new, g_new = evaluate(x_new)
        ok = torch.isfinite(loss_new) & torch.isfinite(g_new).all(1)
        moved = active & ok
        change = (loss_new.double() - loss.double()).abs()
        x = torch.where(moved[:, None], x_new, x)
        g = torch.where(moved[:, None], g_new, g)
        loss = torch.where(moved, loss_new, loss)
        matching = torch.where(moved, matching_new, matching)
        # the call ends after inner_steps updates, or earlier for lack of progress
        inner = inner + moved.long()
        stalled = (move.abs().amax(1) <= schedule.tolerance_change) | (change < schedule.tolerance_change)
        ended = moved & ((inner >= schedule.inner_steps) | stalled)
        calls_left = calls_left - ended.long()
        inner = torch.where(ended, torch.zeros_like(inner), inner)
        active = moved & (g.abs().amax(1) > schedule.tolerance_grad) & (calls_left > 0)
        better = moved & (loss < best_loss)
        best_x = torch.where(better[:, None], x, best_x)
        best_loss = torch.where(better, loss, best_loss)
        done = it + 1
        if it % stride == 0 or it == total - 1:
            trace.append((it, float(torch.nan_to_num(matching, nan=math.inf).min())))
        if progress is not None and (it % report_every == 0 or it == total - 1):
            progress(it + 1, total)
    if progress is not None and done < total:
        progress(total, total)  # converged or stalled early: the remaining updates would not move
    with torch.no_grad():
        final = unflatten(best_x)
        _, matching = over_restarts(objective, restarts=restarts)(final)
    losses = torch.nan_to_num(matching.detach(), nan=float("inf"))
    best = int(torch.argmin(losses))
    return RestartResult(
        state={k: v[best] for k, v in final.items()},
        matching_losses=losses.cpu(),
        best=best,
        trace=tuple(trace),
    )


class _Memory:
    """Each restart's last ``size`` accepted curvature pairs (oldest first), as torch's LBFGS keeps them.

    A row of ``y``, ``s`` and ``rho`` per restart and slot; a restart's pairs are
    right-aligned, and its empty slots have rho = 0 and contribute nothing.
    """

    def __init__(self, restarts: int, n: int, size: int, dtype: torch.dtype, device: torch.device):
        self.y = torch.zeros(restarts, size, n, dtype=dtype, device=device)
        self.s = torch.zeros_like(self.y)
        self.rho = torch.zeros(restarts, size, dtype=dtype, device=device)
        self.h_diag = torch.ones(restarts, dtype=dtype, device=device)
        self.used = 0  # slots that may hold a pair for some restart (host-side bound, no sync)

    def add(self, y: torch.Tensor, s: torch.Tensor, live: torch.Tensor) -> None:
        ys = (y * s).sum(1)
        accepted = live & (ys > 1e-10)
        safe_ys = torch.where(accepted, ys, torch.ones_like(ys))
        yy = (y * y).sum(1)
        self.h_diag = torch.where(accepted, ys / torch.where(accepted, yy, torch.ones_like(yy)), self.h_diag)
        keep = accepted[:, None, None]
        self.y = torch.where(keep, torch.cat([self.y[:, 1:], y[:, None]], 1), self.y)
        self.s = torch.where(keep, torch.cat([self.s[:, 1:], s[:, None]], 1), self.s)
        self.rho = torch.where(accepted[:, None], torch.cat([self.rho[:, 1:], (1.0 / safe_ys)[:, None]], 1), self.rho)
        self.used = min(self.y.shape[1], self.used + 1)

    def direction(self, q: torch.Tensor) -> torch.Tensor:
        """The two-loop recursion: the inverse-Hessian estimate times ``q``, per restart (rows)."""
        size = self.y.shape[1]
        slots = range(size - self.used, size)
        alphas = {}
        for j in reversed(slots):
            a = self.rho[:, j] * (self.s[:, j] * q).sum(1)
            q = q - a[:, None] * self.y[:, j]
            alphas[j] = a
        r = q * self.h_diag[:, None]
        for j in slots:
            b = self.rho[:, j] * (self.y[:, j] * r).sum(1)
            r = r + self.s[:, j] * (alphas[j] - b)[:, None]
        return r


def _lbfgs_strong_wolfe(
    objective: Objective,
    init: State,
    *,
    schedule: LBFGSSchedule,
    deadline: float | None,
    progress: Callable[[int, int], None] | None,
    trace_points: int,
) -> RestartResult:
    """``torch.optim.LBFGS(line_search_fn="strong_wolfe")``, one restart after the other.

    ``iterations`` calls of ``step`` with ``max_iter = inner_steps``; the line search
    costs extra evaluations (torch caps them at 1.25 x inner_steps per call). The best
    iterate by the objective is kept, as in the batched form.
    """
    keys = list(init)
    restarts = init[keys[0]].shape[0]
    value_and_grad = autograd_grad_and_value(objective)
    total = schedule.iterations * restarts
    stride = max(1, schedule.iterations // max(1, trace_points))
    finals: list[State] = []
    trace: list[tuple[int, float]] = []
    best_matching = [math.inf] * schedule.iterations
    for r in range(restarts):
        params = [init[k][r].detach().clone().requires_grad_(True) for k in keys]
        optimizer = torch.optim.LBFGS(params, lr=schedule.lr, max_iter=schedule.inner_steps,
                                      history_size=schedule.history_size, tolerance_grad=schedule.tolerance_grad,
                                      tolerance_change=schedule.tolerance_change, line_search_fn="strong_wolfe")
        best = {"loss": math.inf, "state": {k: p.detach().clone() for k, p in zip(keys, params)}, "matching": math.inf}

        def closure() -> torch.Tensor:
            if deadline is not None and time.monotonic() > deadline:
                raise AttackTimeout(f"time budget ran out in restart {r + 1} of {restarts} (L-BFGS, strong Wolfe)")
            state = {k: p.detach() for k, p in zip(keys, params)}
            grads, (loss, matching) = value_and_grad(state)
            for k, p in zip(keys, params):
                p.grad = grads[k].detach()
            loss_value = float(loss)
            if math.isfinite(loss_value) and loss_value < best["loss"]:
                best.update(loss=loss_value, state={k: v.clone() for k, v in state.items()}, matching=float(matching))
            return loss.detach()

        for it in range(schedule.iterations):
            optimizer.step(closure)
            best_matching[it] = min(best_matching[it], best["matching"])
            if progress is not None:
                progress(r * schedule.iterations + it + 1, total)
        finals.append(best["state"])
    trace = [(it * schedule.inner_steps, best_matching[it]) for it in range(0, schedule.iterations, stride)]
    with torch.no_grad():
        final = {k: torch.stack([f[k] for f in finals]) for k in keys}
        _, matching = over_restarts(objective, restarts=restarts)(final)
    losses = torch.nan_to_num(matching.detach(), nan=float("inf"))
    winner = int(torch.argmin(losses))
    return RestartResult(state={k: v[winner] for k, v in final.items()}, matching_losses=losses.cpu(), best=winner,
                         trace=tuple(trace))


LINE_SEARCHES = {"none": _lbfgs_batched, "strong_wolfe": _lbfgs_strong_wolfe}
