"""GIAS (Jeon et al. 2021, "Gradient Inversion with Generative Image Prior"): latent search, then generator weights.

With a generator G_w trained on the client's data distribution, the candidates are
generated images x = G_w(z) instead of free pixels, which narrows the under-determined
inversion problem down to the generator's range:

1. **Latent search** (GI-z): minimize 1 - cos(g(G_w(z)), g*) + TV over the latent code z
   of every image of the batch, R restarts at once, the best restart chosen by the
   attacker-side matching loss only.
2. **Parameter search** (GI-w): copy G once per image and adapt each copy's weights w_i
   to the gradient from the z found, so that images the generator cannot make exactly
   are still reachable (Bau et al.'s instance-specific adaptation).

``mode`` selects the stages and their order: ``"zw"`` (the paper's GI-z/w), ``"z"``
(latent only), ``"w"`` (weights only, from random z) and ``"wz"`` (the reversed order the
paper reports as worse). The first stage runs R restarts; a later stage continues from
the chosen restart alone. Both stages use Adam (not on the sign) with the learning rate
x0.1 at 3/8, 5/8 and 7/8 of their budget, vectorized over restarts (``run_restarts``)
and, in the weight stage, over the per-image generator copies (a leading image dimension
on the generator's parameters, ``torch.func.functional_call`` under ``vmap``).

The generator (``prior``) is attacker knowledge: a table naming the generator, the
public data it was trained on and its training recipe (``leakbench.generators``). It is
trained on first use (with progress), cached on disk, and part of the attack's
identity, so every row says which prior produced it. Its one-off training is not charged
to the attack's ``timeout_s``, which bounds the inversion itself.

Labels come from the case's label strategy (the paper's code passed the true labels).
Optional ``bn_weight`` adds GradInversion's BatchNorm prior with the client's batch
statistics, which needs ``[threat_model] bn_stats = "shared"`` (FedSGD only).
Generators are run in eval mode (running BatchNorm statistics), so candidates of a batch
do not interact through the generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import nn

from leakbench.attacks.common import attacker_model
from leakbench.attacks.fedavg import update_fn
from leakbench.attacks.optimize import (
    RestartResult,
    Schedule,
    State,
    bn_prior,
    bn_statistics_fn,
    cosine_distance,
    run_restarts,
    target_gradients,
    total_variation,
)
from leakbench.attacks.registry import ATTACKS
from leakbench.core import Attack, Observation, ParamError, Reconstruction, ThreatModelError
from leakbench.core.acceleration import NO_ACCELERATION, Acceleration
from leakbench.core.frozen import freeze_params
from leakbench.generators import PriorSpec, load_or_train_prior, parse_prior
from leakbench.generators.tables import Field, read_table

Mode = Literal["zw", "z", "w", "wz"]

#: The stages of each mode, in order.
MODES: dict[str, tuple[str, ...]] = {"zw": ("latent", "weights"), "z": ("latent",), "w": ("weights",),
                                     "wz": ("weights", "latent")}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Search:
    """One search stage's budget: Adam iterations and the initial learning rate."""

    iterations: int
    lr: float

    def schedule(self) -> Schedule:
        return Schedule(iterations=self.iterations, lr=self.lr, signed=False)

    def identity(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "lr": self.lr}


def parse_search(value: Any, *, param: str, iterations: int, lr: float) -> Search:
    t = read_table(value, param=param, fields={
        "iterations": Field((int,), iterations, lambda v: v >= 1, "at least 1"),
        "lr": Field((float,), lr, lambda v: v > 0, "> 0"),
    })
    return Search(iterations=t["iterations"], lr=t["lr"])


