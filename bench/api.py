"""The Python API: audit your own ``nn.Module`` from a notebook or another tool.

Two ways in, one answer::

    import leakbench
    audit = leakbench.audit(model, images=x, labels=y, defense="topk", attack="inverting_gradients")
    audit = leakbench.audit(model, update=grads, batch_size=1, input_shape=(3, 32, 32), num_classes=10,
                            reference=x, battery="standard-v1")

With ``images`` (and ``labels``), the client's update is computed here, through a registered
FL protocol (``fedsgd``, ``fedavg``) and defense, exactly as a suite's cell computes it. With
``update``, the update is yours (gradients, or a FedAvg weight delta ``θ_after − θ_server``)
and the public metadata of the protocol says how it was made; ``reference`` images, when
given, are what the reconstructions are scored against. Attacks are the registered ones
(``leakbench list attack``), by name or as ``{"name": ..., **parameters}``, or a battery
(``standard-v1``; under ``budget="smoke"`` its smoke twin). Every attack sees only the
observation (and the labels its strategy recovers from it), never the images.

Components registered by plug-ins (``leakbench.plugins``) are found here too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from leakbench.core import AttackTimeout, Batch, Normalization, Observation, ThreatModel, ThreatModelError, generator

log = logging.getLogger(__name__)

ComponentArg = str | Mapping[str, Any]


class AuditError(ValueError):
    """An ``audit`` call that cannot run: names the argument and what to do."""


@dataclass(frozen=True)
class ImageScore:
    """One reference image against the reconstruction matched to it (Hungarian on MSE)."""

    slot: int  # index into the reference images
    matched: int  # index into the attack's reconstruction
    psnr_db: float
    ssim: float
    lpips: float | None  # None when LPIPS has no offline AlexNet weights here (``AttackResult.lpips_note``)
    leaks: bool  # psnr_db above the audit's leak threshold


@dataclass(frozen=True)
class AttackResult:
    """What one attack made of the update: its images, the labels it used, and their scores."""

    attack: str  # label with the parameters given: ``inverting_gradients(iterations=20)``
    name: str
    params: Mapping[str, Any]
    labels_strategy: str | None  # the label strategy whose labels the attack used (None: it infers its own)
    status: Literal["ok", "error", "timeout"]
    error: str | None
    reconstruction: torch.Tensor | None  # (B, C, H, W) in [0, 1], on the CPU
    labels: torch.Tensor | None
    scores: tuple[ImageScore, ...]  # one per reference image; empty without a reference
    seconds: float
    lpips_note: str | None = None

    @property
    def max_psnr_db(self) -> float | None:
        """The most-leaking image's PSNR (None when nothing was scored)."""
        return max((s.psnr_db for s in self.scores), default=None)


