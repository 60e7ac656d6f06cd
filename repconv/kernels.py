"""Fusion math: every re-parameterization family reduces to these operations on branches.

A branch is a linear map that acts like a convolution followed by a per-channel affine map:
y = scale * conv(x, kernel) + bias, with kernel of shape (out_channels, in_channels // groups,
*spatial) and scale and bias of shape (out_channels,). Keeping `scale` apart means folding a
norm costs nothing but channel vectors: the kernels are read once, when `add` sums them.
Everything here is pure (tensors in, tensors out) and computed in float64; `add` rounds once, at
the end, to the dtype asked for. Geometry (stride, padding, dilation) is the caller's business:
these functions only say what the kernel and bias are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

MATH_DTYPE = torch.float64
# `add` works through the output channels in slices of about this many float64 bytes, so its
# float64 intermediates stay in cache and only the rounded result is ever allocated whole.
SLICE_BYTES = 4 << 20


class Branch(NamedTuple):
    kernel: Tensor
    bias: Tensor
    scale: Tensor | None = None  # float64 per output channel; None means 1

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape[2:])

    def scaled_kernel(self) -> Tensor:
        """scale * kernel in float64 (a new tensor when there is a scale)."""
        kernel = self.kernel.to(MATH_DTYPE)
        if self.scale is None:
            return kernel
        return kernel * _per_channel(self.scale, kernel.dim())


def _per_channel(vector: Tensor, dims: int) -> Tensor:
    return vector.view((-1,) + (1,) * (dims - 1))


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
    """Conv followed by eval-mode batch norm, as one conv: only its scale and bias change."""
    scale, shift = norm_scale_shift(stats)
    total = scale if branch.scale is None else branch.scale * scale
    return Branch(branch.kernel, branch.bias.to(MATH_DTYPE) * scale + shift, total)


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
    return Branch(torch.nn.functional.pad(branch.kernel, pads), branch.bias, branch.scale)


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
    k1 = first.scaled_kernel().reshape(groups, mid_per_group, in_per_group)
    k2 = second.kernel.to(MATH_DTYPE).reshape(groups, out // groups, mid_per_group, -1)
    # One GEMM per group, (in, mid) @ (mid, out * taps): a third faster than the einsum, which
    # contracts with the small tap dimension innermost.
    taps = k2.shape[-1]
    by_mid = k2.permute(0, 2, 1, 3).reshape(groups, mid_per_group, -1)
    product = torch.bmm(k1.transpose(1, 2), by_mid).view(groups, in_per_group, out // groups, taps)
    kernel = product.permute(0, 2, 1, 3).reshape(out, in_per_group, *spatial)
    through = k2.sum(dim=3)
    bias_mid = first.bias.to(MATH_DTYPE).reshape(groups, mid_per_group, 1)
    carried = torch.bmm(through.reshape(groups, out // groups, mid_per_group), bias_mid)
    carried = carried.reshape(out)
    if second.scale is not None:  # second's scale applies after its conv, to the carried bias too
        carried = carried * second.scale
    return Branch(kernel, second.bias.to(MATH_DTYPE) + carried, second.scale)


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
    return Branch(kernel.contiguous(), first.bias.to(MATH_DTYPE), first.scale)


def _load_scaled(out: Tensor, kernel: Tensor, scale: Tensor | None) -> Tensor:
    """out = scale * kernel in float64. Widening first, then multiplying float64 by float64,
    takes torch's vectorised paths; a mixed-dtype product would cast element by element."""
    out.copy_(kernel)
    if scale is not None:
        out.mul_(_per_channel(scale, out.dim()))
    return out


