"""Test copies of how real libraries' deploy methods behave (written for these tests).

Each class mimics one behaviour repconv must handle when it calls a block's own method; none of
their structures is known to the block rules, so only the deploy-method pass can fold them. The
`*_net` functions build small models for the CLI (`--arch tests/method_blocks.py:NAME`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv then bn as one kernel and bias (the usual formula, in the tensors' own dtype)."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.view(-1, 1, 1, 1), bn.bias + (bias - bn.running_mean) * scale


class ConvNorm(nn.Module):
    """A conv-then-norm unit with no method of its own (ultralytics `Conv` with act=False)."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class ReturnsConv(nn.Module):
    """RepViT / LeViT style: `fuse()` builds a new conv and returns it; the block is unchanged."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.c(x))

    @torch.no_grad()
    def fuse(self):
        kernel, bias = folded(self.c, self.bn)
        conv = nn.Conv2d(self.c.in_channels, self.c.out_channels, 3, padding=1)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        return conv


class FuseConvsRepConv(nn.Module):
    """ultralytics RepConv style: `fuse_convs()` deletes the branches `forward` uses and installs
    `conv`; only `forward_fuse` works afterwards (the library's model-level fuse switches it)."""

    def __init__(self, c: int, identity: bool = True):
        super().__init__()
        self.conv1 = ConvNorm(c, c, 3)
        self.conv2 = ConvNorm(c, c, 1)
        self.bn = nn.BatchNorm2d(c) if identity else None
        self.act = nn.ReLU()

    def forward(self, x):
        shortcut = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + shortcut)

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    @torch.no_grad()
    def fuse_convs(self):
        k3, b3 = folded(self.conv1.conv, self.conv1.bn)
        k1, b1 = folded(self.conv2.conv, self.conv2.bn)
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.bn is not None:
            eye = torch.zeros_like(kernel)
            eye[range(len(eye)), range(len(eye)), 1, 1] = 1
            kid, bid = folded(_identity_conv(eye), self.bn)
            kernel, bias = kernel + kid, bias + bid
        c = kernel.shape[0]
        self.conv = nn.Conv2d(c, c, 3, padding=1).requires_grad_(False)
        self.conv.weight.data, self.conv.bias.data = kernel, bias
        for name in ("conv1", "conv2", "bn"):
            delattr(self, name)


def _identity_conv(kernel: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], 3, padding=1, bias=False)
    conv.weight.data = kernel
    return conv


class DefaultDtypeBlock(nn.Module):
    """UniRepLKNet / YOLOv10 style: the method builds tensors and a conv without a dtype, so
    they are float32 unless torch's default dtype says otherwise."""

    def __init__(self, c: int):
        super().__init__()
        self.big = ConvNorm(c, c, 3)
        self.small = ConvNorm(c, c, 1)

    def forward(self, x):
        if hasattr(self, "merged"):
            return self.merged(x)
        return self.big(x) + self.small(x)

    @torch.no_grad()
    def merge_dilated_branches(self):
        k3, b3 = folded(self.big.conv, self.big.bn)
        k1, b1 = folded(self.small.conv, self.small.bn)
        c = k3.shape[0]
        centre = torch.zeros(c, c, 3, 3)  # default dtype, as upstream does
        centre[:, :, 1:2, 1:2] = k1
        merged = nn.Conv2d(c, c, 3, padding=1)  # default dtype too
        merged.weight.copy_(k3 + centre)
        merged.bias.copy_(b3 + b1)
        del self.big, self.small
        self.merged = merged


class GhostLike(nn.Module):
    """A block with no method of its own: the model-level method fuses it."""

    def __init__(self, c: int):
        super().__init__()
        self.primary = ConvNorm(c, c, 3)
        self.cheap = nn.BatchNorm2d(c)

    def forward(self, x):
        if hasattr(self, "fused"):
            return self.fused(x)
        return self.primary(x) + self.cheap(x)

    @torch.no_grad()
    def make_fused(self):
        kernel, bias = folded(self.primary.conv, self.primary.bn)
        c = kernel.shape[0]
        eye = torch.zeros_like(kernel)
        eye[range(c), range(c), 1, 1] = 1
        kid, bid = folded(_identity_conv(eye), self.cheap)
        self.fused = nn.Conv2d(c, c, 3, padding=1).to(kernel.dtype)
        self.fused.weight.copy_(kernel + kid)
        self.fused.bias.copy_(bias + bid)
        del self.primary, self.cheap


