"""Generative priors: generator shapes and range, the prior table and its public-data guard, GAN training's cache.

Everything is tiny: generators of width 4 to 8 at 16 px, GANs of one or two epochs on
the 128 public photo crops (a few seconds on one core).
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch

from leakbench.core import ParamError
from leakbench.generators import (
    GENERATORS,
    CacheEntry,
    adapt_channels,
    build_generator,
    load_or_train_prior,
    parse_prior,
    prior_images,
)
from leakbench.generators.models import DCGAN_SIDES, RESNET_SIDES
from leakbench.generators.prior import TRAINING_FORMAT
from leakbench.suite import SuiteError, load_suite, parse_suite

SIDE = 16
LOG = "leakbench.generators.cache"
SIDES = {"dcgan": DCGAN_SIDES, "resnet": RESNET_SIDES}
TINY_GAN = {"generator": {"name": "dcgan", "width": 4}, "dataset": {"name": "photos", "split": "public"},
            "epochs": 2, "batch_size": 64, "discriminator_width": 4}


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in model.state_dict().values()])


@pytest.mark.parametrize("name", GENERATORS.names())
def test_every_generator_makes_images_in_the_unit_box_at_its_sides(name):
    for side in SIDES[name]:
        for channels in (1, 3):
            g = build_generator(name, {"width": 4}, side=side, channels=channels, seed=0).eval()
            x = g(torch.randn(2, g.latent_dim) * 3)
            assert x.shape == (2, channels, side, side)
            assert x.min() >= 0 and x.max() <= 1 and torch.isfinite(x).all()


def test_generators_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_generator("dcgan", {"width": 4}, side=16, channels=3, seed=1)
    b = build_generator("dcgan", {"width": 4}, side=16, channels=3, seed=1)
    c = build_generator("dcgan", {"width": 4}, side=16, channels=3, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(weights(a), weights(b)) and not torch.equal(weights(a), weights(c))


def test_unsupported_side_names_the_supported_ones():
    with pytest.raises(ParamError, match="16, 32, 64, not 224"):
        build_generator("dcgan", {}, side=224, channels=3, seed=0)


# --------------------------------------------------------------------------- the prior table and its guard


def test_prior_table_accepts_the_frozen_form_the_runner_passes():
    table = {"generator": {"name": "dcgan", "width": 4}, "dataset": {"name": "photos", "split": "public"},
             "epochs": 3, "lr": 1}
    frozen = [["dataset", [["name", "photos"], ["split", "public"]]], ["epochs", 3], ["lr", 1],
              ["generator", [["name", "dcgan"], ["width", 4]]]]
    assert parse_prior(table) == parse_prior(frozen)
    assert parse_prior(table).lr == 1.0 and isinstance(parse_prior(table).lr, float)
    assert parse_prior({"epochs": 0}).label() == "dcgan untrained"


@pytest.mark.parametrize("dataset, message", [
    ({"name": "photos", "split": "attack"}, "images the suite attacks"),
    ("photos", "split = \"public\""),  # the default split is the attacked one
    ({"name": "cifar10", "root": "/nowhere"}, "split = \"train\""),
    ({"name": "photos", "split": "public", "side": 32}, "side"),
    ({"name": "photoz"}, "did you mean 'photos'"),
])
def test_prior_data_must_be_public_and_well_formed(dataset, message):
    with pytest.raises(ParamError, match=message):
        parse_prior({"dataset": dataset, "epochs": 1})


@pytest.mark.parametrize("table, message", [
    ({"epochs": 1}, "dataset: required when epochs > 0"),
    ({"epoch": 1}, "did you mean 'epochs'"),
    ({"epochs": -1}, "epochs: impossible value"),
    ({"epochs": 0, "generator": {"name": "dcgan", "widht": 4}}, "did you mean 'width'"),
    ({"epochs": 0, "generator": "stylegan"}, "unknown generator 'stylegan'"),
    ({"epochs": 0, "lr": "fast"}, "lr: must be float"),
])
def test_prior_table_errors_name_the_key(table, message):
    with pytest.raises(ParamError, match=message):
        parse_prior(table)


def test_wrong_data_proxy_and_channel_adaptation():
    images, labels, source = prior_images("lfw_faces", {}, side=SIDE, channels=3)
    assert images.shape == (100, 3, SIDE, SIDE) and labels is None and source["name"] == "lfw_faces"
    assert torch.equal(images[:, 0], images[:, 2])  # grayscale copied to three channels
    gray = adapt_channels(torch.ones(2, 3, 4, 4), 1)
    assert gray.shape == (2, 1, 4, 4) and torch.allclose(gray, torch.ones_like(gray))


SUITE = """
[suite]
name = "guard"
images = 1
[dataset]
name = "photos"
side = 16
[[case]]
victim = "test_tiny"
[[case.attacks]]
name = "gias"
prior = {{ generator = "dcgan", dataset = {dataset}, epochs = 1 }}
"""


def test_a_suite_pointing_the_prior_at_the_attacked_split_fails_validation_with_its_path():
    with pytest.raises(SuiteError) as err:
        parse_suite(textwrap.dedent(SUITE.format(dataset='{ name = "photos", split = "attack" }')))
    assert "case[0].attacks[0].prior" in str(err.value) and "images the suite attacks" in str(err.value)
    suite = parse_suite(textwrap.dedent(SUITE.format(dataset='{ name = "photos", split = "public" }')))
    identity = suite.cells[0].attacks[0].identity()
    assert "public" in json.dumps(identity)  # the prior's data is part of every row's attack_json


def test_the_generative_suite_validates():
    suite = load_suite(Path(__file__).parents[2] / "suites" / "generative.toml")
    names = {a.name for c in suite.cells for a in c.attacks}
    assert {"inverting_gradients", "gias", "giml"} <= names


# --------------------------------------------------------------------------- GAN training and its cache


def test_gan_training_is_cached_and_a_second_call_trains_nothing(tmp_path):
    spec = parse_prior(TINY_GAN)
    calls: list[tuple[int, int]] = []
    first = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path,
                                progress=lambda d, t: calls.append((d, t)))
    assert first.trained_epochs == 2 and len(first.history) == 2 and calls and calls[-1][0] == calls[-1][1]
    assert not first.model.training and not any(p.requires_grad for p in first.model.parameters())
    calls.clear()
    second = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path,
                                 progress=lambda d, t: calls.append((d, t)))
    assert second.trained_epochs == 0 and not calls
    assert torch.equal(weights(first.model), weights(second.model))
    assert second.key == first.key and not (tmp_path / f"{first.key}.partial.pt").exists()
    other = parse_prior({**TINY_GAN, "seed": 1})
    assert load_or_train_prior(other, side=SIDE, channels=3, cache_dir=tmp_path).key != first.key


def test_a_corrupted_cache_is_detected_and_trained_again(tmp_path, caplog):
    spec = parse_prior({**TINY_GAN, "epochs": 1})
    first = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path)
    first.checkpoint.write_bytes(first.checkpoint.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger=LOG):
        again = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path)
    assert again.trained_epochs == 1 and "corrupt" in caplog.text
    assert torch.equal(weights(first.model), weights(again.model))  # same seeds, same weights


def test_cache_loads_with_weights_only(tmp_path, caplog):
    """A file whose hash matches its sidecar but holds a pickled object is refused, not executed."""
    spec = parse_prior({**TINY_GAN, "epochs": 1})
    first = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path)
    torch.save({"payload": Path("/")}, first.checkpoint)  # not a tensor: weights_only refuses it
    entry = CacheEntry(tmp_path, first.key, TRAINING_FORMAT)
    meta = json.loads(entry.meta.read_text())
    from leakbench.core.files import sha256_file, write_json_atomic

    write_json_atomic(entry.meta, {**meta, "sha256": sha256_file(entry.weights)})
    with caplog.at_level(logging.WARNING, logger=LOG):
        again = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path)
    assert again.trained_epochs == 1 and "corrupt" in caplog.text


class Stop(Exception):
    pass


def test_interrupted_gan_training_resumes_to_the_same_weights(tmp_path):
    spec = parse_prior(TINY_GAN)  # 2 epochs of 2 steps
    whole = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path / "whole")

    def stop_in_second_epoch(done: int, total: int) -> None:
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path / "cut", progress=stop_in_second_epoch)
    assert (tmp_path / "cut" / f"{whole.key}.partial.pt").exists()
    resumed = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path / "cut")
    assert resumed.trained_epochs == 1 and len(resumed.history) == 2
    assert torch.equal(weights(whole.model), weights(resumed.model))


def test_an_untrained_prior_needs_no_data_and_writes_nothing(tmp_path):
    spec = parse_prior({"generator": {"name": "dcgan", "width": 4}, "epochs": 0})
    g = load_or_train_prior(spec, side=SIDE, channels=3, cache_dir=tmp_path)
    assert g.checkpoint is None and not any(tmp_path.iterdir())
    assert torch.equal(weights(g.model), weights(load_or_train_prior(spec, side=SIDE, channels=3).model))
