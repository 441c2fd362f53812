"""Quality floors under the numbers the README states, on the quick suite's own settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leakbench.attacks import ATTACKS, LABELS
from leakbench.core import ThreatModel, derive_seed, generator
from leakbench.data import DATASETS
from leakbench.fl import PROTOCOLS
from leakbench.metrics import psnr_db
from leakbench.suite import load_suite
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim

QUICK = Path(__file__).resolve().parents[2] / "suites" / "quick.toml"


def cells_of(victim: str):
    suite = load_suite(QUICK)
    return suite, [c for c in suite.cells if c.victim.name == victim]


def attack_cell(cell, attack_name: str):
    ds = DATASETS.build(cell.dataset.name, **cell.dataset.kwargs())
    batch = ds.batch(list(cell.image_indices))
    model = build_victim(cell.victim.name, cell.victim.kwargs(), num_classes=ds.num_classes, in_channels=ds.channels,
                         side=ds.side, seed=derive_seed(*cell.victim_seed_parts))
    protocol = PROTOCOLS.build(cell.protocol.name, **cell.protocol.kwargs())
    obs, client = protocol.client_update(model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(),
                                         generator=generator(cell.suite_seed, cell.key, "client"))
    spec = next(a for a in cell.attacks if a.name == attack_name)
    labels = LABELS.build(spec.labels.name).recover(obs, client)
    recon = ATTACKS.build(spec.name, **spec.kwargs()).reconstruct(
        obs, client, labels=labels, generator=generator(cell.suite_seed, cell.key, spec.key, "attack"))
    return float(psnr_db(recon.images, batch.images)[0]), int(labels[0]) == int(batch.labels[0])


def test_analytic_fc_is_exact_on_every_quick_image():
    _, cells = cells_of("fc")
    assert len(cells) == 8
    psnrs = [attack_cell(c, "analytic_fc")[0] for c in cells]
    assert min(psnrs) >= 60.0, psnrs


def test_inverting_gradients_on_lenet_holds_the_readme_floor():
    """The README states the mean PSNR of this exact configuration; this is the floor under it."""
    _, cells = cells_of("lenet")
    results = [attack_cell(c, "inverting_gradients") for c in cells]
    psnrs = [p for p, _ in results]
    assert all(ok for _, ok in results)  # iDLG labels are exact on the sigmoid LeNet
    mean = sum(psnrs) / len(psnrs)
    assert mean >= FLOOR_DB, f"mean PSNR {mean:.2f} dB fell under the floor {FLOOR_DB} dB: {psnrs}"


FLOOR_DB = 16.0  # README: 17.45 dB measured with `make run`; a margin for other CPUs and BLAS builds
