"""The fused conv a pass installs, and the conv-BN branches it is summed from.

A norm's statistics checked before they are folded, a conv-then-norm unit as one branch, a
stock conv holding a fused kernel, and its installation in place of a block's train children.
The math is `kernels`' (float64, rounded once); this module only builds and places modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from repconv.errors import CorruptCheckpoint, NotFusable
from repconv.geometry import Geometry, require_lined_up
from repconv.kernels import Branch, NormStats, add, as_branch, fold_bn
from repconv.modules import CONV_BY_DIMS, corrupt_statistics, norm_problem


@dataclass
class Fused:
    """What a rule's fuse step left behind: the new conv's path (relative to the block)."""

    attribute: str
    kernel_shape: tuple[int, ...]
    removed: list[str] = field(default_factory=list)


def norm_stats(norm: nn.Module, *, with_act: bool = False) -> NormStats:
    """The eval-mode statistics of a foldable norm, checked for values no trained model has."""
    problem = norm_problem(norm, with_act=with_act)
    if problem:
        raise NotFusable(problem)
    corrupt = corrupt_statistics(norm)
    if corrupt is not None:
        raise CorruptCheckpoint(
            "running statistics hold NaN, Inf or negative variance "
            f"({corrupt[0]} of {corrupt[1]} channels)"
        )
    affine = getattr(norm, "affine", True)
    weight = norm.weight if affine else None
    bias = norm.bias if affine else None
    return NormStats(norm.running_mean, norm.running_var, weight, bias, float(norm.eps))


def conv_bn_branch(unit: tuple[nn.Module, nn.Module]) -> tuple[Branch, Geometry]:
    conv, norm = unit
    width = getattr(norm, "num_features", None) or norm.running_mean.numel()
    if width != conv.out_channels:
        raise NotFusable(f"norm has {width} channels, its conv {conv.out_channels}")
    branch = fold_bn(as_branch(conv.weight, conv.bias), norm_stats(norm))
    return branch, Geometry.of(conv)


def lined_up_conv_bn_branch(unit: tuple[nn.Module, nn.Module], target: Geometry) -> Branch:
    """A conv-then-norm unit's branch, refused (NotFusable) unless it lines up with `target`."""
    branch, geometry = conv_bn_branch(unit)
    require_lined_up(geometry, target)
    return branch


# ---- building the fused conv ----------------------------------------------------------------


def stock_conv(
    in_channels: int,
    kernel: torch.Tensor,
    bias: torch.Tensor,
    *,
    stride: tuple[int, ...],
    padding: Any,
    dilation: tuple[int, ...],
    groups: int,
    padding_mode: str = "zeros",
    trainable: bool = False,
) -> nn.Module:
    """A stock conv holding `kernel` and `bias` (its out-channels and kernel size are the
    kernel's), built on the meta device so no initialisation is spent on overwritten weights."""
    cls = CONV_BY_DIMS[kernel.dim() - 2]
    with torch.device("meta"):
        conv = cls(
            in_channels,
            kernel.shape[0],
            tuple(kernel.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=True,
            padding_mode=padding_mode,
        )
    conv.weight = nn.Parameter(kernel, requires_grad=trainable)
    conv.bias = nn.Parameter(bias, requires_grad=trainable)
    return conv


def fused_conv_like(conv: _ConvNd, branch: Branch, geometry: Geometry | None = None) -> nn.Module:
    """A stock conv with `conv`'s shape and geometry holding the fused kernel and bias."""
    geometry = geometry or Geometry.of(conv)
    return stock_conv(
        conv.in_channels,
        branch.kernel,
        branch.bias,
        stride=geometry.stride,
        padding=conv.padding if isinstance(conv.padding, str) else geometry.padding,
        dilation=geometry.dilation,
        groups=conv.groups,
        padding_mode=geometry.padding_mode,
        trainable=conv.weight.requires_grad,
    )


def replace_children(block: nn.Module, attribute: str, fused: nn.Module, remove: list[str]) -> None:
    """Install `fused` as `block.<attribute>`, delete train-time children, flip `deploy` flags."""
    for name in remove:
        if hasattr(block, name):
            delattr(block, name)
    setattr(block, attribute, fused)
    if isinstance(getattr(block, "deploy", None), bool):
        block.deploy = True


def install_fused(
    block: nn.Module,
    attribute: str,
    like: _ConvNd,
    branches: list[Branch],
    target: Geometry,
    train_children: list[str],
) -> Fused:
    """Sum the branches into one conv shaped like `like`, install it, drop the train children.

    The kernel is rounded to `like`'s dtype as it is summed; the bias stays float64 until the
    engine rounds the block.
    """
    fused = add(branches, dtype=like.weight.dtype)
    removed = [name for name in train_children if hasattr(block, name)]
    replace_children(block, attribute, fused_conv_like(like, fused, target), removed)
    return Fused(attribute, tuple(fused.kernel.shape), removed)
