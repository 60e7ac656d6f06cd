"""Affine maps that one convolution computes, and the algebra that combines them (float64).

A value inside a linear region is an affine map of one input tensor x of shape (N, C, *S):
y = sum of terms + bias. A term is a convolution read through a `Window`: along each spatial
axis, output position p reads x at `stride * p + start + dilation * t` for taps t < size, with
zeros outside x. A dense term holds a kernel (out, in // groups, *size); a diagonal term (the
identity, average pooling, a per-channel scale) holds only the taps every channel shares, so an
identity over 2048 channels costs nothing until the region is summed into one kernel.

Every operation here decides by shapes and structure only, never by values: run on meta tensors
(a model rebuilt by `load_deploy`) it takes the same branches and raises the same `NotExact` as
on the trained model's. Values are float64; `to_conv` rounds the summed kernel once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from repconv.kernels import MATH_DTYPE, Branch, add

Ints = tuple[int, ...]


class NotExact(Exception):
    """The operation has no exact single-convolution form; the message says why."""


@dataclass(frozen=True)
class Window:
    """How a term reads its input, per spatial axis.

    `excess` is (left + right zero padding) - (the span the taps cover), so a length-L input
    gives (L + excess) // stride + 1 outputs: two terms can be summed only if that agrees for
    every L, i.e. equal strides and equal excess.
    """

    stride: Ints
    start: Ints
    dilation: Ints
    size: Ints
    excess: Ints

    @classmethod
    def conv(cls, size: Ints, stride: Ints, padding: Ints, dilation: Ints) -> Window:
        spans = [(k - 1) * d + 1 for k, d in zip(size, dilation)]
        return cls(
            tuple(stride),
            tuple(-p for p in padding),
            tuple(dilation),
            tuple(size),
            tuple(2 * p - s for p, s in zip(padding, spans)),
        )

    @classmethod
    def pointwise(cls, rank: int) -> Window:
        return cls.conv((1,) * rank, (1,) * rank, (0,) * rank, (1,) * rank)

    @property
    def rank(self) -> int:
        return len(self.size)

    @property
    def spans(self) -> Ints:
        return tuple((k - 1) * d + 1 for k, d in zip(self.size, self.dilation))

    @property
    def is_pointwise(self) -> bool:
        return self == Window.pointwise(self.rank)

    @property
    def is_shift_free_pad(self) -> bool:
        """One tap per output, stride 1: the identity, possibly reading zero padding."""
        return all(k == 1 and s == 1 for k, s in zip(self.size, self.stride))

    @property
    def reads_padding(self) -> bool:
        """Whether some output reads outside the input (left or right)."""
        rights = [e + sp + st for e, sp, st in zip(self.excess, self.spans, self.start)]
        return any(st < 0 for st in self.start) or any(r > 0 for r in rights)


@dataclass(frozen=True)
class Term:
    """One convolution of the input; `groups` None marks a diagonal term (weights = taps)."""

    weights: Tensor
    groups: int | None
    window: Window
    scale: Tensor | None = None  # per output channel, or 0-dim; applied after the conv
    label: str = ""  # what the term was built from, for plans ("3x3", "1x1*alpha", "identity")

    @property
    def diagonal(self) -> bool:
        return self.groups is None


@dataclass(frozen=True)
class LinearValue:
    """sum(terms) + bias, from `channels_in` to `channels_out` channels; bias None is zero."""

    terms: tuple[Term, ...]
    bias: Tensor | None
    channels_in: int
    channels_out: int

    @property
    def rank(self) -> int:
        return self.terms[0].window.rank


def _vector(values: Tensor, channels: int) -> Tensor:
    values = values.to(MATH_DTYPE)
    return values.expand(channels) if values.dim() == 0 else values


def identity(channels: int, rank: int, *, device: torch.device | str = "cpu") -> LinearValue:
    taps = torch.ones((1,) * rank, dtype=MATH_DTYPE, device=device)
    term = Term(taps, None, Window.pointwise(rank), label="identity")
    return LinearValue((term,), None, channels, channels)


def affine(
    value: LinearValue, scale: Tensor | None, shift: Tensor | None, *, mark: str = ""
) -> LinearValue:
    """scale * value + shift, per output channel (0-dim tensors broadcast).

    `mark` is added to the label of a single-term value (a scaled branch, "1x1*alpha").
    """
    terms = value.terms
    if mark and len(terms) == 1:
        terms = (replace(terms[0], label=terms[0].label + mark),)
    bias = value.bias
    if scale is not None:
        scale = scale.to(MATH_DTYPE)
        terms = tuple(
            replace(t, scale=scale if t.scale is None else t.scale * scale) for t in terms
        )
        bias = None if bias is None else bias * scale
    if shift is not None:
        shift = _vector(shift, value.channels_out)
        bias = shift if bias is None else bias + shift
    return replace(value, terms=terms, bias=bias)


def plus(a: LinearValue, b: LinearValue) -> LinearValue:
    if (a.channels_in, a.channels_out) != (b.channels_in, b.channels_out):
        raise NotExact(
            f"branches map {a.channels_in}->{a.channels_out} and "
            f"{b.channels_in}->{b.channels_out} channels"
        )
    if a.rank != b.rank:
        raise NotExact("branches have different numbers of spatial dims")
    if a.bias is None or b.bias is None:
        bias = a.bias if b.bias is None else b.bias
    else:
        bias = a.bias + b.bias
    return replace(a, terms=a.terms + b.terms, bias=bias)


def conv(
    weight: Tensor, groups: int, window: Window, bias: Tensor | None, *, label: str = ""
) -> LinearValue:
    """A convolution of the source itself."""
    out, per_group = weight.shape[:2]
    term = Term(weight, groups, window, label=label)
    return LinearValue(
        (term,), None if bias is None else bias.to(MATH_DTYPE), per_group * groups, out
    )


def diagonal(channels: int, taps: Tensor, window: Window, *, label: str = "") -> LinearValue:
    """Every channel convolved with the same taps (average pooling, for one)."""
    term = Term(taps.to(MATH_DTYPE), None, window, label=label)
    return LinearValue((term,), None, channels, channels)


# ---- composing: value first, then a convolution ---------------------------------------------


def then(first: LinearValue, second: LinearValue) -> LinearValue:
    """`second` applied to the output of `first`, as one map, or NotExact.

    Exact cases: `second` is pointwise (a 1x1 conv, stride 1, no padding: channels mix, every
    tap of `first` stays where it is); or `first` is pointwise, possibly reading zero padding
    (a 1x1 conv, a per-channel affine, an explicit zero pad) and `second` does not meet a
    non-zero border: the zeros `second` pads with are what `first` gives for zero input only
    when `first` has no bias, or when `second` reads no padding at all.
    """
    if first.channels_out != second.channels_in:
        raise NotExact(f"{first.channels_out} channels feed a map of {second.channels_in}")
    if _is_identity(first):
        # A map of the source itself (every region starts so): composing would only multiply
        # the kernel by ones, and a 1x1 after it through a dense identity matrix.
        return second
    if all(t.window.is_pointwise for t in second.terms):
        result = _mix_after(first, second)
    elif _single_tap(first):
        result = _spread_after(first, second)
    else:
        raise NotExact(
            "a spatial map follows another spatial map (exact only without padding between them)"
        )
    if _cost(result) > _cost(first) + _cost(second):
        # Exact, but no re-parameterization: a depthwise 3x3 then a 1x1 would become a dense 3x3.
        raise NotExact("one conv would cost more multiply-adds than the two maps it replaces")
    return _labelled(result, first, second)


def _is_identity(value: LinearValue) -> bool:
    """Whether `value` is `identity(...)` as built, untouched (no scale, bias or padding)."""
    if len(value.terms) != 1 or value.bias is not None:
        return False
    term = value.terms[0]
    if not (term.diagonal and term.scale is None and term.label == "identity"):
        return False
    if not term.window.is_pointwise or term.weights.numel() != 1:
        return False
    return term.weights.is_meta or float(term.weights.reshape(())) == 1.0


def _cost(value: LinearValue) -> int:
    """Multiply-adds per output position of the one conv the value's dense terms sum into
    (diagonal terms alone cost nothing: a norm, a scale, the identity)."""
    dense = [t for t in value.terms if not t.diagonal]
    if not dense:
        return 0
    groups = math.gcd(*[t.groups for t in dense])
    taps = max(math.prod(t.window.size) for t in value.terms)
    return value.channels_out * (value.channels_in // groups) * taps


def _labelled(result: LinearValue, first: LinearValue, second: LinearValue) -> LinearValue:
    """Terms of a composition named after what they compose ("1x1>3x3", "3x3" after a pad)."""
    if len(result.terms) == len(second.terms) and len(first.terms) == 1:
        before = first.terms[0].label
        labels = [t.label if before == "identity" else f"{before}>{t.label}" for t in second.terms]
    else:
        after = "+".join(t.label for t in second.terms)
        labels = [after if t.label == "identity" else f"{t.label}>{after}" for t in first.terms]
    if len(labels) != len(result.terms):
        return result
    terms = tuple(replace(t, label=label) for t, label in zip(result.terms, labels))
    return replace(result, terms=terms)


def _single_tap(value: LinearValue) -> bool:
    windows = {t.window for t in value.terms}
    return len(windows) == 1 and next(iter(windows)).is_shift_free_pad


def _mix_after(first: LinearValue, second: LinearValue) -> LinearValue:
    """A pointwise map after anything: each of `first`'s terms is mixed by `second`'s matrix."""
    matrix = _collapse_pointwise(second)
    terms = tuple(_mix_term(matrix, t, first.channels_out) for t in first.terms)
    bias = second.bias
    if first.bias is not None:
        carried = _apply_matrix(matrix, first.bias)
        bias = carried if bias is None else bias + carried
    return LinearValue(terms, bias, first.channels_in, second.channels_out)


def _spread_after(first: LinearValue, second: LinearValue) -> LinearValue:
    """A spatial map after a single-tap one: the taps of `second`, each mixed by `first`."""
    window = first.terms[0].window
    if first.bias is not None and (not window.is_pointwise or _any_reads_padding(second)):
        raise NotExact(
            "a spatial map pads the output of a map with a bias: its border would read zeros "
            "where the bias belongs"
        )
    matrix = _collapse_pointwise(first)
    terms = tuple(_spread_term(t, matrix, window, first.channels_in) for t in second.terms)
    bias = second.bias
    if first.bias is not None:
        through = [_tap_sums(t, first.channels_out) for t in second.terms]
        carried = sum(_apply_matrix(m, first.bias) for m in through)
        bias = carried if bias is None else bias + carried
    return LinearValue(terms, bias, first.channels_in, second.channels_out)


def _any_reads_padding(value: LinearValue) -> bool:
    return any(t.window.reads_padding for t in value.terms)


@dataclass(frozen=True)
class _Matrix:
    """A pointwise map as (out, in // groups) weights; groups None: a per-channel vector."""

    weights: Tensor
    groups: int | None


def _collapse_pointwise(value: LinearValue) -> _Matrix:
    """The single-tap terms of `value` summed into one channel matrix (taps dropped)."""
    if all(t.diagonal for t in value.terms):
        total = sum(
            _vector(_term_scale(t), value.channels_out) * t.weights.reshape(()) for t in value.terms
        )
        return _Matrix(total, None)
    groups = math.gcd(*[t.groups for t in value.terms if t.groups is not None])
    total = torch.zeros(
        (value.channels_out, value.channels_in // groups),
        dtype=MATH_DTYPE,
        device=value.terms[0].weights.device,
    )
    for t in value.terms:
        total += _dense(t, groups, value.channels_in).reshape(total.shape)
    return _Matrix(total, groups)


def _term_scale(term: Term) -> Tensor:
    if term.scale is None:
        return torch.ones((), dtype=MATH_DTYPE, device=term.weights.device)
    return term.scale


def _apply_matrix(matrix: _Matrix, vector: Tensor) -> Tensor:
    """matrix @ vector for a grouped (or diagonal) channel matrix."""
    if matrix.groups is None:
        return matrix.weights * vector
    out, per_group = matrix.weights.shape
    blocks = matrix.weights.reshape(matrix.groups, out // matrix.groups, per_group)
    return torch.bmm(blocks, vector.reshape(matrix.groups, per_group, 1)).reshape(out)


def _tap_sums(term: Term, channels_in: int) -> _Matrix:
    """What `term` does to an input constant over space: its kernel summed over the taps."""
    spatial = tuple(range(-term.window.rank, 0))
    if term.diagonal:
        return _Matrix(_vector(_term_scale(term), channels_in) * term.weights.sum(), None)
    summed = term.weights.to(MATH_DTYPE).sum(dim=spatial)
    if term.scale is not None:
        summed = summed * _vector(term.scale, summed.shape[0]).unsqueeze(1)
    return _Matrix(summed, term.groups)


def _mix_term(matrix: _Matrix, term: Term, channels: int) -> Term:
    if matrix.groups is None:  # a per-channel scale: the term keeps its shape
        scale = matrix.weights if term.scale is None else matrix.weights * term.scale
        return replace(term, scale=scale)
    inner = term.groups if term.groups is not None else channels
    groups = math.gcd(matrix.groups, inner)
    kernel = _dense(term, groups, channels)
    mixed = _grouped_matmul(_expand_matrix(matrix, groups), kernel, groups)
    return Term(mixed, groups, term.window)


def _spread_term(term: Term, matrix: _Matrix, window: Window, channels_in: int) -> Term:
    """`term` (a conv of the middle) applied to `matrix` (pointwise from the input), read
    through `window` (the pad, if any, before the middle)."""
    shifted = Window(
        term.window.stride,
        tuple(s + w for s, w in zip(term.window.start, window.start)),
        term.window.dilation,
        term.window.size,
        tuple(e + w + 1 for e, w in zip(term.window.excess, window.excess)),
    )
    if matrix.groups is None and term.diagonal:
        scale = matrix.weights if term.scale is None else term.scale * matrix.weights
        return Term(term.weights, None, shifted, scale)
    if matrix.groups is None:  # per-channel scale of the input: scale the kernel's columns
        dense = _dense(term, term.groups, channels_in)
        columns = _input_columns(matrix.weights, term.groups, dense.shape)
        return Term(dense * columns, term.groups, shifted)
    inner = term.groups if term.groups is not None else matrix.weights.shape[0]
    groups = math.gcd(matrix.groups, inner)
    kernel = _dense(term, groups, matrix.weights.shape[0])
    mixed = _grouped_matmul_right(kernel, _expand_matrix(matrix, groups), groups)
    return Term(mixed, groups, shifted)


def _input_columns(vector: Tensor, groups: int, shape: torch.Size) -> Tensor:
    """Per input channel values laid out like a kernel's (out, in // groups) columns."""
    out, per_group = shape[:2]
    rows = torch.arange(out, device=vector.device) // (out // groups) * per_group
    index = rows.unsqueeze(1) + torch.arange(per_group, device=vector.device)
    return vector[index].reshape(out, per_group, *([1] * (len(shape) - 2)))


# ---- dense kernels at a chosen grouping -------------------------------------------------------


def _dense(term: Term, groups: int, channels_in: int) -> Tensor:
    """The term's scaled kernel as (out, channels_in // groups, *size) in float64.

    `groups` must divide the term's own grouping (a diagonal term divides any): a finer-grouped
    kernel sits block-diagonally inside the coarser one.
    """
    size = term.window.size
    if term.diagonal:
        kernel = _diagonal(channels_in, groups, term.weights)
    else:
        kernel = term.weights.to(MATH_DTYPE)
        if term.groups != groups:
            kernel = _regroup(kernel, term.groups, groups, channels_in)
    if term.scale is not None:
        kernel = kernel * _vector(term.scale, kernel.shape[0]).reshape(-1, *([1] * (1 + len(size))))
    return kernel


def _diagonal(channels: int, groups: int, taps: Tensor) -> Tensor:
    per_group = channels // groups
    kernel = torch.zeros((channels, per_group, *taps.shape), dtype=MATH_DTYPE, device=taps.device)
    index = torch.arange(channels, device=taps.device)
    kernel[index, index % per_group] = taps.to(MATH_DTYPE)
    return kernel


def _regroup(kernel: Tensor, fine: int, coarse: int, channels_in: int) -> Tensor:
    out, fine_width = kernel.shape[:2]
    if fine % coarse:
        raise NotExact(f"groups={fine} does not split into groups={coarse}")
    coarse_width = channels_in // coarse
    wide = torch.zeros(
        (out, coarse_width, *kernel.shape[2:]), dtype=kernel.dtype, device=kernel.device
    )
    rows = torch.arange(out, device=kernel.device)
    offset = (rows // (out // fine)) % (fine // coarse) * fine_width
    columns = offset.unsqueeze(1) + torch.arange(fine_width, device=kernel.device)
    wide[rows.unsqueeze(1), columns] = kernel
    return wide


def _expand_matrix(matrix: _Matrix, groups: int) -> Tensor:
    channels_in = matrix.weights.shape[1] * (matrix.groups or 1)
    term = Term(
        matrix.weights.reshape(*matrix.weights.shape, 1), matrix.groups, Window.pointwise(1)
    )
    return _dense(term, groups, channels_in).reshape(matrix.weights.shape[0], -1)


def _grouped_matmul(matrix: Tensor, kernel: Tensor, groups: int) -> Tensor:
    """matrix (out, mid // g) after kernel (mid, in // g, *size): (out, in // g, *size)."""
    out, mid_width = matrix.shape
    mid, in_width = kernel.shape[:2]
    size = kernel.shape[2:]
    left = matrix.reshape(groups, out // groups, mid_width)
    right = kernel.reshape(groups, mid // groups, -1)
    return torch.bmm(left, right).reshape(out, in_width, *size)


def _grouped_matmul_right(kernel: Tensor, matrix: Tensor, groups: int) -> Tensor:
    """kernel (out, mid // g, *size) after matrix (mid, in // g): (out, in // g, *size)."""
    out, mid_width = kernel.shape[:2]
    mid, in_width = matrix.shape
    size = kernel.shape[2:]
    taps = math.prod(size)
    by_tap = kernel.reshape(groups, out // groups, mid_width, taps).permute(0, 3, 1, 2)
    by_tap = by_tap.reshape(groups, taps * (out // groups), mid_width)
    product = torch.bmm(by_tap, matrix.reshape(groups, mid // groups, in_width))
    product = product.reshape(groups, taps, out // groups, in_width).permute(0, 2, 3, 1)
    return product.reshape(out, in_width, *size)


# ---- the sum as one convolution ---------------------------------------------------------------


@dataclass(frozen=True)
class FusedConv:
    """The single convolution a linear value equals."""

    kernel: Tensor
    bias: Tensor
    groups: int
    stride: Ints
    padding: Ints
    dilation: Ints


def to_conv(value: LinearValue, *, dtype: torch.dtype = MATH_DTYPE) -> FusedConv:
    """Sum the terms in the one window they all fit, as a conv; the kernel rounded to `dtype`."""
    windows = [t.window for t in value.terms]
    if len({w.stride for w in windows}) > 1:
        raise NotExact(
            f"branches slide with different strides {sorted({w.stride for w in windows})}"
        )
    if len({w.excess for w in windows}) > 1:
        raise NotExact(
            "branches pad differently, so their outputs differ in size or do not line up"
        )
    rank = windows[0].rank
    axes = [
        _fit_axis([(w.start[a], w.dilation[a], w.size[a]) for w in windows], windows[0].excess[a])
        for a in range(rank)
    ]
    dilation = tuple(ax.dilation for ax in axes)
    size = tuple(ax.size for ax in axes)
    groups = _common_groups(value)
    branches, offsets = [], []
    for t in value.terms:
        branches.append(_placed_branch(t, groups, dilation, value))
        offsets.append(
            tuple((t.window.start[a] - axes[a].first) // dilation[a] for a in range(rank))
        )
    summed = add(branches, dtype=dtype, size=size, offsets=offsets)
    bias = summed.bias if value.bias is None else summed.bias + value.bias
    return FusedConv(
        summed.kernel, bias, groups, windows[0].stride, tuple(ax.padding for ax in axes), dilation
    )


@dataclass(frozen=True)
class _Axis:
    first: int  # input offset of the fused kernel's first tap (= -padding)
    dilation: int
    size: int

    @property
    def padding(self) -> int:
        return -self.first


def _fit_axis(reads: Sequence[tuple[int, int, int]], excess: int) -> _Axis:
    """The fused kernel along one axis: every term's taps on its grid, padding symmetric.

    A conv with padding P and span S has excess 2P - S; zero taps added on the left raise P and
    S together, on the right S alone, so the window is widened until the excess matches.
    """
    first = min(start for start, _, _ in reads)
    last = max(start + d * (k - 1) for start, d, k in reads)
    step = 0
    for start, d, k in reads:
        step = math.gcd(step, start - first)
        if k > 1:
            step = math.gcd(step, d)
    step = step or 1
    padding, span = -first, last - first + 1
    missing = excess - (2 * padding - span)  # = D * (left taps added - right taps added)
    if missing % step:
        raise NotExact("the branches' windows do not centre in one symmetric padding")
    balance = missing // step
    inside = -(padding // step) if padding < 0 else 0  # a conv cannot start inside its input
    left = max(0, balance, inside)
    right = left - balance
    first -= left * step
    span += (left + right) * step
    return _Axis(first, step, (span - 1) // step + 1)


def _common_groups(value: LinearValue) -> int:
    dense = [t.groups for t in value.terms if t.groups is not None]
    if not dense:
        return value.channels_in  # only diagonal terms: a depthwise conv
    if value.channels_in != value.channels_out and any(t.diagonal for t in value.terms):
        raise NotExact("an identity-like branch between different channel counts")
    return math.gcd(*dense)


def _placed_branch(term: Term, groups: int, dilation: Ints, value: LinearValue) -> Branch:
    """The term as a `kernels.Branch` at `groups`, its taps spread onto the fused grid."""
    if term.diagonal:
        kernel = _diagonal(
            value.channels_in, groups, _spread(term.weights, term.window, dilation, 0)
        )
        scale = None if term.scale is None else _vector(term.scale, value.channels_out)
        return Branch(kernel, _zeros(value), scale)
    kernel = term.weights
    if term.groups != groups:
        kernel = _regroup(kernel.to(MATH_DTYPE), term.groups, groups, value.channels_in)
    kernel = _spread(kernel, term.window, dilation, 2)
    scale = None if term.scale is None else _vector(term.scale, value.channels_out)
    return Branch(kernel, _zeros(value), scale)


def _zeros(value: LinearValue) -> Tensor:
    return torch.zeros(value.channels_out, dtype=MATH_DTYPE, device=value.terms[0].weights.device)


def _spread(weights: Tensor, window: Window, dilation: Ints, lead: int) -> Tensor:
    """Taps of dilation d placed on a grid of step D (d a multiple of D): zeros between them."""
    factors = [
        d // step if k > 1 else 1 for d, step, k in zip(window.dilation, dilation, window.size)
    ]
    if all(f == 1 for f in factors):
        return weights
    size = [(k - 1) * f + 1 for k, f in zip(window.size, factors)]
    spread = torch.zeros((*weights.shape[:lead], *size), dtype=weights.dtype, device=weights.device)
    spread[(slice(None),) * lead + tuple(slice(None, None, f) for f in factors)] = weights
    return spread
