"""The written-out second pass (``tangent``) gives autograd's gradient of the cosine matching loss."""

import pytest
import torch

from leakbench.attacks.common import attacker_model
from leakbench.attacks.layerwise import LayerwiseGradients, Unsupported
from leakbench.attacks.optimize import (
    Schedule,
    cosine_distance_rows,
    flat_targets,
    run_packed,
    target_gradients,
    total_variation_rows,
    total_variation_rows_and_gradient,
)
from leakbench.attacks import tangent
from leakbench.attacks.tangent import CosineMatching, _patches
from leakbench.core import ThreatModel, generator
from leakbench.defenses import DEFENSES
from leakbench.fl import PROTOCOLS
from leakbench.victims import build_victim

CPU = torch.device("cpu")


def _setting(smooth_batch, victim, params, *, bn_mode="train", batch_size=2, clients=1):
    batch = smooth_batch(batch_size, side=16)
    model = build_victim(victim, params, num_classes=8, in_channels=3, side=16, seed=0)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=batch_size, bn_mode=bn_mode, clients=clients).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    return obs, attacker_model(client, obs, CPU).double()


def _autograd(attacker, obs, x, y, targets):
    """What the attack did before: autograd through ``layerwise``'s explicit backward and the rows distance."""
    x = x.detach().requires_grad_(True)
    matching = cosine_distance_rows(LayerwiseGradients.build(attacker, obs)(x, y), targets)
    return matching.detach(), torch.autograd.grad(matching.sum(), x)[0]


@pytest.fixture(params=["patches", "grouped"])
def convolutions(request, monkeypatch):
    """Both ways ``tangent`` computes a convolution's weight gradient and weight tangent: batched products with the
    layer's patches (every layer at these sizes), and grouped convolutions (no layer)."""
    monkeypatch.setattr(tangent, "PATCHES_MAX_VALUES", 1 << 40 if request.param == "patches" else 0)
    return request.param


@pytest.mark.parametrize("victim,params,bn_mode,batch_size,clients,rows", [
    ("convnet", {"width": 4}, "train", 2, 1, 3),  # BatchNorm on each candidate set's own statistics
    ("convnet", {"width": 4}, "train", 2, 1, 1),  # one set: torch's BatchNorm kernels on the batch itself
    ("convnet", {"width": 4}, "train", 1, 1, 3),  # one image per set: torch's kernels, a statistic per channel
    ("convnet", {"width": 4}, "train", 2, 2, 3),  # two clients of one image: the same, sets of two images
    ("convnet", {"width": 4}, "train", 4, 2, 3),  # two clients: statistics over half a set each
    ("convnet", {"width": 4}, "eval", 2, 1, 3),  # running statistics
    ("convnet", {"width": 4, "norm": "none"}, "train", 2, 1, 3),  # conv biases, no normalization
    ("fc", {"hidden": 16}, "train", 2, 1, 3),  # linear layers only
])
def test_the_written_out_gradient_is_autograds(smooth_batch, victim, params, bn_mode, batch_size, clients, rows,
                                               convolutions):
    obs, attacker = _setting(smooth_batch, victim, params, bn_mode=bn_mode, batch_size=batch_size, clients=clients)
    x = torch.randn(rows, batch_size, 3, 16, 16, generator=generator(1), dtype=torch.float64)
    y = torch.randint(0, 8, (rows, batch_size), generator=generator(2))
    targets = torch.stack([flat_targets(tuple(t.unsqueeze(0) for t in target_gradients(obs, CPU)))[0].double()
                           + 0.1 * r for r in range(rows)])  # a different target per row
    expected_loss, expected = _autograd(attacker, obs, x, y, targets)
    loss, dx = CosineMatching.build(attacker, obs).grad_and_value(x, y, targets)
    assert torch.allclose(loss, expected_loss, rtol=1e-10, atol=1e-12)
    assert (dx - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert expected.abs().max() > 0  # a real gradient, not two zeros


def test_soft_labels(smooth_batch, convolutions):
    obs, attacker = _setting(smooth_batch, "convnet", {"width": 4})
    x = torch.randn(2, 2, 3, 16, 16, generator=generator(3), dtype=torch.float64)
    y = torch.softmax(torch.randn(2, 2, 8, generator=generator(4), dtype=torch.float64), -1)
    targets = flat_targets(tuple(t.unsqueeze(0) for t in target_gradients(obs, CPU))).double().repeat(2, 1)
    expected_loss, expected = _autograd(attacker, obs, x, y, targets)
    loss, dx = CosineMatching.build(attacker, obs).grad_and_value(x, y, targets)
    assert torch.allclose(loss, expected_loss, rtol=1e-10, atol=1e-12)
    assert (dx - expected).abs().max() <= 1e-9 * expected.abs().max()


@pytest.mark.parametrize("victim,params", [
    ("lenet", {}),  # sigmoid activations
    ("convnet", {"width": 4, "padding_mode": "reflect"}),
    ("convnet", {"width": 4, "norm": "group"}),
])
def test_what_it_does_not_cover_is_refused_by_name(smooth_batch, victim, params):
    obs, attacker = _setting(smooth_batch, victim, params)
    with pytest.raises(Unsupported, match="written-out second pass"):
        CosineMatching.build(attacker, obs)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 2), ((3, 2), (2, 1), 0, 1)])
