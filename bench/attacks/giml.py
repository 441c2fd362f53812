"""GIML (Jeon et al. 2021): meta-learn the generative prior from observed gradients alone, then attack with GIAS.

When the attacker has no generator of the client's data, it can learn one from the
updates it observes: every observed update is a *task*; per task, search the latent
codes (with a latent-norm penalty, without which the search diverges on an untrained G)
and then take a few "integrated" steps on a copy w' of the generator's weights; then move
the generator toward the adapted weights (first-order, Reptile-like: Adam on the
gradient of ||w - w'||^2 / 2, i.e. w - w'). No image is ever shown to the generator, only
gradients.

**Where the observed updates come from** (a choice, stated): an attack in leakbench
receives one observation and the server's model, not a history of rounds. The attacker
therefore *simulates* the updates of other clients of the same round: it draws batches
from the public data named in ``meta.dataset`` (the attacker's own data, disjoint from the
attacked images; the same guard as the prior's), computes each batch's update through the
same victim weights and the same protocol simulation the attack matches with
(``update_fn``: FedSGD gradients, or FedAvg's unrolled local steps), and keeps only that
update and the batch's labels. Stated simplifications:

- the simulated clients' labels are the public batch's labels (a real attacker would
  recover them with its label strategy; the paper gave true labels throughout);
- the simulated updates are undefended: leakbench hands the defense to the client, not to
  the attacker, so GIML learns from clean gradients even in defended cells. That makes
  the prior at least as good as a real attacker's, which errs on the side of leakage;
- every task is at the attacked round's weights (the model does not move between tasks),
  so the tasks differ by their images, not by the model.

The learned generator is cached on disk under a key over the start prior, the meta
recipe, a fingerprint of the victim's weights and the protocol's public metadata, so the
cells of a victim and trial share one meta-learning run (and defenses share it too, since
the simulated tasks are undefended). Meta-learning saves its state atomically after
every epoch (and at most every minute within one), and resumes from it.

``meta.epochs = 0`` skips meta-learning: GIAS with the start generator (the paper's
"untrained G" baseline when the start is untrained).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from leakbench.attacks.common import attacker_model
from leakbench.attacks.fedavg import update_fn
from leakbench.attacks.gias import (
    GIAS,
    LATENT_DEFAULT,
    WEIGHTS_DEFAULT,
    Mode,
    Progress,
    Renderer,
    Search,
    check_common,
    check_mode,
    parse_search,
)
from leakbench.attacks.optimize import cosine_distance, total_variation
from leakbench.attacks.registry import ATTACKS
from leakbench.core import Attack, Normalization, Observation, derive_seed, short_hash
from leakbench.generators import CacheEntry, default_cache_dir, fingerprint, parse_prior, prior_images
from leakbench.generators.data import check_public
from leakbench.generators.prior import frozen_eval, prior_identity
from leakbench.generators.tables import REQUIRED, Field, component, frozen, read_table, thawed

log = logging.getLogger(__name__)

#: Bump when a change to this module changes the generator a meta recipe learns; part of every cache key.
GIML_FORMAT = 1
#: Seconds between saves of the meta-learning state within an epoch.
SAVE_EVERY_S = 60.0

META_LATENT_DEFAULT = (("iterations", 1000), ("lr", 0.03))
META_WEIGHTS_DEFAULT = (("iterations", 500), ("lr", 0.001))

META_FIELDS: dict[str, Field] = {
    "dataset": Field((str, dict), REQUIRED),
    "tasks": Field((int,), 64, lambda v: v >= 1, "at least 1 simulated update"),
    "epochs": Field((int,), 1, lambda v: v >= 0, "0 (no meta-learning) or more"),
    "batch_size": Field((int,), 4, lambda v: v >= 1, "at least 1 task per meta step"),
    "latent": Field((dict,), META_LATENT_DEFAULT),
    "weights": Field((dict,), META_WEIGHTS_DEFAULT),
    "latent_norm": Field((float,), 1e-3, lambda v: v >= 0, ">= 0"),
    "tv_weight": Field((float,), 1e-4, lambda v: v >= 0, ">= 0"),
    "meta_lr": Field((float,), 1e-2, lambda v: v > 0, "> 0"),
    "seed": Field((int,), 0, lambda v: v >= 0, "seeds are >= 0"),
}


@dataclass(frozen=True)
class MetaSpec:
    """How the generator is meta-learned: the simulated clients' data, the tasks, the inner searches, the meta step."""

    dataset: str
    dataset_params: tuple[tuple[str, Any], ...]
    dataset_version: str
    tasks: int
    epochs: int
    batch_size: int
    latent: Search
    weights: Search
    latent_norm: float
    tv_weight: float
    meta_lr: float
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.tasks / self.batch_size)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def identity(self) -> dict[str, Any]:
        return {
            "dataset": {"name": self.dataset, "version": self.dataset_version, "params": thawed(self.dataset_params)},
            "tasks": self.tasks, "epochs": self.epochs, "batch_size": self.batch_size,
            "latent": self.latent.identity(), "weights": self.weights.identity(), "latent_norm": self.latent_norm,
            "tv_weight": self.tv_weight, "meta_lr": self.meta_lr, "seed": self.seed,
        }


