"""The attacker's differentiable simulation of what the clients computed (Geiping et al. 2020, section 6).

A FedAvg client sends θ_E − θ_0 after local SGD steps; matching that against a single
gradient is wrong as soon as the steps move the weights. The attacker knows the protocol's
public metadata (local steps, local batch size b, local lr η, images per client n, number
of clients U; see ``Observation``) and unrolls the same steps on its candidate images with
``torch.func.functional_call``, so the loss can be differentiated through every step.

What the attacker does not know, and does not get: the labels of each local step and the
order a shuffling client visits its images. Candidate slot i stands for the client's i-th
image; the simulation visits slots in order (epoch after epoch, mini-batches of b), and
the labels are the label strategy's, assigned to slots. Since candidates are free, a fixed
slot order loses nothing when the client does not shuffle.

Candidates are compared with the observation in gradient units: the simulated update
becomes the pseudo-gradient −Δ/η, exactly as ``common.as_gradient`` turns the observed
weight difference into one, so any matching distance (cosine, Euclidean) of the shared
optimization core applies unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from leakbench.attacks.optimize import functional_grad, gradient_fn
from leakbench.core import Observation
from leakbench.core.acceleration import NO_ACCELERATION, Acceleration

CandidateFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def local_training_fn(attacker: nn.Module, observation: Observation, *, acceleration: Acceleration = NO_ACCELERATION) -> CandidateFn:
    """Pseudo-gradient −mean_u(Δ_u)/η of the clients' local SGD, simulated on candidates (x, y).

    ``x`` holds every client's candidates (``batch_size`` of them, client u in slots
    u·n .. (u+1)·n − 1), ``y`` their labels (indices or soft labels). Differentiable in x
    (second order through every local step) and vmappable over restarts.
    """
    if observation.kind != "weight_delta":
        raise ValueError(f"local_training_fn simulates weight differences; this observation holds {observation.kind}")
    lr = observation.local_lr
    b = observation.local_batch_size
    if lr is None or b is None:
        raise ValueError("a weight-difference observation must state its local lr and local batch size")
    clients = observation.clients
    n = observation.batch_size // clients
    steps_per_epoch = math.ceil(n / b)
    params0, grad = functional_grad(attacker, observation, acceleration=acceleration)
    names = observation.param_names

    def client_delta(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        p = dict(params0)
        for step in range(observation.local_steps):
            s = step % steps_per_epoch
            g = grad(p, x[s * b:(s + 1) * b], y[s * b:(s + 1) * b])
            p = {k: p[k] - lr * g[k] for k in names}
        return {k: p[k] - params0[k] for k in names}

    def candidate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        deltas = [client_delta(x[u * n:(u + 1) * n], y[u * n:(u + 1) * n]) for u in range(clients)]
        return tuple(-sum(d[k] for d in deltas) / (clients * lr) for k in names)

    return candidate


def frozen_training_fn(attacker: nn.Module, observation: Observation, *, acceleration: Acceleration = NO_ACCELERATION) -> CandidateFn:
    """Pseudo-gradient −mean_u(Δ_u)/η of the clients' local steps as if none of them moved the weights.

    The same steps as ``local_training_fn`` (slots visited in order, mini-batches of b, the
    public step count), each gradient taken at the server's weights: E epochs give E times
    the sum of the mini-batches' mean gradients. It is the first-order approximation of the
    FedAvg update that Geng et al.'s pseudo-gradient form matches (exact for one step), on
    the same scale as the observed −Δ/η, so the two compare directly. Cheaper than
    unrolling (first-order in x) and vmappable over restarts.
    """
    if observation.kind != "weight_delta":
        raise ValueError(f"frozen_training_fn approximates weight differences; this observation holds {observation.kind}")
    b = observation.local_batch_size
    if b is None:
        raise ValueError("a weight-difference observation must state its local batch size")
    clients = observation.clients
    n = observation.batch_size // clients
    steps_per_epoch = math.ceil(n / b)
    epochs, rest = divmod(observation.local_steps, steps_per_epoch)
    if rest:
        raise ValueError(f"{observation.local_steps} local steps are not whole epochs of {steps_per_epoch} "
                         f"mini-batch(es) of {b} over {n} image(s)")
    params0, grad = functional_grad(attacker, observation, acceleration=acceleration)
    names = observation.param_names

    def client_steps(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        grads = [grad(params0, x[s * b:(s + 1) * b], y[s * b:(s + 1) * b]) for s in range(steps_per_epoch)]
        return [epochs * sum(g[k] for g in grads) for k in names]

    def candidate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [client_steps(x[u * n:(u + 1) * n], y[u * n:(u + 1) * n]) for u in range(clients)]
        return tuple(sum(p[k] for p in parts) / clients for k in range(len(names)))

    return candidate


def client_gradients_fn(attacker: nn.Module, observation: Observation, *, acceleration: Acceleration = NO_ACCELERATION) -> CandidateFn:
    """FedSGD: the gradient of the candidates, averaged over clients when there are several.

    One gradient over the whole batch equals the clients' mean unless BatchNorm normalizes
    each client's images by their own statistics (train mode): then each client is
    simulated on its own slots.
    """
    whole = gradient_fn(attacker, observation, acceleration=acceleration)
    clients = observation.clients
    if clients == 1 or observation.bn_mode != "train":
        return whole
    n = observation.batch_size // clients

    def candidate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [whole(x[u * n:(u + 1) * n], y[u * n:(u + 1) * n]) for u in range(clients)]
        return tuple(sum(p[k] for p in parts) / clients for k in range(len(parts[0])))

    return candidate


#: what the server received -> the attacker's differentiable simulation of it
SIMULATIONS: dict[str, Callable[..., CandidateFn]] = {
    "gradients": client_gradients_fn,
    "weight_delta": local_training_fn,
}


def update_fn(attacker: nn.Module, observation: Observation, *, acceleration: Acceleration = NO_ACCELERATION) -> CandidateFn:
    """The candidate update in gradient units, for any kind of observation (see ``SIMULATIONS``)."""
    try:
        simulate = SIMULATIONS[observation.kind]
    except KeyError:
        raise ValueError(f"no attacker-side simulation for observations of kind {observation.kind!r}; "
                         f"known: {', '.join(SIMULATIONS)}") from None
    return simulate(attacker, observation, acceleration=acceleration)
