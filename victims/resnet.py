"""One ResNet builder: depth, block type, stem, width, padding, norm and activation are parameters.

Every registered ResNet (``resnet18`` ... ``resnet152``, the CIFAR family ``resnet20``,
``resnet32``, ``resnet56`` and the free-form ``resnet``) is a few lines over
:class:`ResNet`, so the block and shortcut layout is the same everywhere and the
variation a suite sweeps is only ever a parameter.

Layout (torchvision's ResNet v1.5, which the parameter-count test checks): basic blocks
are two 3x3 convs; bottlenecks are 1x1, 3x3, 1x1 with the stride on the 3x3 conv; a
shortcut is the identity, or a strided 1x1 conv and a norm where the shape changes; the
first block of every stage after the first halves the side. Convs carry no bias (a norm
follows each); weights start as torchvision's (Kaiming normal, fan-out, for convs; norms
at weight 1, bias 0), which is also what the Inverting Gradients reference code used.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from leakbench.core import ParamError
from leakbench.victims import layers as L
from leakbench.victims.layers import check_choice, conv
from leakbench.victims.registry import VICTIMS

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")

# Blocks per stage and block type of the standard depths (He et al. 2016, table 1).
STANDARD_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

# The CIFAR ResNets of He et al. 2016 (section 4.2) as the Inverting Gradients paper used
# them: three stages of 16, 32, 64 channels (times a width multiplier), n basic blocks
# each, depth = 6n + 2.
CIFAR_DEPTHS = (20, 32, 56)
CIFAR_BASE_WIDTH = 16


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


BLOCK_TYPES: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


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
        check_choice("block", block, BLOCKS)
        check_choice("stem", stem, STEMS)
        block_cls = BLOCK_TYPES[block]
        if stem == "cifar":  # small inputs: keep the resolution, no max-pool
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
        _init_like_torchvision(self)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def _init_like_torchvision(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs and unit norms, as torchvision and the Inverting Gradients code do."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_resnet(
    *,
    block: str,
    stages: Sequence[int],
    num_classes: int,
    in_channels: int,
    base_width: int = 64,
    width: int = 1,
    stem: str = "cifar",
    padding_mode: str = "zeros",
    norm: str = "batch",
    activation: str = "relu",
) -> ResNet:
    """Any ResNet: ``stages`` blocks per stage, the first stage ``base_width * width`` channels wide, doubling per stage."""
    if not stages or any(not isinstance(n, int) or n < 1 for n in stages):
        raise ParamError("stages", f"a non-empty list of block counts >= 1 is needed; got {list(stages)}")
    if width < 1:
        raise ParamError("width", f"the width multiplier must be >= 1; got {width}")
    if base_width < 1:
        raise ParamError("base_width", f"must be >= 1 channel; got {base_width}")
    return ResNet(
        block=block,
        stages=tuple(stages),
        num_classes=num_classes,
        in_channels=in_channels,
        stem=stem,
        base_width=base_width * width,
        padding_mode=padding_mode,
        norm=norm,
        act=activation,
    )


@VICTIMS.register("resnet", version="1")
def resnet(
    *,
    num_classes: int,
    in_channels: int,
    side: int,
    stages: tuple[int, ...] = (2, 2, 2, 2),
    block: str = "basic",
    base_width: int = 64,
    width: int = 1,
    stem: str = "cifar",
    padding_mode: str = "zeros",
    norm: str = "batch",
    activation: str = "relu",
) -> nn.Module:
    """A free-form ResNet for wide/deep sweeps: blocks per stage, block type, base width and width multiplier."""
    return build_resnet(block=block, stages=stages, num_classes=num_classes, in_channels=in_channels,
                        base_width=base_width, width=width, stem=stem, padding_mode=padding_mode, norm=norm,
                        activation=activation)


def _standard_resnet(depth: int) -> Callable[..., nn.Module]:
    block, stages = STANDARD_DEPTHS[depth]

    def factory(
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
        return build_resnet(block=block, stages=stages, num_classes=num_classes, in_channels=in_channels,
                            width=width, stem=stem, padding_mode=padding_mode, norm=norm, activation=activation)

    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = (f"ResNet-{depth} ({block} blocks {'-'.join(map(str, stages))}, 64*width base channels); "
                       "CIFAR stem by default for small images, stem = \"imagenet\" for torchvision's.")
    return factory


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    n = (depth - 2) // 6

    def factory(
        *,
        num_classes: int,
        in_channels: int,
        side: int,
        width: int = 1,
        padding_mode: str = "zeros",
        norm: str = "batch",
        activation: str = "relu",
    ) -> nn.Module:
        return build_resnet(block="basic", stages=(n, n, n), num_classes=num_classes, in_channels=in_channels,
                            base_width=CIFAR_BASE_WIDTH, width=width, stem="cifar", padding_mode=padding_mode,
                            norm=norm, activation=activation)

    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = (f"CIFAR ResNet-{depth} (3 stages of {n} basic blocks, 16/32/64 channels times width): "
                       f"width w is ResNet{depth}-w in the Inverting Gradients paper's naming.")
    return factory


# resnet18 is version 2: version 1 kept PyTorch's default conv initialization.
_STANDARD_VERSIONS = {18: "2"}

for _depth in STANDARD_DEPTHS:
    VICTIMS.register(f"resnet{_depth}", version=_STANDARD_VERSIONS.get(_depth, "1"))(_standard_resnet(_depth))
for _depth in CIFAR_DEPTHS:
    VICTIMS.register(f"resnet{_depth}", version="1")(_cifar_resnet(_depth))