def add(
    branches: Iterable[Branch],
    *,
    dtype: torch.dtype = MATH_DTYPE,
    size: Sequence[int] | None = None,
    offsets: Sequence[Sequence[int]] | None = None,
) -> Branch:
    """Parallel branches summed into one kernel, rounded once to `dtype`.

    A smaller kernel is centred in the largest, as `pad_to` would; or, given `size` and one
    offset per branch, its first tap sits at that offset of a kernel of `size`. Each branch's
    scale is applied here, slice by slice of output channels in float64, and each slice is rounded
    straight into the result: no padded, scaled or float64 copy of a whole kernel is ever made.
    The bias stays float64 (it is small); the result has no scale.
    """
    branches = list(branches)
    if not branches:
        raise ValueError("nothing to add")
    _check_same_channels(branches)
    first = branches[0].kernel
    channels = first.shape[:2]
    if size is None:
        size = tuple(max(b.kernel.shape[d] for b in branches) for d in range(2, first.dim()))
        regions = [_centred_region(b.spatial, size) for b in branches]
    else:
        size = tuple(size)
        regions = [_placed_region(b.spatial, at, size) for b, at in zip(branches, offsets or [])]
        if len(regions) != len(branches):
            raise ValueError("one offset per branch is needed with an explicit size")
    # Largest first (ties in the order given): the sum starts from a full-size branch.
    order = sorted(range(len(branches)), key=lambda i: -math.prod(branches[i].spatial))
    bias = torch.zeros(channels[0], dtype=MATH_DTYPE, device=first.device)
    for i in order:
        bias += branches[i].bias
    result = torch.empty((*channels, *size), dtype=dtype, device=first.device)
    row_shape = (*channels[1:], *size)
    step = max(1, SLICE_BYTES // (8 * math.prod(row_shape)))
    # Two float64 work areas, allocated once: fresh memory for every slice would cost a page
    # fault per 4 KiB written, more than the arithmetic itself.
    work = torch.empty((min(step, channels[0]), *row_shape), dtype=MATH_DTYPE, device=first.device)
    scratch = torch.empty(work.numel(), dtype=MATH_DTYPE, device=first.device)
    ordered = [(branches[i], regions[i]) for i in order]
    for lo in range(0, channels[0], step):
        rows = slice(lo, lo + step)
        total = work[: min(step, channels[0] - lo)]
        _sum_rows(total, scratch, ordered, rows, size)
        result[rows] = total
    return Branch(result, bias)


def _check_same_channels(branches: list[Branch]) -> None:
    first = branches[0].kernel
    for b in branches:
        if b.kernel.shape[:2] != first.shape[:2] or b.kernel.dim() != first.dim():
            raise ValueError(
                f"kernel shapes differ: {tuple(first.shape)} vs {tuple(b.kernel.shape)}"
            )


def _centred_region(have: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    """Where a kernel of spatial size `have` sits, centred, in one of spatial size `size`."""
    region = [slice(None), slice(None)]
    for kept, want in zip(have, size):
        if (want - kept) % 2:
            raise ValueError(f"cannot centre a {have} kernel inside {size}")
        region.append(slice((want - kept) // 2, (want + kept) // 2))
    return tuple(region)


def _placed_region(
    have: tuple[int, ...], at: Sequence[int], size: tuple[int, ...]
) -> tuple[slice, ...]:
    """Where a kernel of spatial size `have` sits when its first tap is at `at` in `size`."""
    if len(at) != len(have) or any(o < 0 or o + k > n for o, k, n in zip(at, have, size)):
        raise ValueError(f"a {have} kernel at {tuple(at)} does not fit in {size}")
    return (slice(None), slice(None), *(slice(o, o + k) for o, k in zip(at, have)))


def _sum_rows(
    total: Tensor,
    scratch: Tensor,
    ordered: list[tuple[Branch, tuple[slice, ...]]],
    rows: slice,
    size: tuple[int, ...],
) -> None:
    """total = the scaled, centred sum of the branches' output channels `rows`, in float64.

    `ordered` is largest kernel first, so the first full-size branch is loaded straight into
    `total`; the others are widened and scaled in `scratch`, then added into their region.
    """
    started = False
    for b, region in ordered:
        part = b.kernel[rows]
        scale = None if b.scale is None else b.scale[rows]
        if not started and b.spatial == size:
            _load_scaled(total, part, scale)
            started = True
            continue
        if not started:
            total.zero_()
            started = True
        if scale is not None or part.dtype != MATH_DTYPE:
            part = _load_scaled(scratch[: part.numel()].view(part.shape), part, scale)
        total[region] += part
