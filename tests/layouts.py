"""Test copies of re-parameterizable blocks from public codebases, WITHOUT their deploy methods.

Written for these tests from a reading of each project's public code: the child names, the
constructor arguments and the train-time forward follow upstream; every conversion method
(switch_to_deploy, reparameterize, fuse, merge_kernel, ...) is left out on purpose, so only the
generic data-flow fuser (issue 13) can fold them. `build` makes a small net per layout for the CLI:

    --arch tests/layouts.py:build --arch-kwargs '{"layout": "yolov7_repconv"}'

`NEGATIVE_LAYOUTS` are look-alikes that are NOT linear and must be left alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def conv_bn_seq(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1):
    """The usual `conv_bn` helper: an nn.Sequential with children `conv` and `bn`."""
    unit = nn.Sequential()
    unit.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    unit.add_module("bn", nn.BatchNorm2d(cout))
    return unit


# ---- yolov7 (WongKinYiu/yolov7, models/common.py) ------------------------------------------------


def autopad(k: int, p: int | None = None) -> int:
    return k // 2 if p is None else p


def ultralytics_act(act) -> nn.Module:
    """act=True: the default SiLU; a module: itself; anything else: Identity."""
    if act is True:
        return nn.SiLU()
    return act if isinstance(act, nn.Module) else nn.Identity()


class YoloV7RepConv(nn.Module):
    """yolov7 `RepConv(c1, c2, k=3, s=1, p=None, g=1, act=True)`: branches are nn.Sequential
    with children `0` (conv) and `1` (BN); `rbr_identity` is a BN when c1 == c2 and s == 1."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p=None, g: int = 1, act=True):
        super().__init__()
        self.groups, self.in_channels, self.out_channels = g, c1, c2
        self.act = ultralytics_act(act)
        self.rbr_identity = nn.BatchNorm2d(c1) if c2 == c1 and s == 1 else None
        padding_11 = autopad(k, p) - k // 2
        self.rbr_dense = nn.Sequential(
            nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False), nn.BatchNorm2d(c2)
        )
        self.rbr_1x1 = nn.Sequential(
            nn.Conv2d(c1, c2, 1, s, padding_11, groups=g, bias=False), nn.BatchNorm2d(c2)
        )

    def forward(self, inputs):
        # Upstream's forward runs the deploy form when it is there; the conversion method that
        # builds it (`fuse_repvgg_block`) is left out of this copy.
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


# ---- YOLOv6 (meituan/YOLOv6, yolov6/layers/common.py) --------------------------------------------


class ConvModuleV6(nn.Module):
    """YOLOv6 `ConvModule` with activation_type=None: children `conv`, `bn`."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, padding=None, groups: int = 1):
        super().__init__()
        padding = k // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class QARepVGGBlock(nn.Module):
    """YOLOv6 `QARepVGGBlock`: conv-BN `rbr_dense`, a 1x1 conv WITHOUT BN `rbr_1x1`, a bare
    `rbr_identity` (nn.Identity) and a BN `bn` after the sum; ReLU, SE is Identity."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, groups=1):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_dense = ConvModuleV6(
            in_channels, out_channels, kernel_size, stride, padding=padding, groups=groups
        )
        self.rbr_1x1 = nn.Conv2d(
            in_channels, out_channels, 1, stride=stride, groups=groups, bias=False
        )
        same = out_channels == in_channels and stride == 1
        self.rbr_identity = nn.Identity() if same else None
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        summed = self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out
        return self.nonlinearity(self.bn(self.se(summed)))


