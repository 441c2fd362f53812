"""FL protocols: what clients compute and what the server receives.

Two protocols, one shape:

- ``fedsgd``: each client sends the gradient of its images' mean cross-entropy at the
  server's weights (``Observation.kind = "gradients"``).
- ``fedavg``: each client runs E local epochs of plain SGD (no momentum, no weight decay)
  over its n images in mini-batches of b at local lr η and sends the weight difference
  θ_after − θ_server (``kind = "weight_delta"``). E, b, n and η are public metadata of the
  observation; the labels of each local step are not.

Both aggregate ``clients`` = U clients (secure aggregation): the suite's ``batch_size``
counts every image behind one observed update, client u holds the consecutive images
``u·n .. (u+1)·n − 1`` with n = batch_size / U, and the server sees only the mean of the
U (defended) updates. Attacks reconstruct all ``batch_size`` images at once; they are
matched one-to-one to the ground truth and every image is scored, so the client of the
image in slot s is ``s // n`` (``clients`` is in every row's ``protocol_json``).

Every client trains on a private copy of the server's model, so nothing it does
(BatchNorm running statistics, local steps, a defense's model surgery) leaks back into the
model the attacker gets: that is a fresh copy at the server's weights after the defense's
``prepare`` (the architecture every client trains, which the server knows).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.core import Batch, Defense, Observation, ParamError, Registry, ThreatModel

PROTOCOLS: Registry["Protocol"] = Registry("protocol")

BNStats = list[tuple[torch.Tensor, torch.Tensor]]


class Protocol:
    """A client-side FL protocol; subclasses say what one client computes (``_client_update``)."""

    name = "protocol"
    kind: Literal["gradients", "weight_delta"] = "gradients"

    def __init__(self, *, batch_size: int, bn_mode: Literal["train", "eval"], clients: int):
        self.batch_size = batch_size
        self.bn_mode = bn_mode
        self.clients = clients

    @property
    def images_per_client(self) -> int:
        return self.batch_size // self.clients

    def client_update(
        self, model: nn.Module, batch: Batch, *, defense: Defense, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Observation, nn.Module]:
        """What the server receives, and the attacker's model: the server's weights in the architecture
        the clients train (after ``defense.prepare``), in the protocol's BatchNorm mode."""
        if batch.size != self.batch_size:
            raise ValueError(f"{self.name} expects batches of {self.batch_size} images, got {batch.size}")
        inputs = batch.normalization.normalize(batch.images)
        n = self.images_per_client
        # A private stream for the clients' visiting order, forked first, so that a defense's
        # noise draws do not change the order (the undefended reference run sees the same one).
        order = _fork(generator)
        updates: list[tuple[torch.Tensor, ...]] = []
        client_stats: list[BNStats] = []
        names: tuple[str, ...] = ()
        for u in range(self.clients):
            client = _client_copy(model, defense, self.bn_mode)
            names = tuple(name for name, p in client.named_parameters() if p.requires_grad)
            stats, handles = _record_bn_stats(client) if threat.bn_stats == "shared" else ([], [])
            try:
                update = self._client_update(client, inputs[u * n:(u + 1) * n], batch.labels[u * n:(u + 1) * n],
                                             defense=defense, generator=generator, order=order,
                                             stats_handles=handles)
            finally:
                for h in handles:
                    h.remove()
            if not all(bool(torch.isfinite(t).all()) for t in update):
                raise ValueError(self._diverged_message(u))
            update = defense.transform(tuple(t.detach() for t in update), generator=generator)
            updates.append(tuple(t.detach() for t in update))
            client_stats.append(stats)
        aggregate = _mean_update(updates)
        attacker_view = _client_copy(model, defense, self.bn_mode)
        obs = Observation(
            kind=self.kind,
            update=aggregate,
            param_names=names,
            batch_size=batch.size,
            input_shape=tuple(batch.images.shape[1:]),
            num_classes=batch.num_classes,
            bn_mode=self.bn_mode,
            normalization=batch.normalization,
            protocol=self.name,
            clients=self.clients,
            known_labels=batch.labels.clone() if threat.labels == "known" else None,
            bn_stats=_mean_stats(client_stats) if threat.bn_stats == "shared" else None,
            **self._metadata(),
        )
        return obs, attacker_view

    def _client_update(self, client: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, defense: Defense,
                       generator: torch.Generator, order: torch.Generator,
                       stats_handles: list) -> tuple[torch.Tensor, ...]:
        """One client's update; ``generator`` feeds the defense, ``order`` the client's private image order."""
        raise NotImplementedError

    def _metadata(self) -> dict:
        """Public metadata the server knows about the clients' computation."""
        return {}

    def _diverged_message(self, client: int) -> str:
        return (f"client {client}'s {self.kind.replace('_', ' ')} is not finite (NaN or inf): the victim's loss "
                "overflowed at the server's weights; check the victim and its weights")