class RootMethodNet(nn.Module):
    """RepGhost style: only the root has `convert_to_deploy`; plain conv-BN pairs elsewhere."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(GhostLike(8), nn.ReLU(), GhostLike(8))
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))

    def convert_to_deploy(self):
        for module in self.modules():
            if isinstance(module, GhostLike):
                module.make_fused()


class FusableUnit(ConvNorm):
    """YOLOv6 `ConvModule` style: a conv-norm unit with its own `fuse()` (returns nothing)."""

    def forward(self, x):
        return self.conv(x) if not hasattr(self, "bn") else self.bn(self.conv(x))

    @torch.no_grad()
    def fuse(self):
        kernel, bias = folded(self.conv, self.bn)
        self.conv.weight.data = kernel
        self.conv.bias = nn.Parameter(bias, requires_grad=False)
        del self.bn


class NeedsFusedChildren(nn.Module):
    """YOLOv6 RepVGGBlock style: `switch_to_deploy` reads its units' fused convs and breaks if
    they still hold their norms (the library fuses them first)."""

    def __init__(self, c: int):
        super().__init__()
        self.dense = FusableUnit(c, c, 3)
        self.point = FusableUnit(c, c, 1)

    def forward(self, x):
        if hasattr(self, "reparam"):
            return self.reparam(x)
        return self.dense(x) + self.point(x)

    @torch.no_grad()
    def switch_to_deploy(self):
        if hasattr(self.dense, "bn") or hasattr(self.point, "bn"):
            raise RuntimeError("units must be fused before switch_to_deploy")
        c = self.dense.conv.out_channels
        self.reparam = nn.Conv2d(c, c, 3, padding=1).to(self.dense.conv.weight.dtype)
        self.reparam.weight.copy_(self.dense.conv.weight + F.pad(self.point.conv.weight, [1] * 4))
        self.reparam.bias.copy_(self.dense.conv.bias + self.point.conv.bias)
        del self.dense, self.point


class RaisingBlock(nn.Module):
    """A block whose method crashes; its conv-BN pairs are plain and still foldable."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)

    def switch_to_deploy(self):
        raise RuntimeError("boom from the library")


class DiagonalIdentityRepConv(nn.Module):
    """yolov7 RepConv style with its upstream bug: the identity kernel is built with
    `fill_diagonal_`, right for groups=1 and wrong for grouped convs."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.groups = groups
        self.dense = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c)
        )
        self.idbn = nn.BatchNorm2d(c)

    def forward(self, x):
        if hasattr(self, "fused"):
            return self.fused(x)
        return self.dense(x) + self.idbn(x)

    @torch.no_grad()
    def fuse_repvgg_block(self):
        conv, bn = self.dense
        kernel, bias = folded(conv, bn)
        c = kernel.shape[0]
        eye = torch.zeros(c, c // self.groups, 3, 3, dtype=kernel.dtype)
        eye[:, :, 1, 1].fill_diagonal_(1)  # the bug: only right when groups == 1
        grouped = nn.Conv2d(c // self.groups, c, 3, padding=1, bias=False)
        grouped.weight.data = eye
        kid, bid = folded(grouped, self.idbn)
        self.fused = nn.Conv2d(c, c, 3, padding=1, groups=self.groups).to(kernel.dtype)
        self.fused.weight.copy_(kernel + kid)
        self.fused.bias.copy_(bias + bid)
        del self.dense, self.idbn


class ForgetfulRepConv(nn.Module):
    """A method that is wrong everywhere (it drops the 1x1 branch) yet runs on any device, the
    meta device included, where nothing can tell that it is wrong."""

    def __init__(self, c: int):
        super().__init__()
        self.dense = ConvNorm(c, c, 3)
        self.point = ConvNorm(c, c, 1)

    def forward(self, x):
        if hasattr(self, "fused"):
            return self.fused(x)
        return self.dense(x) + self.point(x)

    @torch.no_grad()
    def switch_to_deploy(self):
        kernel, bias = folded(self.dense.conv, self.dense.bn)
        self.fused = nn.Conv2d(kernel.shape[1], kernel.shape[0], 3, padding=1)
        self.fused.to(kernel.dtype)
        self.fused.weight.copy_(kernel)
        self.fused.bias.copy_(bias)
        del self.dense, self.point


# ---- models for the CLI -------------------------------------------------------------------------


def raising_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), RaisingBlock(4), nn.ReLU())


def grouped_yolov7_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), DiagonalIdentityRepConv(4, groups=2))


def plain_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


def forgetful_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), ForgetfulRepConv(4))


def right_yolov7_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), DiagonalIdentityRepConv(4, groups=1))


class DepthwiseConvNorm(ReturnsConv):
    """RepViT `ConvNorm` style, depthwise: `fuse()` returns the folded conv."""

    def __init__(self, c: int):
        super().__init__(c, c)
        self.c = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)

    @torch.no_grad()
    def fuse(self):
        kernel, bias = folded(self.c, self.bn)
        conv = nn.Conv2d(
            self.c.in_channels, self.c.out_channels, 3, padding=1, groups=self.c.groups
        )
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        return conv


class RepVggDwLike(nn.Module):
    """timm RepViT `RepVggDw` style: bn(conv(x) + conv1(x) + x), depthwise; its `fuse()` calls
    `self.conv.fuse()` and folds the rest itself, so it works only before its child is fused
    (timm's `reparameterize_model` goes parent first)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = DepthwiseConvNorm(c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)

    @torch.no_grad()
    def fuse(self):
        conv = self.conv.fuse()  # AttributeError once the child is a plain Conv2d
        kernel = conv.weight + F.pad(self.conv1.weight, [1, 1, 1, 1])
        kernel[:, :, 1, 1] += 1.0  # the identity
        bias = conv.bias + self.conv1.bias
        scale = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        conv.weight.copy_(kernel * scale.view(-1, 1, 1, 1))
        conv.bias.copy_(self.bn.bias + (bias - self.bn.running_mean) * scale)
        return conv


class CallsChildFuse(RepVggDwLike):
    """As RepVggDwLike, but its `fuse()` leaves out the identity and the norm: wrong whether its
    child was fused first (it fails) or not (it computes something else)."""

    @torch.no_grad()
    def fuse(self):
        conv = self.conv.fuse()  # AttributeError once the child is a plain Conv2d
        conv.weight += F.pad(self.conv1.weight, [1, 1, 1, 1])
        return conv


def repvggdw_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), RepVggDwLike(4), nn.ReLU(), RepVggDwLike(4))
