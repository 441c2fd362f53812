"""Building blocks shared by every convolutional victim: padding, norm, activation."""

from __future__ import annotations

from typing import Callable

from torch import nn

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
NORMS = ("batch", "group", "none")
ACTIVATIONS = ("relu", "sigmoid", "tanh", "elu")

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def conv(cin: int, cout: int, kernel: int, *, stride: int = 1, padding_mode: str = "zeros", bias: bool = True) -> nn.Conv2d:
    check_choice("padding_mode", padding_mode, PADDING_MODES)
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, padding_mode=padding_mode, bias=bias)


def norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm, GroupNorm (up to 32 groups that divide the channels) or identity."""
    check_choice("norm", kind, NORMS)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def activation(kind: str) -> nn.Module:
    check_choice("activation", kind, ACTIVATIONS)
    return _ACTIVATIONS[kind]()
