"""Test copies of re-parameterizable blocks from public codebases, WITHOUT their deploy methods.

Written for these tests from a reading of each project's public code: the child names, the
constructor arguments and the train-time forward follow upstream; every conversion method
(switch_to_deploy, reparameterize, fuse, merge_kernel, ...) is left out on purpose, so only the
generic data-flow fuser (issue 13) can fold them. `build` makes a small net per layout for the CLI:

    --arch tests/layouts.py:build --arch-kwargs '{"layout": "yolov7_repconv"}'

`NEGATIVE_LAYOUTS` are look-alikes that are NOT linear and must be left alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
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


# ---- ultralytics RepConv (ultralytics/ultralytics, nn/modules/conv.py) ---------------------------


class UltralyticsRepConv(nn.Module):
    """ultralytics `RepConv(c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False)`: `conv1` a 3x3
    `Conv` and `conv2` a 1x1 `Conv` (both act=False), `bn` an identity BN when bn=True, c1 == c2
    and s == 1 (else None); `act(conv1(x) + conv2(x) + id_out)`, SiLU by default."""

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, act=True, bn=False):
        super().__init__()
        assert k == 3 and p == 1
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = ultralytics_act(act)
        self.bn = nn.BatchNorm2d(c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = UltralyticsConv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = UltralyticsConv(c1, c2, 1, s, p=p - k // 2, g=g, act=False)

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


# ---- super-gradients QARepVGGBlock (Deci-AI/super-gradients, modules/qarepvgg_block.py) ---------


class Residual(nn.Module):
    """super-gradients `Residual`: returns its input (a marker for the identity branch)."""

    def forward(self, x):
        return x


class SGQARepVGGBlock(nn.Module):
    """super-gradients `QARepVGGBlock(in, out, stride=1, dilation=1, groups=1, ...,
    use_residual_connection=True, use_alpha=False, use_1x1_bias=True, use_post_bn=True)` (the
    YOLO-NAS block): `branch_3x3` conv-BN (padding = dilation), `branch_1x1` conv with a bias,
    `identity` a `Residual` (or None), `alpha` a [1] parameter or the float 1.0, `post_bn` a BN
    (or Identity) after the sum, then `nonlinearity` and `se`. Upstream also builds the
    `rbr_reparam` conv in __init__ (a placeholder its fusion methods fill; the train forward never
    calls it) and the non-persistent `id_tensor` buffer: both kept here."""

    def __init__(
        self, in_channels, out_channels, stride=1, dilation=1, groups=1,
        use_residual_connection=True, use_alpha=False, use_1x1_bias=True, use_post_bn=True,
    ):  # fmt: skip
        super().__init__()
        self.groups, self.in_channels, self.out_channels = groups, in_channels, out_channels
        self.stride, self.dilation = stride, dilation
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.branch_3x3 = nn.Sequential()
        self.branch_3x3.add_module(
            "conv",
            nn.Conv2d(in_channels, out_channels, 3, stride, dilation, dilation, groups, bias=False),
        )
        self.branch_3x3.add_module("bn", nn.BatchNorm2d(out_channels))
        self.branch_1x1 = nn.Conv2d(
            in_channels, out_channels, 1, stride, 0, groups=groups, bias=use_1x1_bias
        )
        if use_residual_connection:
            assert out_channels == in_channels and stride == 1
            self.identity = Residual()
            per_group = in_channels // groups
            id_tensor = torch.zeros(in_channels, per_group, 3, 3)
            for i in range(in_channels):
                id_tensor[i, i % per_group, 1, 1] = 1.0
            self.register_buffer("id_tensor", id_tensor, persistent=False)
        else:
            self.identity = None
        self.alpha = nn.Parameter(torch.tensor([1.0])) if use_alpha else 1.0
        self.post_bn = nn.BatchNorm2d(out_channels) if use_post_bn else nn.Identity()
        self.rbr_reparam = nn.Conv2d(
            in_channels, out_channels, 3, stride, dilation, dilation, groups, bias=True
        )
        self.partially_fused = False
        self.fully_fused = False

    def forward(self, inputs):
        if self.fully_fused:
            return self.se(self.nonlinearity(self.rbr_reparam(inputs)))
        if self.partially_fused:
            return self.se(self.nonlinearity(self.post_bn(self.rbr_reparam(inputs))))
        id_out = 0.0 if self.identity is None else self.identity(inputs)
        x_3x3 = self.branch_3x3(inputs)
        x_1x1 = self.alpha * self.branch_1x1(inputs)
        branches = x_3x3 + x_1x1 + id_out
        return self.se(self.nonlinearity(self.post_bn(branches)))


# ---- RepGhost (ChengpengChen/RepGhost, model/repghost.py) ---------------------------------------


class RepGhostModule(nn.Module):
    """RepGhost `RepGhostModule(inp, oup, kernel_size=1, dw_size=3, stride=1, relu=True,
    reparam_bn=True, reparam_identity=False)`: `primary_conv` (conv, BN, ReLU or an empty
    Sequential), `cheap_operation` (depthwise conv, BN) whose output gains `bn(conv(x1))` for
    each pair of `fusion_conv` / `fusion_bn` (nn.Sequential of Identity / BN, plus Identity /
    Identity for reparam_identity), then `relu` (ReLU or an empty Sequential)."""

    def __init__(
        self, inp, oup, kernel_size=1, dw_size=3, stride=1, relu=True, reparam_bn=True,
        reparam_identity=False,
    ):  # fmt: skip
        super().__init__()
        init_channels = new_channels = oup
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        fusion_conv, fusion_bn = [], []
        if reparam_bn:
            fusion_conv.append(nn.Identity())
            fusion_bn.append(nn.BatchNorm2d(init_channels))
        if reparam_identity:
            fusion_conv.append(nn.Identity())
            fusion_bn.append(nn.Identity())
        self.fusion_conv = nn.Sequential(*fusion_conv)
        self.fusion_bn = nn.Sequential(*fusion_bn)
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(
                init_channels,
                new_channels,
                dw_size,
                1,
                dw_size // 2,
                groups=init_channels,
                bias=False,
            ),
            nn.BatchNorm2d(new_channels),
        )
        self.relu = nn.ReLU(inplace=False) if relu else nn.Sequential()

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)


# ---- OREPA (JUGGHM/OREPA_CVPR2022, blocks.py) ---------------------------------------------------


class OREPA(nn.Module):
    """OREPA `OREPA(in, out, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    internal_channels_1x1_3x3=None, nonlinear=None)`: no conv modules; `weight_gen()` builds one
    kernel from six parameter branches, each scaled per output channel by a row of `vector`
    (origin kxk; 1x1 times the avg prior `weight_orepa_avg_avg`; 1x1 times the frequency prior
    `weight_orepa_prior`; identity-based 1x1 (`weight_orepa_1x1_kxk_idconv1` + `id_tensor`) times
    kxk; 1x1 padded to kxk; depthwise times pointwise), combined with einsum and summed; the
    forward runs F.conv2d with it, then `bn`, then `nonlinear`. All six branches are kept.

    Upstream reads sizes with `t, ig = w.size()`, which torch.fx cannot unpack; this copy takes
    the same sizes from the constructor's arguments (the arithmetic is unchanged)."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
        internal_channels_1x1_3x3=None, nonlinear=None,
    ):  # fmt: skip
        super().__init__()
        assert padding == kernel_size // 2
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size, self.in_channels, self.out_channels = (
            kernel_size,
            in_channels,
            out_channels,
        )
        self.groups, self.stride, self.padding, self.dilation = groups, stride, padding, dilation
        per_group = in_channels // groups
        self.weight_orepa_origin = _kaiming(out_channels, per_group, kernel_size, kernel_size)
        self.weight_orepa_avg_conv = _kaiming(out_channels, per_group, 1, 1)
        self.weight_orepa_pfir_conv = _kaiming(out_channels, per_group, 1, 1)
        avg = torch.ones(kernel_size, kernel_size) / kernel_size / kernel_size
        self.register_buffer("weight_orepa_avg_avg", avg)
        self.weight_orepa_1x1 = _kaiming(out_channels, per_group, 1, 1)
        if internal_channels_1x1_3x3 is None:
            internal_channels_1x1_3x3 = in_channels if groups <= 4 else 2 * in_channels
        self.internal_channels = internal_channels_1x1_3x3
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(
            torch.zeros(internal_channels_1x1_3x3, per_group, 1, 1)
        )
        id_tensor = torch.zeros(internal_channels_1x1_3x3, per_group, 1, 1)
        for i in range(internal_channels_1x1_3x3):
            id_tensor[i, i % per_group, 0, 0] = 1.0
        self.register_buffer("id_tensor", id_tensor)
        self.weight_orepa_1x1_kxk_conv2 = _kaiming(
            out_channels, internal_channels_1x1_3x3 // groups, kernel_size, kernel_size
        )
        expand_ratio = 8
        self.weight_orepa_gconv_dw = _kaiming(
            in_channels * expand_ratio, 1, kernel_size, kernel_size
        )
        self.weight_orepa_gconv_pw = _kaiming(
            out_channels, in_channels * expand_ratio // groups, 1, 1
        )
        self.vector = nn.Parameter(torch.empty(6, out_channels))
        self.bn = nn.BatchNorm2d(out_channels)
        self.register_buffer("weight_orepa_prior", _frequency_prior(out_channels, kernel_size))
        with torch.no_grad():  # upstream's initial branch scales: origin, avg, prior, ...
            for row, scale in enumerate((0.25, 0.25, 0.0, 0.5, 1.0, 0.5)):
                self.vector[row].fill_(scale)

    def weight_gen(self):
        origin = torch.einsum("oihw,o->oihw", self.weight_orepa_origin, self.vector[0, :])
        avg_conv = self.weight_orepa_avg_conv.squeeze(3).squeeze(2)
        avg = torch.einsum("oi,hw->oihw", avg_conv, self.weight_orepa_avg_avg)
        avg = torch.einsum("oihw,o->oihw", avg, self.vector[1, :])
        pfir_conv = self.weight_orepa_pfir_conv.squeeze(3).squeeze(2)
        pfir = torch.einsum("oi,ohw->oihw", pfir_conv, self.weight_orepa_prior)
        pfir = torch.einsum("oihw,o->oihw", pfir, self.vector[2, :])
        conv1 = (self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor).squeeze(3).squeeze(2)
        one_kxk = self._1x1_kxk(conv1, self.weight_orepa_1x1_kxk_conv2)
        one_kxk = torch.einsum("oihw,o->oihw", one_kxk, self.vector[3, :])
        pad = (self.kernel_size - 1) // 2  # upstream's transVI_multiscale
        one = F.pad(self.weight_orepa_1x1, [pad, pad, pad, pad])
        one = torch.einsum("oihw,o->oihw", one, self.vector[4, :])
        gconv = self._dwsc2full(self.weight_orepa_gconv_dw, self.weight_orepa_gconv_pw)
        gconv = torch.einsum("oihw,o->oihw", gconv, self.vector[5, :])
        return origin + avg + one + one_kxk + pfir + gconv

    def _1x1_kxk(self, conv1, conv2):
        g, k = self.groups, self.kernel_size
        if g == 1:
            return torch.einsum("ti,othw->oihw", conv1, conv2)
        t, ig, o = self.internal_channels, self.in_channels // g, self.out_channels
        conv1 = conv1.view(g, t // g, ig)
        conv2 = conv2.view(g, o // g, t // g, k, k)
        return torch.einsum("gti,gothw->goihw", conv1, conv2).reshape(o, ig, k, k)

    def _dwsc2full(self, weight_dw, weight_pw):
        # upstream's dwsc2full(weight_dw, weight_pw, groups=in_channels, groups_conv=groups)
        groups, groups_conv, k = self.in_channels, self.groups, self.kernel_size
        t, ig, o = self.in_channels * 8, 1, self.out_channels
        tg, i = t // groups, ig * groups
        groups_gc = groups // groups_conv
        weight_dw = weight_dw.view(groups_conv, groups_gc, tg, ig, k, k)
        weight_pw = weight_pw.squeeze().view(o // groups_conv, groups_conv, groups_gc, tg)
        weight_dsc = torch.einsum("cgtihw,ocgt->cogihw", weight_dw, weight_pw)
        return weight_dsc.reshape(o, i // groups_conv, k, k)

    def forward(self, inputs):
        weight = self.weight_gen()
        out = F.conv2d(
            inputs, weight, bias=None, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups,
        )  # fmt: skip
        return self.nonlinear(self.bn(out))


def _kaiming(*shape: int) -> nn.Parameter:
    weight = nn.Parameter(torch.empty(*shape))
    nn.init.kaiming_uniform_(weight, a=0.0)
    return weight


def _frequency_prior(channels: int, k: int) -> torch.Tensor:
    """OREPA's `fre_init`: cosines along h for the first half of the channels, along w after."""
    prior = torch.zeros(channels, k, k)
    half = channels / 2
    for i in range(channels):
        for h in range(k):
            for w in range(k):
                if i < half:
                    prior[i, h, w] = math.cos(math.pi * (h + 0.5) * (i + 1) / 3)
                else:
                    prior[i, h, w] = math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3)
    return prior


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


def _scaled_branches(block: OREPA) -> OREPA:
    """Upstream starts the prior branch at scale 0: random scales make every branch count."""
    with torch.no_grad():
        block.vector.uniform_(0.2, 1.0)
    return block


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
        "ultralytics_repconv": lambda: [
            UltralyticsRepConv(w, w, bn=True),
            UltralyticsRepConv(w, 2 * w, s=2, bn=True),  # no identity at stride 2
            UltralyticsRepConv(2 * w, 2 * w, g=2),
        ],
        "sg_qarepvgg": lambda: [
            SGQARepVGGBlock(w, w),
            SGQARepVGGBlock(w, 2 * w, stride=2, use_residual_connection=False, use_alpha=True),
            SGQARepVGGBlock(2 * w, 2 * w, groups=2, use_alpha=True, use_1x1_bias=False),
            SGQARepVGGBlock(2 * w, 2 * w, dilation=2, use_post_bn=False),
        ],
        "repghost": lambda: [
            RepGhostModule(w, w),
            RepGhostModule(w, 2 * w, stride=2, reparam_identity=True),
            RepGhostModule(2 * w, 2 * w, relu=False),
        ],
        "orepa": lambda: [
            _scaled_branches(OREPA(w, w, 3, 1, 1, nonlinear=nn.ReLU())),
            _scaled_branches(OREPA(w, 2 * w, 3, 2, 1, nonlinear=nn.ReLU())),
            _scaled_branches(OREPA(2 * w, 2 * w, 3, 1, 1, groups=2, nonlinear=nn.ReLU())),
        ],
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
    "ultralytics_repconv",
    "sg_qarepvgg",
    "repghost",
    "orepa",
)
# The pass expected to fuse each layout's blocks, and the conv it leaves: the repvgg rule knows
# yolov7's names and leaves its upstream deploy form; the others are the data-flow pass's.
# RepGhost's fused kernel has its depthwise conv's shape, so that conv is kept with the fold.
FUSED_BY = {
    "yolov7_repconv": ("repvgg", "rbr_reparam"),
    # a new name: the class's own forward, its norms as Identity, would add the fusion branch
    # again to a fold kept in `cheap_operation.0` (a name that would lie)
    "repghost": ("dataflow", "reparam"),
    # the fold goes into the deploy conv super-gradients builds in __init__ and the train
    # forward never calls, so the block ends with upstream's deploy keys
    "sg_qarepvgg": ("dataflow", "rbr_reparam"),
}
# Convs a fused block keeps besides its fused one: RepGhost's primary conv (a conv -> BN before a
# ReLU, the conv -> BN pass's).
KEPT_CONVS = {"repghost": ("primary_conv.0",)}
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
    UltralyticsRepConv,
    SGQARepVGGBlock,
    RepGhostModule,
    OREPA,
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
