"""Fusion math: every re-parameterization family reduces to these operations on branches.

A branch is a (kernel, bias) pair that acts like a convolution: kernel has shape
(out_channels, in_channels // groups, *spatial) and bias has shape (out_channels,).
Everything here is pure (tensors in, tensors out) and computed in float64; callers cast once, at
the end, to the model's dtype. Geometry (stride, padding, dilation) is the caller's business:
these functions only say what the kernel and bias are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

MATH_DTYPE = torch.float64


class Branch(NamedTuple):
    kernel: Tensor
    bias: Tensor

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape[2:])


class NormStats(NamedTuple):
    """Eval-mode batch-norm parameters: y = (x - mean) / sqrt(var + eps) * weight + bias."""

    mean: Tensor
    var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float


def as_branch(kernel: Tensor, bias: Tensor | None = None) -> Branch:
    """A conv's weight and optional bias as a branch (a missing bias is zero).

    The kernel keeps its dtype: every operation here promotes to float64 as it reads it, which
    saves a full float64 copy of each weight.
    """
    k = kernel.detach()
    if bias is None:
        b = torch.zeros(k.shape[0], dtype=MATH_DTYPE, device=k.device)
    else:
        b = bias.detach().to(MATH_DTYPE)
    return Branch(k, b)


def norm_scale_shift(stats: NormStats) -> tuple[Tensor, Tensor]:
    """The per-channel affine map (scale, shift) that an eval-mode batch norm applies."""
    mean = stats.mean.detach().to(MATH_DTYPE)
    var = stats.var.detach().to(MATH_DTYPE)
    scale = torch.rsqrt(var + stats.eps)
    if stats.weight is not None:
        scale = scale * stats.weight.detach().to(MATH_DTYPE)
    shift = -mean * scale
    if stats.bias is not None:
        shift = shift + stats.bias.detach().to(MATH_DTYPE)
    return scale, shift


def fold_bn(branch: Branch, stats: NormStats) -> Branch:
    """Conv followed by eval-mode batch norm, as one conv."""
    scale, shift = norm_scale_shift(stats)
    view = (-1,) + (1,) * (branch.kernel.dim() - 1)
    # `scale` is float64, so the product is computed and stored in float64 in one pass.
    return Branch(branch.kernel * scale.view(view), branch.bias * scale + shift)


def pad_to(branch: Branch, size: Sequence[int]) -> Branch:
    """Centre a smaller kernel (1x1, 1xk, kx1, 3x3 in 5x5, ...) inside a kernel of `size`."""
    spatial = branch.spatial
    if len(size) != len(spatial):
        raise ValueError(f"kernel has {len(spatial)} spatial dims, target size {tuple(size)}")
    pads: list[int] = []
    for have, want in reversed(list(zip(spatial, size))):
        extra = want - have
        if extra < 0 or extra % 2:
            raise ValueError(f"cannot centre a {spatial} kernel inside {tuple(size)}")
        pads += [extra // 2, extra // 2]
    if not any(pads):
        return branch
    return Branch(torch.nn.functional.pad(branch.kernel, pads), branch.bias)


def _diagonal_kernel(
    channels: int, groups: int, size: Sequence[int], fill: Tensor, *, device=None
) -> Tensor:
    """A kernel where output channel c sees only input channel c, with `fill` as its window."""
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    kernel = torch.zeros((channels, per_group, *size), dtype=MATH_DTYPE, device=device)
    out_index = torch.arange(channels, device=device)
    kernel[out_index, out_index % per_group] = fill
    return kernel


def identity(
    channels: int, groups: int = 1, size: Sequence[int] = (1, 1), *, device=None
) -> Branch:
    """The identity map as a conv kernel of `size` (odd sizes, tap in the centre)."""
    if any(s % 2 == 0 for s in size):
        raise ValueError(f"the identity needs an odd kernel size, got {tuple(size)}")
    window = torch.zeros(tuple(size), dtype=MATH_DTYPE, device=device)
    window[tuple(s // 2 for s in size)] = 1.0
    kernel = _diagonal_kernel(channels, groups, size, window, device=device)
    return Branch(kernel, torch.zeros(channels, dtype=MATH_DTYPE, device=device))


def avg_pool(channels: int, groups: int, size: Sequence[int], *, device=None) -> Branch:
    """Average pooling (count_include_pad=True) over a window of `size`, as a conv kernel."""
    window = torch.full(tuple(size), 1.0 / math.prod(size), dtype=MATH_DTYPE, device=device)
    kernel = _diagonal_kernel(channels, groups, size, window, device=device)
    return Branch(kernel, torch.zeros(channels, dtype=MATH_DTYPE, device=device))


def compose(first: Branch, second: Branch, groups: int = 1) -> Branch:
    """A 1x1 conv followed by a kxk conv (same `groups`), as one kxk conv.

    The bias of `first` passes through `second` as a constant input. That is exact only when the
    padding between the two convs is filled with that constant rather than zeros (DBB's
    BN-and-pad layer does exactly this), or when there is no padding between them.
    """
    if any(s != 1 for s in first.spatial):
        raise ValueError(f"the first conv of a composition must be 1x1, got {first.spatial}")
    mid, in_per_group = first.kernel.shape[:2]
    out, mid_per_group = second.kernel.shape[:2]
    if mid % groups or out % groups or mid // groups != mid_per_group:
        raise ValueError(
            f"cannot compose {tuple(first.kernel.shape)} then {tuple(second.kernel.shape)} "
            f"with groups={groups}"
        )
    spatial = second.spatial
    k1 = first.kernel.to(MATH_DTYPE).reshape(groups, mid_per_group, in_per_group)
    k2 = second.kernel.to(MATH_DTYPE).reshape(groups, out // groups, mid_per_group, -1)
    # One GEMM per group, (in, mid) @ (mid, out * taps): a third faster than the einsum, which
    # contracts with the small tap dimension innermost.
    taps = k2.shape[-1]
    by_mid = k2.permute(0, 2, 1, 3).reshape(groups, mid_per_group, -1)
    product = torch.bmm(k1.transpose(1, 2), by_mid).view(groups, in_per_group, out // groups, taps)
    kernel = product.permute(0, 2, 1, 3).reshape(out, in_per_group, *spatial)
    through = k2.sum(dim=3)
    bias_mid = first.bias.reshape(groups, mid_per_group, 1)
    carried = torch.bmm(through.reshape(groups, out // groups, mid_per_group), bias_mid)
    return Branch(kernel, second.bias + carried.reshape(out))


def pool_after(first: Branch, size: Sequence[int]) -> Branch:
    """A 1x1 conv followed by average pooling over `size`, as one conv.

    Equal to `compose(first, avg_pool(...))` with the pooling's diagonal kernel, without the
    dense product: every output channel just spreads its 1x1 weights evenly over the window.
    The same padding caveat as `compose` applies to the bias.
    """
    if any(s != 1 for s in first.spatial):
        raise ValueError(f"pooling follows a 1x1 conv, got {first.spatial}")
    window = math.prod(size)
    kernel = first.kernel.to(MATH_DTYPE).expand(*first.kernel.shape[:2], *size) / window
    return Branch(kernel.contiguous(), first.bias.to(MATH_DTYPE))


def add(branches: Iterable[Branch], *, reuse_first: bool = False) -> Branch:
    """Parallel branches summed; a smaller kernel is centred in the largest, as `pad_to` would.

    Accumulates into one new tensor, so no padded copy of any branch is ever made. With
    `reuse_first`, the sum is accumulated into the first branch's kernel itself when that is a
    full-size float64 kernel: the caller hands that branch over, so it must be a fresh result
    of this module (`fold_bn`, `compose`, ...) that nothing else holds, never a model's weight.
    On the largest block of a model that saves a float64 copy of its kernel.
    """
    branches = list(branches)
    if not branches:
        raise ValueError("nothing to add")
    channels = branches[0].kernel.shape[:2]
    dims = branches[0].kernel.dim()
    size = tuple(max(b.kernel.shape[d] for b in branches) for d in range(2, dims))
    first = branches[0].kernel
    # Start from a full-size branch rather than zeros: one pass less. Both ways sum in the same
    # order (largest first, ties in the order given), so they give the same bits.
    ordered = sorted(branches, key=lambda b: -math.prod(b.spatial))
    if reuse_first and first.dtype == MATH_DTYPE and branches[0].spatial == size:
        kernel = first  # it is also ordered[0]: the sort is stable
    elif ordered[0].spatial == size:
        kernel = ordered[0].kernel.to(MATH_DTYPE, copy=True)
    else:
        kernel = torch.zeros((*channels, *size), dtype=MATH_DTYPE, device=first.device)
    bias = torch.zeros_like(branches[0].bias, dtype=MATH_DTYPE)
    for i, b in enumerate(ordered):
        if b.kernel.shape[:2] != channels or b.kernel.dim() != dims:
            raise ValueError(
                f"kernel shapes differ: {tuple(first.shape)} vs {tuple(b.kernel.shape)}"
            )
        bias += b.bias
        if i == 0 and ordered[0].spatial == size:
            continue
        region = [slice(None), slice(None)]
        for have, want in zip(b.spatial, size):
            if (want - have) % 2:
                raise ValueError(f"cannot centre a {b.spatial} kernel inside {size}")
            region.append(slice((want - have) // 2, (want + have) // 2))
        kernel[tuple(region)] += b.kernel
    return Branch(kernel, bias)