def parse_meta(value: Any, *, param: str = "meta") -> MetaSpec:
    t = read_table(value, param=param, fields=META_FIELDS)
    name, params = component(t["dataset"], param=param, key="dataset")
    version = check_public(name, params, param=param)
    return MetaSpec(
        dataset=name, dataset_params=frozen(params), dataset_version=version, tasks=t["tasks"], epochs=t["epochs"],
        batch_size=t["batch_size"],
        latent=parse_search(t["latent"], param=f"{param}.latent", iterations=1000, lr=0.03),
        weights=parse_search(t["weights"], param=f"{param}.weights", iterations=500, lr=0.001),
        latent_norm=t["latent_norm"], tv_weight=t["tv_weight"], meta_lr=t["meta_lr"], seed=t["seed"],
    )


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Tasks:
    """Simulated observed updates: per task, the update (gradient units) and the labels; never the images."""

    targets: tuple[torch.Tensor, ...]  # each (T, *parameter shape)
    labels: torch.Tensor  # (T, B)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: torch.Tensor) -> "Tasks":
        return Tasks(targets=tuple(t[index] for t in self.targets), labels=self.labels[index])


def simulate_tasks(candidate: Callable, images: torch.Tensor, labels: torch.Tensor, *, count: int, batch_size: int,
                   normalization: Normalization, generator: torch.Generator, device: torch.device) -> Tasks:
    """``count`` updates of simulated clients, each over ``batch_size`` distinct public images drawn by ``generator``.

    ``candidate`` is the attacker's simulation of the protocol (``update_fn``), so a task's
    update is what the server would receive from such a client.
    """
    if images.shape[0] < batch_size:
        raise ValueError(f"GIML's data has {images.shape[0]} images, fewer than the batch size {batch_size}")
    targets: list[tuple[torch.Tensor, ...]] = []
    task_labels = []
    for _ in range(count):
        idx = torch.randperm(images.shape[0], generator=generator)[:batch_size]
        x = normalization.normalize(images[idx].to(device))
        y = labels[idx].to(device)
        targets.append(tuple(g.detach() for g in candidate(x, y)))
        task_labels.append(y)
    return Tasks(targets=tuple(torch.stack(ts) for ts in zip(*targets)), labels=torch.stack(task_labels))


# --------------------------------------------------------------------------- inner adaptation, batched over tasks


def _over_tasks(fn: Callable, tasks: int) -> Callable:
    """``fn(state, inputs)`` mapped over a leading task dimension of both (a plain call for one task)."""
    if tasks > 1:
        return torch.func.vmap(fn, in_dims=(0, 0))

    def single(state, inputs):
        out = fn({k: v[0] for k, v in state.items()}, {k: _first(v) for k, v in inputs.items()})
        return torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), out)

    return single


def _first(v: Any) -> Any:
    return tuple(t[0] for t in v) if isinstance(v, tuple) else v[0]


