"""A defense's utility as accuracy: a short, fixed, seeded FL training with the defense, then test accuracy.

The cosine between the defended and the undefended update (``leakbench.fl.utility_cost``) says
how far one update moved; this module says what the defense costs the model. For a suite
with a ``[utility]`` table, every (victim, defense, protocol) of its cells gets:

1. the victim's seeded initialization (the server's weights of the cell's first trial);
2. ``rounds`` FL rounds. The training set is split once into ``clients`` disjoint shards
   (a seeded permutation); in each round every client takes the next ``n`` images of its
   own shard (reshuffled, seeded, at each pass through it), the defense may compose the
   round's batch (``compose_batch``, over the training set), and the case's protocol
   computes the clients' defended updates exactly as in an attack cell (``client_update``:
   the defense's ``prepare``, e.g. Opacus's GroupNorm swap, its per-step gradients, e.g.
   DP-SGD, and its ``transform`` of each client's update), averaged over the clients;
3. the server applies the mean update: gradients (FedSGD) as ``w -= server_lr · g``,
   weight differences (FedAvg) as ``w += Δ`` (the new model is the clients' mean model;
   the clients' local lr is the step size);
4. top-1 accuracy on the suite's data set, the attacked images (disjoint from the
   training split, as for trained victims: ``leakbench.victims.training.evaluate``).

``n`` is ``images_per_client`` or, when the table leaves it out, the case's own images per
client (``batch_size / clients`` of its protocol), so a defense whose strength depends on
the batch (DP-SGD's noise over the batch) is measured at the batch it defends.

The same training without the defense (defense ``none``, same shards, same order) gives
``utility_accuracy_undefended``, so reports can show the drop. Clients train on private
copies (``leakbench.fl``), so no BatchNorm running statistics reach the server: with
``bn_mode = "train"`` the server recomputes them on the training set before it measures
accuracy (with ``"eval"`` the clients normalized with the server's statistics, as the
evaluation does).

Results are cached in memory per process by (victim, defense, protocol, utility settings,
data sets, seed, device): a suite computes each once, whatever the number of its cells.
"""

from __future__ import annotations

import copy
import logging
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from leakbench.core import Batch, ThreatModel, derive_seed, generator, short_hash
from leakbench.core.frozen import freeze_params, thaw_params

if typing.TYPE_CHECKING:
    from leakbench.suite import Cell, Suite
    from leakbench.suite.utility_table import UtilitySpec

log = logging.getLogger(__name__)

#: The protocols whose clients can be asked for fresh updates round after round.
TRAINABLE_PROTOCOLS = ("fedsgd", "fedavg")

Progress = Callable[[int, int], None]

# --------------------------------------------------------------------------- the training


@dataclass(frozen=True)
class TrainingResult:
    accuracy: float
    initial_accuracy: float
    test_images: int
    images_per_client: int


_CACHE: dict[str, TrainingResult] = {}
_TRAIN_SETS: dict[str, Any] = {}
_ERRORS: dict[str, str] = {}


def clear_cache() -> None:
    """Forget every cached training (tests; a long-lived process that changes code)."""
    _CACHE.clear()
    _TRAIN_SETS.clear()
    _ERRORS.clear()


