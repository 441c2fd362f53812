"""The registries the other contract files do not cover: protocols, data sets, generators, batteries.

Each test iterates its registry, so a component registered later is enrolled (and must say
how it is built here, or the enrollment test fails naming it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from leakbench.attacks import ATTACKS, LABELS
from leakbench.attacks.battery import BATTERIES, battery_names, effective_battery
from leakbench.components import registries
from leakbench.core import Observation, ParamError, ThreatModel, generator
from leakbench.data import DATASETS
from leakbench.defenses import DEFENSES
from leakbench.generators import GENERATORS, build_generator
from leakbench.victims import build_victim

PROTOCOLS = registries()["protocol"]  # with the recorded protocol of leakbench.flower registered

# --------------------------------------------------------------------------- protocols

# Small settings of every protocol that computes an update from a batch.
PROTOCOL_PARAMS = {
    "fedsgd": {"batch_size": 2},
    "fedavg": {"batch_size": 2, "local_batch_size": 1, "local_epochs": 1, "local_lr": 0.1},
}
# Protocols that replay a recorded update instead: built from files, tested with a recording.
REPLAYING = {"recorded": "tests/unit/test_flower_recording.py"}


def test_every_protocol_is_enrolled():
    assert set(PROTOCOLS.names()) == set(PROTOCOL_PARAMS) | set(REPLAYING), \
        "a new protocol needs PROTOCOL_PARAMS (or REPLAYING) in tests/contract/test_registries.py"


@pytest.mark.parametrize("name", sorted(PROTOCOL_PARAMS))
def test_protocol_update_matches_the_model_and_is_seeded(name, smooth_batch):
    batch = smooth_batch(2, side=16)
    model = build_victim("test_tiny", {}, num_classes=batch.num_classes, in_channels=3, side=16, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    protocol = PROTOCOLS.build(name, **PROTOCOL_PARAMS[name])
    obs, attacker = protocol.client_update(model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(),
                                           generator=generator(0))
    assert isinstance(obs, Observation) and obs.protocol == name and obs.batch_size == 2
    params = dict(model.named_parameters())
    assert obs.param_names == tuple(params)
    assert [t.shape for t in obs.update] == [params[n].shape for n in obs.param_names]
    assert all(torch.isfinite(t).all() for t in obs.update) and any(t.abs().sum() > 0 for t in obs.update)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the server's model is untouched
    again, _ = protocol.client_update(model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(),
                                      generator=generator(0))
    assert all(torch.equal(a, b) for a, b in zip(obs.update, again.update))


def test_replaying_protocol_names_a_missing_recording(tmp_path):
    with pytest.raises(ParamError, match="no such recording folder; record a Flower run"):
        PROTOCOLS.build("recorded", recording=str(tmp_path / "absent"), client="c0")


# --------------------------------------------------------------------------- data sets


def _image_folder(root: Path) -> Path:
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            pixels = torch.full((20, 24, 3), 60 * c + 30 * i, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


# How each data set is built offline in a test; the standard ones need files a test does not have.
DATA_PARAMS = {
    "photos": lambda tmp: {"side": 16},
    "mnist5k": lambda tmp: {"side": 16},
    "imagefolder": lambda tmp: {"root": str(_image_folder(tmp / "images")), "side": 16},
}
NEEDS_FILES = ("cifar10", "cifar100", "mnist")


def test_every_data_set_is_enrolled():
    assert set(DATASETS.names()) == set(DATA_PARAMS) | set(NEEDS_FILES), \
        "a new data set needs DATA_PARAMS (or NEEDS_FILES) in tests/contract/test_registries.py"


@pytest.mark.parametrize("name", sorted(DATA_PARAMS))
def test_data_set_batches_are_images_in_range_and_stable(name, tmp_path):
    params = DATA_PARAMS[name](tmp_path)
    data = DATASETS.build(name, **params)
    assert len(data) >= 2
    batch = data.batch([0, 1])
    assert batch.images.shape == (2, data.channels, 16, 16) and batch.images.dtype == torch.float32
    assert 0 <= float(batch.images.min()) and float(batch.images.max()) <= 1
    assert all(0 <= int(y) < batch.num_classes for y in batch.labels)
    assert len(set(batch.image_ids)) == 2
    json.dumps(data.describe())  # what the store records about it
    assert torch.equal(DATASETS.build(name, **params).batch([0, 1]).images, batch.images)


@pytest.mark.parametrize("name", NEEDS_FILES)
def test_data_set_without_its_files_says_where_they_go(name, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        DATASETS.build(name, root=str(tmp_path / "none"))


# --------------------------------------------------------------------------- generators

GENERATOR_SIDE = {"dcgan": 16, "resnet": 32}


def test_every_generator_is_enrolled():
    assert set(GENERATORS.names()) == set(GENERATOR_SIDE), \
        "a new generator needs GENERATOR_SIDE in tests/contract/test_registries.py"


@pytest.mark.parametrize("name", sorted(GENERATOR_SIDE))
def test_generator_output_shape_and_seeding(name):
    side = GENERATOR_SIDE[name]
    model = build_generator(name, {"width": 8}, side=side, channels=3, seed=0).eval()
    z = torch.randn(2, model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(z)
        same = build_generator(name, {"width": 8}, side=side, channels=3, seed=0).eval()(z)
        other = build_generator(name, {"width": 8}, side=side, channels=3, seed=1).eval()(z)
    assert out.shape == (2, 3, side, side) and torch.isfinite(out).all()
    assert torch.equal(out, same) and not torch.equal(out, other)


# --------------------------------------------------------------------------- batteries


@pytest.mark.parametrize("name", battery_names())
def test_battery_names_registered_components_with_valid_budgets(name):
    smoke = effective_battery(name, budget="smoke")
    assert smoke in BATTERIES, f"battery {name!r} has no smoke twin"
    for entry in BATTERIES[name]:
        assert entry.attack in ATTACKS.names(), (name, entry.attack)
        assert {entry.labels_single, entry.labels_batch} <= set(LABELS.names()), (name, entry.attack)
        table = entry.table(batch_size=1, bn_stats="none", known_labels=False)
        params = {k: v for k, v in table.items() if k not in ("name", "labels")}
        assert ATTACKS.get(entry.attack).check_params(params) == [], (name, entry.attack)
    full = {e.attack: dict(e.params) for e in BATTERIES[name]}
    tiny = {e.attack: dict(e.params) for e in BATTERIES[smoke]}
    assert set(tiny) == set(full), f"{smoke} runs other attacks than {name}"
    for attack, params in full.items():
        if "iterations" in params:
            assert tiny[attack]["iterations"] <= params["iterations"], (name, attack)
