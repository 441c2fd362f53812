"""A generative prior: its spec (a suite table), and GAN training on the attacker's public data, cached.

A suite writes the prior of a generative attack as an attack parameter::

    prior = { generator = "dcgan", dataset = { name = "photos", split = "public" }, epochs = 300 }

so that the prior's provenance is part of the attack's identity (stored in every row's
``attack_json``) and another prior is another attack key. ``epochs = 0`` is an untrained
generator (seeded initialization, no data, no training): the paper's baseline for GIML.

Training (``train_gan``): the non-saturating GAN loss (Goodfellow et al. 2014) with the
DCGAN discriminator and Adam (lr 2e-4, betas 0.5 / 0.999, Radford et al.'s recipe);
random horizontal flips; every epoch draws its shuffle, flips and latent codes from a
generator seeded by (recipe seed, cache key, epoch), so an interrupted training resumes
from its last saved epoch to the same weights as an uninterrupted one. Training ends by
recalibrating the generator's BatchNorm statistics (see ``models.py``). Results are
cached on disk by a key over the spec, the image shape and ``TRAINING_FORMAT``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.core import ParamError, derive_seed, short_hash
from leakbench.generators.cache import CacheEntry, default_cache_dir
from leakbench.generators.data import check_public, prior_images
from leakbench.generators.models import GENERATOR_CONTEXT, GENERATORS, build_generator, discriminator, recalibrate_batchnorm
from leakbench.generators.tables import REQUIRED, Field, check_against, component, frozen, read_table, thawed

log = logging.getLogger(__name__)

#: Bump when a change to this module changes the weights a prior spec produces; part of every cache key.
TRAINING_FORMAT = 1

AUGMENTATIONS = ("flip", "none")

PRIOR_FIELDS: dict[str, Field] = {
    "generator": Field((str, dict), "dcgan"),
    "dataset": Field((str, dict), None),
    "epochs": Field((int,), REQUIRED, lambda v: v >= 0, "0 (an untrained generator) or more"),
    "batch_size": Field((int,), 64, lambda v: v >= 2, "at least 2 (BatchNorm)"),
    "lr": Field((float,), 2e-4, lambda v: v > 0, "> 0"),
    "beta1": Field((float,), 0.5, lambda v: 0 <= v < 1, "in [0, 1)"),
    "discriminator_width": Field((int,), 64, lambda v: v >= 1, ">= 1"),
    "augment": Field((str,), "flip", lambda v: v in AUGMENTATIONS, "one of " + ", ".join(AUGMENTATIONS)),
    "seed": Field((int,), 0, lambda v: v >= 0, "seeds are >= 0"),
}


@dataclass(frozen=True)
class PriorSpec:
    """A generator and how it was trained; every field is part of the cache key."""

    generator: str = "dcgan"
    generator_params: tuple[tuple[str, Any], ...] = ()
    generator_version: str = ""
    dataset: str | None = None
    dataset_params: tuple[tuple[str, Any], ...] = ()
    dataset_version: str = ""
    epochs: int = 0
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    discriminator_width: int = 64
    augment: str = "flip"
    seed: int = 0

    @property
    def trained(self) -> bool:
        return self.epochs > 0

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "generator": {"name": self.generator, "version": self.generator_version,
                          "params": thawed(self.generator_params)},
            "epochs": self.epochs,
            "seed": self.seed,
        }
        if self.trained:  # an untrained generator depends on none of the training fields
            out.update(dataset={"name": self.dataset, "version": self.dataset_version,
                                "params": thawed(self.dataset_params)},
                       batch_size=self.batch_size, lr=self.lr, beta1=self.beta1,
                       discriminator_width=self.discriminator_width, augment=self.augment)
        return out

    def label(self) -> str:
        """``dcgan trained 300 ep on photos(split=public)`` or ``dcgan untrained``."""
        if not self.trained:
            return f"{self.generator} untrained"
        shown = ", ".join(f"{k}={v}" for k, v in self.dataset_params)
        return f"{self.generator} trained {self.epochs} ep on {self.dataset}({shown})"


def parse_prior(value: Any, *, param: str = "prior") -> PriorSpec:
    """A ``prior`` table (or its frozen form) as a checked ``PriorSpec``; ``ParamError`` names what is wrong."""
    t = read_table(value, param=param, fields=PRIOR_FIELDS)
    gen_name, gen_params = component(t["generator"], param=param, key="generator")
    if gen_name not in GENERATORS:
        raise ParamError(param, "generator: " + GENERATORS.unknown_message(gen_name))
    entry = GENERATORS.get(gen_name)
    check_against(entry, gen_params, param=param, key="generator", reserved=GENERATOR_CONTEXT)
    dataset, data_params, data_version = None, {}, ""
    if t["dataset"] is not None:
        dataset, data_params = component(t["dataset"], param=param, key="dataset")
        data_version = check_public(dataset, data_params, param=param)
    elif t["epochs"] > 0:
        raise ParamError(param, "dataset: required when epochs > 0: name the attacker's public data the generator "
                                "is trained on, e.g. dataset = { name = \"photos\", split = \"public\" }")
    return PriorSpec(
        generator=gen_name, generator_params=frozen(gen_params), generator_version=entry.version,
        dataset=dataset, dataset_params=frozen(data_params), dataset_version=data_version,
        epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], beta1=t["beta1"],
        discriminator_width=t["discriminator_width"], augment=t["augment"], seed=t["seed"],
    )


@dataclass(frozen=True)
class TrainedGenerator:
    """A generator in eval mode with frozen weights, and where it came from."""

    model: nn.Module
    key: str
    checkpoint: Path | None  # None for an untrained generator (nothing is stored)
    trained_epochs: int  # epochs trained by this call (0 when loaded or untrained)
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)


def prior_identity(spec: PriorSpec, *, side: int, channels: int) -> dict[str, Any]:
    return {"format": TRAINING_FORMAT, "prior": spec.identity(), "side": side, "channels": channels}


def load_or_train_prior(
    spec: PriorSpec,
    *,
    side: int,
    channels: int,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainedGenerator:
    """The prior's generator for ``channels`` x ``side`` x ``side`` images: untrained, loaded, or trained and cached.

    ``progress(done, total)`` reports GAN steps while training. An exception it raises (or
    a KeyboardInterrupt) stops training; the next call resumes from the last saved epoch.
    """
    identity = prior_identity(spec, side=side, channels=channels)
    key = short_hash(identity, length=24)
    model = build_generator(spec.generator, thawed(spec.generator_params), side=side, channels=channels,
                            seed=derive_seed(spec.seed, "generator-init", identity))
    if not spec.trained:
        return TrainedGenerator(model=frozen_eval(model, device), key=key, checkpoint=None, trained_epochs=0)
    entry = CacheEntry(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key, TRAINING_FORMAT)
    meta = entry.load(model)
    trained = 0
    if meta is None:
        images, _, source = prior_images(spec.dataset, thawed(spec.dataset_params), side=side, channels=channels)
        history, trained = train_gan(model, images, spec=spec, entry=entry, identity=identity,
                                     device=torch.device(device), progress=progress)
        meta = entry.save(model, identity={**identity, "data": source}, history=history)
    return TrainedGenerator(model=frozen_eval(model, device), key=key, checkpoint=entry.weights,
                            trained_epochs=trained, history=tuple(meta.get("history", ())))


def frozen_eval(model: nn.Module, device: str | torch.device) -> nn.Module:
    """The generator as attacks use it: on ``device``, eval mode (running BatchNorm statistics), no gradients."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(count, generator=generator)
    chunks = [order[i:i + batch_size] for i in range(0, count, batch_size)]
    return [c for c in chunks if len(c) > 1]  # BatchNorm cannot train on one image