class QARepVGGBlockV2(QARepVGGBlock):
    """YOLOv6 `QARepVGGBlockV2`: QARepVGGBlock plus `rbr_avg`, an AvgPool2d(kernel_size, stride,
    padding) (count_include_pad=True) present when the identity is."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        same = out_channels == in_channels and stride == 1
        self.rbr_avg = nn.AvgPool2d(kernel_size, stride=stride, padding=padding) if same else None

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        avg_out = 0 if self.rbr_avg is None else self.rbr_avg(inputs)
        summed = self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out + avg_out
        return self.nonlinearity(self.bn(self.se(summed)))


# ---- mmyolo RepVGGBlock with use_alpha (open-mmlab/mmyolo, layers/yolo_bricks.py) ----------------


class ConvModuleMM(nn.Module):
    """mmcv `ConvModule` with act_cfg=None: children `conv`, `bn`."""

    def __init__(self, cin, cout, k, stride=1, padding=0, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class AlphaRepVGGBlock(nn.Module):
    """mmyolo `RepVGGBlock(..., use_alpha=True)`: `rbr_dense` and `rbr_1x1` ConvModules, BN
    `rbr_identity`, a learned scalar `alpha` (shape [1]) multiplying the 1x1 branch.

    Upstream tests `if self.alpha:` (a tensor's truth value, which torch.fx cannot trace); this
    copy tests `is not None`, as super-gradients' QARepVGGBlock multiplies unconditionally."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, groups=1):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.alpha = nn.Parameter(torch.ones(1))
        same = out_channels == in_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(in_channels) if same else None
        self.rbr_dense = ConvModuleMM(
            in_channels, out_channels, kernel_size, stride, padding, groups
        )
        padding_11 = padding - kernel_size // 2
        self.rbr_1x1 = ConvModuleMM(in_channels, out_channels, 1, stride, padding_11, groups)

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        if self.alpha is not None:
            summed = self.rbr_dense(inputs) + self.alpha * self.rbr_1x1(inputs) + id_out
        else:
            summed = self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out
        return self.nonlinearity(self.se(summed))


# ---- RT-DETR (lyuwenyu/RT-DETR, rtdetr_pytorch/src/zoo/rtdetr/hybrid_encoder.py) -----------------


class ConvNormLayer(nn.Module):
    """RT-DETR `ConvNormLayer(ch_in, ch_out, kernel_size, stride, padding=None, bias=False,
    act=None)`: children `conv`, `norm`, `act`."""

    def __init__(self, ch_in, ch_out, kernel_size, stride, padding=None, bias=False, act=None):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = nn.Identity() if act is None else act

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class RTDETRRepVggBlock(nn.Module):
    """RT-DETR `RepVggBlock(ch_in, ch_out, act='relu')`: `conv1` 3x3 + `conv2` 1x1, then act.
    Upstream has no stride or groups argument."""

    def __init__(self, ch_in, ch_out, act: nn.Module | None = None):
        super().__init__()
        self.ch_in, self.ch_out = ch_in, ch_out
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0)
        self.act = nn.ReLU() if act is None else act

    def forward(self, x):
        return self.act(self.conv1(x) + self.conv2(x))


# ---- MobileOne (apple/ml-mobileone, mobileone.py) ------------------------------------------------


