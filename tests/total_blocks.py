"""Test copies of blocks the data-flow pass once crashed on (issue 21, section 4).

Written for these tests: the child names, the forward arithmetic and the quirks mirror upstream
code (apple's MobileOne SE block reads its pool window from the input's size; a block that
re-parameterizes on the fly in eval mode builds its identity mask with `torch.zeros` and no
dtype), the code is our own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    bias = bn.bias - bn.running_mean * bn.weight / std
    return conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1), bias


# ---- MobileOne ----------------------------------------------------------------------------------


class SEBlock(nn.Module):
    """MobileOne's squeeze-excite: `reduce` and `expand` 1x1 convs, the pool's window the
    input's whole size, read from `inputs.size()` in the forward."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625):
        super().__init__()
        hidden = int(in_channels * rd_ratio)
        self.reduce = nn.Conv2d(in_channels, hidden, kernel_size=1, stride=1, bias=True)
        self.expand = nn.Conv2d(hidden, in_channels, kernel_size=1, stride=1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        _, c, h, w = inputs.size()
        x = F.avg_pool2d(inputs, kernel_size=[h, w])
        x = F.relu(self.reduce(x))
        x = torch.sigmoid(self.expand(x))
        return inputs * x.view(-1, c, 1, 1)


class SideSEBlock(SEBlock):
    """The same gate with the window's side read as `x.size(3)` (a square input)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = torch.sigmoid(self.expand(F.relu(self.reduce(x))))
        return inputs * x


class MobileOneUnit(nn.Module):
    """MobileOne's block without its method: `rbr_skip` (a BN), `rbr_conv` (conv + BN
    branches), `rbr_scale` (a 1x1 conv + BN), summed from 0, then `se` and `activation`."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, se: type | None = None):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.kernel_size, self.stride = kernel, stride
        self.inference_mode = False
        self.se = se(cout) if se is not None else nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList([self._conv_bn(kernel, kernel // 2)])
        self.rbr_scale = self._conv_bn(1, 0) if kernel > 1 else None

    def _conv_bn(self, kernel: int, padding: int) -> nn.Sequential:
        branch = nn.Sequential()
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, kernel, self.stride, padding, bias=False
        )
        branch.add_module("conv", conv)
        branch.add_module("bn", nn.BatchNorm2d(self.out_channels))
        return branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(x)
        return self.activation(self.se(out))


class MobileOneBlock(MobileOneUnit):
    """With MobileOne's `reparameterize`: every branch folded into `reparam_conv`."""

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        k = self.kernel_size
        kernel, bias = 0, 0
        for branch in self.rbr_conv:
            w, b = folded(branch.conv, branch.bn)
            kernel, bias = kernel + w, bias + b
        if self.rbr_scale is not None:
            w, b = folded(self.rbr_scale.conv, self.rbr_scale.bn)
            kernel, bias = kernel + F.pad(w, [k // 2] * 4), bias + b
        if self.rbr_skip is not None:
            eye = torch.zeros(self.in_channels, self.in_channels, k, k, dtype=kernel.dtype)
            for i in range(self.in_channels):
                eye[i, i, k // 2, k // 2] = 1
            std = (self.rbr_skip.running_var + self.rbr_skip.eps).sqrt()
            t = (self.rbr_skip.weight / std).reshape(-1, 1, 1, 1)
            kernel = kernel + eye * t
            bias = bias + self.rbr_skip.bias - self.rbr_skip.running_mean * t.flatten()
        conv = self.rbr_conv[0].conv
        self.reparam_conv = nn.Conv2d(
            self.in_channels, self.out_channels, k, self.stride, conv.padding, bias=True
        ).to(kernel.dtype)
        self.reparam_conv.weight.copy_(kernel)
        self.reparam_conv.bias.copy_(bias)
        del self.rbr_conv, self.rbr_scale
        if hasattr(self, "rbr_skip"):
            del self.rbr_skip
        self.inference_mode = True


def mobileone_se_net(methods: bool = True, side: bool = False) -> nn.Module:
    """A MobileOne-style net: a stride-2 stem, two 16-channel blocks with SE, a pooled head."""
    block = MobileOneBlock if methods else MobileOneUnit
    se = SideSEBlock if side else SEBlock
    return nn.Sequential(
        block(3, 16, 3, 2),
        block(16, 16, 3, 1, se),
        block(16, 16, 3, 1, se),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


# ---- a rewritten forward that would read what a later fusion deleted ------------------------


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) + x)


class ResidualAroundBlock(nn.Module):
    """A residual region in the model's own code, then a child block with one of its own: the
    model's rewritten forward inlines the child's code, which the child's fusion then deletes
    (`'Residual' object has no attribute 'conv'` in the generated forward, until inner blocks
    were fused first)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.a = Residual(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)) + x)
        return self.a(y)


class WeightNormedChain(nn.Module):
    """conv -> bn -> bn with a weight-normed conv (its hook recomputes `weight` before every
    call): the fold absorbed into the conv leaves a forward that raises."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.utils.weight_norm(nn.Conv2d(c, c, 3, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(c)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.bn(self.conv(x))))


# ---- an eval forward that builds a mask without a dtype -----------------------------------------


class OnTheFlyIdentity(nn.Module):
    """Re-parameterizes its identity branch in eval mode: a depthwise conv by a mask built with
    `torch.zeros(...)` and no dtype, so it is in torch's default dtype."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.channels = c
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.relu(self.bn(self.conv(x)) + x)
        mask = torch.zeros(self.channels, 1, 3, 3)
        mask[:, :, 1, 1] = 1
        identity = F.conv2d(x, mask, padding=1, groups=self.channels)
        return F.relu(self.bn(self.conv(x)) + identity)


def on_the_fly_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), OnTheFlyIdentity(4), OnTheFlyIdentity(4))
