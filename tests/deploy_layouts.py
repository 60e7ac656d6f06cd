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


# ---- RepGhost RepGhostModule(deploy=True) (ChengpengChen/RepGhost, model/repghost.py) -----------


class RepGhostModule(L.RepGhostModule):
    """Upstream's `deploy=True` constructor builds `primary_conv` as in training (conv without a
    bias, BN, ReLU: the BN stays live), no `fusion_conv` / `fusion_bn` branches (empty
    Sequentials), and `cheap_operation` as a bare depthwise conv with a bias (key
    `cheap_operation.0.weight` becomes `cheap_operation.weight`). The forward is inherited: the
    loop over the empty fusion branches adds nothing."""

    def __init__(self, inp: int, oup: int, kernel_size=1, dw_size=3, stride=1, deploy=False):
        super().__init__(inp, oup, kernel_size, dw_size, stride)
        self.deploy = deploy
        if deploy:
            self.fusion_conv, self.fusion_bn = nn.Sequential(), nn.Sequential()
            self.cheap_operation = fused_conv(oup, oup, dw_size, 1, dw_size // 2, oup)


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


# ---- yolov7 model with deploy=True: its `Conv` units stay live (WongKinYiu/yolov7) -------------


class YoloV7Conv(L.UltralyticsConv):
    """yolov7 `Conv(c1, c2, k=1, s=1, p=None, g=1, act=True)`: children `conv` (no bias), `bn`,
    `act`; forward act(bn(conv(x))). It has no deploy flag: a model built with `deploy=True`
    holds it as in training (only `model.fuse()` switches it to `fuseforward`), BN live."""


# ---- RT-DETR CSPRepLayer after convert_to_deploy (rtdetr_pytorch/src/zoo/rtdetr) ----------------


class ConvNormLayer(L.ConvNormLayer):
    """RT-DETR's `ConvNormLayer`: no deploy form at all, so conv + `norm` stay live."""


class CSPRepLayer(nn.Module):
    """RT-DETR `CSPRepLayer(in_channels, out_channels, num_blocks=3, expansion=1.0, bias=None,
    act="silu")`: `conv1`, `conv2` 1x1 ConvNormLayers with the activation, `bottlenecks` a
    Sequential of RepVggBlocks, `conv3` a 1x1 ConvNormLayer when the hidden width differs from
    the output (else Identity); forward conv3(bottlenecks(conv1(x)) + conv2(x)). Only the
    RepVggBlocks convert (`convert_to_deploy`, which keeps their dead `conv1`/`conv2`): the
    deploy model's ConvNormLayers are the train ones, live. Activations are SiLU modules here
    (upstream builds them from the name)."""

    def __init__(self, cin: int, cout: int, num_blocks: int = 3, expansion=1.0, deploy=False):
        super().__init__()
        hidden = int(cout * expansion)
        self.conv1 = ConvNormLayer(cin, hidden, 1, 1, act=nn.SiLU())
        self.conv2 = ConvNormLayer(cin, hidden, 1, 1, act=nn.SiLU())
        self.bottlenecks = nn.Sequential(
            *[RTDETRRepVggBlock(hidden, hidden, nn.SiLU(), deploy) for _ in range(num_blocks)]
        )
        same = hidden == cout
        self.conv3 = nn.Identity() if same else ConvNormLayer(hidden, cout, 1, 1, act=nn.SiLU())

    def forward(self, x):
        x_1 = self.bottlenecks(self.conv1(x))
        return self.conv3(x_1 + self.conv2(x))


# ---- MobileOne with use_se=True: the SE block stays live (apple/ml-mobileone) -------------------


class SEBlock(nn.Module):
    """apple `SEBlock(in_channels, rd_ratio=0.0625)`: `reduce` and `expand` 1x1 convs with a
    bias; the pool's kernel is the input's size, read in the forward (`b, c, h, w =
    inputs.size()`, `F.avg_pool2d(inputs, kernel_size=[h, w])`), then relu, sigmoid and
    `x.view(-1, c, 1, 1)` gating the input. Built the same in both forms."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625):
        super().__init__()
        reduced = int(in_channels * rd_ratio)
        self.reduce = nn.Conv2d(in_channels, reduced, 1, 1, bias=True)
        self.expand = nn.Conv2d(reduced, in_channels, 1, 1, bias=True)

    def forward(self, inputs):
        _b, c, h, w = inputs.size()
        x = torch.nn.functional.avg_pool2d(inputs, kernel_size=[h, w])
        x = torch.sigmoid(self.expand(torch.relu(self.reduce(x))))
        return inputs * x.view(-1, c, 1, 1)


class MobileOneSEBlock(MobileOneBlock):
    """`MobileOneBlock(..., use_se=True)`: `se` an SEBlock after the branch sum (train) or after
    `reparam_conv` (inference_mode), before the activation."""

    def __init__(self, *args, inference_mode: bool = False, **kwargs):
        super().__init__(*args, inference_mode=inference_mode, **kwargs)
        self.se = SEBlock(self.out_channels)


# ---- RepLKNet model (DingXiaoH/RepLKNet-pytorch, replknet.py) --------------------------------


def conv_bn_relu(cin: int, cout: int, k: int, stride: int, padding: int, groups: int = 1):
    """RepLKNet's `conv_bn_relu`: an nn.Sequential with children `conv`, `bn`, `nonlinear`."""
    unit = L.conv_bn_seq(cin, cout, k, stride, padding, groups)
    unit.add_module("nonlinear", nn.ReLU())
    return unit


class RepLKBlock(nn.Module):
    """`RepLKBlock(in, dw, block_lk_size, small_kernel, drop_path, small_kernel_merged)`:
    x + drop_path(pw2(lk_nonlinear(large_kernel(pw1(prelkb_bn(x)))))); `prelkb_bn` a BN live
    before the 1x1 `pw1` in both forms (drop_path: identity in eval)."""

    def __init__(self, channels: int, lk: int, small: int, merged: bool):
        super().__init__()
        self.pw1 = conv_bn_relu(channels, channels, 1, 1, 0)
        self.pw2 = L.conv_bn_seq(channels, channels, 1, 1, 0)
        self.large_kernel = ReparamLargeKernelConv(
            channels, channels, lk, 1, channels, small, small_kernel_merged=merged
        )
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(channels)
        self.drop_path = nn.Identity()

    def forward(self, x):
        out = self.pw1(self.prelkb_bn(x))
        out = self.pw2(self.lk_nonlinear(self.large_kernel(out)))
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """`ConvFFN(in, internal, out, drop_path)`: x + drop_path(pw2(GELU(pw1(preffn_bn(x)))))."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.drop_path = nn.Identity()
        self.preffn_bn = nn.BatchNorm2d(channels)
        self.pw1 = L.conv_bn_seq(channels, internal, 1, 1, 0)
        self.pw2 = L.conv_bn_seq(internal, channels, 1, 1, 0)
        self.nonlinear = nn.GELU()

    def forward(self, x):
        out = self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))
        return x + self.drop_path(out)


class RepLKNetStage(nn.Module):
    """`blocks` a ModuleList alternating RepLKBlock and ConvFFN, run in a loop."""

    def __init__(self, channels: int, num_blocks: int, lk: int, small: int, merged: bool):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(num_blocks):
            blocks += [RepLKBlock(channels, lk, small, merged), ConvFFN(channels, 4 * channels)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.Identity()

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


class RepLKNetModel(nn.Module):
    """`RepLKNet(large_kernel_sizes, layers, channels, drop_path_rate, small_kernel, ...,
    num_classes, small_kernel_merged)`: drop-path rates read with `.item()` in `__init__` (no
    meta build), `stem` a ModuleList of four conv_bn_relu units that the forward indexes
    (`stem[0]`, then `stem[1:]` in a loop: the list itself is never called), `stages` and
    `transitions` ModuleLists indexed the same way, then `norm` (BN), `avgpool`, `head`. With
    `small_kernel_merged=True` only the large kernels become `lkb_reparam`: every conv_bn(_relu)
    unit and the pre-block BNs stay live."""

    def __init__(self, merged: bool = False, width: int = 4, in_channels: int = 3):
        super().__init__()
        channels, layers, kernels = [width, 2 * width], [1, 1], [7, 5]
        self.drop_rates = [x.item() for x in torch.linspace(0, 0.1, sum(layers))]
        c = channels[0]
        self.stem = nn.ModuleList(
            [
                conv_bn_relu(in_channels, c, 3, 2, 1),
                conv_bn_relu(c, c, 3, 1, 1, groups=c),
                conv_bn_relu(c, c, 1, 1, 0),
                conv_bn_relu(c, c, 3, 2, 1, groups=c),
            ]
        )
        self.stages, self.transitions = nn.ModuleList(), nn.ModuleList()
        for i, (n, lk) in enumerate(zip(layers, kernels)):
            self.stages.append(RepLKNetStage(channels[i], n, lk, 3, merged))
            if i < len(layers) - 1:
                self.transitions.append(
                    nn.Sequential(
                        conv_bn_relu(channels[i], channels[i + 1], 1, 1, 0),
                        conv_bn_relu(channels[i + 1], channels[i + 1], 3, 2, 1, channels[i + 1]),
                    )
                )
        self.norm = nn.BatchNorm2d(channels[-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels[-1], 10)

    def forward(self, x):
        x = self.stem[0](x)
        for stem_layer in self.stem[1:]:
            x = stem_layer(x)
        for i in range(len(self.stages)):
            x = self.stages[i](x)
            if i < len(self.stages) - 1:
                x = self.transitions[i](x)
        return self.head(torch.flatten(self.avgpool(self.norm(x)), 1))


# ---- UniRepLKNet model (AILab-CVC/UniRepLKNet, unireplknet.py) -------------------------------


class ChannelsFirstLayerNorm(nn.Module):
    """UniRepLKNet's (ConvNeXt's) `LayerNorm(..., data_format="channels_first")`: `weight`,
    `bias`; normalises over the channel dimension of NCHW inputs. Nothing to fold: live."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class GRN(nn.Module):
    """`GRNwithNHWC(dim, use_bias)`: (gamma * Nx + 1) * x (+ beta), Nx the spatial L2 norm over
    its channel mean; `beta` only when use_bias (the deploy form has none: it is folded).
    Upstream starts both at zero; this copy starts them random, so the folds are tested."""

    def __init__(self, dim: int, use_bias: bool = True):
        super().__init__()
        self.use_bias = use_bias
        self.gamma = nn.Parameter(0.5 * torch.randn(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(0.5 * torch.randn(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        out = (self.gamma * nx + 1) * x
        return out + self.beta if self.use_bias else out


class Permute(nn.Module):
    """`NCHWtoNHWC` / `NHWCtoNCHW`."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class UniSEBlock(nn.Module):
    """UniRepLKNet's `SEBlock(input_channels, internal_neurons)`: `down`, `up` 1x1 convs,
    adaptive pool, relu, sigmoid, `x.view(-1, self.input_channels, 1, 1)`; live in both."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, 1, bias=True)
        self.input_channels = channels
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        x = torch.nn.functional.adaptive_avg_pool2d(inputs, output_size=(1, 1))
        x = torch.sigmoid(self.up(self.nonlinear(self.down(x))))
        return inputs * x.view(-1, self.input_channels, 1, 1)


def _bn_scale(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


def _dilated_as_dense(kernel: torch.Tensor, rate: int, size: int) -> torch.Tensor:
    """A depthwise kernel dilated by `rate`, as a dense `size` x `size` kernel (centred)."""
    k = kernel.shape[-1]
    span = rate * (k - 1) + 1
    dense = kernel.new_zeros(kernel.shape[0], 1, span, span)
    dense[:, :, ::rate, ::rate] = kernel
    pad = (size - span) // 2
    return torch.nn.functional.pad(dense, [pad] * 4)


class UniRepLKNetBlock(nn.Module):
    """`UniRepLKNetBlock(dim, kernel_size, drop_path, layer_scale_init_value, deploy)`:
    x + gamma * pwconv2(act(pwconv1(se(norm(dwconv(x)))))); `dwconv` a DilatedReparamBlock
    for kernels >= 7 else a depthwise conv (bias=deploy), `norm` a BN (Identity when deploy),
    `pwconv1` Sequential(NCHWtoNHWC, Linear), `act` Sequential(GELU, GRN(use_bias=not
    deploy)), `pwconv2` Sequential(Linear without bias, NHWCtoNCHW, BN), or Sequential(Linear,
    NHWCtoNCHW) when deploy, `gamma` a layer scale (None when deploy). Its `reparameterize`
    follows upstream's: merge the dilated branches, fold `norm` into the dwconv, and fold GRN's
    beta, pwconv2's BN and gamma into pwconv2's Linear."""

    def __init__(self, dim: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        if kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=deploy)
        else:
            self.dwconv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
            if not deploy:
                self.dwconv.bias = None
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        self.se = UniSEBlock(dim, dim // 4)
        self.pwconv1 = nn.Sequential(Permute(0, 2, 3, 1), nn.Linear(dim, 4 * dim))
        self.act = nn.Sequential(nn.GELU(), GRN(4 * dim, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(4 * dim, dim), Permute(0, 3, 1, 2))
        else:
            self.pwconv2 = nn.Sequential(
                nn.Linear(4 * dim, dim, bias=False), Permute(0, 3, 1, 2), nn.BatchNorm2d(dim)
            )
        # Upstream's layer scale starts at 1e-6; random here, so its fold is tested.
        self.gamma = None if deploy else nn.Parameter(1 + 0.5 * torch.randn(dim))
        self.drop_path = nn.Identity()

    def forward(self, x):
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self):
        conv = self.dwconv.lk_origin if hasattr(self.dwconv, "lk_origin") else self.dwconv
        weight, bias = conv.weight, torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        if hasattr(self.dwconv, "origin_bn"):  # merge the dilated branches (each conv + BN)
            scale, bias = _bn_scale(self.dwconv.origin_bn)
            weight = weight * scale.view(-1, 1, 1, 1)
            for k, r in zip(self.dwconv.kernel_sizes, self.dwconv.dilates):
                scale, shift = _bn_scale(getattr(self.dwconv, f"dil_bn_k{k}_{r}"))
                branch = getattr(self.dwconv, f"dil_conv_k{k}_{r}").weight
                weight = weight + _dilated_as_dense(branch, r, weight.shape[-1]) * scale.view(
                    -1, 1, 1, 1
                )
                bias = bias + shift
            del self.dwconv.origin_bn
            for k, r in zip(self.dwconv.kernel_sizes, self.dwconv.dilates):
                delattr(self.dwconv, f"dil_conv_k{k}_{r}")
                delattr(self.dwconv, f"dil_bn_k{k}_{r}")
        scale, shift = _bn_scale(self.norm)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                          padding=conv.padding, groups=conv.groups)  # fmt: skip
        fused.weight.copy_(weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bias * scale + shift)
        if hasattr(self.dwconv, "lk_origin"):
            self.dwconv.lk_origin = fused
        else:
            self.dwconv = fused
        self.norm = nn.Identity()
        final = self.gamma if self.gamma is not None else 1
        self.gamma = None
        linear, bn = self.pwconv2[0], self.pwconv2[2]
        beta = self.act[1].beta.view(-1)
        del self.act[1].beta
        self.act[1].use_bias = False
        scale, shift = _bn_scale(bn)
        new = nn.Linear(linear.in_features, linear.out_features)
        new.weight.copy_(linear.weight * (scale * final).view(-1, 1))
        new.bias.copy_((linear.weight @ beta * scale + shift) * final)
        self.pwconv2 = nn.Sequential(new, self.pwconv2[1])


class UniRepLKNetModel(nn.Module):
    """`UniRepLKNet(in_chans, num_classes, depths, dims, drop_path_rate, kernel_sizes, deploy)`:
    drop-path rates read with `.item()` in `__init__` (no meta build); `downsample_layers` a
    ModuleList of conv + channels-first LayerNorm units (conv with a bias: live in both forms);
    `stages` a ModuleList of Sequentials of blocks; then `norm` (a LayerNorm over the pooled
    features) and `head`. Two stages here, kernel 3 then 7."""

    def __init__(self, deploy: bool = False, width: int = 4, in_channels: int = 3):
        super().__init__()
        dims, kernels = (width, 2 * width), (3, 7)
        self.drop_rates = [x.item() for x in torch.linspace(0, 0.1, len(kernels))]
        first = nn.Sequential(
            nn.Conv2d(in_channels, dims[0] // 2, 3, 2, 1),
            ChannelsFirstLayerNorm(dims[0] // 2),
            nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1),
            ChannelsFirstLayerNorm(dims[0]),
        )
        then = nn.Sequential(nn.Conv2d(dims[0], dims[1], 3, 2, 1), ChannelsFirstLayerNorm(dims[1]))
        self.downsample_layers = nn.ModuleList([first, then])
        self.stages = nn.ModuleList(
            nn.Sequential(UniRepLKNetBlock(d, k, deploy)) for d, k in zip(dims, kernels)
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], 10)

    def forward(self, x):
        for i in range(len(self.stages)):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.head(self.norm(x.mean([-2, -1])))


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
    makers.update(_live_makers(w, d))
    if layout not in makers:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(makers)}")
    return makers[layout]()


def _live_makers(w: int, d: bool) -> dict[str, Callable[[], list[nn.Module]]]:
    """Layouts whose deploy forms keep plain conv + BN units or SE blocks live."""
    return {
        "yolov7_deploy": lambda: [
            YoloV7Conv(w, 2 * w, 3, 2),
            YoloV7RepConv(2 * w, 2 * w, deploy=d),
            YoloV7Conv(2 * w, w, 1, 1),
            YoloV7RepConv(w, 2 * w, 3, 2, deploy=d),
        ],
        "rtdetr_deploy": lambda: [
            CSPRepLayer(w, 2 * w, num_blocks=2, expansion=0.5, deploy=d),
            CSPRepLayer(2 * w, 2 * w, num_blocks=1, deploy=d),
        ],
        "mobileone_se": lambda: [  # 16 channels: the SE reduces them to one
            MobileOneSEBlock(w, 4 * w, 1, 1, 0, num_conv_branches=2, inference_mode=d),
            MobileOneSEBlock(
                4 * w, 4 * w, 3, 1, 1, groups=4 * w, num_conv_branches=2, inference_mode=d
            ),
        ],
    }


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
    # Deploy models keeping plain conv + BN units (and SE blocks) live beside the fused blocks.
    "yolov7_deploy",
    "rtdetr_deploy",
    "mobileone_se",
    # Whole models whose deploy constructors call `.item()` in __init__ (built on the CPU).
    "replknet_model",
    "unireplknet_model",
)
# The train modules each pair's deploy form keeps live (kept out of the fold), spelled out.
LIVE = {
    "repghost": ("blocks.0.primary_conv", "blocks.1.primary_conv"),
    "yolov7_deploy": ("blocks.0", "blocks.2"),
    "rtdetr_deploy": (
        *("blocks.0.conv1", "blocks.0.conv2", "blocks.0.conv3"),
        *("blocks.1.conv1", "blocks.1.conv2"),
    ),
    "mobileone_se": ("blocks.0.se", "blocks.1.se"),
    "unireplknet_model": (
        *("downsample_layers", "head", "norm"),
        *(f"stages.{i}.0.{m}" for i in (0, 1) for m in ("pwconv1", "se")),
    ),
    "replknet_model": (
        *("stem", "transitions", "norm", "head"),
        *(f"stages.{i}.blocks.0.{m}" for i in (0, 1) for m in ("pw1", "pw2", "prelkb_bn")),
        *(f"stages.{i}.blocks.1" for i in (0, 1)),
    ),
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
    "yolov7_deploy": "rbr_reparam",
    "rtdetr_deploy": "conv",
    "mobileone_se": "reparam_conv",
    "replknet_model": "lkb_reparam",
    "unireplknet_model": "lk_origin",
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


# Layouts that are whole models of their own (no DeployPairNet stem around them).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "replknet_model": RepLKNetModel,
    "unireplknet_model": UniRepLKNetModel,
}


def build(
    layout: str = "repvgg", deploy: bool = False, width: int = 4, in_channels: int = 3
) -> nn.Module:
    """The net for `layout` (PAIRS, or an error-path layout) in train or deploy form."""
    if layout in MODELS:
        return MODELS[layout](deploy, width, in_channels)
    return DeployPairNet(layout, width, in_channels, deploy)
