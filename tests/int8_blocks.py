"""Small nets for the INT8 report's tests (written for these tests).

`RepVGGBlock` is the zoo's copy of the release's block; `QARepVGGBlock` mirrors QARepVGG's
(a kxk conv-BN, a 1x1 conv with no BN, the identity with no BN, one BN after the sum, ReLU).
`settled` gives a block the statistics of a trained one: BN scales near 1, conv weights of
the size a trained kxk conv has, so the identity does not dwarf them; `plant_identity_outlier`
gives its identity BN a large gamma/sigma on a few channels (the RepVGG collapse).
The `*_net` functions build them for the CLI (`--arch tests/int8_blocks.py:NAME`).
"""

from __future__ import annotations

import torch
from torch import nn

from repconv.zoo.blocks import RepVGGBlock

CHANNELS = 8


class QARepVGGBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.rbr_dense = nn.Sequential()
        self.rbr_dense.add_module("conv", nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        self.rbr_dense.add_module("bn", nn.BatchNorm2d(channels))
        self.rbr_1x1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        return self.nonlinearity(self.bn(self.rbr_dense(x) + self.rbr_1x1(x) + x))


def settled(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and BN statistics like a trained net's (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(0.3 * torch.randn(module.weight.shape, generator=generator))
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.1 * torch.randn(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(1 + 0.1 * torch.rand(n, generator=generator))
    return model.eval()


def plant_identity_outlier(block: RepVGGBlock, gamma: float = 40.0, channels=(1, 5)) -> None:
    """The identity BN's gamma/sigma made large on a few channels."""
    with torch.no_grad():
        for c in channels:
            block.rbr_identity.weight[c] = gamma
            block.rbr_identity.running_var[c] = 0.5


def repvgg_net(planted: int | None = None) -> nn.Sequential:
    """Three RepVGG blocks; with `planted`, that block's identity BN holds the outlier."""
    stem = nn.Conv2d(3, CHANNELS, 3, padding=1)
    blocks = [RepVGGBlock(CHANNELS, CHANNELS) for _ in range(3)]
    net = settled(nn.Sequential(stem, *blocks))
    if planted is not None:
        plant_identity_outlier(blocks[planted])
    return net


def planted_net() -> nn.Sequential:
    return repvgg_net(planted=1)


def qa_net() -> nn.Sequential:
    stem = nn.Conv2d(3, CHANNELS, 3, padding=1)
    return settled(nn.Sequential(stem, *[QARepVGGBlock(CHANNELS) for _ in range(3)]))
