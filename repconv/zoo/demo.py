"""A small CNN holding one block of each supported family, in train or deploy form.

Used by repconv's tests and demo: the train form converts to the deploy form, whose state dict
loads into `DemoNet(deploy=True)`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from repconv.zoo.blocks import ACBlock, ConvBN, DiverseBranchBlock, RepVGGBlock
from repconv.zoo.registry import register_model

__all__ = ["DemoNet"]


class DemoNet(nn.Module):
    """Conv-BN stem, ACB, RepVGG (strided and identity), DBB (dense and depthwise), conv-BN head."""

    default_cfg: ClassVar[dict[str, Any]] = {"input_size": (3, 32, 32)}

    def __init__(self, deploy: bool = False, num_classes: int = 10):
        super().__init__()
        self.deploy = deploy
        self.stem = ConvBN(3, 16, 3, stride=1, padding=1, deploy=deploy, nonlinear=nn.ReLU())
        self.acb = ACBlock(16, 16, 3, padding=1, deploy=deploy)
        self.acb_act = nn.ReLU()
        self.repvgg_down = RepVGGBlock(16, 32, 3, stride=2, padding=1, deploy=deploy)
        self.repvgg = RepVGGBlock(32, 32, deploy=deploy)
        self.dbb = DiverseBranchBlock(32, 32, 3, padding=1, deploy=deploy, nonlinear=nn.ReLU())
        self.dbb_dw = DiverseBranchBlock(32, 32, 3, padding=1, groups=32, deploy=deploy)
        self.head_conv = nn.Sequential(
            nn.Conv2d(32, 64, 1, bias=deploy),
            nn.Identity() if deploy else nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.acb_act(self.acb(x))
        x = self.repvgg_down(x)
        x = self.repvgg(x)
        x = self.dbb(x)
        x = self.dbb_dw(x)
        x = self.head_conv(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(family="demo", name="demo_mixed")
def demo_mixed(deploy: bool = False, num_classes: int = 10) -> DemoNet:
    """Small 3x32x32 net with one block of each family (ACB, RepVGG, DBB, conv-BN)."""
    return DemoNet(deploy=deploy, num_classes=num_classes)
