"""Small victims: DLG's sigmoid LeNet, a plain ConvNet, fully connected nets, a test model."""

from __future__ import annotations

import torch
from torch import nn

from leakbench.victims import layers as L
from leakbench.victims.layers import conv
from leakbench.victims.registry import VICTIMS


@VICTIMS.register("lenet", version="1")
def lenet(
    *,
    num_classes: int,
    in_channels: int,
    side: int,
    activation: str = "sigmoid",
    padding_mode: str = "zeros",
    norm: str = "none",
    init_range: float = 0.5,
    width: int = 12,
    depth: int = 3,
) -> nn.Module:
    """The LeNet of the DLG paper: three 5x5 convs of 12 channels (strides 2, 2, 1), sigmoid, one linear layer.

    Conv and linear weights and biases start uniform in (-init_range, init_range), as in
    DLG's code; a norm (none in DLG) is inserted after each conv only when asked for, so
    the default keeps DLG's module layout and parameter names. ``width`` (channels of
    every conv) and ``depth`` (convs: two of stride 2, then ``depth - 2`` of stride 1)
    make the family the architecture study sweeps; the defaults are DLG's network, whose
    weights they leave unchanged.
    """
    if side % 4:
        raise ValueError(f"lenet needs an image side divisible by 4; got {side}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"lenet width must be a positive number of channels; got {width!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise ValueError(f"lenet depth must be an integer >= 2 (two stride-2 convs, then stride-1 ones); got {depth!r}")
    layers: list[nn.Module] = []
    cin = in_channels
    for stride in (2, 2) + (1,) * (depth - 2):
        layers.append(conv(cin, width, 5, stride=stride, padding_mode=padding_mode))
        layers += _optional_norm(norm, width)
        layers.append(L.activation(activation))
        cin = width
    body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * (side // 4) ** 2, num_classes))
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.uniform_(-init_range, init_range)
                m.bias.uniform_(-init_range, init_range)
    return body


def _optional_norm(kind: str, channels: int) -> list[nn.Module]:
    """``[norm]``, or nothing for ``"none"`` (no Identity module, so parameter names stay those of the plain net)."""
    layer = L.norm(kind, channels)
    return [] if isinstance(layer, nn.Identity) else [layer]


@VICTIMS.register("convnet", version="1")
def convnet(
    *,
    num_classes: int,
    in_channels: int,
    side: int,
    width: int = 16,
    norm: str = "batch",
    activation: str = "relu",
    padding_mode: str = "zeros",
) -> nn.Module:
    """A plain ConvNet: conv-norm-act blocks of width, 2*width, 4*width with two stride-2 steps, then pooling and a linear layer."""
    if width < 1:
        raise ValueError(f"convnet width must be >= 1; got {width}")
    chans = [width, 2 * width, 2 * width, 4 * width]
    strides = [1, 2, 1, 2]
    layers: list[nn.Module] = []
    cin = in_channels
    for cout, stride in zip(chans, strides):
        layers += [conv(cin, cout, 3, stride=stride, padding_mode=padding_mode, bias=norm == "none"),
                   L.norm(norm, cout), L.activation(activation)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


@VICTIMS.register("fc", version="1")
def fc(
    *,
    num_classes: int,
    in_channels: int,
    side: int,
    hidden: int = 256,
    activation: str = "relu",
) -> nn.Module:
    """A victim whose first layer is fully connected (flatten, linear+bias, act, linear): the analytic attack's case."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * side * side, hidden),
        L.activation(activation),
        nn.Linear(hidden, num_classes),
    )


@VICTIMS.register("mlp", version="1")
def mlp(
    *,
    num_classes: int,
    in_channels: int,
    side: int,
    hidden: int = 256,
    depth: int = 3,
    activation: str = "relu",
) -> nn.Module:
    """A multi-layer perceptron with ``depth`` linear layers of ``hidden`` units."""
    if depth < 1:
        raise ValueError(f"mlp depth must be >= 1; got {depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    cin = in_channels * side * side
    for _ in range(depth - 1):
        layers += [nn.Linear(cin, hidden), L.activation(activation)]
        cin = hidden
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


@VICTIMS.register("test_tiny", version="1")
def test_tiny(
    *,
    num_classes: int,
    in_channels: int,
    side: int,
    width: int = 4,
    norm: str = "none",
    activation: str = "sigmoid",
    padding_mode: str = "zeros",
) -> nn.Module:
    """A tiny conv net for fast tests: one conv, pooling to 4x4, one linear layer."""
    return nn.Sequential(
        conv(in_channels, width, 3, stride=2, padding_mode=padding_mode, bias=norm == "none"),
        L.norm(norm, width),
        L.activation(activation),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(width * 16, num_classes),
    )
