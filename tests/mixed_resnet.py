"""A small ResNet-style net mixing ACB, DBB, RepVGG and plain conv-BN, in train or deploy form.

Used as `--arch tests/mixed_resnet.py:build` by the end-to-end tests.
"""

from __future__ import annotations

from torch import nn

from repconv.zoo.blocks import ACBlock, ConvBN, DiverseBranchBlock, RepVGGBlock


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, deploy: bool):
        super().__init__()
        self.conv1 = ACBlock(cin, cout, 3, stride=stride, padding=1, deploy=deploy)
        self.relu = nn.ReLU()
        self.conv2 = DiverseBranchBlock(cout, cout, 3, padding=1, deploy=deploy)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=deploy),
                nn.Identity() if deploy else nn.BatchNorm2d(cout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.shortcut(x))


class MixedResNet(nn.Module):
    def __init__(self, deploy: bool = False, num_classes: int = 5, width: int = 8):
        super().__init__()
        self.stem = ConvBN(3, width, 3, stride=1, padding=1, deploy=deploy, nonlinear=nn.ReLU())
        self.layer1 = ResidualBlock(width, width, 1, deploy)
        self.layer2 = ResidualBlock(width, 2 * width, 2, deploy)
        self.rep = RepVGGBlock(2 * width, 2 * width, deploy=deploy)
        self.dw = DiverseBranchBlock(
            2 * width, 2 * width, 3, padding=1, groups=2 * width, deploy=deploy
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.dw(self.rep(self.layer2(self.layer1(self.stem(x)))))
        return {"logits": self.fc(self.pool(x).flatten(1)), "features": [x]}


def build(deploy: bool = False, num_classes: int = 5, width: int = 8) -> MixedResNet:
    return MixedResNet(deploy=deploy, num_classes=num_classes, width=width)