@dataclass(frozen=True)
class Audit:
    """Every attack's result on one update, and what the update was."""

    results: tuple[AttackResult, ...]
    observation: Observation = field(repr=False)
    leak_threshold_db: float

    def worst(self) -> AttackResult | None:
        """The attack whose best image leaked most (highest PSNR); None when nothing was scored."""
        scored = [r for r in self.results if r.scores]
        return max(scored, key=lambda r: r.max_psnr_db) if scored else None

    @property
    def leak_rate(self) -> float | None:
        """Share of reference images that some attack reconstructed above the threshold (None: nothing scored)."""
        slots: dict[int, bool] = {}
        for result in self.results:
            for s in result.scores:
                slots[s.slot] = slots.get(s.slot, False) or s.leaks
        return sum(slots.values()) / len(slots) if slots else None

    def table(self) -> str:
        """A Markdown table: one row per attack, with its best image's scores."""
        lines = ["| attack | status | max PSNR (dB) | SSIM | LPIPS | leaking images |", "|---|---|---|---|---|---|"]
        for r in self.results:
            best = max(r.scores, key=lambda s: s.psnr_db) if r.scores else None
            cells = ["n/a"] * 4 if best is None else [
                f"{best.psnr_db:.2f}", f"{best.ssim:.3f}", "n/a" if best.lpips is None else f"{best.lpips:.3f}",
                f"{sum(s.leaks for s in r.scores)}/{len(r.scores)}"]
            status = r.status if r.error is None else f"{r.status}: {r.error.splitlines()[0][:80]}"
            lines.append(f"| {r.attack} | {status} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def audit(
    model: nn.Module,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    update: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | None = None,
    kind: Literal["gradients", "weight_delta"] = "gradients",
    batch_size: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    local_steps: int = 1,
    local_batch_size: int | None = None,
    local_lr: float | None = None,
    clients: int = 1,
    bn_mode: Literal["train", "eval"] = "train",
    reference: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    protocol: ComponentArg = "fedsgd",
    defense: ComponentArg = "none",
    attack: ComponentArg | Sequence[ComponentArg] | None = None,
    battery: str | None = None,
    label_strategy: str | None = None,
    known_labels: bool = False,
    budget: str = "full",
    leak_threshold_db: float = 20.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Audit:
    """Attack one client update of ``model`` and score what comes back.

    Give either the client's batch, ``images`` ((B, C, H, W) floats in [0, 1]) and ``labels``
    ((B,) ints), whose update is computed here through ``protocol`` and ``defense``; or
    ``update``, what the client sent (a tensor per trainable parameter, in
    ``model.named_parameters()`` order or as a name → tensor mapping) with its public
    metadata: ``kind`` (``"gradients"``, or ``"weight_delta"`` after FedAvg's
    ``local_steps`` of SGD at ``local_lr`` in mini-batches of ``local_batch_size``),
    ``batch_size``, ``input_shape`` (C, H, W), ``num_classes``, ``clients`` (securely
    aggregated clients) and ``bn_mode``; and optionally ``reference`` images to score against.
    ``model`` holds the weights the update was computed at (the server's); it is copied, never
    changed. ``mean``/``std``: the normalization the model applies to [0, 1] images before its
    first layer (default none: mean 0, std 1).

    ``attack``: a registered attack's name, ``{"name": ..., **parameters}``, or a list of them;
    ``battery``: a battery name (``standard-v1``); default ``inverting_gradients``.
    ``label_strategy``: how attacks that need labels get them (default ``idlg`` at batch size 1,
    else ``geng``; a battery sets its own); ``known_labels=True`` grants the true labels (an oracle).
    ``budget="smoke"`` caps iterations, restarts and epochs as ``leakbench run --budget smoke`` does.
    Returns an ``Audit``; an attack that fails is a result with its ``status`` and ``error``.
    """
    from leakbench import components
    from leakbench.suite import BUDGETS

    reg = components.registries()
    dev = torch.device(device)
    if budget not in BUDGETS:
        raise AuditError(f"budget: unknown budget {budget!r}; one of {', '.join(BUDGETS)}")
    if not isinstance(model, nn.Module):
        raise AuditError(f"model: must be a torch nn.Module, got {type(model).__name__}")
    if (images is None) == (update is None):
        raise AuditError("give either images= (and labels=): the client's batch, whose update leakbench computes; "
                         "or update=: the update the client sent, with its metadata")
    threat = ThreatModel(labels="known" if known_labels else "recovered",
                         bn_stats="none")
    model = model.to(dev)
    if images is not None:
        batch = _batch(images, labels, mean=mean, std=std, num_classes=num_classes, model=model, device=dev)
        observation, attacker_model = _computed_update(model, batch, protocol=protocol, defense=defense,
                                                       threat=threat, seed=seed, reg=reg)
    else:
        observation, attacker_model, batch = _given_update(
            model, update, kind=kind, batch_size=batch_size, input_shape=input_shape, num_classes=num_classes,
            local_steps=local_steps, local_batch_size=local_batch_size, local_lr=local_lr, clients=clients,
            bn_mode=bn_mode, reference=reference, labels=labels, known_labels=known_labels, mean=mean, std=std,
            device=dev)
    tables = _attack_tables(attack, battery, budget=budget, observation=observation, model=attacker_model,
                            label_strategy=label_strategy, known_labels=known_labels)
    scorer = None
    if batch is not None:
        from leakbench.metrics import get_lpips

        scorer = get_lpips(dev)
    results = tuple(_run_attack(table, observation, attacker_model, batch, scorer, reg=reg, seed=seed,
                                threshold=leak_threshold_db) for table in tables)
    return Audit(results=results, observation=observation, leak_threshold_db=leak_threshold_db)


# --------------------------------------------------------------------------- the update


def _normalization(mean, std, channels: int) -> Normalization:
    mean = tuple(float(m) for m in (mean if mean is not None else (0.0,) * channels))
    std = tuple(float(s) for s in (std if std is not None else (1.0,) * channels))
    if len(mean) != channels or len(std) != channels:
        raise AuditError(f"mean/std: give one value per channel ({channels}), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise AuditError(f"std: must be > 0, got {std}")
    return Normalization(mean=mean, std=std)


def _images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise AuditError(f"{name}: must be a float tensor of shape (B, C, H, W), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if images.min() < 0 or images.max() > 1:
        raise AuditError(f"{name}: pixel values must be in [0, 1] (leakbench normalizes them with mean/std); "
                         f"got {float(images.min()):.3g} .. {float(images.max()):.3g}")
    from leakbench.metrics.image import SSIM_WINDOW

    if min(images.shape[-2:]) < SSIM_WINDOW:
        raise AuditError(f"{name}: {images.shape[-2]}x{images.shape[-1]} px is smaller than SSIM's {SSIM_WINDOW}-px "
                         "window; the scores need images of at least that side")
    return images.detach().float()


def _classes(model: nn.Module, num_classes: int | None, inputs: torch.Tensor) -> int:
    if num_classes is not None:
        return int(num_classes)
    with torch.no_grad():
        probe = model.training
        model.eval()
        out = model(inputs[:1])
        model.train(probe)
    if out.dim() != 2:
        raise AuditError(f"num_classes: the model's output has shape {tuple(out.shape)}, not (B, classes); give "
                         "num_classes=")
    return int(out.shape[1])


def _batch(images, labels, *, mean, std, num_classes, model, device) -> Batch:
    images = _images(images, "images").to(device)
    if labels is None:
        raise AuditError("labels: the client's labels are needed to compute its update (shape (B,), ints)")
    labels = torch.as_tensor(labels).to(device=device, dtype=torch.int64).reshape(-1)
    norm = _normalization(mean, std, images.shape[1])
    classes = _classes(model, num_classes, norm.normalize(images))
    if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() >= classes:
        raise AuditError(f"labels: need {images.shape[0]} class indices in 0..{classes - 1}, got {labels.tolist()}")
    return Batch(images=images, labels=labels, image_ids=tuple(f"image{i}" for i in range(images.shape[0])),
                 normalization=norm, num_classes=classes)


def _component(arg: ComponentArg, what: str) -> tuple[str, dict]:
    if isinstance(arg, str):
        return arg, {}
    if isinstance(arg, Mapping) and isinstance(arg.get("name"), str):
        return arg["name"], {k: v for k, v in arg.items() if k != "name"}
    raise AuditError(f"{what}: a registered name or {{'name': ..., **parameters}}, got {arg!r}")


def _build(reg, kind: str, arg: ComponentArg, what: str, **fixed):
    from leakbench.core import ParamError, RegistryError

    name, params = _component(arg, what)
    try:
        return name, params, reg[kind].build(name, **{**params, **fixed})
    except (RegistryError, ParamError, TypeError, ValueError) as err:
        raise AuditError(f"{what}: {err}") from None


def _computed_update(model, batch: Batch, *, protocol, defense, threat, seed: int, reg):
    name, params = _component(protocol, "protocol")
    params.setdefault("batch_size", batch.size)
    _, _, proto = _build(reg, "protocol", {"name": name, **params}, "protocol")
    _, _, shield = _build(reg, "defense", defense, "defense")
    try:
        return proto.client_update(model, batch, defense=shield, threat=threat,
                                   generator=generator(seed, "api", "client"))
    except ValueError as err:
        raise AuditError(f"protocol: the client update failed: {err}") from None


def _given_update(model, update, *, kind, batch_size, input_shape, num_classes, local_steps, local_batch_size,
                  local_lr, clients, bn_mode, reference, labels, known_labels, mean, std, device):
    import copy

    if kind not in ("gradients", "weight_delta"):
        raise AuditError(f"kind: 'gradients' or 'weight_delta', got {kind!r}")
    if kind == "weight_delta" and local_lr is None:
        raise AuditError("local_lr: a weight delta needs the clients' local learning rate (public FedAvg metadata)")
    attacker = copy.deepcopy(model)
    attacker.train(bn_mode == "train")
    named = [(n, p) for n, p in attacker.named_parameters() if p.requires_grad]
    if isinstance(update, Mapping):
        missing = [n for n, _ in named if n not in update]
        extra = [n for n in update if n not in dict(named)]
        if missing or extra:
            raise AuditError(f"update: names must be the model's trainable parameters; missing {missing[:5]}, "
                             f"unknown {extra[:5]}")
        tensors = [update[n] for n, _ in named]
    else:
        tensors = list(update)
    if len(tensors) != len(named):
        raise AuditError(f"update: {len(tensors)} tensors for the model's {len(named)} trainable parameters")
    for (n, p), t in zip(named, tensors):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
            raise AuditError(f"update[{n!r}]: shape {tuple(getattr(t, 'shape', ()))}, the parameter's is "
                             f"{tuple(p.shape)}")
    ref = None if reference is None else _images(reference, "reference").to(device)
    if batch_size is None:
        if ref is None:
            raise AuditError("batch_size: how many images are behind the update (or give reference=)")
        batch_size = ref.shape[0]
    if input_shape is None:
        if ref is None:
            raise AuditError("input_shape: the model's input (C, H, W) (or give reference=)")
        input_shape = tuple(ref.shape[1:])
    channels = int(input_shape[0])
    norm = _normalization(mean, std, channels)
    if num_classes is None:
        num_classes = _classes(attacker, None, torch.zeros((1, *input_shape), device=device))
    true_labels = None if labels is None else torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if known_labels and true_labels is None:
        raise AuditError("labels: known_labels=True grants the attacker the true labels; give them with labels=")
    observation = Observation(
        kind=kind, update=tuple(t.detach().to(device, torch.float32) for t in tensors),
        param_names=tuple(n for n, _ in named), batch_size=int(batch_size), input_shape=tuple(input_shape),
        num_classes=int(num_classes), bn_mode=bn_mode, normalization=norm,
        protocol="fedavg" if kind == "weight_delta" else "fedsgd", local_steps=local_steps,
        local_batch_size=local_batch_size, local_lr=local_lr, clients=clients,
        known_labels=true_labels.to(device) if known_labels else None,
    )
    batch = None
    if ref is not None:
        if ref.shape[0] != batch_size or tuple(ref.shape[1:]) != tuple(input_shape):
            raise AuditError(f"reference: shape {tuple(ref.shape)} does not match batch_size {batch_size} and "
                             f"input_shape {tuple(input_shape)}")
        scored_labels = true_labels if true_labels is not None else torch.zeros(batch_size, dtype=torch.int64)
        batch = Batch(images=ref, labels=scored_labels.to(device), image_ids=tuple(f"image{i}" for i in
                                                                                    range(batch_size)),
                      normalization=norm, num_classes=int(num_classes))
    return observation, attacker, batch


# --------------------------------------------------------------------------- the attacks


def _attack_tables(attack, battery, *, budget: str, observation: Observation, model, label_strategy,
                   known_labels: bool) -> list[dict]:
    from leakbench.suite import SMOKE_CAPS

    default_labels = label_strategy or ("known" if known_labels else "idlg" if observation.batch_size == 1
                                        else "geng")
    tables: list[dict] = []
    if battery is not None:
        from leakbench.attacks.battery import resolve_battery

        try:
            tables += [dict(t) for t in resolve_battery(
                battery, budget=budget, batch_size=observation.batch_size, bn_stats="none", model=model,
                num_classes=observation.num_classes, known_labels=known_labels)]
        except KeyError as err:
            raise AuditError(f"battery: {err.args[0]}") from None
    if attack is not None or battery is None:
        listed = attack if isinstance(attack, (list, tuple)) else [attack or "inverting_gradients"]
        for item in listed:
            name, params = _component(item, "attack")
            tables.append({"name": name, **params, "labels": params.get("labels", default_labels)})
    if budget == "smoke":
        tables = [{k: min(v, SMOKE_CAPS[k]) if k in SMOKE_CAPS and isinstance(v, int) and not isinstance(v, bool)
                   else v for k, v in t.items()} for t in tables]
    return tables


def _label(name: str, params: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{name}({shown})" if shown else name


def _run_attack(table: dict, observation: Observation, model, batch: Batch | None, scorer, *, reg, seed: int,
                threshold: float) -> AttackResult:
    from leakbench.metrics import score

    table = dict(table)
    labels_name = table.pop("labels", "idlg")
    name, params = table.pop("name"), table
    label = _label(name, params)
    t0 = time.monotonic()

    def failed(status, error):
        return AttackResult(attack=label, name=name, params=params, labels_strategy=labels_name, status=status,
                            error=error, reconstruction=None, labels=None, scores=(), seconds=time.monotonic() - t0)

    _, _, attacker = _build(reg, "attack", {"name": name, **params}, "attack")  # bad names, parameters: raise
    strategy_name = labels_name if attacker.uses_labels else None
    try:
        recovered = None
        if attacker.uses_labels:
            _, _, strategy = _build(reg, "labels", labels_name, "label_strategy")
            recovered = strategy.recover(observation, model,
                                         generator=generator(seed, "api", labels_name, "labels"))
        recon = attacker.reconstruct(observation, model, labels=recovered,
                                     generator=generator(seed, "api", label, "attack"))
    except AttackTimeout as err:
        return failed("timeout", str(err))
    except ThreatModelError as err:
        return failed("error", f"threat model: {err}")
    except AuditError:
        raise
    except Exception as err:  # a failed attack is a result, with its reason
        log.debug("attack %s failed", label, exc_info=True)
        return failed("error", f"{type(err).__name__}: {err}")
    images = recon.images.detach().cpu()
    used = recon.labels if recon.labels is not None else recovered
    scores: tuple[ImageScore, ...] = ()
    note = None
    if batch is not None:
        cpu = Batch(images=batch.images.cpu(), labels=batch.labels.cpu(), image_ids=batch.image_ids,
                    normalization=batch.normalization, num_classes=batch.num_classes)
        recon_cpu = type(recon)(**{**recon.__dict__, "images": images,
                                   "labels": None if used is None else used.cpu()})
        scored = score(recon_cpu, cpu, lpips_scorer=scorer)
        note = scored.lpips_reason
        scores = tuple(ImageScore(slot=s.reference_index, matched=s.matched_index, psnr_db=s.psnr_db, ssim=s.ssim,
                                  lpips=s.lpips, leaks=s.psnr_db > threshold) for s in scored.images)
    return AttackResult(attack=label, name=name, params=params, labels_strategy=strategy_name, status="ok",
                        error=None, reconstruction=images, labels=None if used is None else used.detach().cpu(),
                        scores=scores, seconds=time.monotonic() - t0, lpips_note=note)


__all__ = ["Audit", "AttackResult", "AuditError", "ImageScore", "audit"]
