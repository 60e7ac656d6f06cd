"""Shared test helpers: seeded models with non-trivial BN statistics, output comparison."""

from __future__ import annotations

import torch
from torch import nn

from repconv.zoo.blocks import randomize_bn_


def randomized(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """`model` in eval mode with random BN statistics/affine and random DBB identity-1x1 weights."""
    generator = torch.Generator().manual_seed(seed)
    randomize_bn_(model, generator)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "idconv1" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())
