"""Property tests for the fusion math (repconv.kernels) and branch alignment (repconv.geometry).

Every property runs the branches themselves with plain torch ops (conv, eval-mode batch norm,
identity, average pooling, BN-and-pad with a constant border) and compares the sum against one
convolution built from the fused kernel and bias.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from repconv.errors import NotFusable
from repconv.geometry import Geometry, align
from repconv.kernels import (
    MATH_DTYPE,
    Branch,
    NormStats,
    add,
    as_branch,
    avg_pool,
    compose,
    fold_bn,
    identity,
    pad_to,
    pool_after,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}

SETTINGS = settings(max_examples=50, deadline=None)
FEW = settings(max_examples=30, deadline=None)

dtypes = st.sampled_from([torch.float64, torch.float32])
seeds = st.integers(0, 2**31 - 1)
odd_sizes = st.sampled_from([1, 3, 5, 7])
epsilons = st.sampled_from([1e-5, 1e-3, 0.1, 1.0])


# ---- helpers --------------------------------------------------------------------------------


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def make_bn(gen: torch.Generator, channels: int, affine: bool, eps: float, dtype) -> NormStats:
    mean = randn(gen, channels).to(dtype)
    var = (torch.rand(channels, generator=gen, dtype=torch.float64) * 1.8 + 0.2).to(dtype)
    weight = randn(gen, channels).to(dtype) if affine else None
    bias = randn(gen, channels).to(dtype) if affine else None
    return NormStats(mean, var, weight, bias, eps)


def ref_bn(y: torch.Tensor, stats: NormStats) -> torch.Tensor:
    return F.batch_norm(
        y, stats.mean, stats.var, stats.weight, stats.bias, training=False, eps=stats.eps
    )


def pad_or_crop(x: torch.Tensor, padding) -> torch.Tensor:
    """Zero-pad (p > 0) or crop (p < 0) each spatial dim of x by |p| on both sides."""
    for axis, p in enumerate(padding):
        dim = 2 + axis
        if p < 0:
            x = x.narrow(dim, -p, x.shape[dim] + 2 * p)
        elif p > 0:
            pads = [0] * (2 * (x.dim() - 2))
            back = 2 * (x.dim() - 3 - axis)
            pads[back] = pads[back + 1] = p
            x = F.pad(x, pads)
    return x


def pad_with(y: torch.Tensor, padding, value: torch.Tensor) -> torch.Tensor:
    """Pad each spatial dim by padding[i] on both sides with a per-channel constant."""
    n, c, *size = y.shape
    full = [s + 2 * p for s, p in zip(size, padding)]
    out = value.reshape(1, c, *([1] * len(size))).expand(n, c, *full).clone()
    interior = (slice(None), slice(None), *(slice(p, p + s) for s, p in zip(size, padding)))
    out[interior] = y
    return out


def ref_conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A conv whose padding may be negative (a crop), as ACNet's cropping branches do."""
    dims = x.dim() - 2
    if isinstance(padding, int):
        padding = (padding,) * dims
    return CONV[dims](pad_or_crop(x, padding), weight, bias, stride, 0, dilation, groups)


def fused_conv(branch: Branch, x: torch.Tensor, stride=1, padding=0, dilation=1, groups=1):
    """The single conv a fused branch stands for (its scale applied), run in x's dtype."""
    # A kernel that was only scaled or lined up keeps its weight's dtype; the rest is float64.
    assert branch.kernel.dtype in (MATH_DTYPE, x.dtype) and branch.bias.dtype == MATH_DTYPE
    assert branch.scale is None or branch.scale.dtype == MATH_DTYPE
    dims = x.dim() - 2
    kernel, bias = branch.scaled_kernel().to(x.dtype), branch.bias.to(x.dtype)
    return CONV[dims](x, kernel, bias, stride, padding, dilation, groups)


def assert_close(fused: torch.Tensor, ref: torch.Tensor) -> None:
    assert fused.shape == ref.shape, (tuple(fused.shape), tuple(ref.shape))
    assert fused.dtype == ref.dtype
    bound = TOLERANCE[ref.dtype] * max(1.0, ref.abs().max().item())
    err = (fused - ref).abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


def input_size(kernel: int, padding: int, dilation: int, extra: int) -> int:
    """A spatial size that gives at least one output position (and survives a crop)."""
    return max(1, dilation * (kernel - 1) + 1 - 2 * padding, 1 - 2 * padding) + extra


