"""The library's own deploy form by default, for two forms that keep more than a fused block
(issue 21): the output loads strictly into what the library's own conversion leaves.

Written for these tests from a reading of meituan/YOLOv6 (yolov6/layers/common.py,
yolov6/utils/torch_utils.py) and DingXiaoH/RepLKNet-pytorch (replknet.py):

- YOLOv6's `QARepVGGBlock`: `rbr_dense` a `ConvModule` (conv + bn), `rbr_1x1` a bare conv, an
  `nn.Identity` branch, the post-sum `bn` that `switch_to_deploy()` keeps for quantization-aware
  training. The method reads `rbr_dense.conv.bias`, which exists only once YOLOv6's `fuse_model`
  has folded every `ConvModule`: on the train model as saved, it fails.
- RepLKNet: `ReparamLargeKernelConv.merge_kernel()` (large + small kernel, each conv + bn);
  `prelkb_bn` / `preffn_bn` BNs before 1x1 conv + bn pairs; a root `structural_reparam()` that
  calls every child's `merge_kernel()`; the deploy constructor (`small_kernel_merged=True`)
  keeps every plain pair and pre-norm live; `.item()` on a tensor in `__init__`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from helpers import randomized, rel_error
from torch import nn
from torch.nn import functional as F

import repconv

SHAPE = [3, 16, 16]


# ---- YOLOv6 -----------------------------------------------------------------------------------
class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU() if act else None

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if self.act is None else self.act(y)

    def forward_fuse(self, x):
        y = self.conv(x)
        return y if self.act is None else self.act(y)


class QARepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.in_channels, self.groups = cin, 1
        self.nonlinearity, self.se = nn.ReLU(), nn.Identity()
        self.rbr_dense = ConvModule(cin, cout, 3, stride, act=False)
        self.bn = nn.BatchNorm2d(cout)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.rbr_identity = nn.Identity() if cin == cout and stride == 1 else None

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(x))))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)))

    def switch_to_deploy(self) -> None:
        if hasattr(self, "rbr_reparam"):
            return
        conv = self.rbr_dense.conv
        kernel = conv.weight + F.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if self.rbr_identity is not None:  # float32 numpy, as upstream builds it
            ident = np.zeros((self.in_channels, self.in_channels, 3, 3), dtype=np.float32)
            for i in range(self.in_channels):
                ident[i, i, 1, 1] = 1
            kernel = kernel + torch.from_numpy(ident)
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = conv.bias  # None (TypeError) until fuse_model has run
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            delattr(self, name)


def fuse_model(model: nn.Module) -> nn.Module:
    """YOLOv6's: every ConvModule still holding its bn folded, its forward the fused one."""
    for m in model.modules():
        if type(m) is ConvModule and hasattr(m, "bn"):
            scale = m.bn.weight / (m.bn.running_var + m.bn.eps).sqrt()
            fused = nn.Conv2d(m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size,
                              m.conv.stride, m.conv.padding, bias=True)  # fmt: skip
            fused.weight.data = m.conv.weight * scale.reshape(-1, 1, 1, 1)
            fused.bias.data = m.bn.bias - m.bn.running_mean * scale
            m.conv = fused
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