def _adam(objective: Callable, state: dict[str, torch.Tensor], inputs: dict[str, Any], *, search: Search,
          tasks: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Adam over every task's state at once (elementwise, so exactly T independent optimizers); final matching (T,)."""
    step = _over_tasks(torch.func.grad_and_value(objective, has_aux=True), tasks)
    state = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
    schedule = search.schedule()
    optimizer = torch.optim.Adam(list(state.values()), lr=schedule.lr)
    scheduler = schedule.scheduler(optimizer)
    for _ in range(schedule.iterations):
        grads, _ = step({k: v.detach() for k, v in state.items()}, inputs)
        for k, v in state.items():
            v.grad = grads[k]
        optimizer.step()
        scheduler.step()
    final = {k: v.detach() for k, v in state.items()}
    with torch.no_grad():
        _, matching = _over_tasks(objective, tasks)(final, inputs)
    return final, matching


class TaskObjective:
    """Per task: 1 - cos(update(G(z)), observed) + TV + latent_norm x mean(z^2), with G's weights shared by the task."""

    def __init__(self, renderer: Renderer, candidate: Callable, normalization: Normalization, *, tv_weight: float,
                 latent_norm: float):
        self.renderer = renderer
        self.candidate = candidate
        self.normalization = normalization
        self.tv_weight = tv_weight
        self.latent_norm = latent_norm

    def __call__(self, z: torch.Tensor, weights: dict[str, torch.Tensor] | None, inputs: dict[str, Any]):
        x = self.normalization.normalize(self.renderer.shared(z, weights))
        matching = cosine_distance(self.candidate(x, inputs["labels"]), inputs["targets"])
        total = matching + self.tv_weight * total_variation(x) + self.latent_norm * z.pow(2).mean()
        return total, matching

    def adapt(self, tasks: Tasks, *, latent: Search, weights: Search | None, generator: torch.Generator,
              device: torch.device) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor, torch.Tensor]:
        """Latent search, then (if ``weights``) steps on a per-task copy of G from the found z.

        Returns the adapted weights (T, *shape) or None, and the tasks' final matching
        losses after the latent search and after the weight steps.
        """
        count, batch = tasks.labels.shape
        inputs = {"targets": tasks.targets, "labels": tasks.labels}
        z0 = torch.randn(count, batch, self.renderer.latent_dim, generator=generator).to(device)
        found, latent_matching = _adam(lambda s, i: self(s["z"], None, i), {"z": z0}, inputs, search=latent,
                                       tasks=count)
        if weights is None:
            return None, latent_matching, latent_matching
        inputs = {**inputs, "z": found["z"]}
        adapted, matching = _adam(lambda s, i: self(i["z"], s, i), self.renderer.copies(count), inputs,
                                  search=weights, tasks=count)
        return adapted, latent_matching, matching


