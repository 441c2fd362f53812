"""Every registered attack and label strategy, on the tiny victim: shapes, ranges, contracts."""

import pytest
import torch

from leakbench.attacks import ATTACKS, LABELS
from leakbench.core import ThreatModel, ThreatModelError, generator
from leakbench.fl import PROTOCOLS
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim

# Small budgets for the contract, one per registered attack (required: an attack missing here
# fails test_every_attack_has_a_tiny_budget instead of running at its papers' budget).
TINY_PARAMS = {
    "analytic_fc": {},  # closed form: no iterations to cut
    "label_only": {},  # a baseline: no optimization
    "inverting_gradients": {"iterations": 10, "restarts": 2},
    "inverting_gradients_euclidean": {"iterations": 10, "restarts": 2},
    "dlg": {"iterations": 2, "inner_steps": 3},
    "idlg": {"iterations": 2, "inner_steps": 3},
    "gradinversion": {"iterations": 6, "restarts": 2, "warmup": 2, "bn_prior": "running"},
    "geng": {"iterations": 2, "inner_steps": 3},
    # untrained tiny generators: nothing trained, nothing written to the cache (tests/unit/test_gias.py covers those)
    "gias": {"prior": {"generator": {"name": "dcgan", "width": 4}, "epochs": 0}, "restarts": 2,
             "latent": {"iterations": 3}, "weights": {"iterations": 3}},
    "giml": {"prior": {"generator": {"name": "dcgan", "width": 4}, "epochs": 0}, "restarts": 2,
             "meta": {"dataset": {"name": "photos", "split": "public"}, "epochs": 0},
             "latent": {"iterations": 3}, "weights": {"iterations": 3}},
}
# The victim each attack needs (analytic_fc needs a first fully connected layer).
VICTIM_FOR = {"analytic_fc": ("fc", {"hidden": 16})}


def test_every_attack_has_a_tiny_budget():
    missing = sorted(set(ATTACKS.names()) - set(TINY_PARAMS))
    assert not missing, f"give {missing} a tiny budget in TINY_PARAMS (tests/contract/test_attacks.py)"
    for name, params in TINY_PARAMS.items():
        assert not ATTACKS.get(name).check_params(params), name
        for key, value in params.items():  # a budget at most what the attack's own default is
            default = ATTACKS.get(name).defaults().get(key)
            if key in ("iterations", "inner_steps") and isinstance(default, int):
                assert value <= default, (name, key)


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
    attack = ATTACKS.build(name, **TINY_PARAMS[name])
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
    attack = ATTACKS.build(name, **TINY_PARAMS[name])
    a = attack.reconstruct(obs, model, labels=batch.labels, generator=generator(5))
    b = attack.reconstruct(obs, model, labels=batch.labels, generator=generator(5))
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_does_not_touch_the_model(name, smooth_batch):
    batch = smooth_batch(1, side=16)
    victim, params = VICTIM_FOR.get(name, ("test_tiny", {"norm": "batch"}))
    obs, model = observe(victim, params, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ATTACKS.build(name, **TINY_PARAMS[name]).reconstruct(obs, model, labels=batch.labels, generator=generator(1))
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
        # no tensor in the observation, alone or in a tuple, has the shape of the private images
        tensors = [value] if isinstance(value, torch.Tensor) else [
            t for t in value if isinstance(t, torch.Tensor)] if isinstance(value, tuple) else []
        assert all(t.shape != batch.images.shape for t in tensors), field.name
    # the update is one gradient per parameter, exactly the gradient of the client's loss: nothing else rides along
    params = dict(model.named_parameters())
    assert [t.shape for t in obs.update] == [params[n].shape for n in obs.param_names]
    loss = torch.nn.functional.cross_entropy(model(batch.normalization.normalize(batch.images)), batch.labels)
    expected = torch.autograd.grad(loss, list(params.values()))
    assert all(torch.allclose(u, g, atol=1e-6) for u, g in zip(obs.update, expected))


# Every label strategy, at a batch size it supports; "known" and "none" have their own tests.
LABEL_BATCH = {"idlg": 1}
RECOVERING = [n for n in LABELS.names() if n not in ("known", "none")]


@pytest.mark.parametrize("name", RECOVERING)
def test_label_strategy_shape_range_and_determinism(name, smooth_batch):
    b = LABEL_BATCH.get(name, 4)
    batch = smooth_batch(b, side=16)
    obs, model = observe("test_tiny", {}, batch)
    strategy = LABELS.build(name)
    labels = strategy.recover(obs, model, generator=generator(3))
    assert labels.shape == (b,) and labels.dtype == torch.int64 and labels.device.type == "cpu"
    assert int(labels.min()) >= 0 and int(labels.max()) < batch.num_classes
    assert torch.equal(strategy.recover(obs, model, generator=generator(3)), labels)


@pytest.mark.parametrize("name", RECOVERING)
def test_label_strategy_never_reads_the_true_labels(name, smooth_batch):
    """Granted labels in the observation change nothing: a strategy that recovers must not peek."""
    import dataclasses

    b = LABEL_BATCH.get(name, 4)
    batch = smooth_batch(b, side=16)
    obs, model = observe("test_tiny", {}, batch)
    honest = LABELS.build(name).recover(obs, model, generator=generator(3))
    forged = dataclasses.replace(obs, known_labels=(batch.labels + 3) % batch.num_classes)
    assert torch.equal(LABELS.build(name).recover(forged, model, generator=generator(3)), honest)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_declares_whether_it_uses_labels(name, smooth_batch):
    """Attacks that need no labels run with labels=None (the runner recovers none for them)."""
    attack = ATTACKS.build(name, **TINY_PARAMS[name])
    if attack.uses_labels:
        return
    batch = smooth_batch(1, side=16)
    victim, params = VICTIM_FOR.get(name, ("test_tiny", {}))
    obs, model = observe(victim, params, batch)
    recon = attack.reconstruct(obs, model, labels=None, generator=generator(1))
    assert recon.images.shape == batch.images.shape
