"""FedAvg and multi-client aggregation: the client's local steps, what the server sees, and the attack's simulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bench.attacks import ATTACKS, LABELS
from bench.attacks.common import attacker_model
from bench.attacks.fedavg import local_training_fn, update_fn
from bench.attacks.optimize import target_gradients
from bench.core import ParamError, ThreatModel, generator
from bench.fl import PROTOCOLS
from bench.metrics.image import psnr_db
from defenses import DEFENSES
from victims import build_victim


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded CPU the thread sync costs several-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(norm="none", seed=0):
    return build_victim("test_tiny", {"norm": norm}, num_classes=8, in_channels=3, side=16, seed=seed)


def observe(model, batch, protocol="fedavg", threat=ThreatModel(), defense="none", seed=0, **params):
    proto = PROTOCOLS.build(protocol, batch_size=batch.size, **params)
    return proto.client_update(model, batch, defense=DEFENSES.build(defense), threat=threat, generator=generator(seed))


def test_client_runs_the_stated_local_sgd(smooth_batch):
    """2 epochs over 4 images in mini-batches of 2 at lr 0.1 = 4 plain SGD steps, in order; the delta is sent."""
    batch = smooth_batch(4, side=16)
    model = tiny()
    obs, _ = observe(model, batch, local_epochs=2, local_batch_size=2, local_lr=0.1)
    assert obs.kind == "weight_delta" and obs.local_steps == 4 and obs.local_batch_size == 2 and obs.local_lr == 0.1
    manual = tiny()
    start = [p.detach().clone() for p in manual.parameters()]
    x = batch.normalization.normalize(batch.images)
    for _ in range(2):
        for s in range(2):
            loss = F.cross_entropy(manual(x[2 * s:2 * s + 2]), batch.labels[2 * s:2 * s + 2])
            grads = torch.autograd.grad(loss, list(manual.parameters()))
            with torch.no_grad():
                for p, g in zip(manual.parameters(), grads):
                    p -= 0.1 * g
    for got, p, p0 in zip(obs.update, manual.parameters(), start):
        torch.testing.assert_close(got, p.detach() - p0, rtol=1e-5, atol=1e-7)


def test_fedavg_observation_carries_no_labels(smooth_batch):
    batch = smooth_batch(2, side=16)
    obs, _ = observe(tiny(), batch, local_epochs=3, local_batch_size=1, local_lr=0.1, shuffle=True)
    assert obs.known_labels is None and obs.bn_stats is None
    for field in dataclasses.fields(obs):
        value = getattr(obs, field.name)
        tensors = value if isinstance(value, tuple) else (value,)
        for t in tensors:
            if isinstance(t, torch.Tensor):
                assert t.is_floating_point(), f"{field.name} holds integer data (labels?)"
                assert t.shape != batch.images.shape


def test_attacker_simulation_reproduces_the_client_exactly(smooth_batch):
    """Given the true images and labels, the attacker's unrolled steps give the observed update (BN in train mode, 2 clients)."""
    batch = smooth_batch(4, side=16)
    obs, model = observe(tiny("batch"), batch, local_epochs=2, local_batch_size=1, local_lr=0.5, clients=2)
    assert obs.clients == 2 and obs.local_steps == 4
    attacker = attacker_model(model, obs, torch.device("cpu"))
    simulated = local_training_fn(attacker, obs)(batch.normalization.normalize(batch.images), batch.labels)
    for got, want in zip(simulated, target_gradients(obs, torch.device("cpu"))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_clients_average_their_updates(smooth_batch):
    batch = smooth_batch(4, side=16)
    both, _ = observe(tiny(), batch, local_lr=0.5, local_epochs=2, clients=2)
    halves = [observe(tiny(), type(batch)(images=batch.images[i:i + 2], labels=batch.labels[i:i + 2],
                                          image_ids=batch.image_ids[i:i + 2], normalization=batch.normalization,
                                          num_classes=batch.num_classes), local_lr=0.5, local_epochs=2)[0]
              for i in (0, 2)]
    for got, a, b in zip(both.update, halves[0].update, halves[1].update):
        torch.testing.assert_close(got, (a + b) / 2)
    # FedSGD without BatchNorm: the mean of equal clients' mean gradients is the whole batch's gradient
    fedsgd_two, _ = observe(tiny(), batch, protocol="fedsgd", clients=2)
    fedsgd_one, _ = observe(tiny(), batch, protocol="fedsgd")
    for a, b in zip(fedsgd_two.update, fedsgd_one.update):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_shuffling_client_order_is_private_but_reproducible(smooth_batch):
    batch = smooth_batch(4, side=16)
    kw = dict(local_epochs=3, local_batch_size=1, local_lr=0.5)
    a, _ = observe(tiny(), batch, shuffle=True, seed=1, **kw)
    b, _ = observe(tiny(), batch, shuffle=True, seed=1, **kw)
    fixed, _ = observe(tiny(), batch, shuffle=False, seed=1, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.update, b.update))
    assert not all(torch.allclose(x, y) for x, y in zip(a.update, fixed.update))


