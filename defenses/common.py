"""Helpers the defenses share: noise on the right device from the caller's generator."""

from __future__ import annotations

import torch


def generator_on(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """``generator`` if it lives on ``device``; else a generator there, seeded by one draw of it.

    Opacus draws its noise on the parameters' device, where a CPU generator cannot be
    used; the seed comes from the caller's generator, so runs stay reproducible.
    """
    if torch.device(generator.device).type == torch.device(device).type:
        return generator
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return seeded


def gaussian_like(reference: torch.Tensor, std: float, *, generator: torch.Generator) -> torch.Tensor:
    """N(0, std²) noise of ``reference``'s shape and dtype, drawn on the generator's device.

    Drawing where the generator lives (and moving the result) gives the same numbers on a
    CPU and a GPU run of the same cell.
    """
    noise = torch.randn(reference.shape, generator=generator, device=generator.device, dtype=reference.dtype)
    return (noise * std).to(reference.device)


def uniform_like(reference: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """U[0, 1) of ``reference``'s shape and dtype, drawn on the generator's device."""
    draw = torch.rand(reference.shape, generator=generator, device=generator.device, dtype=reference.dtype)
    return draw.to(reference.device)
