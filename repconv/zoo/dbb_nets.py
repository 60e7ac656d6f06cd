"""The Diverse Branch Block release's ResNet-18, ResNet-50 and MobileNet (V1).

Each is built three ways, as that release switches its conv-BN implementation: every 3x3
conv-BN as a DBB block, as an ACB block, or as a plain conv-BN unit. 1x1 and 7x7 convs stay plain
conv-BN units (`conv` + `bn`, deploy `conv` with bias) in all three. Keys follow the release:
ResNets `stage0.conv1`, `stage0.maxpool`, `stage1`..`stage4`, `gap`, `linear`; MobileNet
`conv1`, `stem` (13 depthwise + pointwise blocks), `gap`, `linear`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from repconv.zoo.blocks import ACBlock, ConvBN, DiverseBranchBlock
from repconv.zoo.registry import register_model

ConvFactory = Callable[..., nn.Module]


class CropLayer(nn.Module):
    """The DBB release's crop for ACB's thin branches (no state; rows/cols to drop per side)."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.rows_to_crop, self.cols_to_crop = rows, cols

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2], x.shape[3]
        return x[
            :,
            :,
            self.rows_to_crop : h - self.rows_to_crop,
            self.cols_to_crop : w - self.cols_to_crop,
        ]


class NonlinearACBlock(ACBlock):
    """The DBB release's variant of ACNet's block: a `nonlinear` child, crop layers for the thin
    branches, and the nonlinearity applied after the sum.

    The release's deploy-mode forward skips the nonlinearity; this one applies it in both forms,
    which is what the train form computes.
    """

    def __init__(self, *args: Any, nonlinear: nn.Module | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        if not self.deploy:
            crop = self.crop
            self.crop = 0  # cropping is the crop layers' job in this variant
            self.ver_conv_crop_layer = CropLayer(0, crop) if crop else nn.Identity()
            self.hor_conv_crop_layer = CropLayer(crop, 0) if crop else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.nonlinear(self.fused_conv(x))
        out = self.square_bn(self.square_conv(x))
        out = out + self.ver_bn(self.ver_conv(self.ver_conv_crop_layer(x)))
        out = out + self.hor_bn(self.hor_conv(self.hor_conv_crop_layer(x)))
        return self.nonlinear(out)


_KXK = {"dbb": DiverseBranchBlock, "acb": NonlinearACBlock, "convbn": ConvBN}


def _units(kind: str, deploy: bool) -> tuple[ConvFactory, ConvFactory]:
    """The release's `conv_bn` and `conv_bn_relu` for one implementation choice."""

    def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, relu=False) -> nn.Module:
        block = ConvBN if k == 1 or k >= 7 else _KXK[kind]
        nonlinear = nn.ReLU() if relu else None
        return block(
            cin,
            cout,
            k,
            stride=stride,
            padding=padding,
            groups=groups,
            deploy=deploy,
            nonlinear=nonlinear,
        )

    def conv_bn_relu(*args, **kwargs) -> nn.Module:
        return conv_bn(*args, relu=True, **kwargs)

    return conv_bn, conv_bn_relu


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, units, cin: int, planes: int, stride: int):
        super().__init__()
        conv_bn, conv_bn_relu = units
        if stride != 1 or cin != planes:
            self.shortcut = conv_bn(cin, planes, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = conv_bn_relu(cin, planes, 3, stride=stride, padding=1)
        self.conv2 = conv_bn(planes, planes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, units, cin: int, planes: int, stride: int):
        super().__init__()
        conv_bn, conv_bn_relu = units
        out = planes * self.expansion
        if stride != 1 or cin != out:
            self.shortcut = conv_bn(cin, out, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = conv_bn_relu(cin, planes, 1)
        self.conv2 = conv_bn_relu(planes, planes, 3, stride=stride, padding=1)
        self.conv3 = conv_bn(planes, out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    default_cfg: ClassVar[dict[str, Any]] = {"input_size": (3, 224, 224)}

    def __init__(self, block, depths, kind: str, num_classes: int = 1000, deploy: bool = False):
        super().__init__()
        units = _units(kind, deploy)
        self.stage0 = nn.Sequential()
        self.stage0.add_module("conv1", units[1](3, 64, 7, stride=2, padding=3))
        self.stage0.add_module("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        cin = 64
        stages = []
        for planes, depth, stride in zip((64, 128, 256, 512), depths, (1, 2, 2, 2)):
            blocks = []
            for i in range(depth):
                blocks.append(block(units, cin, planes, stride if i == 0 else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stage0(x)))))
        return self.linear(self.gap(x).flatten(1))


# (depthwise channels, pointwise channels) of the 13 blocks, and which ones stride.
_MOBILE_WIDTHS = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
_MOBILE_WIDTHS += [(512, 512)] * 5 + [(512, 1024), (1024, 1024)]
_MOBILE_STRIDED = {1, 3, 5, 11}


class MobileV1Block(nn.Module):
    def __init__(self, units, cin: int, cout: int, stride: int):
        super().__init__()
        _, conv_bn_relu = units
        self.depthwise = conv_bn_relu(cin, cin, 3, stride=stride, padding=1, groups=cin)
        self.pointwise = conv_bn_relu(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNet(nn.Module):
    default_cfg: ClassVar[dict[str, Any]] = {"input_size": (3, 224, 224)}

    def __init__(self, kind: str, num_classes: int = 1000, deploy: bool = False):
        super().__init__()
        units = _units(kind, deploy)
        self.conv1 = units[1](3, 32, 3, stride=2, padding=1)
        self.stem = nn.Sequential(
            *[
                MobileV1Block(units, cin, cout, 2 if i in _MOBILE_STRIDED else 1)
                for i, (cin, cout) in enumerate(_MOBILE_WIDTHS)
            ]
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.gap(self.stem(self.conv1(x))).flatten(1))


_FAMILIES = {"dbb": "DBB", "acb": "ACB", "convbn": "conv-BN"}


def _register(kind: str) -> None:
    def resnet18(deploy: bool = False, num_classes: int = 1000) -> ResNet:
        return ResNet(BasicBlock, (2, 2, 2, 2), kind, num_classes, deploy)

    def resnet50(deploy: bool = False, num_classes: int = 1000) -> ResNet:
        return ResNet(Bottleneck, (3, 4, 6, 3), kind, num_classes, deploy)

    def mobilenet(deploy: bool = False, num_classes: int = 1000) -> MobileNet:
        return MobileNet(kind, num_classes, deploy)

    for factory, title in (
        (resnet18, "ResNet-18"),
        (resnet50, "ResNet-50"),
        (mobilenet, "MobileNet"),
    ):
        name = f"{kind}_{factory.__name__}"
        register_model(
            family=_FAMILIES[kind],
            name=name,
            description=f"{title} with {_FAMILIES[kind]} 3x3 convs (DBB release)",
        )(factory)


for _kind in _FAMILIES:
    _register(_kind)
