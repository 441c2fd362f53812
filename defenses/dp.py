"""DP-SGD (Abadi et al. 2016) through Opacus, and clipping alone.

The client's gradient is computed in Opacus's named stages, not re-implemented:

1. per-example gradients: ``opacus.GradSampleModule`` hooks;
2. ``clip_and_accumulate``: each example's gradient clipped to L2 norm ``max_grad_norm`` (C), summed;
3. ``add_noise``: N(0, (σ·C)²) on the sum, drawn from the cell's seeded generator;
4. ``scale_grad``: divided by the batch size (the mean-loss convention of the other clients).

These are the stages of ``opacus.optimizers.DPOptimizer.pre_step``; the optimizer's own
``step`` is never taken (the FL protocol applies the update). FedAvg clients run the
stages at every local step, as a DP-SGD client would.

BatchNorm mixes the examples of a batch, so per-example gradients do not exist through
it: ``prepare`` runs ``opacus.validators.ModuleValidator.fix``, which swaps BatchNorm for
GroupNorm. The attacked model is then this effective victim (the attacker gets the same
architecture the clients train); ``describe`` records it so reports can say so.

ε is Opacus's accountants' answer (RDP and PRV) for the stated δ, sample rate and number
of steps: the training this update is one step of, stated in the suite, because one
observed update alone does not say how the client was sampled or how long it trains.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from opacus.validators.errors import IllegalModuleConfigurationError
from torch import nn

from leakbench.core import Defense, ParamError
from leakbench.defenses.common import generator_on
from leakbench.defenses.registry import DEFENSES
from leakbench.privacy.rero import DPGuarantee

log = logging.getLogger(__name__)

#: accountants whose ε every dp_sgd row carries (Opacus's mechanism names)
ACCOUNTANTS = ("rdp", "prv")


@functools.lru_cache(maxsize=512)
def accountant_epsilon(*, accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
                       delta: float) -> tuple[float, tuple[str, ...]]:
    """ε of ``steps`` Poisson-subsampled Gaussian steps for ``delta``, from Opacus's ``accountant``,
    with the warnings Opacus raised on the way (e.g. an RDP order at the edge of its range).

    The history Opacus's accountants build step by step is a list of (noise multiplier,
    sample rate, steps); one entry says the same as ``steps`` calls of ``step``.
    PRV: Opacus's default ε precision (0.01) makes its grid intractable for weak noise
    (minutes at σ = 0.1); the precision asked for is 0.1% of the RDP bound, never finer
    than 0.01, so strong privacy gets Opacus's default and weak privacy an answer in a second.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc = create_accountant(mechanism=accountant)
        acc.history = [(noise_multiplier, sample_rate, steps)]
        if accountant == "prv":
            bound, _ = accountant_epsilon(accountant="rdp", noise_multiplier=noise_multiplier,
                                          sample_rate=sample_rate, steps=steps, delta=delta)
            eps = acc.get_epsilon(delta=delta, eps_error=max(0.01, 1e-3 * bound))
        else:
            eps = acc.get_epsilon(delta=delta)
    # Opacus's own warnings (numpy's overflow warnings inside the PRV grid say nothing more)
    notes = tuple(sorted({str(w.message).split(".")[0] for w in caught if issubclass(w.category, UserWarning)}))
    return float(eps), notes


