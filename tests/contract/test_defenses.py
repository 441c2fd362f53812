"""Every registered defense, through both FL protocols on the tiny victim: the contracts a suite relies on.

Registering a defense enrolls it here. Parameters below only make a defense exercise its
randomness (a defense whose defaults already do needs no entry).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from leakbench.core import Defense, ThreatModel, generator
from leakbench.fl import PROTOCOLS
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim

PARAMS = {"label_disguise": {"last_layer_sigma": 1.0}}
PROTOCOL_PARAMS = {
    "fedsgd": {"batch_size": 4},
    "fedavg": {"batch_size": 4, "local_batch_size": 2, "local_epochs": 2, "local_lr": 0.1},
}


def build(name: str) -> Defense:
    return DEFENSES.build(name, **PARAMS.get(name, {}))


def update(name, protocol, batch, *, seed=0, norm="none"):
    model = build_victim("test_tiny", {"norm": norm}, num_classes=batch.num_classes, in_channels=3, side=16, seed=0)
    proto = PROTOCOLS.build(protocol, **PROTOCOL_PARAMS[protocol])
    defense = build(name)
    obs, attacker = proto.client_update(model, batch, defense=defense, threat=ThreatModel(), generator=generator(seed))
    return obs, attacker, defense, model


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_PARAMS))
@pytest.mark.parametrize("name", DEFENSES.names())
def test_shapes_dtypes_and_names_kept(name, protocol, smooth_batch):
    batch = smooth_batch(4, side=16)
    plain, _, _, _ = update("none", protocol, batch)
    defended, _, _, _ = update(name, protocol, batch)
    assert defended.param_names == plain.param_names
    assert defended.kind == plain.kind
    for d, p in zip(defended.update, plain.update):
        assert d.shape == p.shape and d.dtype == p.dtype and d.device == p.device
        assert torch.isfinite(d).all()


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_PARAMS))
@pytest.mark.parametrize("name", DEFENSES.names())
def test_same_generator_same_update_bit_for_bit(name, protocol, smooth_batch):
    batch = smooth_batch(4, side=16)
    a, _, defense, _ = update(name, protocol, batch, seed=3)
    b, _, _, _ = update(name, protocol, batch, seed=3)
    c, _, _, _ = update(name, protocol, batch, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.update, b.update))
    same = all(torch.equal(x, y) for x, y in zip(a.update, c.update))
    # a randomized defense draws from the generator (another one gives another update);
    # a deterministic one must not depend on it
    assert same == (not defense.randomized), f"{name}: randomized={defense.randomized} but same={same}"


@pytest.mark.parametrize("name", DEFENSES.names())
def test_server_model_untouched_and_attacker_gets_server_weights(name, smooth_batch):
    batch = smooth_batch(4, side=16)
    model = build_victim("test_tiny", {"norm": "batch"}, num_classes=8, in_channels=3, side=16, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    proto = PROTOCOLS.build("fedavg", **PROTOCOL_PARAMS["fedavg"])
    _, attacker = proto.client_update(model, batch, defense=build(name), threat=ThreatModel(), generator=generator(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the attacker's copy holds the server's weights, not the client's after its local steps
    # (a GroupNorm that Opacus put in a BatchNorm's place starts at the same 1 and 0)
    server = dict(model.named_parameters())
    assert [n for n, _ in attacker.named_parameters()] == list(server)
    assert all(torch.equal(server[n], p) for n, p in attacker.named_parameters())


@pytest.mark.parametrize("name", DEFENSES.names())
def test_describe_is_json_numbers_or_text(name, smooth_batch):
    batch = smooth_batch(4, side=16)
    _, _, defense, _ = update(name, "fedsgd", batch)
    info = defense.describe()
    text = json.dumps(info)
    assert json.loads(text) == info
    for key, value in info.items():
        assert isinstance(value, (int, float, str, bool)) or value is None, key
        if isinstance(value, float):
            assert math.isfinite(value), f"{key} = {value}: store None with a note instead"


@pytest.mark.parametrize("name", DEFENSES.names())
def test_compose_batch_returns_as_many_distinct_pool_indices(name):
    labels = [i % 8 for i in range(40)]
    defense = build(name)
    indices = (0, 1, 2, 3, 4, 5, 6, 7)
    out = defense.compose_batch(indices, label_of=labels.__getitem__, pool_size=40, generator=generator(0))
    assert len(out) == len(indices) and len(set(out)) == len(out)
    assert all(0 <= i < 40 for i in out)
    again = defense.compose_batch(indices, label_of=labels.__getitem__, pool_size=40, generator=generator(0))
    assert again == out