def fl_accuracy(
    *,
    victim: str,
    victim_params: Mapping[str, Any] | None,
    defense: tuple[str, Mapping[str, Any]],
    protocol: tuple[str, Mapping[str, Any]],
    spec: UtilitySpec,
    train_set,
    test_set,
    seed: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> dict[str, float | int]:
    """Test accuracy after ``spec.rounds`` FL rounds with ``defense``, and without it (cached per process).

    ``victim`` is built by ``leakbench.victims.build_victim`` from ``seed``; ``defense`` and
    ``protocol`` are (name, parameters) of their registries, the protocol's as in the
    suite's case (its ``batch_size / clients`` is the default images per client).
    ``seed`` also fixes the shards and the draws of every round, shared by the defended
    and the undefended training. ``progress(done, total)`` counts rounds of the trainings
    this call runs (none when both are cached).

    Returns flat numbers for a cell's ``defense_info``: ``utility_accuracy``,
    ``utility_accuracy_undefended``, ``utility_accuracy_initial`` (before any round),
    ``utility_rounds``, ``utility_clients``, ``utility_images_per_client``,
    ``utility_test_images``.
    """
    device = torch.device(device)
    name, params = protocol
    n = spec.images_per_client or params.get("batch_size", 1) // params.get("clients", 1)
    # the protocol the training runs: the case's, with the table's clients and images per client
    # (so cases that differ only in their batch share a training when images_per_client is set)
    protocol = (name, {**params, "batch_size": spec.clients * n, "clients": spec.clients})
    common = {
        "victim": {"name": victim, "params": _plain(victim_params or {})},
        "protocol": {"name": protocol[0], "params": _plain(protocol[1])},
        "spec": spec.identity(), "seed": seed, "device": device.type,
        "train_set": train_set.describe(), "test_set": test_set.describe(),
    }
    runs = {"defended": defense, "undefended": ("none", {})}
    keys = {role: short_hash({**common, "defense": {"name": d[0], "params": _plain(d[1])}})
            for role, d in runs.items()}
    todo = list(dict.fromkeys(k for k in keys.values() if k not in _CACHE))
    done = [0]
    total = spec.rounds * len(todo)

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    for role, (name, params) in runs.items():
        key = keys[role]
        if key in _CACHE:
            continue
        _CACHE[key] = _train(victim=victim, victim_params=victim_params, defense=(name, params), protocol=protocol,
                             spec=spec, train_set=train_set, test_set=test_set, seed=seed, device=device, tick=tick)
        log.info("FL accuracy of %s with defense %s after %d rounds: %.1f%%", victim, name, spec.rounds,
                 100 * _CACHE[key].accuracy)
    defended, undefended = _CACHE[keys["defended"]], _CACHE[keys["undefended"]]
    return {
        "utility_accuracy": defended.accuracy,
        "utility_accuracy_undefended": undefended.accuracy,
        "utility_accuracy_initial": defended.initial_accuracy,
        "utility_rounds": spec.rounds,
        "utility_clients": spec.clients,
        "utility_images_per_client": defended.images_per_client,
        "utility_test_images": defended.test_images,
    }


def _train(*, victim, victim_params, defense, protocol, spec: UtilitySpec, train_set, test_set, seed: int,
           device: torch.device, tick: Callable[[], None]) -> TrainingResult:
    from leakbench.fl import PROTOCOLS
    from leakbench.defenses import DEFENSES
    from leakbench.victims import build_victim
    from leakbench.victims.training import evaluate

    name, params = protocol
    if name not in TRAINABLE_PROTOCOLS:
        raise ValueError(f"protocol {name!r} does not compute fresh client updates; the FL accuracy needs one of "
                         f"{', '.join(TRAINABLE_PROTOCOLS)}")
    params = dict(params)
    clients = params["clients"]
    n = params["batch_size"] // clients
    shard_size = len(train_set) // clients
    if n > shard_size:
        raise ValueError(f"{clients} clients x {n} images per round need shards of at least {n} images, but "
                         f"{train_set.name} has {len(train_set)} ({shard_size} per client); lower [utility] clients "
                         "or images_per_client")
    proto = PROTOCOLS.build(name, **params)
    chosen = DEFENSES.build(defense[0], **dict(defense[1]))
    model = build_victim(victim, victim_params, num_classes=test_set.num_classes, in_channels=test_set.channels,
                         side=test_set.side, seed=seed)
    server = chosen.prepare(copy.deepcopy(model)).to(device)
    initial, count = evaluate(server, test_set, device=device)
    shards = _Shards(len(train_set), clients=clients, seed=derive_seed(seed, "utility-shards"))
    named = dict(server.named_parameters())
    for r in range(spec.rounds):
        indices = shards.round(n)
        indices = tuple(chosen.compose_batch(indices, label_of=lambda i: train_set.get(i)[1],
                                             pool_size=len(train_set),
                                             generator=generator(seed, "utility-round", r, "compose")))
        cpu = train_set.batch(list(indices))
        batch = Batch(images=cpu.images.to(device), labels=cpu.labels.to(device), image_ids=cpu.image_ids,
                      normalization=cpu.normalization, num_classes=cpu.num_classes)
        try:
            observation, _ = proto.client_update(server, batch, defense=chosen, threat=ThreatModel(),
                                                 generator=generator(seed, "utility-round", r, "client"))
        except ValueError as err:
            if "not finite" not in str(err):
                raise
            raise FloatingPointError(f"the FL training diverged in round {r + 1} of {spec.rounds}: {err}. Lower "
                                     "[utility] server_lr (FedSGD) or the protocol's local_lr (FedAvg)") from err
        with torch.no_grad():
            for pname, update in zip(observation.param_names, observation.update):
                step = -spec.server_lr * update if observation.kind == "gradients" else update
                named[pname].add_(step.to(named[pname].dtype))
        if not all(bool(torch.isfinite(p).all()) for p in named.values()):
            raise FloatingPointError(f"the FL training diverged in round {r + 1} (weights not finite); lower "
                                     "[utility] server_lr (FedSGD) or the protocol's local_lr (FedAvg)")
        tick()
    if params.get("bn_mode", "train") == "train":
        _recalibrate_batch_norm(server, train_set, device=device)
    accuracy, count = evaluate(server, test_set, device=device)
    return TrainingResult(accuracy=accuracy, initial_accuracy=initial, test_images=count, images_per_client=n)


class _Shards:
    """Disjoint client shards of a training set; each client walks its own, reshuffled at every pass (seeded)."""

    def __init__(self, size: int, *, clients: int, seed: int):
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        per = size // clients
        self.shards = [order[u * per:(u + 1) * per] for u in range(clients)]
        self.generators = [torch.Generator().manual_seed(derive_seed(seed, "client", u)) for u in range(clients)]
        self.queues: list[list[int]] = [[] for _ in range(clients)]

    def round(self, n: int) -> tuple[int, ...]:
        """The round's images: client u's n images in slots u·n .. (u+1)·n − 1 (``leakbench.fl``'s layout)."""
        out: list[int] = []
        for u, shard in enumerate(self.shards):
            if len(self.queues[u]) < n:  # a new pass; images left from the last one go first
                perm = torch.randperm(len(shard), generator=self.generators[u]).tolist()
                self.queues[u] += [shard[i] for i in perm if shard[i] not in self.queues[u]]
            out += self.queues[u][:n]
            del self.queues[u][:n]
        return tuple(out)


@torch.no_grad()
def _recalibrate_batch_norm(model: nn.Module, data, *, device: torch.device, batch_size: int = 64) -> None:
    """BatchNorm running statistics recomputed on ``data`` (cumulative averages over its batches)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    try:
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            if stop - start < 2:
                break
            batch = data.batch(range(start, stop))
            model(batch.normalization.normalize(batch.images.to(device)))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


# --------------------------------------------------------------------------- the runner's entry point


def cell_utility(suite: Suite, cell: Cell, dataset, *, device, progress: Progress | None = None) -> dict:
    """The FL accuracy numbers of ``cell``'s (victim, defense, protocol), for its ``defense_info``; {} without ``[utility]``.

    ``suite.utility`` is None (no ``[utility]`` table): returns {} at no cost. Otherwise it
    trains (or takes from the per-process cache) the cell's victim from its seeded
    initialization (the server's weights of trial 0) for ``suite.utility.rounds`` FL rounds
    with the cell's defense and protocol on the table's training set, and the same without
    the defense, and measures both on ``dataset`` (the suite's data set, the attacked
    images, as the runner built it). Every cell of a (victim, defense, protocol) gets the
    same numbers; only the first pays for the training.

    Returns the flat numbers of ``fl_accuracy`` (``utility_accuracy``,
    ``utility_accuracy_undefended``, ``utility_accuracy_initial``, ``utility_rounds``,
    ``utility_clients``, ``utility_images_per_client``, ``utility_test_images``) to merge
    into ``defense_info``. A training that cannot run (a protocol without fresh updates, too
    few training images, divergence) gives ``{"utility_accuracy_error": why}`` (cached too),
    so a missing number never costs the cell its attacks. ``device`` is a ``torch.device``
    or its name; ``progress(done, total)`` counts training rounds.
    """
    spec: UtilitySpec | None = getattr(suite, "utility", None)
    if spec is None:
        return {}
    victim_identity = cell.victim.identity()
    seed = derive_seed(cell.suite_seed, "victim", victim_identity, 0)  # the server's weights of trial 0
    error_key = short_hash("error", victim_identity, cell.defense.identity(), cell.protocol.identity(),
                           spec.identity(), dataset.describe(), seed)
    if error_key in _ERRORS:
        return {"utility_accuracy_error": _ERRORS[error_key]}
    try:
        train_set = _train_set(spec)
        return fl_accuracy(victim=cell.victim.name, victim_params=cell.victim.kwargs(),
                           defense=(cell.defense.name, cell.defense.kwargs()),
                           protocol=(cell.protocol.name, cell.protocol.kwargs()), spec=spec, train_set=train_set,
                           test_set=dataset, seed=seed, device=device, progress=progress)
    except (ValueError, RuntimeError, FloatingPointError) as err:
        message = f"{type(err).__name__}: {err}"
        log.warning("FL accuracy of cell %s: %s", cell.key, message)
        _ERRORS[error_key] = message
        return {"utility_accuracy_error": message}


def _train_set(spec: UtilitySpec):
    from leakbench.data import DATASETS

    key = short_hash(spec.train, spec.train_kwargs())
    if key not in _TRAIN_SETS:
        _TRAIN_SETS[key] = DATASETS.build(spec.train, **spec.train_kwargs())
    return _TRAIN_SETS[key]


def _plain(params: Mapping[str, Any]) -> dict[str, Any]:
    return thaw_params(freeze_params(params))
