"""Train/deploy pairs of public re-parameterizable blocks, for `--deploy-arch` (issue 14).

Written for these tests from a reading of each project's public code (child names, the deploy-mode
constructor flag and the fused conv's attribute follow upstream). Each pair is one `build` call
with `deploy` false (train form) or true (the form the user deploys):

    --arch tests/deploy_layouts.py:build --arch-kwargs '{"layout": "mobileone", "deploy": false}'
    --deploy-arch tests/deploy_layouts.py:build --deploy-arch-kwargs '{"layout": "mobileone",
        "deploy": true}'

The train forms are the copies in tests/layouts.py (and repconv's zoo RepVGGBlock), subclassed to
take the deploy flag; in deploy form the train children are not built.
"""

from __future__ import annotations

from collections.abc import Callable

import layouts as L
import torch
from torch import nn

from repconv.zoo.blocks import RepVGGBlock


def fused_conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1):
    """The conv a deploy form holds in place of its branches: a stock conv with a bias."""
    return nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=True)


def drop_children(module: nn.Module, *names: str) -> None:
    for name in names:
        if hasattr(module, name):
            delattr(module, name)


# ---- yolov7 RepConv(..., deploy=True): `rbr_reparam` (WongKinYiu/yolov7, models/common.py) ------


class YoloV7RepConv(L.YoloV7RepConv):
    """Upstream's deploy constructor builds only `rbr_reparam` (bias=True, autopad padding);
    the forward (inherited) runs it when present."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, act=True, deploy: bool = False):
        super().__init__(c1, c2, k, s, p, g, act)
        self.deploy = deploy
        if deploy:
            drop_children(self, "rbr_identity", "rbr_dense", "rbr_1x1")
            self.rbr_reparam = fused_conv(c1, c2, k, s, L.autopad(k, p), g)


# ---- MobileOne(inference_mode=True): `reparam_conv` (apple/ml-mobileone, mobileone.py) -----------


class MobileOneBlock(L.MobileOneBlock):
    """With `inference_mode=True` upstream builds only `reparam_conv` and its forward returns
    activation(se(reparam_conv(x)))."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
        num_conv_branches=1, inference_mode: bool = False,
    ):  # fmt: skip
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, groups, num_conv_branches
        )
        self.inference_mode = inference_mode
        if inference_mode:
            drop_children(self, "rbr_skip", "rbr_conv", "rbr_scale")
            self.reparam_conv = fused_conv(
                in_channels, out_channels, kernel_size, stride, padding, groups
            )

    def forward(self, x):
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        return super().forward(x)


# ---- RepLKNet(small_kernel_merged=True): `lkb_reparam` (DingXiaoH/RepLKNet-pytorch) --------------


