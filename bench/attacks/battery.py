"""Named, frozen attack batteries: the attacks, their budgets and their label strategies.

A suite's case says ``battery = "standard-v1"`` instead of (or besides) listing attacks.
The battery is fixed in code, like AutoAttack's ``version='standard'``: changing an
attack, a budget or a label rule of a battery means a new version (``standard-v2``), so
every stored row's ``battery`` column names exactly what ran.

Batteries

- ``standard-v1``: the published attacks at their papers' budgets (GPU-sized).
- ``cpu-v1``: the same attacks and rules at budgets sized for a 2-core CPU by measuring
  them against positive controls (no defense, FedSGD batch 1, photos at 32x32, labels
  recovered); ``leakbench run --budget cpu`` runs it in place of ``standard-v1``.
- ``smoke-v1``: the same attacks and rules at tiny budgets: tests only. Its numbers say
  nothing about leakage. ``resolve_battery(name, budget="smoke")`` swaps ``standard-v1``
  and ``cpu-v1`` for it, which is what ``leakbench run --budget smoke`` does.

What ``cpu-v1`` breaks (measured with ``tests/perf/measure_cpu_tier.py`` on the quick
suite's two images per victim; table in ``tests/perf/measured/cpu_tier.json`` and in the
README; 20 dB PSNR threshold; the whole battery unless an attack is named):

- ``lenet``: 1 of 2 images (31.6, 19.7 dB), both from iDLG, the attack that breaks it:
  iDLG at 15 x 20 updates reached 14.6, 14.5 dB; DLG at 50 x 20 reached 22.7 on one
  image; Inverting Gradients at 2400 iterations 18.6, 18.4 (4800: 20.2, 17.8).
- ``convnet`` (width 16), BatchNorm in eval mode: 1 of 2 (20.5, 12.5), from Inverting
  Gradients (alone at 2400 iterations, TV 0.05: 20.2, 11.2; at 4800 iterations 2 of 4
  images, measured before this tier).
- ``convnet``, BatchNorm in train mode: 0 of 2 (12.3, 10.4). No budget measured on a CPU
  breaks it: Inverting Gradients stalls (matching loss 0.04-0.06 at 2400 iterations; at
  1200 x 4 restarts 12.9, 9.4 dB; at 4800 iterations 0 of 4, measured before this tier);
  GradInversion with the running-statistics prior at 500 iterations 6.4, 5.6 dB; DLG,
  iDLG and Geng et al. at most 8.9 dB. ``certify`` is inconclusive there.
- ``resnet20``, BatchNorm in eval mode: not shown broken at a CPU budget. This tier's
  Inverting Gradients alone took 193 CPU seconds for one image and left it at 16.7 dB
  (matching loss 0.012; at 300 iterations 13.8 and 12.6 dB on two images). Train mode
  was not measured.
- ``fc``: 2 of 2 (``analytic_fc`` is exact; GradInversion alone reached 30.6, 38.3 dB).

"Most images" is not reached on any convolutional victim at these budgets; two images
per control make the rates coarse. Measured on a 2-core machine shared with other jobs
(1-minute load average 14-23), so wall times there were several times those of idle
cores (the whole battery: 233 s per LeNet image, 273 and 306 s per ConvNet image in
train and eval mode, 144 s per FC image); the JSON records the CPU seconds too.

Rules (how an entry becomes attack tables for one case)

- Labels per batch size: each entry names a strategy for batch size 1 and one for
  larger batches, so that every strategy works where it is used: ``idlg`` needs one
  image; ``geng`` counts duplicates at any batch size; ``analytic`` needs distinct
  labels, which only ``analytic_fc`` requires. ``none`` for DLG, whose soft labels are
  optimized with the images.
- Batch sizes: ``idlg`` is DLG with the label of a single image read first; above batch
  size 1 it would be DLG with counted labels, which ``geng`` covers, so it runs at batch
  size 1 only.
- Oracle labels: where the threat model grants them (``labels = "known"``), every
  attack that uses labels gets ``known``, as a case without a battery does.
- BatchNorm prior of ``gradinversion``: the client's batch statistics where the threat
  model shares them (``bn_stats = "shared"``), else the model's running statistics (a
  public proxy). A battery never asks for more than the suite grants.
- Victims: ``analytic_fc`` runs only where its closed form exists: a fully connected
  first layer with a bias at batch size 1; a one-layer or linear-activation-linear victim
  with more classes than images above it (see ``bench/attacks/analytic.py``). Elsewhere it
  is left out for that victim rather than filling the store with error rows.

Every table is validated by the suite loader exactly like a hand-written
``[[case.attacks]]`` table, and every resulting row carries the battery's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from leakbench.attacks.analytic import _linear_chain
from leakbench.attacks.common import first_parametric

#: A victim requirement: the reason an attack cannot run on ``model`` at this batch size, or None.
Requirement = Callable[..., "str | None"]


@dataclass(frozen=True)
class BatteryEntry:
    """One attack of a battery: its parameters and its label rule."""

    attack: str
    params: tuple[tuple[str, Any], ...]
    labels_single: str  # label strategy at batch size 1
    labels_batch: str  # label strategy at batch size > 1
    single_image_only: bool = False
    requirement: str | None = None  # a key of REQUIREMENTS
    bn_prior_from_threat: bool = False  # gradinversion: "shared" where granted, else "running"

    def table(self, *, batch_size: int, bn_stats: str, known_labels: bool) -> dict[str, Any]:
        """The entry as a ``[[case.attacks]]`` table for a case with this batch size and threat model."""
        table: dict[str, Any] = {"name": self.attack, **dict(self.params)}
        if self.bn_prior_from_threat:
            table["bn_prior"] = "shared" if bn_stats == "shared" else "running"
        labels = self.labels_single if batch_size == 1 else self.labels_batch
        table["labels"] = "known" if known_labels and labels != "none" else labels
        return table


def _analytic_requirement(model: nn.Module, *, batch_size: int, num_classes: int) -> str | None:
    if batch_size == 1:
        _, layer = first_parametric(model)
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            return None
        return f"its first layer is {type(layer).__name__}, not fully connected with a bias"
    if batch_size >= num_classes:
        return f"batch size {batch_size} needs more than {batch_size} classes; the data set has {num_classes}"
    try:
        _linear_chain(model)
    except ValueError as err:
        return str(err)
    return None


REQUIREMENTS: dict[str, Requirement] = {"analytic_fc": _analytic_requirement}


def _entry(attack: str, labels: tuple[str, str], **kw: Any) -> BatteryEntry:
    options = {k: kw.pop(k) for k in ("single_image_only", "requirement", "bn_prior_from_threat") if k in kw}
    return BatteryEntry(attack=attack, params=tuple(sorted(kw.items())), labels_single=labels[0],
                        labels_batch=labels[1], **options)


STANDARD_V1: tuple[BatteryEntry, ...] = (
    _entry("dlg", ("none", "none"), iterations=300, inner_steps=20, lr=1.0, restarts=1),
    _entry("idlg", ("idlg", "idlg"), iterations=300, inner_steps=20, lr=1.0, restarts=1, single_image_only=True),
    _entry("inverting_gradients", ("idlg", "geng"), iterations=4800, restarts=4, lr=0.1, tv_weight=1e-2),
    _entry("gradinversion", ("idlg", "geng"), iterations=20000, restarts=4, bn_prior_from_threat=True),
    _entry("geng", ("geng", "geng"), iterations=600, inner_steps=20, lr=0.1, restarts=1),
    _entry("analytic_fc", ("idlg", "analytic"), requirement="analytic_fc"),
)

SMOKE_V1: tuple[BatteryEntry, ...] = (
    _entry("dlg", ("none", "none"), iterations=2, inner_steps=4, lr=1.0, restarts=1),
    _entry("idlg", ("idlg", "idlg"), iterations=2, inner_steps=4, lr=1.0, restarts=1, single_image_only=True),
    _entry("inverting_gradients", ("idlg", "geng"), iterations=8, restarts=1, lr=0.1, tv_weight=1e-2),
    _entry("gradinversion", ("idlg", "geng"), iterations=8, restarts=2, warmup=2, bn_prior_from_threat=True),
    _entry("geng", ("geng", "geng"), iterations=2, inner_steps=4, lr=0.1, restarts=1),
    _entry("analytic_fc", ("idlg", "analytic"), requirement="analytic_fc"),
)

CPU_V1: tuple[BatteryEntry, ...] = (
    _entry("dlg", ("none", "none"), iterations=50, inner_steps=20, lr=1.0, restarts=1),
    _entry("idlg", ("idlg", "idlg"), iterations=100, inner_steps=20, lr=1.0, restarts=1, single_image_only=True),
    _entry("inverting_gradients", ("idlg", "geng"), iterations=2400, restarts=1, lr=0.1, tv_weight=5e-2),
    _entry("gradinversion", ("idlg", "geng"), iterations=500, restarts=1, bn_prior_from_threat=True),
    _entry("geng", ("geng", "geng"), iterations=20, inner_steps=20, lr=0.1, restarts=1),
    _entry("analytic_fc", ("idlg", "analytic"), requirement="analytic_fc"),
)

BATTERIES: dict[str, tuple[BatteryEntry, ...]] = {"standard-v1": STANDARD_V1, "cpu-v1": CPU_V1,
                                                 "smoke-v1": SMOKE_V1}
#: the battery a budget runs instead of the named one
BUDGET_SWAPS: dict[str, dict[str, str]] = {
    "full": {},
    "cpu": {"standard-v1": "cpu-v1"},
    "smoke": {"standard-v1": "smoke-v1", "cpu-v1": "smoke-v1"},
}


def battery_names() -> list[str]:
    return sorted(BATTERIES)


def effective_battery(name: str, *, budget: str = "full") -> str:
    """The battery that runs for ``name`` under ``budget`` (``standard-v1`` under smoke is ``smoke-v1``)."""
    if name not in BATTERIES:
        from leakbench.core import did_you_mean

        raise KeyError(f"unknown battery {name!r}{did_you_mean(name, BATTERIES)}; known: {', '.join(battery_names())}")
    if budget not in BUDGET_SWAPS:
        raise KeyError(f"unknown budget {budget!r}; known: {', '.join(BUDGET_SWAPS)}")
    return BUDGET_SWAPS[budget].get(name, name)


def resolve_battery(
    name: str,
    *,
    budget: str = "full",
    batch_size: int = 1,
    bn_stats: str = "none",
    model: nn.Module | None = None,
    num_classes: int | None = None,
    known_labels: bool = False,
) -> tuple[dict[str, Any], ...]:
    """The battery's attacks as ``[[case.attacks]]`` tables for one case (and victim).

    ``batch_size`` and ``bn_stats`` pick the label strategies and the BatchNorm prior
    (``known_labels``: the threat model grants the true labels, so every attack that uses
    labels gets them, as in a case without a battery);
    ``model`` (a victim, e.g. built on the meta device) and ``num_classes`` leave out
    the attacks whose closed form does not exist for it. Raises ``KeyError`` naming the
    known batteries for an unknown name.
    """
    entries = BATTERIES[effective_battery(name, budget=budget)]
    tables = []
    for entry in entries:
        if entry.single_image_only and batch_size != 1:
            continue
        if entry.requirement is not None and model is not None:
            reason = REQUIREMENTS[entry.requirement](model, batch_size=batch_size,
                                                     num_classes=num_classes or batch_size + 1)
            if reason is not None:
                continue
        tables.append(entry.table(batch_size=batch_size, bn_stats=bn_stats, known_labels=known_labels))
    return tuple(tables)


def describe(name: str) -> list[Mapping[str, Any]]:
    """A battery's entries, for listings and reports (``leakbench list``)."""
    return [
        {"attack": e.attack, "params": dict(e.params), "labels at batch 1": e.labels_single,
         "labels above batch 1": e.labels_batch, "batch 1 only": e.single_image_only,
         "needs": e.requirement, "bn_prior from threat model": e.bn_prior_from_threat}
        for e in BATTERIES[effective_battery(name)]
    ]