class FedSGD(Protocol):
    """Each client sends the gradient of its images' mean cross-entropy at the server's weights."""

    name = "fedsgd"
    kind = "gradients"

    def _client_update(self, client, inputs, labels, *, defense, generator, order, stats_handles):
        return _gradients(client, defense, inputs, labels, generator=generator)


class FedAvg(Protocol):
    """Each client runs ``local_epochs`` epochs of SGD in mini-batches and sends θ_after − θ_server."""

    name = "fedavg"
    kind = "weight_delta"

    def __init__(self, *, batch_size: int, bn_mode: Literal["train", "eval"], clients: int, local_epochs: int,
                 local_batch_size: int, local_lr: float, shuffle: bool):
        super().__init__(batch_size=batch_size, bn_mode=bn_mode, clients=clients)
        self.local_epochs = local_epochs
        self.local_batch_size = local_batch_size
        self.local_lr = local_lr
        self.shuffle = shuffle

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.images_per_client / self.local_batch_size)

    @property
    def local_steps(self) -> int:
        return self.local_epochs * self.steps_per_epoch

    def _metadata(self) -> dict:
        return {"local_steps": self.local_steps, "local_batch_size": self.local_batch_size, "local_lr": self.local_lr}

    def _diverged_message(self, client: int) -> str:
        return (f"client {client}'s local training diverged: its weight difference after {self.local_steps} SGD "
                f"step(s) at local_lr = {self.local_lr:g} is not finite (NaN or inf); lower protocol.local_lr "
                "(an untrained victim without working normalization, e.g. BatchNorm in eval mode, tolerates less)")

    def _client_update(self, client, inputs, labels, *, defense, generator, order, stats_handles):
        params = [p for p in client.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        n, b = inputs.shape[0], self.local_batch_size
        for epoch in range(self.local_epochs):
            # The order is the client's own: a private permutation when shuffling, else the
            # images' order (public, as in Geiping et al.'s simulation).
            visit = torch.randperm(n, generator=order).to(inputs.device) if self.shuffle \
                else torch.arange(n, device=inputs.device)
            for s in range(self.steps_per_epoch):
                if epoch or s:
                    for h in stats_handles:  # shared BN statistics: those of the first step only
                        h.remove()
                idx = visit[s * b:(s + 1) * b]
                grads = _gradients(client, defense, inputs[idx], labels[idx], generator=generator)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(self.local_lr * g)
        return tuple(p.detach() - p0 for p, p0 in zip(params, start))


# --------------------------------------------------------------------------- helpers


def _fork(generator: torch.Generator) -> torch.Generator:
    forked = torch.Generator(device=generator.device)
    forked.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
    return forked


def _client_copy(model: nn.Module, defense: Defense, bn_mode: str) -> nn.Module:
    client = defense.prepare(copy.deepcopy(model))
    client.train(bn_mode == "train")
    return client


def _gradients(client: nn.Module, defense: Defense, inputs: torch.Tensor, labels: torch.Tensor, *,
               generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    try:
        grads = defense.client_gradients(client, F.cross_entropy, inputs, labels, generator=generator)
    except ValueError as err:
        if "Expected more than 1 value per channel" in str(err):
            raise ValueError(
                f"BatchNorm in train mode cannot normalize a batch of {inputs.shape[0]} image(s) whose feature maps "
                "shrink to 1x1; set protocol.bn_mode = \"eval\", use a larger (local) batch, or a victim with "
                "norm = \"group\""
            ) from err
        raise
    return tuple(g.detach() for g in grads)


def _mean_update(updates: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    if len(updates) == 1:
        return updates[0]
    return tuple(torch.stack(parts).mean(0) for parts in zip(*updates))


def _mean_stats(per_client: list[BNStats]) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Each BN layer's batch mean and variance, averaged over clients (what a secure sum would give)."""
    return tuple((torch.stack([m for m, _ in layer]).mean(0), torch.stack([v for _, v in layer]).mean(0))
                 for layer in zip(*per_client))


def _record_bn_stats(model: nn.Module) -> tuple[BNStats, list]:
    """Forward hooks that capture each BatchNorm layer's batch mean and variance."""
    stats: BNStats = []
    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inputs, output, store=stats):
                x = inputs[0].detach()
                dims = [d for d in range(x.dim()) if d != 1]
                store.append((x.mean(dims), x.var(dims, unbiased=False)))
            handles.append(module.register_forward_hook(hook))
    return stats, handles


# --------------------------------------------------------------------------- utility cost


class _PrepareOnly(Defense):
    """A defense's model change without its gradient or update changes: the reference update."""

    def __init__(self, defense: Defense):
        self._defense = defense

    def prepare(self, model: nn.Module) -> nn.Module:
        return self._defense.prepare(model)


def flat(update: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in update])


def update_cosine(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """Cosine similarity of two updates, all parameters concatenated (0 if either is all zero)."""
    fa, fb = flat(a), flat(b)
    denom = fa.norm() * fb.norm()
    return float(fa @ fb / denom) if denom > 0 else 0.0


def utility_cost(
    protocol: Protocol,
    model: nn.Module,
    batch: Batch,
    *,
    defense: Defense,
    defended: Observation,
    generator: torch.Generator,
) -> dict[str, float | None]:
    """How far the defense moved the update from what the same clients would send undefended.

    The reference runs the same protocol on the same batch and the same architecture (the
    defense's ``prepare`` is kept, so an Opacus GroupNorm swap is compared with the
    undefended GroupNorm model) with the defense's gradient and update hooks off. It is
    computed for reports only and never enters the observation. Pass a generator seeded
    like the defended run's, so that a shuffling client visits its images in the same order.
    """
    reference, _ = protocol.client_update(model, batch, defense=_PrepareOnly(defense), threat=ThreatModel(),
                                          generator=generator)
    ref_norm = float(flat(reference.update).norm())
    return {
        "utility_cosine": update_cosine(defended.update, reference.update),
        "utility_norm_ratio": float(flat(defended.update).norm()) / ref_norm if ref_norm > 0 else None,
    }


# --------------------------------------------------------------------------- registry


def _check_common(batch_size: int, clients: int) -> None:
    if batch_size < 1:
        raise ParamError("batch_size", f"must be >= 1, got {batch_size}")
    if clients < 1:
        raise ParamError("clients", f"must be >= 1, got {clients}")
    if batch_size % clients:
        raise ParamError(
            "clients",
            f"{clients} clients cannot share {batch_size} images equally; batch_size counts every image behind "
            f"the aggregated update, so it must be a multiple of clients",
        )


@PROTOCOLS.register("fedsgd", version="2")
def fedsgd(*, batch_size: int = 1, bn_mode: Literal["train", "eval"] = "train", clients: int = 1) -> FedSGD:
    """FedSGD: the mean over ``clients`` of each client's gradient of its images' mean loss; BatchNorm in ``bn_mode``.

    ``batch_size`` counts all images behind the aggregated update (``batch_size / clients`` per client).
    """
    _check_common(batch_size, clients)
    return FedSGD(batch_size=batch_size, bn_mode=bn_mode, clients=clients)


@PROTOCOLS.register("fedavg", version="1")
def fedavg(
    *,
    batch_size: int = 1,
    local_epochs: int = 1,
    local_batch_size: int | None = None,
    local_lr: float = 1e-4,
    clients: int = 1,
    bn_mode: Literal["train", "eval"] = "train",
    shuffle: bool = False,
) -> FedAvg:
    """FedAvg: each client runs ``local_epochs`` epochs of SGD (mini-batches of ``local_batch_size``, lr ``local_lr``) and sends its weight difference.

    ``batch_size`` counts all images behind the aggregated update (n = ``batch_size / clients``
    per client); ``local_batch_size`` defaults to n (one step per epoch). ``local_lr`` 1e-4 is
    the value of Geiping et al.'s multi-step notebook. ``shuffle`` = true makes each epoch's
    order a private permutation the attacker cannot reproduce.
    """
    _check_common(batch_size, clients)
    n = batch_size // clients
    b = n if local_batch_size is None else local_batch_size
    if local_epochs < 1:
        raise ParamError("local_epochs", f"must be >= 1, got {local_epochs}")
    if not 1 <= b <= n:
        raise ParamError("local_batch_size", f"must be between 1 and the {n} images of a client, got {b}")
    if not local_lr > 0:
        raise ParamError("local_lr", f"must be > 0, got {local_lr}")
    return FedAvg(batch_size=batch_size, bn_mode=bn_mode, clients=clients, local_epochs=local_epochs,
                  local_batch_size=b, local_lr=local_lr, shuffle=shuffle)