def _flip(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return images
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def train_gan(
    model: nn.Module,
    images: torch.Tensor,
    *,
    spec: PriorSpec,
    entry: CacheEntry,
    identity: dict[str, Any],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], int]:
    """Trains ``model`` (in place) against a fresh discriminator; returns the per-epoch history and epochs trained."""
    if images.shape[0] < 2:
        raise ValueError(f"a GAN prior needs at least 2 training images, got {images.shape[0]}")
    side, channels = images.shape[-1], images.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, "discriminator-init", identity))
        critic = discriminator(side=side, channels=channels, width=spec.discriminator_width)
    model.to(device).train()
    critic.to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    betas = (spec.beta1, 0.999)
    opt_g = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), lr=spec.lr, betas=betas)
    start, history = _resume(entry, model, critic, opt_g, opt_d)
    steps_per_epoch = len(_batches(images.shape[0], spec.batch_size, torch.Generator()))
    total = spec.epochs * steps_per_epoch
    step = start * steps_per_epoch
    log.info("generator %s: %s %s (%d images, %d steps)", entry.key, "resuming after epoch %d of" % start
             if start else "training", spec.label(), images.shape[0], total)
    for epoch in range(start, spec.epochs):
        g = torch.Generator().manual_seed(derive_seed(spec.seed, entry.key, "epoch", epoch))
        sums = {"loss_d": 0.0, "loss_g": 0.0, "d_real": 0.0, "d_fake": 0.0}
        batches = _batches(images.shape[0], spec.batch_size, g)
        for idx in batches:
            real = _flip(images[idx], spec.augment, g).to(device) * 2 - 1
            z = torch.randn(len(idx), model.latent_dim, generator=g).to(device)
            fake = model(z) * 2 - 1
            d_real, d_fake = critic(real), critic(fake.detach())
            loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            out = critic(fake)
            loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))  # non-saturating
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            step += 1
            sums["loss_d"] += float(loss_d.detach())
            sums["loss_g"] += float(loss_g.detach())
            sums["d_real"] += float(torch.sigmoid(d_real.detach()).mean())
            sums["d_fake"] += float(torch.sigmoid(d_fake.detach()).mean())
            if progress is not None:
                progress(step, total)
        means = {k: v / len(batches) for k, v in sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise FloatingPointError(f"generator {entry.key}: the GAN losses diverged in epoch {epoch + 1}; lower the "
                                     f"prior's lr (now {spec.lr:g})")
        history.append({"epoch": epoch + 1, **means})
        log.info("generator %s: epoch %d/%d, D loss %.3f, G loss %.3f", entry.key, epoch + 1, spec.epochs,
                 means["loss_d"], means["loss_g"])
        entry.save_partial({"generator": model.state_dict(), "discriminator": critic.state_dict(),
                            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "epoch": epoch + 1,
                            "history": history})
    recalibrate_batchnorm(model, batches=8, batch_size=64,
                          generator=torch.Generator().manual_seed(derive_seed(spec.seed, entry.key, "recalibrate")))
    model.eval()
    return history, spec.epochs - start


def _resume(entry: CacheEntry, model: nn.Module, critic: nn.Module, opt_g: torch.optim.Optimizer,
            opt_d: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    state = entry.load_partial()
    if state is None:
        return 0, []
    initial = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, critic)]
    try:
        model.load_state_dict(state["generator"])
        critic.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        return int(state["epoch"]), list(state["history"])
    except Exception as err:
        log.warning("generator %s: the saved training state does not fit (%s: %s); training from the start",
                    entry.key, type(err).__name__, err)
        for m, s in zip((model, critic), initial):
            m.load_state_dict(s)
        return 0, []