def yolov6_qa() -> nn.Sequential:
    return nn.Sequential(
        ConvModule(3, 8, 3, 2),
        QARepVGGBlock(8, 8),
        QARepVGGBlock(8, 16, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def yolov6_export_form(train: nn.Module, whole_model: bool) -> nn.Module:
    """What YOLOv6's export leaves (`fuse_model` on the whole model, then `switch_to_deploy`),
    or, `whole_model` false, each block switched after its own pairs are folded."""
    model = copy.deepcopy(train)
    if whole_model:
        fuse_model(model)
    for m in model.modules():
        if isinstance(m, QARepVGGBlock):
            fuse_model(m)
            m.switch_to_deploy()
    return model


def _converted(train: nn.Module, **options) -> tuple[Any, torch.Tensor]:
    result = repconv.convert(copy.deepcopy(train), input_shape=SHAPE, **options)  # in place
    assert result.passed, result.verification.failure_message()
    return result, torch.randn(2, *SHAPE, dtype=torch.float64)


def _loads_strictly(deploy: nn.Module, result, train: nn.Module, x: torch.Tensor) -> float:
    deploy.double().load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        return rel_error(deploy.eval()(x), train(x))


def test_qarepvgg_is_switched_by_its_own_method_and_keeps_its_post_sum_bn():
    train = randomized(yolov6_qa())
    result, x = _converted(train)
    fused = {o.path: o.rule for o in result.plan.entries if o.status == "fused"}
    assert fused == {"1": "deploy_method", "2": "deploy_method"}
    assert {"1.rbr_reparam.bias", "1.bn.weight", "0.bn.weight"} <= set(result.state_dict)
    deploy = yolov6_export_form(train, whole_model=False)
    assert _loads_strictly(deploy, result, train, x) < 1e-12
    reasons = {w["path"]: w["message"] for w in result.plan.warnings}
    assert "kept by the block's own deploy form" in reasons["1.bn"]
    assert "--fold-plain-bn" in reasons["0.bn"]


def test_qarepvgg_with_fold_plain_bn_is_yolov6s_export_form():
    train = randomized(yolov6_qa())
    result, x = _converted(train, fold_plain_bn=True)
    assert "0.bn.weight" not in result.state_dict and "2.bn.weight" in result.state_dict
    assert _loads_strictly(yolov6_export_form(train, whole_model=True), result, train, x) < 1e-12


# ---- RepLKNet -------------------------------------------------------------------------------
def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    seq = conv_bn(cin, cout, k, stride, groups)
    seq.add_module("nonlinear", nn.ReLU())
    return seq


def _fuse_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    return conv.weight * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


class ReparamLargeKernelConv(nn.Module):
    def __init__(self, channels: int, k: int, small: int, merged: bool = False):
        super().__init__()
        self.kernel_size, self.small_kernel = k, small
        if merged:
            self.lkb_reparam = nn.Conv2d(channels, channels, k, 1, k // 2, groups=channels)
        else:
            self.lkb_origin = conv_bn(channels, channels, k, groups=channels)
            self.small_conv = conv_bn(channels, channels, small, groups=channels)

    def forward(self, x):
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        out += self.small_conv(x)
        return out

    def merge_kernel(self) -> None:
        k, b = _fuse_bn(self.lkb_origin.conv, self.lkb_origin.bn)  # fails once merged
        small_k, small_b = _fuse_bn(self.small_conv.conv, self.small_conv.bn)
        conv = self.lkb_origin.conv
        self.lkb_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                     1, conv.padding, groups=conv.groups)  # fmt: skip
        pad = (self.kernel_size - self.small_kernel) // 2
        self.lkb_reparam.weight.data = k + F.pad(small_k, [pad] * 4)
        self.lkb_reparam.bias.data = b + small_b
        del self.lkb_origin, self.small_conv


class RepLKBlock(nn.Module):
    def __init__(self, channels: int, k: int, merged: bool):
        super().__init__()
        self.pw1 = conv_bn_relu(channels, channels, 1)
        self.pw2 = conv_bn(channels, channels, 1)
        self.large_kernel = ReparamLargeKernelConv(channels, k, 3, merged)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x)))))
        return x + out


class ConvFFN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.preffn_bn = nn.BatchNorm2d(channels)
        self.pw1 = conv_bn(channels, 2 * channels, 1)
        self.pw2 = conv_bn(2 * channels, channels, 1)
        self.nonlinear = nn.GELU()

    def forward(self, x):
        return x + self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))


class TinyRepLKNet(nn.Module):
    def __init__(self, small_kernel_merged: bool = False, drop_path_rate: float = 0.1):
        super().__init__()
        self.drop_path = [r.item() for r in torch.linspace(0, drop_path_rate, 2)]  # as upstream
        self.stem = conv_bn_relu(3, 8, 3, stride=2)
        self.blocks = nn.Sequential(RepLKBlock(8, 7, small_kernel_merged), ConvFFN(8))
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.norm(self.blocks(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def structural_reparam(self) -> None:
        for m in self.modules():
            if hasattr(m, "merge_kernel"):
                m.merge_kernel()


def test_replknet_default_output_loads_strictly_into_its_deploy_constructor():
    train = randomized(TinyRepLKNet())
    result, x = _converted(train)
    keys = set(result.state_dict)
    assert "blocks.0.large_kernel.lkb_reparam.weight" in keys
    # the pre-norms and the plain pairs stay live, as small_kernel_merged=True keeps them: no
    # pass folds `prelkb_bn` into `pw1.conv` (a plain pair with a norm before its conv)
    kept = {"blocks.0.prelkb_bn.weight", "blocks.1.preffn_bn.weight", "blocks.0.pw1.bn.weight"}
    assert kept <= keys and "stem.bn.weight" in keys
    assert not any(o.rule == "dataflow" for o in result.plan.entries if o.status == "fused")
    deploy = TinyRepLKNet(small_kernel_merged=True)
    assert _loads_strictly(deploy, result, train, x) < 1e-12