def test_protocol_parameters_are_checked():
    with pytest.raises(ParamError, match="clients"):
        PROTOCOLS.build("fedavg", batch_size=6, clients=4)
    with pytest.raises(ParamError, match="local_batch_size"):
        PROTOCOLS.build("fedavg", batch_size=4, clients=2, local_batch_size=3)
    with pytest.raises(ParamError, match="local_lr"):
        PROTOCOLS.build("fedavg", local_lr=0.0)
    with pytest.raises(ParamError, match="clients"):
        PROTOCOLS.build("fedsgd", batch_size=3, clients=2)


def test_idlg_reads_the_label_from_a_weight_difference(smooth_batch):
    """Labels come from the strategy on -delta/lr (as_gradient), never from the client."""
    for seed in range(4):
        batch = smooth_batch(1, side=16, seed=seed)
        obs, model = observe(tiny(), batch, local_epochs=3, local_lr=0.1)
        assert obs.known_labels is None
        assert LABELS.build("idlg").recover(obs, model).tolist() == batch.labels.tolist()


def test_attack_recovers_a_one_image_client_after_three_local_steps(smooth_batch, one_thread):
    """Inverting Gradients' FedAvg form (Geiping et al. 2020, section 6) beats its own initialization by far."""
    batch = smooth_batch(1, side=16, seed=0)
    obs, model = observe(tiny(), batch, local_epochs=3, local_lr=0.1)
    assert obs.local_steps == 3
    labels = LABELS.build("idlg").recover(obs, model)
    attack = ATTACKS.build("inverting_gradients", iterations=80, restarts=1, tv_weight=0.01)
    recon = attack.reconstruct(obs, model, labels=labels, generator=generator(2))
    assert torch.equal(recon.labels, labels)  # the strategy's labels, nothing else
    # the attack's starting point: the same draw from the same generator, clamped to the pixel box
    start = torch.randn((1, *batch.images.shape), generator=generator(2))[0]
    lo, hi = obs.normalization.box(start)
    start = obs.normalization.denormalize(torch.maximum(torch.minimum(start, hi), lo)).clamp(0, 1)
    before = float(psnr_db(start, batch.images))
    after = float(psnr_db(recon.images, batch.images))
    assert after > before + 6, f"{before:.1f} dB at the start, {after:.1f} dB after"
    assert after > 16


def test_simulating_the_steps_beats_matching_one_gradient(smooth_batch):
    """With large local steps, the unrolled simulation fits the observed update where a single gradient cannot."""
    batch = smooth_batch(1, side=16, seed=1)
    model = build_victim("test_tiny", {"activation": "relu"}, num_classes=8, in_channels=3, side=16, seed=0)
    obs, model = observe(model, batch, local_epochs=5, local_lr=0.5)
    attacker = attacker_model(model, obs, torch.device("cpu"))
    x = batch.normalization.normalize(batch.images)
    target = target_gradients(obs, torch.device("cpu"))

    def cosine(a, b):
        fa, fb = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
        return float(fa @ fb / (fa.norm() * fb.norm()))

    single = dataclasses.replace(obs, kind="gradients")
    assert cosine(update_fn(attacker, obs)(x, batch.labels), target) > 0.9999
    assert cosine(update_fn(attacker, single)(x, batch.labels), target) < 0.95  # 0.86 when written
