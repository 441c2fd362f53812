"""Trained victims: train once under a stated recipe, cache the checkpoint, load it afterwards.

A suite asks for ``state = "trained"`` with a :class:`Recipe`. :func:`load_or_train`
builds the victim from a seed derived from the recipe, trains it on the recipe's data
set, and stores the weights under a key that hashes everything that determines them
(the victim's name, version and parameters, the data set's shape, the recipe and this
module's training format). Every later run with the same key loads the file instead.

Why it is built this way:

- The key hashes the whole recipe, ``epochs`` included, so a capped smoke budget or any
  other change trains (and caches) a different model instead of reusing the wrong one.
- Checkpoints are loaded with ``torch.load(weights_only=True)``: a cache directory is
  shared state, and unpickling arbitrary objects from it would execute code.
- A sidecar JSON holds the SHA-256 of the weights file; a truncated or corrupted file
  (or a missing sidecar) is detected, logged as a warning and trained again.
- Training saves its state (weights, optimizer, finished epochs) atomically at the end
  of every epoch (write a temporary file, then ``os.replace``), so an interrupted run
  resumes from its last finished epoch and ends with the same weights as an
  uninterrupted one: shuffling and augmentation draw from generators seeded per epoch,
  and the learning rate is a function of the step alone.
- This package imports only ``leakbench.core``: the caller resolves the recipe's data set
  (``leakbench.data``) and passes the images in.

Test accuracy is measured on the data set the caller passes as ``test_set`` (the runner
passes the suite's attacked images, disjoint from the training split) and stored in the
sidecar per test set.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from leakbench.core import Batch, Normalization, ParamError, derive_seed, short_hash
from leakbench.core.frozen import freeze_params, thaw_params
from leakbench.core.files import CheckpointFiles, atomic_save, cpu_state, sha256_file, write_json_atomic
from leakbench.victims.registry import CONTEXT_PARAMS, VICTIMS, build_victim

log = logging.getLogger(__name__)

#: Bump when a change to this module changes the weights a recipe produces; it is part of every cache key.
TRAINING_FORMAT = 1

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("none", "flip", "flip_crop")

#: The recipe keys a suite must state; the others have the defaults of :class:`Recipe`.
RECIPE_REQUIRED = ("dataset", "epochs")


class LabelledImages(Protocol):
    """What training needs of a data set (``leakbench.data.ImageSet`` provides it)."""

    name: str
    side: int
    channels: int
    num_classes: int
    normalization: Normalization

    def __len__(self) -> int: ...
    def batch(self, indices: Sequence[int]) -> Batch: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Recipe:
    """How a trained victim is trained. Every field is part of the checkpoint's cache key.

    ``dataset`` and ``dataset_params`` name a registered data set (``leakbench.data``) that the
    caller builds; ``dataset_version`` is its registry version. ``dataset_params`` may be
    given as a mapping; it is stored as sorted (key, value) pairs so the recipe stays
    hashable. The learning rate follows ``schedule`` over all steps; ``augment`` draws
    random horizontal flips (and 4-pixel shifted crops with zero padding for
    ``flip_crop``) from a generator seeded per epoch.
    """

    dataset: str
    epochs: int
    dataset_params: tuple[tuple[str, Any], ...] = ()
    dataset_version: str = ""
    optimizer: str = "sgd"
    lr: float = 0.05
    batch_size: int = 32
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: str = "flip_crop"

    def __post_init__(self) -> None:
        params = self.dataset_params
        if isinstance(params, Mapping):
            params = params.items()
        object.__setattr__(self, "dataset_params", freeze_params(params))
        problems = recipe_problems({f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise ParamError(*problems[0])

    @classmethod
    def suite_keys(cls) -> tuple[str, ...]:
        """The keys of a suite's ``recipe`` table (the data set's version is filled in, not given)."""
        return tuple(f.name for f in fields(cls) if f.name not in ("dataset_params", "dataset_version"))

    def dataset_kwargs(self) -> dict[str, Any]:
        return thaw_params(self.dataset_params)

    def identity(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dataset"] = {"name": self.dataset, "version": self.dataset_version, "params": self.dataset_kwargs()}
        del out["dataset_params"], out["dataset_version"]
        return out

    def label(self) -> str:
        """Short form for leaderboards: ``20 ep sgd lr=0.05 on photos(split=public)``."""
        shown = ", ".join(f"{k}={v}" for k, v in self.dataset_params if k != "side")
        data = f"{self.dataset}({shown})" if shown else self.dataset
        return f"{self.epochs} ep {self.optimizer} lr={self.lr:g} on {data}"


#: What makes each recipe value possible, with the message when it is not.
_RECIPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dataset": (lambda v: bool(v), "name a registered data set"),
    "epochs": (lambda v: v >= 1, "train for at least 1 epoch"),
    "optimizer": (lambda v: v in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS)),
    "lr": (lambda v: v > 0, "the learning rate must be > 0"),
    "batch_size": (lambda v: v >= 2, "at least 2: BatchNorm cannot train on a batch of 1 image"),
    "seed": (lambda v: v >= 0, "seeds are >= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "schedule": (lambda v: v in SCHEDULES, "one of " + ", ".join(SCHEDULES)),
    "augment": (lambda v: v in AUGMENTATIONS, "one of " + ", ".join(AUGMENTATIONS)),
}


def recipe_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for every impossible value among ``values`` (well-typed recipe fields); empty when all fit."""
    return [(k, f"{message}; got {values[k]!r}") for k, (ok, message) in _RECIPE_CHECKS.items()
            if k in values and not ok(values[k])]


