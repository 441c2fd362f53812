"""What each defense computes: exact counts, stated noise levels, Opacus's ε, the effective victim."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant

from leakbench.core import ParamError, ThreatModel, generator
from leakbench.fl import PROTOCOLS, update_cosine, utility_cost
from leakbench.defenses import DEFENSES
from leakbench.defenses.label_disguise import auto_distinct
from leakbench.defenses.sparsify import kept_count
from leakbench.victims import build_victim


def fc_model(side=16, hidden=64):
    return build_victim("fc", {"hidden": hidden}, num_classes=8, in_channels=3, side=side, seed=0)


def client_grads(defense, model, batch, seed=0):
    """The defense's gradient hook on the normalized batch, as a FedSGD client calls it."""
    model = defense.prepare(model)
    inputs = batch.normalization.normalize(batch.images)
    return defense.client_gradients(model, F.cross_entropy, inputs, batch.labels, generator=generator(seed))


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.1, 0.01, 0.001])
def test_topk_keeps_exactly_the_stated_count_of_largest_entries(fraction):
    g = torch.Generator().manual_seed(0)
    update = (torch.randn(10_000, generator=g), torch.randn(30, 7, generator=g), torch.randn(3, generator=g))
    out = DEFENSES.build("topk", fraction=fraction).transform(update, generator=generator(0))
    for before, after in zip(update, out):
        k = kept_count(before.numel(), fraction)
        assert k == max(1, math.ceil(round(fraction * before.numel(), 9)))
        kept = after != 0
        assert int(kept.sum()) == k
        assert torch.equal(after[kept], before[kept])  # kept entries unchanged
        if k < before.numel():
            assert before[kept].abs().min() >= before[~kept].abs().max()


def test_topk_count_is_exact_with_ties():
    update = (torch.ones(100),)
    out = DEFENSES.build("topk", fraction=0.1).transform(update, generator=generator(0))
    assert int((out[0] != 0).sum()) == 10


def test_topk_rejects_impossible_fractions():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ParamError, match="fraction"):
            DEFENSES.build("topk", fraction=bad)


# --------------------------------------------------------------------------- DP-SGD through Opacus


def test_dp_sgd_noise_has_the_stated_standard_deviation(smooth_batch):
    """noise = (DP update - clipped update) x batch size has std sigma x C (49 800 entries: 3% is > 4 SE)."""
    batch = smooth_batch(4, side=16)
    sigma, clip = 0.7, 0.5
    noisy = client_grads(DEFENSES.build("dp_sgd", noise_multiplier=sigma, max_grad_norm=clip), fc_model(), batch)
    clean = client_grads(DEFENSES.build("clip", max_grad_norm=clip), fc_model(), batch)
    noise = torch.cat([(a - b).reshape(-1) for a, b in zip(noisy, clean)]) * batch.size
    assert noise.numel() > 40_000
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.03)
    assert abs(noise.mean().item()) < 4 * sigma * clip / math.sqrt(noise.numel())