def epsilon(*, accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Just ε (see ``accountant_epsilon``)."""
    return accountant_epsilon(accountant=accountant, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                              steps=steps, delta=delta)[0]


def _replacements(before: nn.Module, after: nn.Module) -> list[tuple[str, str, str]]:
    kinds = {name: type(m).__name__ for name, m in before.named_modules()}
    return [(name, kinds[name], type(m).__name__) for name, m in after.named_modules()
            if name in kinds and kinds[name] != type(m).__name__]


class OpacusClipping(Defense):
    """Per-example clipping at C and (when σ > 0) Gaussian noise σ·C on the sum, through Opacus."""

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float):
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.randomized = noise_multiplier > 0
        self.replaced: list[tuple[str, str, str]] = []
        self.steps_taken = 0
        if noise_multiplier == 0:
            self.no_dp_reason = "clipping only (noise_multiplier 0): no differential-privacy guarantee"

    # -- hook 1: the model Opacus can train privately ------------------------------------

    def prepare(self, model: nn.Module) -> nn.Module:
        fixed = ModuleValidator.fix(model)
        problems = [e for e in ModuleValidator.validate(fixed, strict=False)
                    if not isinstance(e, IllegalModuleConfigurationError)]  # train/eval is the protocol's choice
        if problems:
            raise ValueError(
                f"Opacus cannot compute per-example gradients of this victim even after ModuleValidator.fix: "
                f"{problems}. Per-example clipping needs layers that treat examples independently; "
                "choose a victim without them"
            )
        self.replaced = _replacements(model, fixed)
        if self.replaced:
            log.info("Opacus replaced %d module(s): %s", len(self.replaced), self.effective_victim())
        return fixed

    def effective_victim(self) -> str:
        if not self.replaced:
            return "unchanged"
        swaps = sorted({(a, b) for _, a, b in self.replaced})
        where = ", ".join(name for name, _, _ in self.replaced)
        return ("; ".join(f"{a} -> {b}" for a, b in swaps)
                + f" at {where} (Opacus ModuleValidator.fix: BatchNorm mixes examples)")

    # -- hook 2: the private gradient, in Opacus's stages --------------------------------

    def client_gradients(self, model, loss_fn, inputs, labels, *, generator):
        params = [p for p in model.parameters() if p.requires_grad]
        was_training = model.training
        model.train()  # Opacus records activations in training mode only; no BatchNorm is left after prepare
        sampler = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        optimizer = DPOptimizer(
            torch.optim.SGD(params, lr=0.0),  # never stepped: the FL protocol applies the update
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=inputs.shape[0],
            loss_reduction="mean",
            generator=generator_on(params[0].device, generator),
        )
        try:
            for p in params:
                p.grad = None
            with warnings.catch_warnings():
                # Opacus's backward hooks fire on the first layer although the images need no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss_fn(sampler(inputs), labels).backward()  # stage 1: per-example gradients
            optimizer.clip_and_accumulate()              # stage 2: clip each example to C, sum
            optimizer.add_noise()                        # stage 3: + N(0, (σC)²)
            optimizer.scale_grad()                       # stage 4: / batch size
            grads = tuple(p.grad.detach().clone() for p in params)
        finally:
            optimizer.zero_grad(set_to_none=True)
            sampler.to_standard_module()  # removes Opacus's hooks and per-parameter attributes
            for p in params:
                p.grad = None
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
            model.train(was_training)
        self.steps_taken += 1
        return grads

    def describe(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "per_example": True,
            "noise_std_on_sum": self.noise_multiplier * self.max_grad_norm,
            "client_steps": self.steps_taken,  # private gradient computations, summed over clients
            "effective_victim": self.effective_victim(),
            "replaced_modules": len(self.replaced),
        }


class DPSGD(OpacusClipping):
    """DP-SGD with ε from Opacus's accountants for the stated training."""

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, delta: float, sample_rate: float, steps: int):
        super().__init__(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
        self.delta = delta
        self.sample_rate = sample_rate
        self.steps = steps

    def dp_guarantee(self) -> DPGuarantee | None:
        """Gaussian noise σ·C on the sum of per-example gradients clipped to C, over the stated training."""
        if self.noise_multiplier == 0:
            return None
        return DPGuarantee(noise_multiplier=self.noise_multiplier, clipping_norm=self.max_grad_norm,
                           sample_rate=self.sample_rate, steps=self.steps, delta=self.delta)

    def privacy(self) -> dict[str, Any]:
        info: dict[str, Any] = {"delta": self.delta, "accountant_sample_rate": self.sample_rate,
                                "accountant_steps": self.steps}
        if self.noise_multiplier == 0:
            info.update({f"epsilon_{a}": None for a in ACCOUNTANTS})
            info["epsilon_note"] = "noise_multiplier 0: clipping only, no differential privacy (epsilon is infinite)"
            return info
        notes = []
        for accountant in ACCOUNTANTS:
            try:
                eps, warned = accountant_epsilon(accountant=accountant, noise_multiplier=self.noise_multiplier,
                                                 sample_rate=self.sample_rate, steps=self.steps, delta=self.delta)
            except Exception as err:  # an accountant that cannot answer is recorded, not fatal
                info[f"epsilon_{accountant}"] = None
                notes.append(f"{accountant}: {type(err).__name__}: {err}")
                continue
            info[f"epsilon_{accountant}"] = eps if math.isfinite(eps) else None
            if not math.isfinite(eps):
                notes.append(f"{accountant}: epsilon is infinite (no meaningful guarantee at this noise)")
            notes += [f"{accountant}: {w}" for w in warned]
        if notes:
            info["epsilon_note"] = "; ".join(notes)
        return info

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.privacy()}


class UpdateClipping(Defense):
    """Scales the whole sent update down to L2 norm at most C (client-level clipping, as in DP-FedAvg)."""

    def __init__(self, *, max_norm: float):
        self.max_norm = max_norm

    def transform(self, update, *, generator):
        norm = torch.sqrt(sum(t.double().pow(2).sum() for t in update))
        factor = min(1.0, self.max_norm / (float(norm) + 1e-12))
        return tuple(t * factor for t in update) if factor < 1.0 else update

    no_dp_reason = "whole-update clipping without noise: no differential-privacy guarantee"

    def describe(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_norm, "per_example": False}


def _check_clipping(max_grad_norm: float) -> None:
    if not max_grad_norm > 0:
        raise ParamError("max_grad_norm", f"must be > 0, got {max_grad_norm}")


@DEFENSES.register("dp_sgd", version="1")
def dp_sgd(
    *,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    delta: float = 1e-5,
    sample_rate: float = 0.01,
    steps: int = 1000,
) -> Defense:
    """DP-SGD through Opacus: per-example clipping at max_grad_norm, N(0, (noise_multiplier·max_grad_norm)²) on the sum, / batch; ε (RDP, PRV) for delta, sample_rate, steps.

    BatchNorm is swapped for GroupNorm (Opacus ``ModuleValidator.fix``); every row records the effective victim.
    """
    if not noise_multiplier >= 0:
        raise ParamError("noise_multiplier", f"must be >= 0, got {noise_multiplier}")
    _check_clipping(max_grad_norm)
    if not 0 < delta < 1:
        raise ParamError("delta", f"must be in (0, 1), usually below 1 / (number of examples); got {delta}")
    if not 0 < sample_rate <= 1:
        raise ParamError("sample_rate", f"a probability in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ParamError("steps", f"must be >= 1, got {steps}")
    return DPSGD(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, delta=delta,
                 sample_rate=sample_rate, steps=steps)


@DEFENSES.register("clip", version="1")
def clip(*, max_grad_norm: float = 1.0, per_example: bool = True) -> Defense:
    """Clipping alone: each example's gradient to max_grad_norm through Opacus (per_example), or the whole sent update.

    Per-example clipping swaps BatchNorm for GroupNorm like ``dp_sgd``; whole-update clipping keeps the victim.
    """
    _check_clipping(max_grad_norm)
    if per_example:
        return OpacusClipping(noise_multiplier=0.0, max_grad_norm=max_grad_norm)
    return UpdateClipping(max_norm=max_grad_norm)