@dataclass(frozen=True)
class TrainedVictim:
    """A trained model and the facts a report shows beside its leakage."""

    model: nn.Module
    key: str
    checkpoint: Path
    recipe: Recipe
    test_accuracy: float
    test_images: int
    test_set: str
    trained_epochs: int  # epochs trained by this call (0 when the checkpoint was loaded)
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)

    def info(self) -> dict[str, Any]:
        """JSON-able description stored with every cell (``cells.victim_info_json``)."""
        last = self.history[-1] if self.history else {}
        return {
            "state": "trained",
            "recipe": self.recipe.identity(),
            "test_accuracy": self.test_accuracy,
            "test_images": self.test_images,
            "test_set": self.test_set,
            "train_loss": last.get("loss"),
            "train_accuracy": last.get("accuracy"),
            "checkpoint": str(self.checkpoint),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def default_cache_dir() -> Path:
    """``$LEAKBENCH_CACHE/victims``, else ``~/.cache/leakbench/victims``."""
    root = os.environ.get("LEAKBENCH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "leakbench"
    return base / "victims"


def checkpoint_key(name: str, params: Mapping[str, Any] | None, *, recipe: Recipe, num_classes: int,
                   in_channels: int, side: int) -> str:
    """The cache key of a trained victim: a hash of everything its weights depend on."""
    return short_hash(_key_identity(name, params, recipe=recipe, num_classes=num_classes, in_channels=in_channels,
                                    side=side), length=24)


def load_or_train(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    recipe: Recipe,
    train_set: LabelledImages,
    test_set: LabelledImages,
    num_classes: int,
    in_channels: int,
    side: int,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> TrainedVictim:
    """The victim ``name`` trained under ``recipe``: loaded from the cache, or trained (resuming) and cached.

    ``progress(done, total)`` reports optimizer steps while training; it is not called
    when the checkpoint is loaded. An exception it raises (or a KeyboardInterrupt)
    stops training; the next call resumes from the last finished epoch.
    """
    _check_data(train_set, num_classes=num_classes, in_channels=in_channels, side=side, role="training")
    _check_data(test_set, num_classes=num_classes, in_channels=in_channels, side=side, role="test")
    identity = _key_identity(name, params, recipe=recipe, num_classes=num_classes, in_channels=in_channels, side=side)
    key = short_hash(identity, length=24)
    files = CheckpointFiles(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    device = torch.device(device)

    model = build_victim(name, params, num_classes=num_classes, in_channels=in_channels, side=side,
                         seed=derive_seed(recipe.seed, "trained-victim-init", identity))
    meta = _load_checkpoint(model, files)
    trained_epochs = 0
    if meta is None:
        files.directory.mkdir(parents=True, exist_ok=True)
        history, trained_epochs = _train(model, recipe=recipe, train_set=train_set, files=files, key=key,
                                         device=device, progress=progress)
        meta = _save_checkpoint(model, files, identity=identity, history=history)
    model.to(device)

    test_id = short_hash(test_set.describe())
    evaluation = meta.get("evaluations", {}).get(test_id)
    if evaluation is None:
        accuracy, count = evaluate(model, test_set, device=device)
        evaluation = {"test_set": test_set.name, "accuracy": accuracy, "images": count}
        meta.setdefault("evaluations", {})[test_id] = evaluation
        write_json_atomic(files.meta, meta)
    log.info("victim %s (%s): test accuracy %.1f%% on %d images of %s", name, key, 100 * evaluation["accuracy"],
             evaluation["images"], evaluation["test_set"])
    return TrainedVictim(
        model=model, key=key, checkpoint=files.weights, recipe=recipe, test_accuracy=evaluation["accuracy"],
        test_images=evaluation["images"], test_set=evaluation["test_set"], trained_epochs=trained_epochs,
        history=tuple(meta.get("history", ())),
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: LabelledImages, *, device: str | torch.device = "cpu",
             batch_size: int = 256) -> tuple[float, int]:
    """Top-1 accuracy of ``model`` (in eval mode: running BatchNorm statistics) on every image of ``data``."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            inputs = batch.normalization.normalize(batch.images.to(device))
            correct += int((model(inputs).argmax(1) == batch.labels.to(device)).sum())
    finally:
        model.train(was_training)
    return correct / len(data), len(data)


# --------------------------------------------------------------------------- training


def _optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    return _OPTIMIZER_FACTORIES[recipe.optimizer](params, recipe)


_OPTIMIZER_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, r: torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay),
    "adam": lambda params, r: torch.optim.Adam(params, lr=r.lr, weight_decay=r.weight_decay),
}

_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1 + math.cos(math.pi * step / total)),
}


def _batches(count: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """A seeded shuffle cut into batches; a last batch of one image is dropped (BatchNorm cannot train on it)."""
    order = torch.randperm(count, generator=generator).tolist()
    chunks = [order[i:i + batch_size] for i in range(0, count, batch_size)]
    return [c for c in chunks if len(c) > 1]


def _augment(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips, and for ``flip_crop`` shifts of up to 4 pixels with zero padding."""
    if kind == "none":
        return images
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if kind == "flip_crop":
        pad = 4
        side = images.shape[-1]
        padded = F.pad(images, (pad, pad, pad, pad))
        shifts = torch.randint(0, 2 * pad + 1, (images.shape[0], 2), generator=generator).tolist()
        images = torch.stack([padded[i, :, y:y + side, x:x + side] for i, (y, x) in enumerate(shifts)])
    return images


def _train(model: nn.Module, *, recipe: Recipe, train_set: LabelledImages, files: CheckpointFiles, key: str,
           device: torch.device, progress: Callable[[int, int], None] | None) -> tuple[list[dict], int]:
    model.to(device)
    optimizer = _optimizer(recipe, model.parameters())
    start, history = _resume(model, optimizer, files)
    steps_per_epoch = len(_batches(len(train_set), recipe.batch_size, torch.Generator()))
    if steps_per_epoch == 0:
        raise ValueError(f"the training set {train_set.name} has {len(train_set)} image(s): too few for batches of "
                         f"{recipe.batch_size}")
    total = recipe.epochs * steps_per_epoch
    step = start * steps_per_epoch
    if start:
        log.info("victim %s: resuming training after epoch %d of %d", key, start, recipe.epochs)
    else:
        log.info("victim %s: training %s", key, recipe.label())
    for epoch in range(start, recipe.epochs):
        model.train()
        g = torch.Generator().manual_seed(derive_seed(recipe.seed, key, "epoch", epoch))
        loss_sum, correct, seen = 0.0, 0, 0
        for indices in _batches(len(train_set), recipe.batch_size, g):
            batch = train_set.batch(indices)
            images = _augment(batch.images, recipe.augment, g)
            inputs = batch.normalization.normalize(images).to(device)
            labels = batch.labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * _SCHEDULES[recipe.schedule](step, total)
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * len(indices)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(indices)
            if progress is not None:
                progress(step, total)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"victim {key}: the training loss diverged in epoch {epoch + 1}; "
                                     f"lower the recipe's lr (now {recipe.lr:g})")
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "accuracy": correct / seen})
        log.info("victim %s: epoch %d/%d, loss %.4f, train accuracy %.1f%%", key, epoch + 1, recipe.epochs,
                 loss_sum / seen, 100 * correct / seen)
        atomic_save({"model": cpu_state(model), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                      "history": history}, files.partial)
    return history, recipe.epochs - start


def _resume(model: nn.Module, optimizer: torch.optim.Optimizer, files: CheckpointFiles) -> tuple[int, list[dict]]:
    """The epoch to start from and the history so far, from a partial checkpoint when a usable one exists."""
    if not files.partial.exists():
        return 0, []
    try:
        state = torch.load(files.partial, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["epoch"]), list(state["history"])
    except Exception as err:  # a partial file from a killed run: start over rather than fail
        log.warning("victim %s: the saved training state %s cannot be used (%s: %s); training from the start",
                    files.key, files.partial, type(err).__name__, err)
        return 0, []


def _save_checkpoint(model: nn.Module, files: CheckpointFiles, *, identity: dict, history: list[dict]) -> dict:
    atomic_save(cpu_state(model), files.weights)
    meta = {
        "format": TRAINING_FORMAT,
        "key": files.key,
        "identity": identity,
        "sha256": sha256_file(files.weights),
        "bytes": files.weights.stat().st_size,
        "history": history,
        "evaluations": {},
        "torch": torch.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(files.meta, meta)
    files.partial.unlink(missing_ok=True)
    log.info("victim %s: checkpoint saved to %s", files.key, files.weights)
    return meta


def _load_checkpoint(model: nn.Module, files: CheckpointFiles) -> dict | None:
    """The sidecar of a verified checkpoint, loaded into ``model``; ``None`` (after a warning if broken) otherwise."""
    if not files.weights.exists() and not files.meta.exists():
        return None
    try:
        meta = json.loads(files.meta.read_text(encoding="utf-8"))
        if meta.get("format") != TRAINING_FORMAT or meta.get("key") != files.key:
            raise ValueError(f"sidecar describes format {meta.get('format')} / key {meta.get('key')}")
        digest = sha256_file(files.weights)
        if digest != meta.get("sha256"):
            raise ValueError(f"SHA-256 {digest[:12]}... does not match the recorded {str(meta.get('sha256'))[:12]}...")
        state = torch.load(files.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:
        log.warning("victim checkpoint %s is corrupt or incomplete (%s: %s); deleting it and training again",
                    files.weights, type(err).__name__, err)
        files.weights.unlink(missing_ok=True)
        files.meta.unlink(missing_ok=True)
        return None
    log.info("victim %s: loaded the cached checkpoint %s", files.key, files.weights)
    return meta


# --------------------------------------------------------------------------- helpers


def _key_identity(name: str, params: Mapping[str, Any] | None, *, recipe: Recipe, num_classes: int,
                  in_channels: int, side: int) -> dict[str, Any]:
    entry = VICTIMS.get(name)
    problems = entry.check_params(dict(params or {}), reserved=CONTEXT_PARAMS)
    if problems:
        raise ValueError(f"victim {name!r}: " + "; ".join(problems))
    full = {**entry.defaults(exclude=CONTEXT_PARAMS), **dict(params or {})}
    return {
        "format": TRAINING_FORMAT,
        "victim": {"name": name, "version": entry.version, "params": thaw_params(freeze_params(full))},
        "context": {"num_classes": num_classes, "in_channels": in_channels, "side": side},
        "recipe": recipe.identity(),
    }


def _check_data(data: LabelledImages, *, num_classes: int, in_channels: int, side: int, role: str) -> None:
    found = (data.num_classes, data.channels, data.side)
    if found != (num_classes, in_channels, side):
        raise ValueError(
            f"the {role} set {data.name} has {found[0]} classes, {found[1]} channel(s) and side {found[2]}, but the "
            f"victim is built for {num_classes} classes, {in_channels} channel(s) and side {side}; "
            "train on a data set with the attacked data set's classes and image shape"
        )