# --------------------------------------------------------------------------- the objective


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Matching:
    """The attacker-side objective of candidate pixels: 1 - cos(update(x), observed) + TV (+ BatchNorm prior).

    ``candidate(x, y)`` is the attacker's differentiable simulation of what the client sent
    (the gradient, or for FedAvg the unrolled local steps), so the same objective serves
    every protocol. TV is taken on the normalized candidates, as in Inverting Gradients.
    """

    def __init__(self, observation: Observation, model: nn.Module, labels: torch.Tensor, *, device: torch.device,
                 tv_weight: float, bn_weight: float, acceleration: Acceleration = NO_ACCELERATION):
        self.normalization = observation.normalization
        self.acceleration = acceleration
        self.tv_weight = tv_weight
        self.bn_weight = bn_weight
        targets = self._bn_targets(observation, model) if bn_weight > 0 else ()
        self.bn_targets = tuple((m.to(device), v.to(device)) for m, v in targets)
        self.attacker = attacker_model(model, observation, device)
        self.candidate = update_fn(self.attacker, observation, acceleration=acceleration)
        # the statistics' forward hooks live on a copy of their own, so ``candidate`` stays hook-free
        self._with_stats = (bn_statistics_fn(attacker_model(model, observation, device), observation,
                                             acceleration=acceleration)
                            if self.bn_targets else None)
        self.target = target_gradients(observation, device)
        self.labels = labels.to(device)

    @staticmethod
    def _bn_targets(observation: Observation, model: nn.Module) -> tuple:
        if not _has_batchnorm(model):
            return ()
        if observation.bn_stats is None:
            raise ThreatModelError(
                "gias with bn_weight > 0 uses the client's BatchNorm batch statistics, which this threat model does "
                "not grant (threat_model.bn_stats = \"none\"); set [threat_model] bn_stats = \"shared\" (an oracle "
                "setting shown in every report) or bn_weight = 0"
            )
        if observation.kind != "gradients":
            raise ValueError("gias's BatchNorm prior needs FedSGD gradients; set bn_weight = 0 for FedAvg updates")
        return observation.bn_stats

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total, matching) of candidate images in [0, 1]."""
        x = self.normalization.normalize(pixels)
        if self._with_stats is not None:
            grads, stats = self._with_stats(x, self.labels)
            extra = self.bn_weight * bn_prior(stats, self.bn_targets)
        else:
            grads, extra = self.candidate(x, self.labels), 0.0
        matching = cosine_distance(grads, self.target)
        return matching + self.tv_weight * total_variation(x) + extra, matching


# --------------------------------------------------------------------------- the generator, functionally


class Renderer:
    """The generator as a pure function of (weights, z), for shared weights or per-image copies.

    ``base`` are detached views of the generator's parameters: in-place updates of the
    generator (GIML's meta steps) are seen without rebuilding.
    """

    def __init__(self, generator: nn.Module):
        self.generator = generator
        self.latent_dim = int(generator.latent_dim)
        self.base = {n: p.detach() for n, p in generator.named_parameters()}
        self.buffers = {n: b for n, b in generator.named_buffers()}
        self.names = tuple(self.base)

    def shared(self, z: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Images of latent codes (B, latent) under one set of weights (the base ones by default)."""
        params = self.base if weights is None else weights
        return torch.func.functional_call(self.generator, (params, self.buffers), (z,))

    def per_image(self, weights: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """Image i from its own weights (every tensor with a leading image dimension) and z[i]."""
        def one(w: dict[str, torch.Tensor], zi: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.generator, (w, self.buffers), (zi[None],))[0]

        return torch.func.vmap(one)(weights, z)

    def render(self, z: torch.Tensor, weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
        return self.shared(z) if weights is None else self.per_image(weights, z)

    def copies(self, *leading: int) -> dict[str, torch.Tensor]:
        """The base weights repeated along new leading dimensions (restarts, images)."""
        return {n: p.expand(*leading, *p.shape).clone() for n, p in self.base.items()}


def _weights_of(state: State) -> dict[str, torch.Tensor]:
    return {k[2:]: v for k, v in state.items() if k.startswith("w/")}


# --------------------------------------------------------------------------- the attack


class GIAS(Attack):
    def __init__(self, *, prior: PriorSpec, mode: str, restarts: int, latent: Search, weights: Search,
                 tv_weight: float, bn_weight: float, latent_weight: float):
        self.prior = prior
        self.mode = mode
        self.restarts = restarts
        self.searches = {"latent": latent, "weights": weights}
        self.tv_weight = tv_weight
        self.bn_weight = bn_weight
        self.latent_weight = latent_weight

    @property
    def iterations(self) -> int:
        return sum(self.searches[s].iterations for s in MODES[self.mode])

    def generator_for(self, observation: Observation, model: nn.Module, *, device: torch.device,
                      progress: Progress | None) -> nn.Module:
        """The generator the search runs in (eval mode, frozen): the prior, trained or loaded on first use."""
        channels, height, width = observation.input_shape
        if height != width:
            raise ValueError(f"generative priors make square images; the victim's input is {height}x{width}")
        return load_or_train_prior(self.prior, side=height, channels=channels, device=device, progress=progress).model

    def reconstruct(self, observation, model, *, labels, generator, deadline=None, progress=None):
        if labels is None:
            raise ValueError("gias needs labels from a label strategy")
        device = next(model.parameters()).device
        # the matching problem first: a threat-model error comes before any training
        problem = Matching(observation, model, labels, device=device, tv_weight=self.tv_weight,
                           bn_weight=self.bn_weight, acceleration=self.acceleration)
        renderer = Renderer(self.generator_for(observation, model, device=device, progress=progress))
        restarts, batch = self.restarts, observation.batch_size
        z = torch.randn(restarts, batch, renderer.latent_dim, generator=generator).to(device)
        weights: dict[str, torch.Tensor] | None = None  # per-image generator weights once a weight stage ran
        trace: list[tuple[int, float]] = []
        offset, total = 0, self.iterations
        result: RestartResult | None = None
        for stage in MODES[self.mode]:
            search = self.searches[stage]
            report = None if progress is None else (lambda d, t, o=offset: progress(o + d, total))
            if stage == "latent":
                result = self._latent_stage(problem, renderer, z, weights, search, deadline, report)
            else:
                init = renderer.copies(restarts, batch) if weights is None else {k: v[None] for k, v in weights.items()}
                result = self._weight_stage(problem, renderer, z, init, search, deadline, report)
                weights = _weights_of(result.state)
            z = result.state["z"][None]
            trace += [(offset + i, loss) for i, loss in result.trace]
            offset += search.iterations
            restarts = 1  # later stages continue from the chosen restart
        assert result is not None
        with torch.no_grad():
            images = renderer.render(z[0], weights).clamp(0, 1).cpu()
        return Reconstruction(images=images, labels=labels.cpu(),
                              matching_loss=float(result.matching_losses[result.best]), trace=tuple(trace),
                              iterations=total, restarts=self.restarts)

    def _latent_stage(self, problem: Matching, renderer: Renderer, z0: torch.Tensor,
                      weights: dict[str, torch.Tensor] | None, search: Search, deadline, progress) -> RestartResult:
        """Latent codes of every image, under the base weights or (after a weight stage) each image's own."""
        latent_weight = self.latent_weight

        def objective(state: State):
            z = state["z"]
            total, matching = problem(renderer.render(z, weights))
            return total + latent_weight * z.pow(2).mean(), matching

        return run_restarts(objective, {"z": z0}, schedule=search.schedule(), deadline=deadline, progress=progress,
                            acceleration=self.acceleration)

    def _weight_stage(self, problem: Matching, renderer: Renderer, z0: torch.Tensor, w0: dict[str, torch.Tensor],
                      search: Search, deadline, progress) -> RestartResult:
        """Per-image generator weights from fixed latent codes (z rides in the state, detached: Adam leaves it)."""

        def objective(state: State):
            return problem(renderer.per_image(_weights_of(state), state["z"].detach()))

        init = {"z": z0, **{f"w/{k}": v for k, v in w0.items()}}
        return run_restarts(objective, init, schedule=search.schedule(), deadline=deadline, progress=progress,
                            acceleration=self.acceleration)


def check_common(*, restarts: int, tv_weight: float, bn_weight: float, latent_weight: float) -> None:
    if restarts < 1:
        raise ParamError("restarts", f"must be >= 1, got {restarts}")
    for name, value in (("tv_weight", tv_weight), ("bn_weight", bn_weight), ("latent_weight", latent_weight)):
        if value < 0:
            raise ParamError(name, f"must be >= 0, got {value}")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ParamError("mode", f"one of {', '.join(MODES)}, got {mode!r}")
    return mode


# Frozen (hashable) defaults that thaw to tables: a cell's identity shows them as { iterations, lr }.
LATENT_DEFAULT = freeze_params({"iterations": 500, "lr": 0.03})
WEIGHTS_DEFAULT = freeze_params({"iterations": 5000, "lr": 0.001})


@ATTACKS.register("gias", version="1")
def gias(
    *,
    prior: dict,
    mode: Mode = "zw",
    restarts: int = 3,
    latent: dict | tuple = LATENT_DEFAULT,
    weights: dict | tuple = WEIGHTS_DEFAULT,
    tv_weight: float = 1e-6,
    bn_weight: float = 0.0,
    latent_weight: float = 0.0,
) -> Attack:
    """Jeon et al. 2021: latent search in a generative prior, then per-image generator weights (mode zw, z, w, wz).

    ``prior``: the generator and the public data it was trained on, e.g. ``{ generator =
    "dcgan", dataset = { name = "photos", split = "public" }, epochs = 300 }`` (``epochs =
    0``: untrained). ``latent`` / ``weights``: ``{ iterations, lr }`` of each stage
    (reference at 32 px: 500 at 3e-2, 5 000 at 1e-3). ``latent_weight`` x mean(z^2) keeps
    codes near the prior; ``bn_weight`` needs shared BatchNorm statistics.
    """
    check_common(restarts=restarts, tv_weight=tv_weight, bn_weight=bn_weight, latent_weight=latent_weight)
    return GIAS(prior=parse_prior(prior), mode=check_mode(mode), restarts=restarts,
                latent=parse_search(latent, param="latent", iterations=500, lr=0.03),
                weights=parse_search(weights, param="weights", iterations=5000, lr=0.001),
                tv_weight=tv_weight, bn_weight=bn_weight, latent_weight=latent_weight)
