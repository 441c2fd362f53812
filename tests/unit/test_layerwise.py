"""Explicit layer-by-layer backpropagation gives the general path's candidate gradients, and their derivatives."""

import pytest
import torch

from leakbench.attacks import ATTACKS
from leakbench.attacks import inverting_gradients as ig
from leakbench.attacks.common import attacker_model
from leakbench.attacks.fedavg import update_fn
from leakbench.attacks.layerwise import LayerwiseGradients, Unsupported
from leakbench.attacks.optimize import (
    MATCHING,
    MATCHING_ROWS,
    Schedule,
    run_packed,
    target_gradients,
    total_variation,
    total_variation_rows,
)
from leakbench.core import ThreatModel, generator
from leakbench.defenses import DEFENSES
from leakbench.fl import PROTOCOLS
from leakbench.victims import build_victim

CPU = torch.device("cpu")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to floating-point order: every entry within ``tol`` of the larger tensor's largest magnitude."""
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= tol * max(float(a.abs().max()), float(b.abs().max()), 1e-12))


def _setting(smooth_batch, victim, params, *, bn_mode="train", batch_size=2, clients=1, protocol="fedsgd"):
    batch = smooth_batch(batch_size, side=16)
    model = build_victim(victim, params, num_classes=8, in_channels=3, side=16, seed=0)
    obs, client = PROTOCOLS.build(protocol, batch_size=batch_size, bn_mode=bn_mode, clients=clients).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    return obs, attacker_model(client, obs, CPU), batch


@pytest.mark.parametrize("victim,params,bn_mode", [
    ("lenet", {}, "train"),  # DLG's sigmoid LeNet
    ("lenet", {"padding_mode": "circular", "activation": "relu"}, "train"),
    ("lenet", {"padding_mode": "reflect", "activation": "tanh"}, "train"),
    ("lenet", {"padding_mode": "replicate", "activation": "elu", "norm": "group"}, "train"),
    ("convnet", {"width": 4}, "train"),  # BatchNorm on each candidate set's own statistics
    ("convnet", {"width": 4}, "eval"),  # BatchNorm on the running statistics
    ("convnet", {"width": 4, "norm": "none"}, "train"),  # conv biases
    ("fc", {"hidden": 16}, "train"),
    ("mlp", {"hidden": 16, "activation": "sigmoid"}, "train"),
])
def test_rows_gradients_and_their_derivatives_match_the_general_path(smooth_batch, victim, params, bn_mode):
    obs, attacker, _ = _setting(smooth_batch, victim, params, bn_mode=bn_mode)
    general = update_fn(attacker, obs)
    explicit = LayerwiseGradients.build(attacker, obs)
    x = torch.randn(3, 2, 3, 16, 16, generator=generator(1), requires_grad=True)
    y = torch.randint(0, 8, (3, 2), generator=generator(2))
    expected = [general(x[r], y[r]) for r in range(3)]
    got = explicit(x, y)
    assert len(got) == len(obs.param_names)
    for i, name in enumerate(obs.param_names):
        for r in range(3):
            assert _close(got[i][r], expected[r][i]), (name, r)
    # what the attack differentiates: a distance of these gradients, with respect to the candidates
    weights = [torch.randn(t.shape, generator=generator(3 + i)) for i, t in enumerate(obs.update)]
    d_general, = torch.autograd.grad(sum((e[i] * w).sum() for e in expected for i, w in enumerate(weights)), x)
    d_explicit, = torch.autograd.grad(sum((got[i] * w).sum() for i, w in enumerate(weights)), x)
    assert _close(d_explicit, d_general)


def test_soft_labels_and_clients_with_their_own_batchnorm_statistics(smooth_batch):
    """Two clients of two images each: each client's BatchNorm statistics are its own, as the FedSGD simulation's."""
    obs, attacker, _ = _setting(smooth_batch, "convnet", {"width": 4}, batch_size=4, clients=2)
    general = update_fn(attacker, obs)
    explicit = LayerwiseGradients.build(attacker, obs)
    x = torch.randn(2, 4, 3, 16, 16, generator=generator(1), requires_grad=True)
    y = torch.softmax(torch.randn(2, 4, 8, generator=generator(2)), -1)
    got = explicit(x, y)
    for r in range(2):
        for i, e in enumerate(general(x[r], y[r])):
            assert _close(got[i][r], e)