class MobileOneBlock(nn.Module):
    """apple `MobileOneBlock(in, out, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    inference_mode=False, use_se=False, num_conv_branches=1)`: `rbr_conv` ModuleList of conv-BN
    units (`conv`, `bn`), `rbr_scale` 1x1 conv-BN when kernel_size > 1, `rbr_skip` BN when
    in == out and stride == 1, `se` Identity, `activation` ReLU; `out +=` accumulates."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
        num_conv_branches=1,
    ):  # fmt: skip
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.num_conv_branches = num_conv_branches
        self.se = nn.Identity()
        self.activation = nn.ReLU()
        same = out_channels == in_channels and stride == 1
        self.rbr_skip = nn.BatchNorm2d(in_channels) if same else None
        self.rbr_conv = nn.ModuleList(
            self._conv_bn(kernel_size, padding) for _ in range(num_conv_branches)
        )
        self.rbr_scale = self._conv_bn(1, 0) if kernel_size > 1 else None

    def _conv_bn(self, kernel_size: int, padding: int) -> nn.Sequential:
        return conv_bn_seq(
            self.in_channels, self.out_channels, kernel_size, self.stride, padding, self.groups
        )

    def forward(self, x):
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))


# ---- RepLKNet (DingXiaoH/RepLKNet-pytorch, replknet.py) ------------------------------------------


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet `ReparamLargeKernelConv(in, out, kernel_size, stride, groups, small_kernel)`:
    `lkb_origin` conv-BN with the large kernel (padding k//2) plus `small_conv` conv-BN with the
    small one (padding small//2); no activation; `out +=` adds the small branch."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, groups, small_kernel):
        super().__init__()
        self.kernel_size, self.small_kernel = kernel_size, small_kernel
        self.lkb_origin = conv_bn_seq(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups
        )
        if small_kernel is not None:
            assert small_kernel <= kernel_size
            self.small_conv = conv_bn_seq(
                in_channels, out_channels, small_kernel, stride, small_kernel // 2, groups
            )

    def forward(self, inputs):
        out = self.lkb_origin(inputs)
        if hasattr(self, "small_conv"):
            out += self.small_conv(inputs)
        return out


# ---- UniRepLKNet (AILab-CVC/UniRepLKNet, unireplknet.py) -----------------------------------------

# Upstream's branch kernels and dilations per large kernel size (kernel_sizes, dilates).
DILATED_BRANCHES = {
    5: ([3, 3], [1, 2]),
    7: ([5, 3, 3], [1, 2, 3]),
    9: ([5, 5, 3, 3], [1, 2, 3, 4]),
    11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
    13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]),
}


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet `DilatedReparamBlock(channels, kernel_size, deploy=False)`: depthwise
    `lk_origin` (no bias) then `origin_bn`, plus per (k, r) a depthwise dilated conv
    `dil_conv_k{k}_{r}` (padding (r*(k-1)+1)//2) and its BN `dil_bn_k{k}_{r}`; stride 1."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.lk_origin = nn.Conv2d(
            channels, channels, kernel_size, 1, kernel_size // 2, groups=channels, bias=False
        )
        self.kernel_sizes, self.dilates = DILATED_BRANCHES[kernel_size]
        self.origin_bn = nn.BatchNorm2d(channels)
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = nn.Conv2d(
                channels, channels, k, 1, (r * (k - 1) + 1) // 2, dilation=r, groups=channels,
                bias=False,
            )  # fmt: skip
            self.__setattr__(f"dil_conv_k{k}_{r}", conv)
            self.__setattr__(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = self.__getattr__(f"dil_conv_k{k}_{r}")
            bn = self.__getattr__(f"dil_bn_k{k}_{r}")
            out = out + bn(conv(x))
        return out


# ---- YOLOv10 RepVGGDW (ultralytics, nn/modules/block.py and conv.py) -----------------------------


class UltralyticsConv(nn.Module):
    """ultralytics `Conv(c1, c2, k, s, p, g, d, act)`: children `conv`, `bn`, `act`."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = ultralytics_act(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RepVGGDW(nn.Module):
    """YOLOv10 `RepVGGDW(ed)`: depthwise 7x7 `conv` + depthwise 3x3 `conv1` (both act=False),
    summed, then SiLU `act`. Stride 1, depthwise only."""

    def __init__(self, ed: int):
        super().__init__()
        self.conv = UltralyticsConv(ed, ed, 7, 1, 3, g=ed, act=False)
        self.conv1 = UltralyticsConv(ed, ed, 3, 1, 1, g=ed, act=False)
        self.dim = ed
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x) + self.conv1(x))


# ---- look-alikes that are not linear -------------------------------------------------------------


class ActBetweenBlock(nn.Module):
    """RepVGG-like, but the 1x1 branch goes through a ReLU before the sum."""

    def __init__(self, c: int):
        super().__init__()
        self.rbr_dense = conv_bn_seq(c, c, 3, 1, 1)
        self.rbr_1x1 = nn.Sequential(conv_bn_seq(c, c, 1), nn.ReLU())
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + x)


class MeanScaledBlock(nn.Module):
    """The 1x1 branch is scaled by the input's mean: a data-dependent factor."""

    def __init__(self, c: int):
        super().__init__()
        self.rbr_dense = conv_bn_seq(c, c, 3, 1, 1)
        self.rbr_1x1 = conv_bn_seq(c, c, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) * x.mean())


class InputGatedBlock(nn.Module):
    """The 1x1 branch is gated elementwise by the input itself (quadratic in x)."""

    def __init__(self, c: int):
        super().__init__()
        self.rbr_dense = conv_bn_seq(c, c, 3, 1, 1)
        self.rbr_1x1 = conv_bn_seq(c, c, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) * torch.sigmoid(x))


class ReflectPaddedBlock(nn.Module):
    """Two 3x3 branches, one zero-padded, one reflect-padded: their sum is no single conv
    (they differ on the border)."""

    def __init__(self, c: int):
        super().__init__()
        self.rbr_dense = conv_bn_seq(c, c, 3, 1, 1)
        self.rbr_reflect = nn.Sequential()
        self.rbr_reflect.add_module(
            "conv", nn.Conv2d(c, c, 3, 1, 1, bias=False, padding_mode="reflect")
        )
        self.rbr_reflect.add_module("bn", nn.BatchNorm2d(c))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.rbr_dense(x) + self.rbr_reflect(x))


# ---- nets ----------------------------------------------------------------------------------------