def meta_learn(generator_model: nn.Module, tasks: Tasks, *, spec: MetaSpec, objective: TaskObjective, key: str,
               device: torch.device, entry: CacheEntry | None = None,
               progress: Progress | None = None) -> list[dict[str, float]]:
    """Meta-learns ``generator_model`` in place over ``spec.epochs`` passes of the tasks; returns the per-step history.

    Each meta step adapts ``spec.batch_size`` tasks in parallel, then sets every weight's
    gradient to w - mean(w'_t) and takes an Adam step (lr ``meta_lr``). Draws come from
    generators seeded per epoch and step, so a run resumed from ``entry``'s saved state
    ends with the same weights as an uninterrupted one.
    """
    params = dict(generator_model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=spec.meta_lr)
    start, history = _resume(entry, generator_model, optimizer)
    per_step = spec.latent.iterations + spec.weights.iterations
    total = spec.steps * per_step
    last_save = time.monotonic()
    for step in range(start, spec.steps):
        epoch, within = divmod(step, spec.steps_per_epoch)
        order = torch.randperm(len(tasks), generator=torch.Generator().manual_seed(
            derive_seed(spec.seed, key, "epoch", epoch)))
        chosen = order[within * spec.batch_size:(within + 1) * spec.batch_size]
        g = torch.Generator().manual_seed(derive_seed(spec.seed, key, "step", step))
        adapted, latent_matching, matching = objective.adapt(tasks.select(chosen), latent=spec.latent,
                                                             weights=spec.weights, generator=g, device=device)
        assert adapted is not None
        with torch.no_grad():
            for name, p in params.items():
                p.grad = p.detach() - adapted[name].mean(0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "latent_matching": float(latent_matching.mean()),
                        "matching": float(matching.mean())})
        log.debug("giml %s: step %d/%d, task matching after latent search %.4f, after weight steps %.4f", key,
                  step + 1, spec.steps, history[-1]["latent_matching"], history[-1]["matching"])
        if progress is not None:
            progress((step + 1) * per_step, total)
        end_of_epoch = within == spec.steps_per_epoch - 1
        if entry is not None and (end_of_epoch or time.monotonic() - last_save > SAVE_EVERY_S):
            entry.save_partial({"generator": generator_model.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": step + 1, "history": history})
            last_save = time.monotonic()
    for p in params.values():
        p.requires_grad_(False)
    return history


def _resume(entry: CacheEntry | None, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    state = None if entry is None else entry.load_partial()
    if state is None:
        return 0, []
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        log.info("giml %s: resuming after meta step %d", entry.key, int(state["step"]))
        return int(state["step"]), list(state["history"])
    except Exception as err:
        log.warning("giml %s: the saved state does not fit (%s: %s); starting over", entry.key, type(err).__name__, err)
        model.load_state_dict(initial)
        return 0, []


def protocol_identity(observation: Observation) -> dict[str, Any]:
    """The public facts of the observation that shape a simulated client's update."""
    return {
        "kind": observation.kind, "protocol": observation.protocol, "batch_size": observation.batch_size,
        "bn_mode": observation.bn_mode, "local_steps": observation.local_steps,
        "local_batch_size": observation.local_batch_size, "local_lr": observation.local_lr,
        "clients": observation.clients, "input_shape": list(observation.input_shape),
        "num_classes": observation.num_classes,
        "normalization": [list(observation.normalization.mean), list(observation.normalization.std)],
        "param_names": list(observation.param_names),
    }


# --------------------------------------------------------------------------- the attack


class GIML(GIAS):
    def __init__(self, *, meta: MetaSpec, **kwargs):
        super().__init__(**kwargs)
        self.meta = meta

    def generator_for(self, observation: Observation, model: nn.Module, *, device: torch.device,
                      progress: Progress | None) -> nn.Module:
        start = super().generator_for(observation, model, device=device, progress=progress)
        if self.meta.epochs == 0:
            return start
        return learn_or_load(start, observation, model, prior=prior_identity(
            self.prior, side=observation.input_shape[1], channels=observation.input_shape[0]),
            spec=self.meta, device=device, progress=progress)


def learn_or_load(start: nn.Module, observation: Observation, model: nn.Module, *, prior: dict[str, Any],
                  spec: MetaSpec, device: torch.device, cache_dir: str | Path | None = None,
                  progress: Progress | None = None) -> nn.Module:
    """The generator meta-learned from ``start`` against this victim and protocol: loaded, or learned and cached."""
    identity = {"format": GIML_FORMAT, "start": prior, "meta": spec.identity(), "victim": fingerprint(model),
                "protocol": protocol_identity(observation)}
    key = "giml-" + short_hash(identity, length=24)
    entry = CacheEntry(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key, GIML_FORMAT)
    learned = start
    if entry.load(learned) is not None:
        return frozen_eval(learned, device)
    channels, side, _ = observation.input_shape
    images, labels, _ = prior_images(spec.dataset, thawed(spec.dataset_params), side=side, channels=channels)
    if labels is None:
        raise ValueError(f"GIML simulates clients of the victim's task and needs labelled images; {spec.dataset!r} has "
                         "no labels: name a labelled public split in meta.dataset")
    if int(labels.max()) >= observation.num_classes:
        raise ValueError(f"GIML's data {spec.dataset!r} has labels up to {int(labels.max())}, the victim "
                         f"{observation.num_classes} classes")
    candidate = update_fn(attacker_model(model, observation, device), observation)
    tasks = simulate_tasks(candidate, images, labels, count=spec.tasks, batch_size=observation.batch_size,
                           normalization=observation.normalization, device=device,
                           generator=torch.Generator().manual_seed(derive_seed(spec.seed, key, "tasks")))
    objective = TaskObjective(Renderer(learned), candidate, observation.normalization, tv_weight=spec.tv_weight,
                              latent_norm=spec.latent_norm)
    log.info("giml %s: meta-learning over %d simulated updates, %d epoch(s), %d meta steps", key, spec.tasks,
             spec.epochs, spec.steps)
    history = meta_learn(learned, tasks, spec=spec, objective=objective, key=key, device=device, entry=entry,
                         progress=progress)
    entry.save(learned, identity=identity, history=history)
    return frozen_eval(learned, device)




@ATTACKS.register("giml", version="1")
def giml(
    *,
    prior: dict,
    meta: dict,
    mode: Mode = "zw",
    restarts: int = 3,
    latent: dict | tuple = LATENT_DEFAULT,
    weights: dict | tuple = WEIGHTS_DEFAULT,
    tv_weight: float = 1e-6,
    bn_weight: float = 0.0,
    latent_weight: float = 0.0,
) -> Attack:
    """Jeon et al. 2021: a generator meta-learned from simulated observed updates (start: ``prior``), then GIAS.

    ``prior``: the start generator, e.g. ``{ generator = "dcgan", epochs = 0 }`` (untrained)
    or one trained on other data. ``meta``: ``{ dataset, tasks = 64, epochs = 1,
    batch_size = 4 (tasks per meta step), latent = { iterations = 1000, lr = 0.03 },
    weights = { iterations = 500, lr = 0.001 }, latent_norm = 1e-3, tv_weight = 1e-4,
    meta_lr = 1e-2, seed = 0 }``; the rest as in ``gias``.
    """
    check_common(restarts=restarts, tv_weight=tv_weight, bn_weight=bn_weight, latent_weight=latent_weight)
    return GIML(meta=parse_meta(meta), prior=parse_prior(prior), mode=check_mode(mode), restarts=restarts,
                latent=parse_search(latent, param="latent", iterations=500, lr=0.03),
                weights=parse_search(weights, param="weights", iterations=5000, lr=0.001),
                tv_weight=tv_weight, bn_weight=bn_weight, latent_weight=latent_weight)
