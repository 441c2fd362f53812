"""Every registered victim: forward, gradient, double backward, seeded initialization;
every padding / norm / activation value on every convolutional victim.

Registering a victim enrolls it here. Everything runs at a 16 px side. The bottleneck
ResNets are too slow for the full check on a shared 2-core CPU (one double backward at
16 px, one thread, unloaded: resnet50 1.1 s, resnet101 3.2 s, resnet152 3.0 s; a seeded
build 0.3-0.7 s, three per test), so they are built and run forward on the meta device
(shapes only); the code they run (``leakbench.victims.resnet.build_resnet`` with bottleneck blocks
and its initialization) gets the full check through the generic ``resnet`` at a tiny
width, and the test against torchvision pins their layout.
"""

from __future__ import annotations

import fnmatch
import inspect

import pytest
import torch
from torch import nn

from leakbench.victims import VICTIMS, build_victim
from leakbench.victims.layers import ACTIVATIONS, NORMS, PADDING_MODES

SIDE = 16
HEAVY = {"resnet50", "resnet101", "resnet152"}

# Per-value checks use the cheapest configuration that still runs each code path: every
# ResNet entry is one call of ``build_resnet`` that differs from these only in blocks per
# stage and widths (tests below pin the standard depths against torchvision).
PER_VALUE_CONFIGS: dict[str, tuple[str, dict]] = {
    "lenet": ("lenet", {}),
    "convnet": ("convnet", {}),
    "test_tiny": ("test_tiny", {}),
    "resnet20": ("resnet20", {}),
    "resnet-basic-cifar": ("resnet", {"stages": [1, 1], "base_width": 4}),
    "resnet-bottleneck-imagenet": ("resnet", {"stages": [1, 1], "base_width": 4, "block": "bottleneck",
                                              "stem": "imagenet"}),
}
VALUES = {"padding_mode": PADDING_MODES, "norm": NORMS, "activation": ACTIVATIONS}
ACTIVATION_TYPES = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "elu": nn.ELU}