def _blocks(layout: str, w: int) -> list[nn.Module]:
    """A few blocks per layout: identity where allowed, stride 2 and groups where allowed."""
    makers: dict[str, Callable[[], list[nn.Module]]] = {
        "yolov7_repconv": lambda: [
            YoloV7RepConv(w, w),
            YoloV7RepConv(w, 2 * w, 3, 2),
            YoloV7RepConv(2 * w, 2 * w, 3, 1, g=2),
        ],
        "yolov6_qarepvgg": lambda: [
            QARepVGGBlock(w, w),
            QARepVGGBlock(w, 2 * w, stride=2),
            QARepVGGBlock(2 * w, 2 * w, groups=2),
        ],
        "yolov6_qarepvgg_v2": lambda: [
            QARepVGGBlockV2(w, w),
            QARepVGGBlockV2(w, 2 * w, stride=2),
            QARepVGGBlockV2(2 * w, 2 * w, groups=2),
        ],
        "alpha_repvgg": lambda: [
            AlphaRepVGGBlock(w, w),
            AlphaRepVGGBlock(w, 2 * w, stride=2),
            AlphaRepVGGBlock(2 * w, 2 * w, groups=2),
        ],
        "rtdetr_repvgg": lambda: [RTDETRRepVggBlock(w, w), RTDETRRepVggBlock(w, 2 * w)],
        "mobileone": lambda: [
            MobileOneBlock(w, w, 3, 1, 1, groups=w, num_conv_branches=2),
            MobileOneBlock(w, w, 1, 1, 0, num_conv_branches=2),
            MobileOneBlock(w, w, 3, 2, 1, groups=w, num_conv_branches=2),
            MobileOneBlock(w, 2 * w, 1, 1, 0, num_conv_branches=2),
        ],
        "replknet": lambda: [
            ReparamLargeKernelConv(w, w, 13, 1, w, 5),
            nn.ReLU(),
            ReparamLargeKernelConv(w, w, 7, 2, w, 3),
            nn.ReLU(),
            ReparamLargeKernelConv(w, 2 * w, 5, 1, 1, 3),
            nn.ReLU(),
        ],
        "unireplknet": lambda: [
            DilatedReparamBlock(w, 7),
            nn.ReLU(),
            DilatedReparamBlock(w, 13),
            nn.ReLU(),
        ],
        "yolov10_repvggdw": lambda: [RepVGGDW(w), RepVGGDW(w)],
        "act_between": lambda: [ActBetweenBlock(w)],
        "mean_scaled": lambda: [MeanScaledBlock(w)],
        "input_gated": lambda: [InputGatedBlock(w)],
        "reflect_padded": lambda: [ReflectPaddedBlock(w)],
    }
    if layout not in makers:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(makers)}")
    return makers[layout]()


LAYOUTS = (
    "yolov7_repconv",
    "yolov6_qarepvgg",
    "yolov6_qarepvgg_v2",
    "alpha_repvgg",
    "rtdetr_repvgg",
    "mobileone",
    "replknet",
    "unireplknet",
    "yolov10_repvggdw",
)
# The pass expected to fuse each layout's blocks, and the conv it leaves: the repvgg rule knows
# yolov7's names and leaves its upstream deploy form; the others are the data-flow pass's.
FUSED_BY = {"yolov7_repconv": ("repvgg", "rbr_reparam")}
DEFAULT_FUSED_BY = ("dataflow", "reparam")


def fused_by(layout: str) -> tuple[str, str]:
    return FUSED_BY.get(layout, DEFAULT_FUSED_BY)


NEGATIVE_LAYOUTS = ("act_between", "mean_scaled", "input_gated", "reflect_padded")

# The block classes above: what the tests look for inside a built net.
BLOCK_TYPES = (
    YoloV7RepConv,
    QARepVGGBlock,
    AlphaRepVGGBlock,
    RTDETRRepVggBlock,
    MobileOneBlock,
    ReparamLargeKernelConv,
    DilatedReparamBlock,
    RepVGGDW,
)
NEGATIVE_TYPES = (ActBetweenBlock, MeanScaledBlock, InputGatedBlock, ReflectPaddedBlock)


class LayoutNet(nn.Module):
    """A conv-BN-ReLU stem, then the layout's blocks in `blocks`."""

    def __init__(self, layout: str, width: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*_blocks(layout, width))

    def forward(self, x):
        return self.blocks(self.stem(x))


def build(layout: str = "yolov7_repconv", width: int = 4, in_channels: int = 3) -> LayoutNet:
    """The net for `layout` (see LAYOUTS and NEGATIVE_LAYOUTS), in train form."""
    return LayoutNet(layout, width, in_channels)