class ReparamLargeKernelConv(L.ReparamLargeKernelConv):
    """With `small_kernel_merged=True` upstream builds `lkb_reparam` (padding kernel_size // 2,
    bias=True) and its forward runs only that when present."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride, groups, small_kernel,
        small_kernel_merged: bool = False,
    ):  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, stride, groups, small_kernel)
        if small_kernel_merged:
            drop_children(self, "lkb_origin", "small_conv")
            self.lkb_reparam = fused_conv(
                in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups
            )

    def forward(self, inputs):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(inputs)
        return super().forward(inputs)


# ---- RT-DETR RepVggBlock after convert_to_deploy: `conv` added, `conv1`/`conv2` kept -------------


class RTDETRRepVggBlock(L.RTDETRRepVggBlock):
    """Upstream's convert_to_deploy adds `conv = nn.Conv2d(ch_in, ch_out, 3, 1, padding=1)`
    (bias by default) and leaves its `__delattr__('conv1')` / `('conv2')` commented out, so the
    deploy model keeps both dead branches; the forward runs `conv` when present."""

    def __init__(self, ch_in, ch_out, act: nn.Module | None = None, deploy: bool = False):
        super().__init__(ch_in, ch_out, act)
        if deploy:
            self.conv = nn.Conv2d(ch_in, ch_out, 3, 1, padding=1)

    def forward(self, x):
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return super().forward(x)


# ---- RepGhost-style ghost module: `cheap_operation` Sequential collapses to a bare conv ----------


class RepGhostModule(nn.Module):
    """RepGhost's module without its BN re-param branch (ChengpengChen/RepGhost, repghost.py,
    reparam_bn off): `primary_conv` Sequential(conv, BN, ReLU) and `cheap_operation`
    Sequential(depthwise conv, BN), then ReLU. Upstream's switch_to_deploy replaces
    `cheap_operation` by a bare conv with a bias (key `cheap_operation.0.weight` becomes
    `cheap_operation.weight`); this deploy form also holds `primary_conv`'s conv with a bias
    and no BN (upstream keeps that BN unfused: see NOTES in tests/test_deploy_arch.py)."""

    def __init__(self, inp: int, oup: int, kernel_size=1, dw_size=3, stride=1, deploy=False):
        super().__init__()
        self.deploy = deploy
        primary = nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=deploy)
        norm = nn.Identity() if deploy else nn.BatchNorm2d(oup)
        self.primary_conv = nn.Sequential(primary, norm, nn.ReLU())
        cheap = nn.Conv2d(oup, oup, dw_size, 1, dw_size // 2, groups=oup, bias=deploy)
        self.cheap_operation = cheap if deploy else nn.Sequential(cheap, nn.BatchNorm2d(oup))
        self.relu = nn.ReLU()

    def forward(self, x):
        x1 = self.primary_conv(x)
        return self.relu(self.cheap_operation(x1))


# ---- YOLOv6 QARepVGGBlock with a deploy form holding `rbr_reparam` (meituan/YOLOv6) -------------


class QARepVGGBlock(L.QARepVGGBlock):
    """Fully fused deploy form: `rbr_reparam` (bias=True), then se and the non-linearity.

    Upstream's own deploy form keeps the post-sum `bn` live after `rbr_reparam` (its forward is
    nonlinearity(bn(se(rbr_reparam(x))))); `keep_bn=True` builds that one, which the conversion
    fills by keeping that `bn` out of the fold (the deploy model decides)."""

    TRAIN_BRANCHES = ("rbr_dense", "rbr_1x1", "rbr_identity")

    def __init__(
        self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, groups=1,
        deploy: bool = False, keep_bn: bool = False,
    ):  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.deploy = deploy
        if deploy:
            drop_children(self, *self.TRAIN_BRANCHES)
            if not keep_bn:
                drop_children(self, "bn")
            self.rbr_reparam = fused_conv(
                in_channels, out_channels, kernel_size, stride, padding, groups
            )

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            out = self.se(self.rbr_reparam(inputs))
            return self.nonlinearity(self.bn(out) if hasattr(self, "bn") else out)
        return super().forward(inputs)


# ---- YOLOv6 QARepVGGBlockV2: `rbr_reparam` (meituan/YOLOv6, yolov6/layers/common.py) -----------


class QARepVGGBlockV2(QARepVGGBlock, L.QARepVGGBlockV2):
    """Fully fused deploy form: `rbr_reparam` (bias=True), then se and the non-linearity.

    Upstream's `deploy=True` constructor (RepVGGBlock's) builds only `rbr_reparam`, but its
    forward still calls `bn`, which only `switch_to_deploy` leaves behind (live, "keep post bn
    for QAT"), as in QARepVGGBlock; `keep_bn=True` builds that form (filled as V1's). The
    train form (V2's, by the method order) also has the avg-pool branch to drop."""

    TRAIN_BRANCHES = (*QARepVGGBlock.TRAIN_BRANCHES, "rbr_avg")


# ---- mmyolo RepVGGBlock(use_alpha=True, deploy=True): `rbr_reparam`, `alpha` kept dead ---------


class AlphaRepVGGBlock(L.AlphaRepVGGBlock):
    """mmyolo builds `alpha` before its `if deploy:` and `rbr_reparam` (bias=True) in it; the
    deploy forward is nonlinearity(se(rbr_reparam(x))), so `alpha` stays as a dead parameter."""

    def __init__(
        self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, groups=1,
        deploy: bool = False,
    ):  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.deploy = deploy
        if deploy:
            drop_children(self, "rbr_identity", "rbr_dense", "rbr_1x1")
            self.rbr_reparam = fused_conv(
                in_channels, out_channels, kernel_size, stride, padding, groups
            )

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        return super().forward(inputs)


# ---- UniRepLKNet DilatedReparamBlock(deploy=True): `lk_origin` with a bias (AILab-CVC) -----------


class DilatedReparamBlock(L.DilatedReparamBlock):
    """Upstream builds `lk_origin` with `bias=deploy` and the BNs and dilated branches only when
    not deploy; its forward returns lk_origin(x) when `origin_bn` is absent. The fused conv
    keeps the train conv's name: `lk_origin.weight` is in the checkpoint, unfused."""

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False):
        super().__init__(channels, kernel_size)
        if deploy:
            drop_children(self, "origin_bn")
            for k, r in zip(self.kernel_sizes, self.dilates):
                drop_children(self, f"dil_conv_k{k}_{r}", f"dil_bn_k{k}_{r}")
            self.lk_origin = fused_conv(
                channels, channels, kernel_size, 1, kernel_size // 2, channels
            )

    def forward(self, x):
        if not hasattr(self, "origin_bn"):
            return self.lk_origin(x)
        return super().forward(x)


# ---- YOLOv10 RepVGGDW after fuse(): `conv` becomes a bare conv (ultralytics) --------------------


class RepVGGDW(L.RepVGGDW):
    """Upstream has no deploy flag: `fuse()` sets `self.conv = fuse_conv_and_bn(conv.conv,
    conv.bn)` (a bare nn.Conv2d with a bias: the `Conv` wrapper and its `bn` are gone, key
    `conv.conv.weight` becomes `conv.weight`), deletes `conv1`, and `forward_fuse` is
    act(conv(x)). `deploy=True` builds that form."""

    def __init__(self, ed: int, deploy: bool = False):
        super().__init__(ed)
        self.deploy = deploy
        if deploy:
            drop_children(self, "conv1")
            self.conv = fused_conv(ed, ed, 7, 1, 3, ed)

    def forward(self, x):
        if self.deploy:
            return self.act(self.conv(x))
        return super().forward(x)


# ---- deploy forms that do NOT fit (error paths) --------------------------------------------------


class RepVGGWithExtra(RepVGGBlock):
    """RepVGG whose deploy form holds a tensor no train model has (`extra_scale`)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, deploy: bool = False):
        super().__init__(cin, cout, 3, stride, 1, deploy=deploy)
        if deploy:
            self.extra_scale = nn.Parameter(torch.ones(cout))


class TwoCandidates(L.QARepVGGBlock):
    """Deploy form with two same-shape convs (`fused_a`, `fused_b`): which one gets the fused
    kernel is ambiguous."""

    def __init__(self, c: int, deploy: bool = False):
        super().__init__(c, c)
        if deploy:
            drop_children(self, "rbr_dense", "rbr_1x1", "rbr_identity", "bn")
            self.fused_a = fused_conv(c, c, 3, 1, 1)
            self.fused_b = fused_conv(c, c, 3, 1, 1)

    def forward(self, inputs):
        if hasattr(self, "fused_a"):
            return self.nonlinearity(self.fused_a(inputs) + self.fused_b(inputs))
        return super().forward(inputs)


# ---- nets ----------------------------------------------------------------------------------------


def _blocks(layout: str, w: int, deploy: bool) -> list[nn.Module]:
    """A few blocks per layout: identity where allowed, stride 2 and groups where allowed."""
    d = deploy
    makers: dict[str, Callable[[], list[nn.Module]]] = {
        "repvgg": lambda: [
            RepVGGBlock(w, w, deploy=d),
            RepVGGBlock(w, 2 * w, stride=2, deploy=d),
            RepVGGBlock(2 * w, 2 * w, groups=2, deploy=d),
        ],
        "yolov7_repconv": lambda: [
            YoloV7RepConv(w, w, deploy=d),
            YoloV7RepConv(w, 2 * w, 3, 2, deploy=d),
            YoloV7RepConv(2 * w, 2 * w, 3, 1, g=2, deploy=d),
        ],
        "mobileone": lambda: [
            MobileOneBlock(w, w, 3, 1, 1, groups=w, num_conv_branches=2, inference_mode=d),
            MobileOneBlock(w, w, 1, 1, 0, num_conv_branches=2, inference_mode=d),
            MobileOneBlock(w, 2 * w, 3, 2, 1, num_conv_branches=2, inference_mode=d),
        ],
        "replknet": lambda: [
            ReparamLargeKernelConv(w, w, 7, 1, w, 3, small_kernel_merged=d),
            nn.ReLU(),
            ReparamLargeKernelConv(w, 2 * w, 5, 2, 1, 3, small_kernel_merged=d),
            nn.ReLU(),
        ],
        "rtdetr_repvgg": lambda: [
            RTDETRRepVggBlock(w, w, deploy=d),
            RTDETRRepVggBlock(w, 2 * w, deploy=d),
        ],
        "repghost": lambda: [
            RepGhostModule(w, w, deploy=d),
            RepGhostModule(w, 2 * w, stride=2, deploy=d),
        ],
        "yolov6_qarepvgg": lambda: [
            QARepVGGBlock(w, w, deploy=d),
            QARepVGGBlock(w, 2 * w, stride=2, deploy=d),
            QARepVGGBlock(2 * w, 2 * w, groups=2, deploy=d),
        ],
        "yolov6_qarepvgg_v2": lambda: [
            QARepVGGBlockV2(w, w, deploy=d),
            QARepVGGBlockV2(w, 2 * w, stride=2, deploy=d),
            QARepVGGBlockV2(2 * w, 2 * w, groups=2, deploy=d),
        ],
        "alpha_repvgg": lambda: [
            AlphaRepVGGBlock(w, w, deploy=d),
            AlphaRepVGGBlock(w, 2 * w, stride=2, deploy=d),
            AlphaRepVGGBlock(2 * w, 2 * w, groups=2, deploy=d),
        ],
        "unireplknet": lambda: [
            DilatedReparamBlock(w, 7, deploy=d),
            nn.ReLU(),
            DilatedReparamBlock(w, 5, deploy=d),
            nn.ReLU(),
        ],
        "yolov10_repvggdw": lambda: [RepVGGDW(w, deploy=d), RepVGGDW(w, deploy=d)],
        "yolov6_live_bn": lambda: [
            QARepVGGBlock(w, w, deploy=d, keep_bn=True),
            QARepVGGBlock(w, 2 * w, stride=2, deploy=d, keep_bn=True),
        ],
        "yolov6_v2_live_bn": lambda: [
            QARepVGGBlockV2(w, w, deploy=d, keep_bn=True),
            QARepVGGBlockV2(w, 2 * w, stride=2, deploy=d, keep_bn=True),
        ],
        # Error paths: these deploy forms do not fit their train form.
        "repvgg_extra": lambda: [RepVGGWithExtra(w, w, deploy=d)],
        "two_candidates": lambda: [TwoCandidates(w, deploy=d)],
    }
    if layout not in makers:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(makers)}")
    return makers[layout]()


# Pairs whose deploy form fits the train form (the conversion must fill it).
PAIRS = (
    "repvgg",
    "yolov7_repconv",
    "mobileone",
    "replknet",
    "rtdetr_repvgg",
    "repghost",
    "yolov6_qarepvgg",
    "yolov6_qarepvgg_v2",
    # Upstream's own deploy forms: the post-sum `bn` stays live after `rbr_reparam`, so the
    # conversion must keep it out of the fold.
    "yolov6_live_bn",
    "yolov6_v2_live_bn",
    "alpha_repvgg",
    "yolov10_repvggdw",
    # Its deploy form keeps the train conv's name `lk_origin` for the fused conv (with a bias).
    "unireplknet",
)
# The train modules each pair's deploy form keeps live (kept out of the fold), spelled out.
LIVE = {
    "yolov6_live_bn": ("blocks.0.bn", "blocks.1.bn"),
    "yolov6_v2_live_bn": ("blocks.0.bn", "blocks.1.bn"),
}
# Each pair's fused conv attribute in deploy form (the name to find).
DEPLOY_CONV = {
    "repvgg": "rbr_reparam",
    "yolov7_repconv": "rbr_reparam",
    "mobileone": "reparam_conv",
    "replknet": "lkb_reparam",
    "rtdetr_repvgg": "conv",
    "repghost": "cheap_operation",
    "yolov6_qarepvgg": "rbr_reparam",
    "yolov6_qarepvgg_v2": "rbr_reparam",
    "yolov6_live_bn": "rbr_reparam",
    "yolov6_v2_live_bn": "rbr_reparam",
    "alpha_repvgg": "rbr_reparam",
    "unireplknet": "lk_origin",
    "yolov10_repvggdw": "conv",
}
BLOCK_TYPES = (
    RepVGGBlock,
    YoloV7RepConv,
    MobileOneBlock,
    ReparamLargeKernelConv,
    RTDETRRepVggBlock,
    RepGhostModule,
    QARepVGGBlock,
    QARepVGGBlockV2,
    AlphaRepVGGBlock,
    DilatedReparamBlock,
    RepVGGDW,
)


class DeployPairNet(nn.Module):
    """A conv-BN-ReLU stem (a conv with a bias in deploy form), then the layout's blocks."""

    def __init__(self, layout: str, width: int, in_channels: int, deploy: bool):
        super().__init__()
        stem_conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=deploy)
        norm = nn.Identity() if deploy else nn.BatchNorm2d(width)
        self.stem = nn.Sequential(stem_conv, norm, nn.ReLU())
        self.blocks = nn.Sequential(*_blocks(layout, width, deploy))

    def forward(self, x):
        return self.blocks(self.stem(x))


def build(
    layout: str = "repvgg", deploy: bool = False, width: int = 4, in_channels: int = 3
) -> DeployPairNet:
    """The net for `layout` (PAIRS, or an error-path layout) in train or deploy form."""
    return DeployPairNet(layout, width, in_channels, deploy)