def _forward_double_backward(model: nn.Module, side: int = SIDE, *, device: str = "cpu") -> None:
    x = torch.rand(2, 3, side, side, device=device, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5)
    loss = nn.functional.cross_entropy(out, torch.tensor([0, 3], device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    assert len(grads) == len(params)
    if device == "meta":
        return
    assert all(torch.isfinite(g).all() for g in grads)
    # the second derivative (d/dx of a gradient norm) exists and is not zero: gradient matching needs it
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), x)[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_every_convolutional_victim_takes_padding_norm_activation():
    """Uniform parameters: every victim with a conv layer accepts all three, fully connected ones only activation."""
    for entry in VICTIMS.entries():
        with torch.device("meta"):
            model = build_victim(entry.name, num_classes=5, in_channels=3, side=SIDE, seed=0)
        accepted = set(entry.parameters())
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        if has_conv:
            assert set(VALUES) <= accepted, f"{entry.name} lacks {set(VALUES) - accepted}"
        else:
            assert "activation" in accepted, entry.name


@pytest.mark.parametrize("name", VICTIMS.names())
def test_forward_and_double_backward(name):
    if name in HEAVY:
        with torch.device("meta"):
            model = build_victim(name, num_classes=5, in_channels=3, side=SIDE, seed=0)
            assert model(torch.empty(2, 3, SIDE, SIDE)).shape == (2, 5)
        return
    model = build_victim(name, num_classes=5, in_channels=3, side=SIDE, seed=0)
    _forward_double_backward(model)


@pytest.mark.parametrize("name", sorted(set(VICTIMS.names()) - HEAVY))
def test_initialization_is_seeded(name):
    a = build_victim(name, num_classes=4, in_channels=3, side=SIDE, seed=1)
    b = build_victim(name, num_classes=4, in_channels=3, side=SIDE, seed=1)
    c = build_victim(name, num_classes=4, in_channels=3, side=SIDE, seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_seeded_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_victim("lenet", num_classes=4, in_channels=3, side=16, seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("config", PER_VALUE_CONFIGS)
@pytest.mark.parametrize("param,value", [(p, v) for p, values in VALUES.items() for v in values])
def test_every_padding_norm_activation_value(config, param, value):
    name, params = PER_VALUE_CONFIGS[config]
    model = build_victim(name, {**params, param: value}, num_classes=5, in_channels=3, side=SIDE, seed=0)
    _forward_double_backward(model)
    kinds = {type(m) for m in model.modules()}
    if param == "padding_mode":
        spatial = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
        assert spatial and all(m.padding_mode == value for m in spatial)
    elif param == "norm":
        expected = {"batch": nn.BatchNorm2d, "group": nn.GroupNorm}.get(value)
        present = kinds & {nn.BatchNorm2d, nn.GroupNorm}
        assert present == ({expected} if expected else set())
    else:
        assert kinds & set(ACTIVATION_TYPES.values()) == {ACTIVATION_TYPES[value]}


def test_lenet_matches_dlg():
    model = build_victim("lenet", num_classes=10, in_channels=3, side=32, seed=0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [12, 12, 12]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert any(isinstance(m, torch.nn.Sigmoid) for m in model.modules())
    weights = torch.cat([p.flatten() for p in model.parameters()])
    assert weights.abs().max() <= 0.5
    # the default keeps DLG's layout: no norm modules, plain Sequential indices
    assert [n for n, _ in model.named_parameters()][:2] == ["0.weight", "0.bias"]


def _conv_layout(model: nn.Module) -> list[tuple]:
    return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
            for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_imagenet_resnets_equal_torchvision(depth):
    """Same parameter count as torchvision's resnet{depth}, and the same convs in the same order (v1.5 strides)."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours = build_victim(f"resnet{depth}", {"stem": "imagenet"}, num_classes=1000, in_channels=3, side=224, seed=0)
        theirs = getattr(torchvision.models, f"resnet{depth}")()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert sum(b.numel() for b in ours.buffers()) == sum(b.numel() for b in theirs.buffers())
    assert _conv_layout(ours) == _conv_layout(theirs)


def cifar_resnet_parameters(depth: int, width: int, classes: int = 10) -> int:
    """Parameters of He et al.'s CIFAR ResNet with 1x1-conv shortcuts, counted by hand."""
    n, widths = (depth - 2) // 6, [16 * width, 32 * width, 64 * width]
    total = 3 * 9 * widths[0] + 2 * widths[0]  # stem conv + BatchNorm
    cin = widths[0]
    for c in widths:
        for j in range(n):
            total += cin * 9 * c + c * 9 * c + 4 * c  # two 3x3 convs, two BatchNorms
            if cin != c:
                total += cin * c + 2 * c  # projection shortcut + BatchNorm
            cin = c
    return total + cin * classes + classes


@pytest.mark.parametrize("depth,width", [(20, 1), (20, 4), (32, 10), (56, 1)])
def test_cifar_resnets(depth, width):
    """He et al.'s CIFAR ResNets: 3 stages of (depth - 2) / 6 basic blocks, 16/32/64 channels times width."""
    with torch.device("meta"):
        model = build_victim(f"resnet{depth}", {"width": width}, num_classes=10, in_channels=3, side=32, seed=0)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 * (depth - 2) // 6
    assert model.fc.in_features == 64 * width
    assert sum(p.numel() for p in model.parameters()) == cifar_resnet_parameters(depth, width)
    assert cifar_resnet_parameters(20, 1) == 272_474  # the usual "0.27M" of ResNet-20 (projection shortcuts)


def test_generic_resnet_reproduces_the_standard_depths():
    with torch.device("meta"):
        generic = build_victim("resnet", {"stages": [3, 4, 6, 3], "block": "bottleneck"}, num_classes=10,
                               in_channels=3, side=32, seed=0)
        standard = build_victim("resnet50", num_classes=10, in_channels=3, side=32, seed=0)
    assert _conv_layout(generic) == _conv_layout(standard)


def test_width_multiplies_channels():
    with torch.device("meta"):
        narrow = build_victim("resnet18", num_classes=10, in_channels=3, side=32, seed=0)
        wide = build_victim("resnet18", {"width": 2}, num_classes=10, in_channels=3, side=32, seed=0)
    assert wide.fc.in_features == 2 * narrow.fc.in_features == 1024


def test_bad_victim_parameter_is_an_error():
    with pytest.raises(ValueError, match="padding_mode"):
        build_victim("convnet", {"padding_mode": "mirror"}, num_classes=3, in_channels=3, side=16, seed=0)
    with pytest.raises(ValueError, match="no parameter 'widht'"):
        build_victim("convnet", {"widht": 2}, num_classes=3, in_channels=3, side=16, seed=0)
    with pytest.raises(ValueError, match="stages"):
        build_victim("resnet", {"stages": []}, num_classes=3, in_channels=3, side=16, seed=0)
    with pytest.raises(ValueError, match="block must be one of"):
        build_victim("resnet", {"block": "wide"}, num_classes=3, in_channels=3, side=16, seed=0)


def test_registered_factories_are_keyword_only():
    for entry in VICTIMS.entries():
        kinds = {p.kind for p in entry.signature.parameters.values()}
        assert kinds <= {inspect.Parameter.KEYWORD_ONLY}, entry.name
