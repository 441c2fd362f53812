"""Generator architectures for generative image priors, and the discriminator that trains them.

Every generator maps latent codes ``z`` of shape (B, latent_dim) to images of shape
(B, channels, side, side) **in [0, 1]** (a tanh output rescaled), the space every image
of leakbench lives in; the attack normalizes them for the victim itself. Generators are
registered in ``GENERATORS`` with ``side`` and ``channels`` reserved (filled from the
attacked images, like a victim's ``side``); the rest of their parameters are a suite's.

Why BatchNorm is kept but only used in eval mode by attacks: DCGAN needs it to train, but
in train mode it would mix the candidates of a batch (and of vmapped restarts) through
the batch statistics. Attacks therefore run generators in eval mode (running statistics),
and GAN training ends with a recalibration of those statistics (``recalibrate_batchnorm``)
so that eval-mode samples look like the train-mode ones the discriminator saw.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from leakbench.core import ParamError, Registry

GENERATORS: Registry[nn.Module] = Registry("generator")

#: Parameters leakbench fills from the attacked images; a suite may not set them.
GENERATOR_CONTEXT = ("side", "channels")

DCGAN_SIDES = (16, 32, 64)
RESNET_SIDES = (32, 64, 128)


class ImageGenerator(nn.Module):
    """A generator body whose output (tanh range) is mapped to pixels in [0, 1]."""

    def __init__(self, body: nn.Module, *, latent_dim: int, side: int, channels: int, reshape: tuple[int, ...]):
        super().__init__()
        self.body = body
        self.latent_dim = latent_dim
        self.side = side
        self.channels = channels
        self._reshape = reshape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z.reshape(z.shape[0], *self._reshape)
        return (torch.tanh(self.body(h)) + 1) / 2


def _upsamplings(side: int, allowed: tuple[int, ...], name: str) -> int:
    if side not in allowed:
        raise ParamError("side", f"generator {name!r} makes images of side {', '.join(map(str, allowed))}, not {side}; "
                                 f"choose another generator or attack images of a supported side")
    return int(round(math.log2(side // 4)))


def _check_width(width: int, latent_dim: int) -> None:
    if width < 1:
        raise ParamError("width", f"must be >= 1, got {width}")
    if latent_dim < 1:
        raise ParamError("latent_dim", f"must be >= 1, got {latent_dim}")


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.'s initialization: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@GENERATORS.register("dcgan", version="1")
def dcgan(*, side: int, channels: int, latent_dim: int = 100, width: int = 64) -> nn.Module:
    """DCGAN (Radford et al. 2016): z -> 4x4 by a transposed conv, then x2 per block to ``side`` (16, 32, 64).

    Channels halve per block from ``width * 2^(blocks-1)`` to ``width``; BatchNorm and
    ReLU in between, tanh at the end. GIAS's and GIML's generator at 32 px.
    """
    _check_width(width, latent_dim)
    n = _upsamplings(side, DCGAN_SIDES, "dcgan")
    chans = [width * 2 ** (n - 1 - i) for i in range(n)]
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(latent_dim, chans[0], 4, 1, 0, bias=False), nn.BatchNorm2d(chans[0]), nn.ReLU(True),
    ]
    for c_in, c_out in zip(chans, chans[1:]):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
    layers.append(nn.ConvTranspose2d(chans[-1], channels, 4, 2, 1, bias=False))
    model = ImageGenerator(nn.Sequential(*layers), latent_dim=latent_dim, side=side, channels=channels,
                           reshape=(latent_dim, 1, 1))
    dcgan_init(model)
    return model


class _ResidualUp(nn.Module):
    """BN-ReLU-up-conv3-BN-ReLU-conv3, plus an upsampled 1x1 shortcut (the SNGAN/BigGAN generator block)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1),
        )
        self.skip = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class _Project(nn.Module):
    def __init__(self, latent_dim: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(latent_dim, channels * 16)
        self.channels = channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z).reshape(z.shape[0], self.channels, 4, 4)


@GENERATORS.register("resnet", version="1")
def resnet_generator(*, side: int, channels: int, latent_dim: int = 128, width: int = 32) -> nn.Module:
    """A residual generator (SNGAN/BigGAN-style up-blocks) for 32 to 128 px: the larger prior for 64 px and up.

    z -> 4x4 x ``8 width`` by a linear layer, then one residual up-block per doubling
    (channels ``min(8, 2^k) * width``, down to ``width``), BN-ReLU-conv3-tanh at the end.
    """
    _check_width(width, latent_dim)
    n = _upsamplings(side, RESNET_SIDES, "resnet")
    chans = [width * min(8, 2 ** (n - i)) for i in range(n + 1)]
    blocks: list[nn.Module] = [_Project(latent_dim, chans[0])]
    blocks += [_ResidualUp(a, b) for a, b in zip(chans, chans[1:])]
    blocks += [nn.BatchNorm2d(chans[-1]), nn.ReLU(), nn.Conv2d(chans[-1], channels, 3, 1, 1)]
    model = ImageGenerator(nn.Sequential(*blocks), latent_dim=latent_dim, side=side, channels=channels,
                           reshape=(latent_dim,))
    dcgan_init(model)
    return model


def build_generator(name: str, params: Mapping[str, Any] | None = None, *, side: int, channels: int,
                    seed: int) -> nn.Module:
    """A registered generator with weights initialized from ``seed`` (global RNG fenced by ``fork_rng``)."""
    entry = GENERATORS.get(name)
    params = dict(params or {})
    problems = entry.check_params(params, reserved=GENERATOR_CONTEXT)
    if problems:
        raise ValueError(f"generator {name!r}: " + "; ".join(problems))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.factory(side=side, channels=channels, **params)


def discriminator(*, side: int, channels: int, width: int) -> nn.Module:
    """DCGAN discriminator: stride-2 convs (LeakyReLU 0.2, BatchNorm after the first) down to 4x4, then one logit.

    One architecture trains every registered generator; its ``width`` follows the
    generator's so that neither side overpowers the other by construction.
    """
    if side < 8 or side & (side - 1):
        raise ValueError(f"the discriminator needs a power-of-two side >= 8, got {side}")
    n = int(round(math.log2(side // 4)))
    chans = [width * 2 ** i for i in range(n)]
    layers: list[nn.Module] = [nn.Conv2d(channels, chans[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
    for c_in, c_out in zip(chans, chans[1:]):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
    layers += [nn.Conv2d(chans[-1], 1, 4, 1, 0), nn.Flatten()]
    model = nn.Sequential(*layers)
    dcgan_init(model)
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, *, batches: int, batch_size: int, generator: torch.Generator) -> None:
    """Re-estimates every BatchNorm's running statistics as the exact average over ``batches`` random z batches.

    Running averages with momentum lag behind the weights of a GAN; attacks use eval mode,
    so the statistics they see should be those of the final weights.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    device = next(model.parameters()).device
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        for _ in range(batches):
            z = torch.randn(batch_size, model.latent_dim, generator=generator).to(device)
            model(z)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