@st.composite
def channel_layouts(draw, square: bool = False):
    """(in_channels, out_channels, groups), including depthwise convs."""
    groups = draw(st.integers(1, 4))
    depthwise = draw(st.booleans())
    in_per = 1 if depthwise else draw(st.integers(1, 3))
    if square:
        out_per = in_per
    else:
        out_per = draw(st.integers(1, 2)) if depthwise else draw(st.integers(1, 3))
    return groups * in_per, groups * out_per, groups


def spatial(draw, dims: int, elements) -> tuple[int, ...]:
    return tuple(draw(elements) for _ in range(dims))


# ---- fold_bn --------------------------------------------------------------------------------


@SETTINGS
@given(
    dims=st.integers(1, 3),
    layout=channel_layouts(),
    conv_bias=st.booleans(),
    affine=st.booleans(),
    eps=epsilons,
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_fold_bn_matches_conv_then_batch_norm(
    dims, layout, conv_bias, affine, eps, dtype, seed, data
):
    cin, cout, groups = layout
    ks = spatial(data.draw, dims, odd_sizes if dims < 3 else st.sampled_from([1, 3, 5]))
    stride = spatial(data.draw, dims, st.integers(1, 3))
    padding = spatial(data.draw, dims, st.integers(0, 3))
    dilation = spatial(data.draw, dims, st.integers(1, 2))
    extra = spatial(data.draw, dims, st.integers(0, 3))
    gen = torch.Generator().manual_seed(seed)
    size = [input_size(*a) for a in zip(ks, padding, dilation, extra)]
    x = randn(gen, 2, cin, *size).to(dtype)
    weight = randn(gen, cout, cin // groups, *ks).to(dtype)
    bias = randn(gen, cout).to(dtype) if conv_bias else None
    stats = make_bn(gen, cout, affine, eps, dtype)

    ref = ref_bn(CONV[dims](x, weight, bias, stride, padding, dilation, groups), stats)
    fused = fold_bn(as_branch(weight, bias), stats)
    assert fused.kernel.shape == weight.shape and fused.bias.shape == (cout,)
    assert_close(fused_conv(fused, x, stride, padding, dilation, groups), ref)


def test_fold_bn_known_values():
    kernel = torch.tensor([[[2.0]], [[-1.0]]], dtype=torch.float64)  # 2 channels, 1d, size 1
    stats = NormStats(
        mean=torch.tensor([1.0, -2.0], dtype=torch.float64),
        var=torch.tensor([3.0, 0.5], dtype=torch.float64),
        weight=torch.tensor([2.0, 4.0], dtype=torch.float64),
        bias=torch.tensor([0.5, -1.0], dtype=torch.float64),
        eps=1.0,
    )
    fused = fold_bn(as_branch(kernel, torch.tensor([3.0, 1.0])), stats)
    # scale = weight / sqrt(var + eps) = (1, 4 / sqrt(1.5)); bias = (b - mean) * scale + beta
    s1 = 4.0 / math.sqrt(1.5)
    torch.testing.assert_close(
        fused.scaled_kernel().flatten(),
        torch.tensor([2.0, -s1], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        fused.bias, torch.tensor([2.5, 3.0 * s1 - 1.0], dtype=torch.float64), rtol=0, atol=1e-12
    )
    no_affine = fold_bn(as_branch(kernel), stats._replace(weight=None, bias=None))
    torch.testing.assert_close(
        no_affine.bias,
        torch.tensor([-0.5, 2.0 / math.sqrt(1.5)], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )


# ---- pad_to ---------------------------------------------------------------------------------


@SETTINGS
@given(
    dims=st.integers(1, 3),
    layout=channel_layouts(),
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_pad_to_centres_the_kernel(dims, layout, dtype, seed, data):
    cin, cout, groups = layout
    small = spatial(data.draw, dims, st.integers(1, 4))
    grow = spatial(data.draw, dims, st.integers(0, 2))
    target = tuple(k + 2 * g for k, g in zip(small, grow))
    stride = spatial(data.draw, dims, st.integers(1, 2))
    padding = spatial(data.draw, dims, st.integers(0, 2))
    dilation = spatial(data.draw, dims, st.integers(1, 2))
    extra = spatial(data.draw, dims, st.integers(0, 2))
    gen = torch.Generator().manual_seed(seed)
    branch = as_branch(randn(gen, cout, cin // groups, *small), randn(gen, cout))

    padded = pad_to(branch, target)
    assert padded.spatial == target
    centre = (slice(None), slice(None), *(slice(g, g + k) for k, g in zip(small, grow)))
    assert torch.equal(padded.kernel[centre], branch.kernel)
    rest = padded.kernel.clone()
    rest[centre] = 0
    assert not rest.any()
    assert torch.equal(padded.bias, branch.bias)

    # The padded kernel with its padding grown by d * (K - k) / 2 computes the same function.
    size = [input_size(*a) for a in zip(small, padding, dilation, extra)]
    x = randn(gen, 2, cin, *size).to(dtype)
    ref = CONV[dims](
        x, branch.kernel.to(dtype), branch.bias.to(dtype), stride, padding, dilation, groups
    )
    big_padding = tuple(p + d * g for p, d, g in zip(padding, dilation, grow))
    assert_close(fused_conv(padded, x, stride, big_padding, dilation, groups), ref)


def test_pad_to_rejects_impossible_targets():
    branch = as_branch(torch.ones(2, 1, 3, 1))
    with pytest.raises(ValueError):
        pad_to(branch, (4, 3))  # odd difference
    with pytest.raises(ValueError):
        pad_to(branch, (5, 2))  # odd difference in the second dim
    with pytest.raises(ValueError):
        pad_to(branch, (1, 3))  # shrinking
    with pytest.raises(ValueError):
        pad_to(branch, (3, 3, 3))  # different number of dims
    assert torch.equal(pad_to(branch, (3, 1)).kernel, branch.kernel)


# ---- identity -------------------------------------------------------------------------------


@SETTINGS
@given(
    dims=st.integers(1, 3),
    layout=channel_layouts(square=True),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_identity_kernel_reproduces_the_input(dims, layout, stride, dilation, dtype, seed, data):
    channels, _, groups = layout
    size = spatial(data.draw, dims, odd_sizes if dims < 3 else st.sampled_from([1, 3, 5]))
    length = spatial(data.draw, dims, st.integers(1, 7))
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, 2, channels, *length).to(dtype)

    branch = identity(channels, groups, size)
    assert branch.kernel.shape == (channels, channels // groups, *size)
    assert not branch.bias.any()
    padding = tuple(dilation * (k // 2) for k in size)
    out = fused_conv(branch, x, stride, padding, dilation, groups)
    ref = x[(slice(None), slice(None)) + (slice(None, None, stride),) * dims]
    assert_close(out, ref)


def test_identity_rejects_bad_arguments():
    with pytest.raises(ValueError):
        identity(4, 1, (3, 2))
    with pytest.raises(ValueError):
        identity(6, 4)


# ---- avg_pool -------------------------------------------------------------------------------


@SETTINGS
@given(
    dims=st.integers(1, 3),
    layout=channel_layouts(square=True),
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_avg_pool_kernel_matches_avg_pool(dims, layout, dtype, seed, data):
    channels, _, groups = layout
    size = spatial(data.draw, dims, st.integers(1, 4))
    stride = spatial(data.draw, dims, st.integers(1, 3))
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in size)
    extra = spatial(data.draw, dims, st.integers(0, 4))
    gen = torch.Generator().manual_seed(seed)
    length = [k + e for k, e in zip(size, extra)]  # torch's pools want input >= window
    x = randn(gen, 2, channels, *length).to(dtype)

    ref = AVG_POOL[dims](x, size, stride, padding, count_include_pad=True)
    branch = avg_pool(channels, groups, size)
    assert branch.kernel.shape == (channels, channels // groups, *size)
    assert_close(fused_conv(branch, x, stride, padding, 1, groups), ref)


# ---- compose (1x1 -> BN -> BN-and-pad -> kxk -> BN) -----------------------------------------


def bn_and_pad_then(x, first_w, first_b, bn1, padding, groups, second):
    """1x1 conv -> BN -> pad with the BN output for a zero input -> second(.)."""
    dims = x.dim() - 2
    mid = ref_bn(CONV[dims](x, first_w, first_b, groups=groups), bn1)
    zero = torch.zeros((1, x.shape[1]) + (1,) * dims, dtype=x.dtype)
    border = ref_bn(CONV[dims](zero, first_w, first_b, groups=groups), bn1).flatten()
    return second(pad_with(mid, padding, border))


@SETTINGS
@given(
    dims=st.integers(1, 3),
    layout=channel_layouts(),
    mid_per_group=st.integers(1, 3),
    first_bias=st.booleans(),
    second_bias=st.booleans(),
    affine=st.booleans(),
    eps=epsilons,
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_compose_matches_1x1_bn_pad_kxk(
    dims, layout, mid_per_group, first_bias, second_bias, affine, eps, dtype, seed, data
):
    cin, cout, groups = layout
    mid = groups * mid_per_group
    ks = spatial(data.draw, dims, odd_sizes if dims < 3 else st.sampled_from([1, 3, 5]))
    stride = spatial(data.draw, dims, st.integers(1, 3))
    padding = spatial(data.draw, dims, st.integers(0, 3))
    dilation = spatial(data.draw, dims, st.integers(1, 2))
    extra = spatial(data.draw, dims, st.integers(0, 3))
    gen = torch.Generator().manual_seed(seed)
    size = [input_size(*a) for a in zip(ks, padding, dilation, extra)]
    x = randn(gen, 2, cin, *size).to(dtype)
    w1 = randn(gen, mid, cin // groups, *([1] * dims)).to(dtype)
    b1 = randn(gen, mid).to(dtype) if first_bias else None
    bn1 = make_bn(gen, mid, affine, eps, dtype)
    w2 = randn(gen, cout, mid_per_group, *ks).to(dtype)
    b2 = randn(gen, cout).to(dtype) if second_bias else None
    bn2 = make_bn(gen, cout, True, eps, dtype)

    def second(y):
        return ref_bn(CONV[dims](y, w2, b2, stride, 0, dilation, groups), bn2)

    ref = bn_and_pad_then(x, w1, b1, bn1, padding, groups, second)
    first = fold_bn(as_branch(w1, b1), bn1)
    if not affine and not first_bias:
        assert first.bias.abs().max() > 0  # the running mean alone makes the bias non-zero
    fused = compose(first, fold_bn(as_branch(w2, b2), bn2), groups)
    assert fused.kernel.shape == (cout, cin // groups, *ks)
    assert_close(fused_conv(fused, x, stride, padding, dilation, groups), ref)


def test_compose_rejects_bad_shapes():
    one = as_branch(torch.ones(4, 2, 1, 1))
    three = as_branch(torch.ones(6, 2, 3, 3))
    with pytest.raises(ValueError):
        compose(three, three, 2)  # first conv is not 1x1
    with pytest.raises(ValueError):
        compose(one, three, 1)  # 4 mid channels, second conv expects 2 per group with 1 group
    with pytest.raises(ValueError):
        compose(one, as_branch(torch.ones(5, 2, 3, 3)), 2)  # 5 outputs do not split in 2
    assert compose(one, three, 2).kernel.shape == (6, 2, 3, 3)


# ---- add, with geometry.align ---------------------------------------------------------------


@SETTINGS
@given(
    layout=channel_layouts(),
    k=st.sampled_from([3, 5, 7]),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    affine=st.booleans(),
    eps=epsilons,
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_add_acb_square_horizontal_vertical(
    layout, k, stride, dilation, affine, eps, dtype, seed, data
):
    cin, cout, groups = layout
    p = data.draw(st.integers(0, dilation * (k // 2) + 1))
    shift = dilation * (k // 2)  # d * (k // 2); with d = 1 this is ACNet's p - k // 2
    extra = spatial(data.draw, 2, st.integers(0, 3))
    gen = torch.Generator().manual_seed(seed)
    size = [input_size(k, p, dilation, e) for e in extra]
    x = randn(gen, 2, cin, *size).to(dtype)

    target = Geometry((k, k), (stride, stride), (p, p), (dilation, dilation))
    shapes = {"square": (k, k), "hor": (1, k), "ver": (k, 1)}
    paddings = {"square": (p, p), "hor": (p - shift, p), "ver": (p, p - shift)}
    ref = 0
    fused = []
    for name, ks in shapes.items():
        w = randn(gen, cout, cin // groups, *ks).to(dtype)
        stats = make_bn(gen, cout, affine, eps, dtype)
        out = ref_conv(x, w, None, stride, paddings[name], dilation, groups)
        ref = ref + ref_bn(out, stats)
        geometry = Geometry(ks, (stride, stride), paddings[name], (dilation, dilation))
        fused.append(align(fold_bn(as_branch(w), stats), geometry, target))
    total = add(fused)
    assert total.kernel.shape == (cout, cin // groups, k, k)
    assert_close(fused_conv(total, x, stride, p, dilation, groups), ref)


@SETTINGS
@given(
    dims=st.integers(1, 3),
    layout=channel_layouts(square=True),
    stride=st.integers(1, 2),
    delta=st.integers(-1, 1),
    affine=st.booleans(),
    eps=epsilons,
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_add_repvgg_kxk_1x1_identity(dims, layout, stride, delta, affine, eps, dtype, seed, data):
    channels, _, groups = layout
    ks = spatial(data.draw, dims, odd_sizes if dims < 3 else st.sampled_from([1, 3, 5]))
    dilation = spatial(data.draw, dims, st.integers(1, 2))
    centre = tuple(d * (k // 2) for k, d in zip(ks, dilation))
    padding = tuple(max(0, c + delta) for c in centre)
    extra = spatial(data.draw, dims, st.integers(0, 3))
    gen = torch.Generator().manual_seed(seed)
    size = [input_size(*a) for a in zip(ks, padding, dilation, extra)]
    x = randn(gen, 2, channels, *size).to(dtype)
    strides = (stride,) * dims
    ones = (1,) * dims
    target = Geometry(ks, strides, padding, dilation)

    w = randn(gen, channels, channels // groups, *ks).to(dtype)
    bn = make_bn(gen, channels, affine, eps, dtype)
    ref = ref_bn(CONV[dims](x, w, None, stride, padding, dilation, groups), bn)
    branches = [fold_bn(as_branch(w), bn)]

    w1 = randn(gen, channels, channels // groups, *ones).to(dtype)
    bn1 = make_bn(gen, channels, affine, eps, dtype)
    pad1 = tuple(p - c for p, c in zip(padding, centre))
    ref = ref + ref_bn(ref_conv(x, w1, None, stride, pad1, 1, groups), bn1)
    geometry1 = Geometry(ones, strides, pad1, ones)
    branches.append(align(fold_bn(as_branch(w1), bn1), geometry1, target))

    if stride == 1 and padding == centre:
        bn_id = make_bn(gen, channels, affine, eps, dtype)
        ref = ref + ref_bn(x, bn_id)
        geometry_id = Geometry(ones, strides, (0,) * dims, ones)
        identity_bn = fold_bn(identity(channels, groups, ones), bn_id)
        branches.append(align(identity_bn, geometry_id, target))

    assert_close(fused_conv(add(branches), x, stride, padding, dilation, groups), ref)


@FEW
@given(
    layout=channel_layouts(),
    k=st.sampled_from([3, 5]),
    stride=st.integers(1, 2),
    extra_pad=st.integers(0, 1),
    affine=st.booleans(),
    eps=epsilons,
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_add_dbb_four_branches(layout, k, stride, extra_pad, affine, eps, dtype, seed, data):
    """DBB: kxk-BN + 1x1-BN + 1x1-BN-pad-avg-BN + 1x1-BN-pad-kxk-BN, as one kxk conv."""
    cin, cout, groups = layout
    mid_per_group = data.draw(st.integers(1, 2))
    p = k // 2 + extra_pad
    extra = spatial(data.draw, 2, st.integers(0, 3))
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, 2, cin, *[input_size(k, p, 1, e) for e in extra]).to(dtype)
    target = Geometry((k, k), (stride, stride), (p, p), (1, 1))

    def bn(channels):
        return make_bn(gen, channels, affine, eps, dtype)

    w = randn(gen, cout, cin // groups, k, k).to(dtype)
    bn_kxk = bn(cout)
    ref = ref_bn(F.conv2d(x, w, None, stride, p, 1, groups), bn_kxk)
    branches = [fold_bn(as_branch(w), bn_kxk)]

    w1 = randn(gen, cout, cin // groups, 1, 1).to(dtype)
    bn_1x1 = bn(cout)
    pad1 = (p - k // 2,) * 2
    ref = ref + ref_bn(ref_conv(x, w1, None, stride, pad1, 1, groups), bn_1x1)
    geometry1 = Geometry((1, 1), (stride, stride), pad1, (1, 1))
    branches.append(align(fold_bn(as_branch(w1), bn_1x1), geometry1, target))

    wa = randn(gen, cout, cin // groups, 1, 1).to(dtype)
    bn_a1, bn_a2 = bn(cout), bn(cout)

    def pool(y):
        return ref_bn(F.avg_pool2d(y, k, stride, 0, count_include_pad=True), bn_a2)

    ref = ref + bn_and_pad_then(x, wa, None, bn_a1, (p, p), groups, pool)
    avg = fold_bn(avg_pool(cout, groups, (k, k)), bn_a2)
    branches.append(compose(fold_bn(as_branch(wa), bn_a1), avg, groups))

    mid = groups * mid_per_group
    wm = randn(gen, mid, cin // groups, 1, 1).to(dtype)
    wk = randn(gen, cout, mid_per_group, k, k).to(dtype)
    bn_m1, bn_m2 = bn(mid), bn(cout)

    def kxk(y):
        return ref_bn(F.conv2d(y, wk, None, stride, 0, 1, groups), bn_m2)

    ref = ref + bn_and_pad_then(x, wm, None, bn_m1, (p, p), groups, kxk)
    second = fold_bn(as_branch(wk), bn_m2)
    branches.append(compose(fold_bn(as_branch(wm), bn_m1), second, groups))

    assert_close(fused_conv(add(branches), x, stride, p, 1, groups), ref)


def test_add_rejects_mismatched_or_empty():
    with pytest.raises(ValueError):
        add([])
    with pytest.raises(ValueError):  # an even difference cannot be centred
        add([as_branch(torch.ones(2, 1, 3, 3)), as_branch(torch.ones(2, 1, 2, 3))])
    with pytest.raises(ValueError):  # different channels
        add([as_branch(torch.ones(2, 1, 3, 3)), as_branch(torch.ones(3, 1, 3, 3))])
    # A smaller kernel is centred, exactly as pad_to would do it.
    big, thin = as_branch(torch.rand(2, 1, 5, 5)), as_branch(torch.rand(2, 1, 1, 3))
    centred = add([big, thin])
    assert torch.equal(centred.kernel, big.kernel.double() + pad_to(thin, (5, 5)).kernel.double())
    a = as_branch(torch.ones(2, 1, 3), torch.tensor([1.0, 2.0]))
    b = as_branch(-2 * torch.ones(2, 1, 3), torch.tensor([0.5, -1.0]))
    total = add([a, b])
    assert torch.equal(total.kernel, -torch.ones(2, 1, 3, dtype=torch.float64))
    assert torch.equal(total.bias, torch.tensor([1.5, 1.0], dtype=torch.float64))


@given(
    shapes=st.lists(st.sampled_from([(3, 3), (1, 1), (1, 3), (3, 1)]), min_size=1, max_size=4),
    scaled=st.lists(st.booleans(), min_size=4, max_size=4),
    out=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    slice_bytes=st.sampled_from([1, 8 * 2 * 9 * 2, 4 << 20]),
    seed=st.integers(0, 2**16),
)
@FEW
def test_add_in_slices_equals_the_whole_sum_rounded_once(
    shapes, scaled, out, dtype, slice_bytes, seed
):
    g = torch.Generator().manual_seed(seed)
    branches = [
        Branch(
            torch.randn(out, 2, *shape, generator=g).to(dtype),
            torch.randn(out, generator=g, dtype=MATH_DTYPE),
            torch.rand(out, generator=g, dtype=MATH_DTYPE) + 0.5 if scale else None,
        )
        for shape, scale in zip(shapes, scaled)
    ]
    size = tuple(max(b.kernel.shape[d] for b in branches) for d in (2, 3))
    largest_first = sorted(branches, key=lambda b: -math.prod(b.spatial))  # add's order
    whole = sum(pad_to(Branch(b.scaled_kernel(), b.bias), size).kernel for b in largest_first)
    kernels_before = [b.kernel.clone() for b in branches]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("repconv.kernels.SLICE_BYTES", slice_bytes)
        total = add(branches, dtype=dtype)
    assert total.kernel.dtype == dtype and total.scale is None
    torch.testing.assert_close(total.kernel, whole.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(total.bias, sum(b.bias for b in branches), rtol=0, atol=1e-12)
    assert all(torch.equal(b.kernel, k) for b, k in zip(branches, kernels_before))


# ---- align: accepted geometries are exact, rejected ones raise NotFusable -------------------


@SETTINGS
@given(
    dims=st.integers(1, 2),
    layout=channel_layouts(),
    stride=st.integers(1, 3),
    dtype=dtypes,
    seed=seeds,
    data=st.data(),
)
def test_align_of_lined_up_branch_is_exact(dims, layout, stride, dtype, seed, data):
    """Any branch that satisfies the alignment rule is accepted, and the fusion is exact."""
    cin, cout, groups = layout
    big_k = spatial(data.draw, dims, odd_sizes)
    big_d = spatial(data.draw, dims, st.integers(1, 3))
    big_p = spatial(data.draw, dims, st.integers(0, 4))
    ks, ds, ps = [], [], []
    for K, D, P in zip(big_k, big_d, big_p):
        k = data.draw(st.sampled_from(range(1, K + 1, 2)))  # odd, at most K
        d = D if k > 1 else data.draw(st.integers(1, 3))  # a 1-tap dim ignores its dilation
        ks.append(k)
        ds.append(d)
        ps.append(P - D * (K - k) // 2)  # may be negative: a crop
    extra = spatial(data.draw, dims, st.integers(0, 3))
    gen = torch.Generator().manual_seed(seed)
    size = [input_size(*a) for a in zip(big_k, big_p, big_d, extra)]
    x = randn(gen, 2, cin, *size).to(dtype)
    w = randn(gen, cout, cin // groups, *ks).to(dtype)
    b = randn(gen, cout).to(dtype)

    strides = (stride,) * dims
    geometry = Geometry(tuple(ks), strides, tuple(ps), tuple(ds))
    target = Geometry(big_k, strides, big_p, big_d)
    aligned = align(as_branch(w, b), geometry, target)
    assert aligned.spatial == big_k
    ref = ref_conv(x, w, b, stride, tuple(ps), tuple(ds), groups)
    assert_close(fused_conv(aligned, x, stride, big_p, big_d, groups), ref)


def three_by_three(stride=1, padding=1, dilation=1, mode="zeros") -> Geometry:
    return Geometry((3, 3), (stride, stride), (padding, padding), (dilation, dilation), mode)


BRANCH_3X3 = as_branch(torch.ones(2, 2, 3, 3))
BRANCH_1X1 = as_branch(torch.ones(2, 2, 1, 1))


@FEW
@given(k=st.sampled_from([1, 3]), stride=st.integers(1, 3), other=st.integers(1, 3))
def test_align_rejects_mismatched_stride(k, stride, other):
    if stride == other:
        other = stride % 3 + 1
    branch = BRANCH_3X3 if k == 3 else BRANCH_1X1
    geometry = Geometry((k, k), (other, other), (k // 2, k // 2), (1, 1))
    with pytest.raises(NotFusable):
        align(branch, geometry, three_by_three(stride))
    mixed = Geometry((k, k), (stride, other), (k // 2, k // 2), (1, 1))
    with pytest.raises(NotFusable):
        align(branch, mixed, three_by_three(stride))


@FEW
@given(
    k=st.sampled_from([1, 3, 5]),
    big_k=st.sampled_from([3, 5, 7]),
    dilation=st.integers(1, 3),
    big_p=st.integers(0, 6),
    off=st.sampled_from([-2, -1, 1, 2]),
    axis=st.integers(0, 1),
)
def test_align_rejects_misaligned_padding(k, big_k, dilation, big_p, off, axis):
    if k > big_k:
        k, big_k = big_k, k
    right = big_p - dilation * (big_k - k) // 2
    padding = [right, right]
    padding[axis] += off
    branch = as_branch(torch.ones(2, 2, k, k))
    geometry = Geometry((k, k), (1, 1), tuple(padding), (dilation, dilation))
    target = Geometry((big_k, big_k), (1, 1), (big_p, big_p), (dilation, dilation))
    with pytest.raises(NotFusable):
        align(branch, geometry, target)
    # ...while the lined-up padding is accepted.
    assert align(branch, geometry.with_padding((right, right)), target).spatial == (big_k,) * 2


@FEW
@given(
    k=st.sampled_from([3, 5]),
    d=st.integers(1, 3),
    big_d=st.integers(1, 3),
    big_p=st.integers(0, 6),
)
def test_align_rejects_different_dilation(k, d, big_d, big_p):
    if d == big_d:
        big_d = d % 3 + 1
    branch = as_branch(torch.ones(2, 2, k, 1))
    for p in range(-6, 7):  # no padding makes it fusable
        geometry = Geometry((k, 1), (1, 1), (p, big_p), (d, big_d))
        target = Geometry((k, k), (1, 1), (big_p, big_p), (big_d, big_d))
        with pytest.raises(NotFusable):
            align(branch, geometry, target)
    # a 1-tap dim may have any dilation
    ok = Geometry((k, 1), (1, 1), (big_p, big_p - big_d * (k // 2)), (big_d, d))
    assert align(branch, ok, Geometry((k, k), (1, 1), (big_p, big_p), (big_d, big_d))).spatial


@FEW
@given(k=st.sampled_from([3, 5, 7]), p=st.integers(0, 8), seed=seeds)
def test_align_rejects_acb_branch_with_dilation_two(k, p, seed):
    """ACNet's p - k // 2 crop is right for dilation 1 only: with dilation 2 it is misaligned."""
    target = Geometry((k, k), (1, 1), (p, p), (2, 2))
    hor = Geometry((1, k), (1, 1), (p - k // 2, p), (2, 2))
    ver = Geometry((k, 1), (1, 1), (p, p - k // 2), (2, 2))
    gen = torch.Generator().manual_seed(seed)
    for geometry in (hor, ver):
        branch = as_branch(randn(gen, 2, 2, *geometry.kernel_size))
        with pytest.raises(NotFusable):
            align(branch, geometry, target)
    # The rejection is justified: the branch's output does not even have the block's shape.
    x = randn(gen, 1, 2, 2 * k + 3, 2 * k + 3)
    out = ref_conv(x, branch.kernel, None, 1, ver.padding, 2)
    block = F.conv2d(x, torch.zeros(2, 2, k, k, dtype=torch.float64), None, 1, p, 2)
    assert out.shape != block.shape


def test_align_rejects_other_mismatches():
    with pytest.raises(NotFusable):  # different number of spatial dims
        align(as_branch(torch.ones(2, 2, 3)), Geometry((3,), (1,), (1,), (1,)), three_by_three())
    with pytest.raises(NotFusable):  # bigger than the block's kernel
        align(
            as_branch(torch.ones(2, 2, 5, 5)),
            Geometry((5, 5), (1, 1), (2, 2), (1, 1)),
            three_by_three(),
        )
    with pytest.raises(NotFusable):  # even size cannot be centred in odd
        align(
            as_branch(torch.ones(2, 2, 2, 2)),
            Geometry((2, 2), (1, 1), (1, 1), (1, 1)),
            three_by_three(),
        )
    with pytest.raises(NotFusable):  # reads zero padding while the block reflects
        align(BRANCH_3X3, three_by_three(), three_by_three(mode="reflect"))


@FEW
@given(layout=channel_layouts(), k=st.sampled_from([3, 5]), seed=seeds)
def test_align_allows_padding_mode_when_branch_reads_no_padding(layout, k, seed):
    """A 1x1 branch without padding never sees the border, so the block may reflect-pad."""
    cin, cout, groups = layout
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, 2, cin, k + 2, k + 3)
    w, b = randn(gen, cout, cin // groups, k, k), randn(gen, cout)
    w1, b1 = randn(gen, cout, cin // groups, 1, 1), randn(gen, cout)
    c = k // 2
    padded = F.pad(x, (c, c, c, c), mode="reflect")
    ref = F.conv2d(padded, w, b, groups=groups) + F.conv2d(x, w1, b1, groups=groups)
    target = Geometry((k, k), (1, 1), (c, c), (1, 1), "reflect")
    aligned = align(as_branch(w1, b1), Geometry((1, 1), (1, 1), (0, 0), (1, 1)), target)
    total = add([as_branch(w, b), aligned])
    out = F.conv2d(padded, total.kernel, total.bias, groups=groups)
    assert_close(out, ref)


def test_computed_kernels_are_float64_whatever_the_input_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        k = as_branch(torch.randn(4, 2, 3, 3).to(dtype), torch.randn(4).to(dtype))
        one = as_branch(torch.randn(4, 2, 1, 1).to(dtype))
        stats = NormStats(torch.zeros(4), torch.ones(4), torch.ones(4), torch.zeros(4), 1e-5)
        folded = fold_bn(k, stats)
        assert folded.kernel is k.kernel  # folding never touches the kernel
        assert folded.scale.dtype == folded.bias.dtype == MATH_DTYPE
        assert folded.scaled_kernel().dtype == MATH_DTYPE
        assert add([folded, one]).kernel.dtype == MATH_DTYPE
        assert add([folded, one], dtype=dtype).kernel.dtype == dtype
        first = as_branch(torch.randn(4, 4, 1, 1).to(dtype))
        assert compose(first, k, 2).kernel.dtype == MATH_DTYPE


@FEW
@given(
    out=st.integers(1, 6),
    groups=st.sampled_from([1, 2]),
    k=st.sampled_from([1, 3, 5]),
    seed=seeds,
)
def test_pool_after_equals_composing_with_the_pool_kernel(out, groups, k, seed):
    gen = torch.Generator().manual_seed(seed)
    channels = out * groups
    first = Branch(
        torch.randn(channels, 2, 1, 1, generator=gen, dtype=torch.float64),
        torch.randn(channels, generator=gen, dtype=torch.float64),
    )
    direct = pool_after(first, (k, k))
    composed = compose(first, avg_pool(channels, groups, (k, k)), groups)
    assert torch.allclose(direct.kernel, composed.kernel, rtol=0, atol=1e-14)
    assert torch.allclose(direct.bias, composed.bias, rtol=0, atol=1e-14)