def test_per_example_clipping_matches_a_direct_computation(smooth_batch):
    """Opacus's clipped mean equals clipping each example's own gradient (computed one by one) to C."""
    batch = smooth_batch(3, side=16)
    clip = 0.05
    got = client_grads(DEFENSES.build("clip", max_grad_norm=clip), fc_model(), batch)
    model = fc_model()
    inputs = batch.normalization.normalize(batch.images)
    total = None
    for i in range(batch.size):
        g = torch.autograd.grad(F.cross_entropy(model(inputs[i:i + 1]), batch.labels[i:i + 1]), list(model.parameters()))
        norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        g = [t * factor for t in g]
        total = g if total is None else [a + b for a, b in zip(total, g)]
    expected = [t / batch.size for t in total]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(torch.sqrt(sum(t.pow(2).sum() for t in got))) <= clip + 1e-6


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant(accountant):
    """The issue's reference point: noise 1.0, sample rate 0.01, 1000 steps, delta 1e-5."""
    info = DEFENSES.build("dp_sgd", noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5).describe()
    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(1000):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert info[f"epsilon_{accountant}"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert info["delta"] == 1e-5 and info["accountant_steps"] == 1000 and info["accountant_sample_rate"] == 0.01


def test_epsilon_grows_as_noise_falls_and_is_absent_without_noise():
    eps = [DEFENSES.build("dp_sgd", noise_multiplier=s).describe()["epsilon_rdp"] for s in (2.0, 1.0, 0.5)]
    assert eps[0] < eps[1] < eps[2]
    info = DEFENSES.build("dp_sgd", noise_multiplier=0.0).describe()
    assert info["epsilon_rdp"] is None and info["epsilon_prv"] is None and "infinite" in info["epsilon_note"]


def test_dp_sgd_swaps_batchnorm_and_records_the_effective_victim(smooth_batch):
    batch = smooth_batch(2, side=16)
    model = build_victim("convnet", {"width": 4}, num_classes=8, in_channels=3, side=16, seed=0)
    defense = DEFENSES.build("dp_sgd")
    proto = PROTOCOLS.build("fedsgd", batch_size=2)
    obs, attacker = proto.client_update(model, batch, defense=defense, threat=ThreatModel(), generator=generator(0))
    info = defense.describe()
    assert info["replaced_modules"] == 4
    assert "BatchNorm2d -> GroupNorm" in info["effective_victim"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in attacker.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in attacker.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the server's model is untouched
    assert info["client_steps"] == 1


def test_dp_parameters_are_checked():
    for param, value in [("noise_multiplier", -1.0), ("max_grad_norm", 0.0), ("delta", 1.0), ("sample_rate", 0.0),
                         ("steps", 0)]:
        with pytest.raises(ParamError, match=param):
            DEFENSES.build("dp_sgd", **{param: value})


# --------------------------------------------------------------------------- noise, clipping, quantization


def test_gaussian_noise_has_the_stated_standard_deviation():
    update = (torch.zeros(200, 100), torch.zeros(50))
    out = DEFENSES.build("gaussian_noise", sigma=0.02).transform(update, generator=generator(0))
    noise = torch.cat([t.reshape(-1) for t in out])
    assert noise.std().item() == pytest.approx(0.02, rel=0.03)


def test_whole_update_clipping_scales_to_the_norm():
    update = (torch.full((4,), 3.0), torch.full((2,), 4.0))
    out = DEFENSES.build("clip", max_grad_norm=1.0, per_example=False).transform(update, generator=generator(0))
    assert float(torch.sqrt(sum(t.pow(2).sum() for t in out))) == pytest.approx(1.0)
    assert update_cosine(out, update) == pytest.approx(1.0)
    small = (torch.full((4,), 0.1),)
    assert DEFENSES.build("clip", max_grad_norm=1.0, per_example=False).transform(small, generator=generator(0)) is small


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("stochastic", [True, False])
def test_quantize_uses_at_most_2_to_the_bits_values(bits, stochastic):
    t = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    (q,) = DEFENSES.build("quantize", bits=bits, stochastic=stochastic).transform((t,), generator=generator(0))
    assert len(torch.unique(q)) <= 2**bits - 1
    step = t.abs().max() / (2 ** (bits - 1) - 1)
    assert (q - t).abs().max() <= step * (1.0 if stochastic else 0.5) + 1e-6


def test_stochastic_quantization_is_unbiased():
    t = torch.linspace(-1, 1, 101)
    draws = torch.stack([DEFENSES.build("quantize", bits=2).transform((t,), generator=generator(s))[0]
                         for s in range(400)])
    # 2 bits: levels -1, 0, 1; each entry's rounding has variance <= 1/4, so the mean of 400 is within 0.1
    assert (draws.mean(0) - t).abs().max() < 0.1


# --------------------------------------------------------------------------- label disguise


def test_label_disguise_builds_batches_with_fewer_distinct_labels():
    labels = [i % 8 for i in range(40)]  # 8 classes, 5 images each (like the photos)
    cell = (0, 1, 2, 3, 4, 5, 6, 8)  # 7 distinct labels: 0 appears twice
    defense = DEFENSES.build("label_disguise")
    out = defense.compose_batch(cell, label_of=labels.__getitem__, pool_size=40, generator=generator(0))
    assert len(set(labels[i] for i in out)) == auto_distinct(8) == 3
    assert {0, 8} <= set(out)  # the most frequent label's images are kept
    info = defense.describe()
    assert info["distinct_labels"] == 3 and info["distinct_labels_before"] == 7 and info["images_replaced"] > 0


def test_label_disguise_explains_when_the_data_runs_out():
    labels = [i % 8 for i in range(40)]
    with pytest.raises(ValueError, match="too few images"):
        DEFENSES.build("label_disguise", distinct_labels=2).compose_batch(
            tuple(range(16)), label_of=labels.__getitem__, pool_size=40, generator=generator(0))


def test_label_disguise_single_image_is_left_alone():
    defense = DEFENSES.build("label_disguise")
    assert defense.compose_batch((5,), label_of=lambda i: 0, pool_size=40, generator=generator(0)) == (5,)
    assert "nothing to disguise" in defense.describe()["composition_note"]


def test_last_layer_variant_perturbs_only_the_classifier(smooth_batch):
    batch = smooth_batch(1, side=16)
    model = build_victim("test_tiny", {}, num_classes=8, in_channels=3, side=16, seed=0)
    proto = PROTOCOLS.build("fedsgd")
    plain, _ = proto.client_update(model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(),
                                   generator=generator(0))
    noisy, _ = proto.client_update(model, batch, defense=DEFENSES.build("label_disguise", compose=False,
                                                                        last_layer_sigma=1.0),
                                   threat=ThreatModel(), generator=generator(0))
    changed = [n for n, a, b in zip(plain.param_names, plain.update, noisy.update) if not torch.equal(a, b)]
    assert changed == ["5.weight", "5.bias"]  # test_tiny's classifier


def test_label_disguise_that_does_nothing_is_refused():
    with pytest.raises(ParamError, match="does nothing"):
        DEFENSES.build("label_disguise", compose=False)


# --------------------------------------------------------------------------- utility cost


def test_utility_cost_is_one_without_defense_and_falls_with_sparsity(smooth_batch):
    batch = smooth_batch(2, side=16)
    model = build_victim("test_tiny", {}, num_classes=8, in_channels=3, side=16, seed=0)
    proto = PROTOCOLS.build("fedsgd", batch_size=2)
    costs = []
    for defense in (DEFENSES.build("none"), DEFENSES.build("topk", fraction=0.3), DEFENSES.build("topk", fraction=0.01)):
        obs, _ = proto.client_update(model, batch, defense=defense, threat=ThreatModel(), generator=generator(0))
        costs.append(utility_cost(proto, model, batch, defense=defense, defended=obs, generator=generator(0)))
    assert costs[0]["utility_cosine"] == pytest.approx(1.0) and costs[0]["utility_norm_ratio"] == pytest.approx(1.0)
    assert 1.0 > costs[1]["utility_cosine"] > costs[2]["utility_cosine"] > 0
