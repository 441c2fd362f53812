"""Every registered attack and label strategy, on the tiny victim: shapes, ranges, contracts."""

import pytest
import torch

from bench.attacks import ATTACKS, LABELS
from bench.core import ThreatModel, ThreatModelError, generator
from bench.fl import PROTOCOLS
from defenses import DEFENSES
from victims import build_victim

# Small budgets for the contract; each attack's own parameters, named by registry name.
TINY_PARAMS = {"inverting_gradients": {"iterations": 10, "restarts": 2}}
# The victim each attack needs (analytic_fc needs a first fully connected layer).
VICTIM_FOR = {"analytic_fc": ("fc", {"hidden": 16})}


def observe(victim, params, batch, *, threat=ThreatModel(), bn_mode="train"):
    model = build_victim(victim, params, num_classes=batch.num_classes, in_channels=3, side=batch.images.shape[-1],
                         seed=0)
    protocol = PROTOCOLS.build("fedsgd", batch_size=batch.size, bn_mode=bn_mode)
    return protocol.client_update(model, batch, defense=DEFENSES.build("none"), threat=threat, generator=generator(0))


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_output_shape_and_range(name, smooth_batch):
    batch = smooth_batch(1, side=16)
    victim, params = VICTIM_FOR.get(name, ("test_tiny", {}))
    obs, model = observe(victim, params, batch)
    attack = ATTACKS.build(name, **TINY_PARAMS.get(name, {}))
    recon = attack.reconstruct(obs, model, labels=batch.labels, generator=generator(1))
    assert recon.images.shape == batch.images.shape
    assert recon.images.dtype == torch.float32
    assert recon.images.min() >= 0 and recon.images.max() <= 1
    assert torch.isfinite(recon.images).all()
    assert recon.matching_loss == recon.matching_loss  # not NaN


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_is_deterministic_for_a_seed(name, smooth_batch):
    batch = smooth_batch(1, side=16)
    victim, params = VICTIM_FOR.get(name, ("test_tiny", {}))
    obs, model = observe(victim, params, batch)
    attack = ATTACKS.build(name, **TINY_PARAMS.get(name, {}))
    a = attack.reconstruct(obs, model, labels=batch.labels, generator=generator(5))
    b = attack.reconstruct(obs, model, labels=batch.labels, generator=generator(5))
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_does_not_touch_the_model(name, smooth_batch):
    batch = smooth_batch(1, side=16)
    victim, params = VICTIM_FOR.get(name, ("test_tiny", {"norm": "batch"}))
    obs, model = observe(victim, params, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ATTACKS.build(name, **TINY_PARAMS.get(name, {})).reconstruct(obs, model, labels=batch.labels, generator=generator(1))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_idlg_recovers_single_labels(smooth_batch):
    hits = 0
    for seed in range(6):
        batch = smooth_batch(1, side=16, seed=seed)
        obs, model = observe("lenet", {}, batch)
        hits += int(LABELS.build("idlg").recover(obs, model).item() == batch.labels.item())
    assert hits == 6  # exact for non-negative (sigmoid) penultimate features


def test_idlg_refuses_batches(smooth_batch):
    batch = smooth_batch(2, side=16)
    obs, model = observe("lenet", {}, batch)
    with pytest.raises(ValueError, match="single image"):
        LABELS.build("idlg").recover(obs, model)


def test_known_labels_only_when_granted(smooth_batch):
    batch = smooth_batch(2, side=16)
    obs, model = observe("test_tiny", {}, batch)
    assert obs.known_labels is None
    with pytest.raises(ThreatModelError, match="does not grant"):
        LABELS.build("known").recover(obs, model)
    obs, model = observe("test_tiny", {}, batch, threat=ThreatModel(labels="known"))
    assert torch.equal(LABELS.build("known").recover(obs, model), batch.labels)


def test_observation_holds_only_what_the_server_sees(smooth_batch):
    batch = smooth_batch(1, side=16)
    obs, model = observe("test_tiny", {}, batch)
    assert obs.known_labels is None and obs.bn_stats is None
    assert obs.kind == "gradients" and obs.batch_size == 1
    assert obs.param_names == tuple(n for n, _ in model.named_parameters())
    for field in obs.__dataclass_fields__.values():
        value = getattr(obs, field.name)
        # no tensor in the observation has the shape of the private images
        if isinstance(value, torch.Tensor):
            assert value.shape != batch.images.shape