def test_only_the_observed_parameters_are_computed(smooth_batch):
    """A victim whose first conv is frozen by the client: its gradient is neither observed nor returned."""
    batch = smooth_batch(2, side=16)
    model = build_victim("lenet", {}, num_classes=8, in_channels=3, side=16, seed=0)
    model[0].requires_grad_(False)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=2).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    assert "0.weight" not in obs.param_names
    attacker = attacker_model(client, obs, CPU)
    explicit = LayerwiseGradients.build(attacker, obs)
    x = torch.randn(1, 2, 3, 16, 16, generator=generator(1))
    got = explicit(x, batch.labels.unsqueeze(0))
    expected = update_fn(attacker, obs)(x[0], batch.labels)
    assert [t.shape[1:] for t in got] == [t.shape for t in expected]
    for a, b in zip(got, expected):
        assert _close(a[0], b)


@pytest.mark.parametrize("victim,params,protocol", [
    ("resnet18", {}, "fedsgd"),  # residual blocks: not a sequential chain
    ("test_tiny", {}, "fedsgd"),  # pooling to 4x4
    ("lenet", {}, "fedavg"),  # a weight difference: local steps unrolled, not one gradient
])
def test_what_it_cannot_do_is_refused_by_name(smooth_batch, victim, params, protocol):
    obs, attacker, _ = _setting(smooth_batch, victim, params, protocol=protocol, batch_size=1)
    with pytest.raises(Unsupported):
        LayerwiseGradients.build(attacker, obs)


def test_rows_distances_and_total_variation_are_the_per_row_ones():
    g = tuple(torch.randn(6, *s, generator=generator(i)) for i, s in enumerate([(4, 3), (5,)]))
    t = tuple(torch.randn(2, *s, generator=generator(9 + i)) for i, s in enumerate([(4, 3), (5,)]))
    for name, rows in MATCHING_ROWS.items():
        got = rows(g, t)
        expected = torch.stack([MATCHING[name](tuple(a[r] for a in g), tuple(b[r // 3] for b in t)) for r in range(6)])
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), name
    x = torch.randn(4, 2, 3, 5, 5, generator=generator(3))
    assert torch.allclose(total_variation_rows(x), torch.stack([total_variation(r) for r in x]))


def test_a_vectorized_objective_takes_no_consensus():
    with pytest.raises(ValueError, match="consensus"):
        run_packed(lambda s, given: (s["x"].sum((1, 2)), s["x"].sum((1, 2))), {"x": torch.zeros(2, 3, 3)}, groups=2,
                   schedule=Schedule(iterations=1, lr=0.1), inputs={"y": torch.zeros(2)}, vectorized=True,
                   consensus=lambda s: {"m": s["x"].mean(0)})


@pytest.mark.parametrize("victim,params", [("lenet", {}), ("convnet", {"width": 4})])
def test_inverting_gradients_is_the_same_attack_on_either_path(smooth_batch, monkeypatch, victim, params):
    """Three reconstructions of two restarts packed: explicit backpropagation vs the general (vmapped) path."""
    settings = [_setting(lambda *a, **k: smooth_batch(*a, seed=c, **k), victim, params) for c in range(3)]
    observations = [s[0] for s in settings]
    labels = [s[2].labels for s in settings]
    client = build_victim(victim, params, num_classes=8, in_channels=3, side=16, seed=0)
    attack = ATTACKS.build("inverting_gradients", iterations=15, restarts=2, lr=0.01, signed=False)

    def run():
        return attack.reconstruct_many(observations, client, labels=labels,
                                       generators=[generator(20 + c) for c in range(3)])

    built = []
    real = LayerwiseGradients.build
    monkeypatch.setattr(ig.LayerwiseGradients, "build", lambda *a: built.append(1) or real(*a))
    fast = run()
    assert built  # the explicit path was taken

    def refuse(*a):
        raise Unsupported("the general path, for comparison")

    monkeypatch.setattr(ig.LayerwiseGradients, "build", refuse)
    general = run()
    for a, b in zip(fast, general):
        assert a.matching_loss == pytest.approx(b.matching_loss, rel=1e-3, abs=1e-6)
        assert torch.allclose(a.images, b.images, atol=1e-3)
