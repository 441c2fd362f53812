"""One ResNet builder: depth, block type, stem, width, padding, norm and activation are parameters."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from victims import layers as L
from victims.layers import check_choice, conv
from victims.registry import VICTIMS

# Blocks per stage and block type of the standard depths (He et al. 2016).
STANDARD_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, padding_mode: str, norm: str, act: str):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = conv(cin, planes, 3, stride=stride, padding_mode=padding_mode, bias=False)
        self.bn1 = L.norm(norm, planes)
        self.act1 = L.activation(act)
        self.conv2 = conv(planes, out, 3, padding_mode=padding_mode, bias=False)
        self.bn2 = L.norm(norm, out)
        self.act2 = L.activation(act)
        self.shortcut = _shortcut(cin, out, stride, norm)

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, padding_mode: str, norm: str, act: str):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = conv(cin, planes, 1, bias=False)
        self.bn1 = L.norm(norm, planes)
        self.act1 = L.activation(act)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding_mode=padding_mode, bias=False)
        self.bn2 = L.norm(norm, planes)
        self.act2 = L.activation(act)
        self.conv3 = conv(planes, out, 1, bias=False)
        self.bn3 = L.norm(norm, out)
        self.act3 = L.activation(act)
        self.shortcut = _shortcut(cin, out, stride, norm)

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.act3(y + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int, norm: str) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), L.norm(norm, cout))


class ResNet(nn.Module):
    def __init__(
        self,
        *,
        block: str,
        stages: Sequence[int],
        num_classes: int,
        in_channels: int,
        stem: str,
        base_width: int,
        padding_mode: str,
        norm: str,
        act: str,
    ):
        super().__init__()
        check_choice("block", block, ("basic", "bottleneck"))
        check_choice("stem", stem, ("cifar", "imagenet"))
        block_cls = BasicBlock if block == "basic" else Bottleneck
        if stem == "cifar":
            self.stem = nn.Sequential(
                conv(in_channels, base_width, 3, padding_mode=padding_mode, bias=False),
                L.norm(norm, base_width),
                L.activation(act),
            )
        else:
            self.stem = nn.Sequential(
                conv(in_channels, base_width, 7, stride=2, padding_mode=padding_mode, bias=False),
                L.norm(norm, base_width),
                L.activation(act),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        layers = []
        cin = base_width
        for i, count in enumerate(stages):
            planes = base_width * 2**i
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block_cls(cin, planes, stride, padding_mode=padding_mode, norm=norm, act=act))
                cin = planes * block_cls.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def build_resnet(
    *,
    depth: int,
    num_classes: int,
    in_channels: int,
    width: int = 1,
    stem: str = "cifar",
    padding_mode: str = "zeros",
    norm: str = "batch",
    activation: str = "relu",
) -> ResNet:
    """A standard-depth ResNet; ``width`` multiplies the 64 base channels."""
    if depth not in STANDARD_DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(STANDARD_DEPTHS)}; got {depth}")
    if width < 1:
        raise ValueError(f"ResNet width must be >= 1; got {width}")
    block, stages = STANDARD_DEPTHS[depth]
    return ResNet(
        block=block,
        stages=stages,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=stem,
        base_width=64 * width,
        padding_mode=padding_mode,
        norm=norm,
        act=activation,
    )


@VICTIMS.register("resnet18", version="1")
def resnet18(
    *,
    num_classes: int,
    in_channels: int,
    side: int,
    width: int = 1,
    stem: str = "cifar",
    padding_mode: str = "zeros",
    norm: str = "batch",
    activation: str = "relu",
) -> nn.Module:
    """ResNet-18 (basic blocks 2-2-2-2); CIFAR stem by default for small images."""
    return build_resnet(
        depth=18,
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        stem=stem,
        padding_mode=padding_mode,
        norm=norm,
        activation=activation,
    )
