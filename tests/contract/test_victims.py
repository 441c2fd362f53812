"""Every registered victim: forward, gradient, double backward, seeded initialization.

Registering a victim enrolls it here. Large victims are exercised at a small side.
"""

import pytest
import torch

from victims import VICTIMS, build_victim

SIDE = {"resnet*": 16}


def side_for(name: str) -> int:
    import fnmatch

    return next((s for pattern, s in SIDE.items() if fnmatch.fnmatch(name, pattern)), 16)


@pytest.mark.parametrize("name", VICTIMS.names())
def test_forward_and_double_backward(name):
    side = side_for(name)
    model = build_victim(name, num_classes=5, in_channels=3, side=side, seed=0)
    x = torch.rand(2, 3, side, side, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5)
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 3]))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    # the second derivative (d/dx of a gradient norm) exists and is not zero: gradient matching needs it
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), x)[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0


@pytest.mark.parametrize("name", VICTIMS.names())
def test_initialization_is_seeded(name):
    side = side_for(name)
    a = build_victim(name, num_classes=4, in_channels=3, side=side, seed=1)
    b = build_victim(name, num_classes=4, in_channels=3, side=side, seed=1)
    c = build_victim(name, num_classes=4, in_channels=3, side=side, seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_seeded_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_victim("lenet", num_classes=4, in_channels=3, side=16, seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["convnet", "resnet18", "test_tiny"])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_norm_choices(name, norm):
    model = build_victim(name, {"norm": norm}, num_classes=3, in_channels=3, side=16, seed=0)
    kinds = {type(m).__name__ for m in model.modules()}
    expected = {"batch": "BatchNorm2d", "group": "GroupNorm"}.get(norm)
    if expected:
        assert expected in kinds
    else:
        assert not kinds & {"BatchNorm2d", "GroupNorm"}
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_lenet_matches_dlg():
    model = build_victim("lenet", num_classes=10, in_channels=3, side=32, seed=0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [12, 12, 12]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert any(isinstance(m, torch.nn.Sigmoid) for m in model.modules())
    weights = torch.cat([p.flatten() for p in model.parameters()])
    assert weights.abs().max() <= 0.5


def test_bad_victim_parameter_is_an_error():
    with pytest.raises(ValueError, match="padding_mode"):
        build_victim("convnet", {"padding_mode": "mirror"}, num_classes=3, in_channels=3, side=16, seed=0)
    with pytest.raises(ValueError, match="no parameter 'widht'"):
        build_victim("convnet", {"widht": 2}, num_classes=3, in_channels=3, side=16, seed=0)