def test_the_patches_are_unfolds(kernel, stride, padding, dilation):
    conv = torch.nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    a = torch.randn(2, 3, 11, 9, generator=generator(6))
    expected = torch.nn.functional.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.equal(_patches(conv, a), expected)
    out, kept = tangent._conv_forward(conv, a, None)
    assert kept is not None and torch.allclose(out, conv(a), atol=1e-5)
    c = torch.randn(expected.shape, generator=generator(7))  # the fold is the patches' adjoint: <P a, c> = <a, F c>
    folded = tangent._fold(c, conv, a)
    assert torch.allclose(folded, torch.nn.functional.fold(c, a.shape[2:], conv.kernel_size, conv.dilation,
                                                           conv.padding, conv.stride), atol=1e-5)
    assert torch.allclose((expected * c).sum(), (a * folded).sum(), rtol=1e-5)


def test_the_total_variation_gradient_is_autograds():
    x = torch.randn(3, 2, 3, 7, 5, generator=generator(5), dtype=torch.float64)
    x[0, 0, 0, 1, 1] = x[0, 0, 0, 1, 2]  # an equal pair: autograd's abs has slope 0 there
    leaf = x.clone().requires_grad_(True)
    value = total_variation_rows(leaf)
    expected, = torch.autograd.grad(value.sum(), leaf)
    got_value, got = total_variation_rows_and_gradient(x)
    assert torch.allclose(got_value, value.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_a_written_out_gradient_needs_a_vectorized_objective():
    with pytest.raises(ValueError, match="vectorized"):
        run_packed(lambda s: (s["x"].sum(), s["x"].sum()), {"x": torch.zeros(1, 3)}, groups=1,
                   schedule=Schedule(iterations=1, lr=0.1), gradient=lambda s: ({"x": s["x"]}, (None, None)))


def test_new_targets_are_matched_not_the_last_ones(smooth_batch):
    obs, attacker = _setting(smooth_batch, "convnet", {"width": 4})
    written = CosineMatching.build(attacker, obs)
    x = torch.randn(1, 2, 3, 16, 16, generator=generator(7), dtype=torch.float64)
    y = torch.randint(0, 8, (1, 2), generator=generator(8))
    targets = flat_targets(tuple(t.unsqueeze(0) for t in target_gradients(obs, CPU))).double()
    written.grad_and_value(x, y, targets)
    targets.mul_(3).add_(0.1)  # changed in place: its norms must be taken again
    expected_loss, expected = _autograd(attacker, obs, x, y, targets)
    loss, dx = written.grad_and_value(x, y, targets)
    assert torch.allclose(loss, expected_loss, rtol=1e-10, atol=1e-12)
    assert (dx - expected).abs().max() <= 1e-9 * expected.abs().max()
