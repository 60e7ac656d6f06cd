"""Where a branch's kernel sits relative to the fused conv's window.

Parallel branches can be summed only if, for every output position, each branch reads input
pixels that the fused kernel also reads, at a fixed offset. This module checks that and centres
the branch's kernel accordingly. Pure functions; no modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from repconv.errors import NotFusable
from repconv.kernels import Branch, pad_to


@dataclass(frozen=True)
class Geometry:
    """How a conv-like branch slides over its input, one entry per spatial dim.

    `padding` may be negative: a branch that crops its input before the conv (ACNet's `crop`)
    behaves like a conv with negative padding.
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Module) -> Geometry:
        """The geometry of a torch conv module (string paddings resolved)."""
        ks = tuple(conv.kernel_size)
        dilation = tuple(conv.dilation)
        padding = conv.padding
        if isinstance(padding, str):
            padding = _resolve_string_padding(padding, ks, dilation, tuple(conv.stride))
        return cls(ks, tuple(conv.stride), tuple(padding), dilation, conv.padding_mode)

    def with_padding(self, padding: tuple[int, ...]) -> Geometry:
        return Geometry(self.kernel_size, self.stride, padding, self.dilation, self.padding_mode)


def _resolve_string_padding(mode: str, ks, dilation, stride) -> tuple[int, ...]:
    if mode == "valid":
        return tuple(0 for _ in ks)
    pads = []
    for k, d in zip(ks, dilation):
        total = d * (k - 1)
        if total % 2:
            # PyTorch pads 'same' asymmetrically here; no symmetric conv reproduces it.
            raise NotFusable("padding='same' with an even receptive field is asymmetric")
        pads.append(total // 2)
    return tuple(pads)


def align(branch: Branch, geometry: Geometry, target: Geometry) -> Branch:
    """Centre `branch` (sliding with `geometry`) in the window of `target`, or explain why not."""
    require_lined_up(geometry, target)
    return pad_to(branch, target.kernel_size)


def require_lined_up(geometry: Geometry, target: Geometry) -> None:
    """Raise NotFusable unless a branch sliding with `geometry` lines up with `target`.

    A branch that passes can be summed into the fused kernel once `kernels.add` centres it. Per
    spatial dim, a branch with kernel k, padding p, dilation d lines up with a target of
    kernel K, padding P, dilation D when strides match, the kernels share a dilation (or k == 1),
    K - k is even and P - p == D * (K - k) / 2. That is also what makes the output sizes equal.
    """
    dims = len(target.kernel_size)
    if len(geometry.kernel_size) != dims:
        raise NotFusable("branch and fused conv have different numbers of spatial dims")
    if geometry.stride != target.stride:
        raise NotFusable(f"stride {geometry.stride} differs from the block's {target.stride}")
    reads_padding = any(p > 0 for p in geometry.padding)
    if reads_padding and geometry.padding_mode != target.padding_mode:
        raise NotFusable(
            f"padding mode {geometry.padding_mode!r} differs from the block's "
            f"{target.padding_mode!r}"
        )
    for axis in range(dims):
        k, p, d = geometry.kernel_size[axis], geometry.padding[axis], geometry.dilation[axis]
        big_k, big_p, big_d = (
            target.kernel_size[axis],
            target.padding[axis],
            target.dilation[axis],
        )
        if k > big_k or (big_k - k) % 2:
            raise NotFusable(f"a size-{k} kernel cannot be centred in size {big_k}")
        if k > 1 and d != big_d:
            raise NotFusable(f"dilation {d} differs from the block's {big_d}")
        if big_p - p != big_d * (big_k - k) // 2:
            raise NotFusable(
                f"padding {p} does not line up with the block's padding {big_p} "
                f"(kernel {k} in {big_k}, dilation {big_d})"
            )
