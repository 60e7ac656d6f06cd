"""Property tests for the data-flow fuser (issue 13): the algebra of `repconv.linear_map` against
torch's own ops, and whole random programs of linear ops converted by `engine.convert_model`.

Everything runs in float64 and must agree within 1e-10. Where the code refuses (`NotExact`, or a
block left unfused) that is allowed; a wrong answer never is.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import randomized
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from repconv import dataflow, engine, tracing
from repconv import linear_map as L

TOLERANCE = 1e-10
CHANNELS = 4
# Small by default (the file runs in seconds); REPCONV_PROPERTY_EXAMPLES=10 hunts longer.
_SCALE = int(os.environ.get("REPCONV_PROPERTY_EXAMPLES", "1"))
FEW = settings(max_examples=30 * _SCALE, deadline=None)
GRAPHS = settings(max_examples=12 * _SCALE, deadline=None)

seeds = st.integers(0, 2**31 - 1)

# ---- part 1: linear_map against torch -----------------------------------------------------------


@dataclass
class Map:
    """A linear map twice: as the algebra's value and as the torch ops it stands for."""

    value: L.LinearValue
    run: Callable[[Tensor], Tensor]
    name: str


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def conv_map(gen, size, stride, padding, dilation, groups, bias=True, cin=CHANNELS, cout=CHANNELS):
    weight = randn(gen, cout, cin // groups, *size)
    b = randn(gen, cout) if bias else None
    window = L.Window.conv(size, stride, padding, dilation)
    value = L.conv(weight, groups, window, b, label="conv")

    def run(x):
        return F.conv2d(x, weight, b, stride, padding, dilation, groups)

    name = f"conv{size} s{stride} p{padding} d{dilation} g{groups} bias={bias}"
    return Map(value, run, name)


def pool_map(size, stride, padding):
    taps = torch.full(size, 1.0 / (size[0] * size[1]), dtype=torch.float64)
    value = L.diagonal(CHANNELS, taps, L.Window.conv(size, stride, padding, (1, 1)))

    def run(x):
        return F.avg_pool2d(x, size, stride, padding, count_include_pad=True)

    return Map(value, run, f"avgpool{size} s{stride} p{padding}")


def pad_map(lo, hi):
    """F.pad with (top, left) = lo and (bottom, right) = hi, as the analysis builds it."""
    window = L.Window(
        (1, 1), (-lo[0], -lo[1]), (1, 1), (1, 1), (lo[0] + hi[0] - 1, lo[1] + hi[1] - 1)
    )
    value = L.diagonal(CHANNELS, torch.ones((1, 1), dtype=torch.float64), window)

    def run(x):
        return F.pad(x, [lo[1], hi[1], lo[0], hi[0]])

    return Map(value, run, f"pad lo={lo} hi={hi}")


def identity_map():
    return Map(L.identity(CHANNELS, 2), lambda x: x, "identity")


def affine_map(gen, inner: Map, per_channel: bool, shift: bool) -> Map:
    scale = randn(gen, CHANNELS) if per_channel else randn(gen)
    offset = randn(gen, CHANNELS) if shift else None
    value = L.affine(inner.value, scale, offset)

    def run(x):
        y = inner.run(x) * (scale.reshape(-1, 1, 1) if per_channel else scale)
        return y if offset is None else y + offset.reshape(-1, 1, 1)

    return Map(value, run, f"affine({inner.name}, shift={shift})")


@st.composite
def conv_geometry(draw, stride=None, centred=False):
    """Kernel sizes 1..5 (even and asymmetric too), dilation 1..3, stride 1 or 2; padding that
    centres the window (odd spans only when `centred`) or any padding up to the span."""
    size, dilation, padding = [], [], []
    for _ in range(2):
        k, d = draw(st.integers(1, 5)), draw(st.integers(1, 3))
        if centred and (k - 1) * d % 2:
            k -= 1
        span = (k - 1) * d + 1
        middle = (span - 1) // 2
        size.append(k)
        dilation.append(d)
        padding.append(middle if centred or draw(st.booleans()) else draw(st.integers(0, span)))
    stride = draw(st.sampled_from([1, 2])) if stride is None else stride
    return tuple(size), (stride, stride), tuple(padding), tuple(dilation)


@st.composite
def branches(draw, gen, stride=None, centred=False):
    """One random map of CHANNELS -> CHANNELS channels, scaled or shifted or not."""
    kinds = ["conv", "conv", "pool", "identity", "pad"]
    if centred:
        kinds = ["conv", "conv", "pool"] + (["identity"] if stride in (None, 1) else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        size, strides, padding, dilation = draw(conv_geometry(stride, centred))
        groups = draw(st.sampled_from([1, 2, 4]))
        inner = conv_map(gen, size, strides, padding, dilation, groups, draw(st.booleans()))
    elif kind == "pool":
        k = draw(st.sampled_from([1, 3])) if centred else draw(st.integers(1, 3))
        s = draw(st.sampled_from([1, 2])) if stride is None else stride
        p = k // 2 if centred else draw(st.integers(0, k // 2))
        inner = pool_map((k, k), (s, s), (p, p))
    elif kind == "pad":
        lo = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        hi = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        inner = pad_map(lo, hi)
    else:
        inner = identity_map()
    if draw(st.booleans()):
        return affine_map(gen, inner, draw(st.booleans()), draw(st.booleans()))
    return inner


def evaluate(value: L.LinearValue, x: Tensor) -> Tensor:
    """A linear value computed term by term from its windows (independent of `to_conv`)."""
    total = sum(_run_term(term, x) for term in value.terms)
    if value.bias is not None:
        total = total + value.bias.reshape(-1, 1, 1)
    return total


def _run_term(term: L.Term, x: Tensor) -> Tensor:
    window, pads, outputs = term.window, [], []
    for axis in range(2):
        length = x.shape[2 + axis]
        count = (length + window.excess[axis]) // window.stride[axis] + 1
        last = window.stride[axis] * (count - 1) + window.start[axis] + window.spans[axis] - 1
        pads.append((-window.start[axis], last - (length - 1)))
        outputs.append(count)
    padded = F.pad(x, [*pads[1], *pads[0]])  # negative pads crop
    if term.diagonal:
        kernel = term.weights.expand(x.shape[1], 1, *window.size)
        groups = x.shape[1]
    else:
        kernel, groups = term.weights, term.groups
    y = F.conv2d(padded, kernel, None, window.stride, 0, window.dilation, groups)
    assert list(y.shape[2:]) == outputs
    if term.scale is not None:
        y = y * (term.scale.reshape(-1, 1, 1) if term.scale.dim() else term.scale)
    return y


def run_fused(fused: L.FusedConv, x: Tensor) -> Tensor:
    return F.conv2d(
        x, fused.kernel, fused.bias, fused.stride, fused.padding, fused.dilation, fused.groups
    )


def assert_close(got: Tensor, want: Tensor, what: str) -> None:
    assert got.shape == want.shape, (what, tuple(got.shape), tuple(want.shape))
    error = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert error <= TOLERANCE, f"{what}: error {error:.3e}"


def input_for(gen: torch.Generator, data) -> Tensor:
    """Big enough for any unpadded 5-tap kernel of dilation 3 (span 13), odd or even."""
    height, width = data.draw(st.integers(13, 15)), data.draw(st.integers(13, 15))
    return randn(gen, 2, CHANNELS, height, width)


@FEW
@given(seed=seeds, count=st.integers(2, 3), data=st.data())
def test_sum_is_exact_or_refused(seed, count, data):
    gen = torch.Generator().manual_seed(seed)
    maps = [data.draw(branches(gen)) for _ in range(count)]
    x = input_for(gen, data)
    outputs = [m.run(x) for m in maps]
    total = maps[0].value
    for m in maps[1:]:
        total = L.plus(total, m.value)
    names = " + ".join(m.name for m in maps)
    if len({tuple(y.shape) for y in outputs}) > 1:
        event("sizes differ: refused")
        with pytest.raises(L.NotExact):
            L.to_conv(total)
        return
    reference = sum(outputs)
    assert_close(evaluate(total, x), reference, names)
    try:
        fused = L.to_conv(total)
    except L.NotExact:
        event("same sizes: refused")
        return
    event("same sizes: fused")
    assert_close(run_fused(fused, x), reference, names)


@FEW
@given(seed=seeds, count=st.integers(1, 3), stride=st.sampled_from([1, 2]), data=st.data())
def test_centred_branches_of_one_stride_always_fuse(seed, count, stride, data):
    """RepVGG-like sums (odd spans, centred padding, one stride): never refused, exact."""
    gen = torch.Generator().manual_seed(seed)
    maps = [data.draw(branches(gen, stride=stride, centred=True)) for _ in range(count)]
    x = input_for(gen, data)
    total = maps[0].value
    for m in maps[1:]:
        total = L.plus(total, m.value)
    fused = L.to_conv(total)
    assert_close(run_fused(fused, x), sum(m.run(x) for m in maps), " + ".join(m.name for m in maps))


@st.composite
def first_maps(draw, gen):
    kind = draw(st.sampled_from(["any", "pointwise", "affine", "pad"]))
    if kind == "pointwise":
        groups = draw(st.sampled_from([1, 2, 4]))
        return conv_map(gen, (1, 1), (1, 1), (0, 0), (1, 1), groups, draw(st.booleans()))
    if kind == "affine":
        return affine_map(gen, identity_map(), draw(st.booleans()), draw(st.booleans()))
    if kind == "pad":
        lo = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        return pad_map(lo, (draw(st.integers(0, 2)), draw(st.integers(0, 2))))
    return draw(branches(gen))


@st.composite
def second_maps(draw, gen):
    kind = draw(st.sampled_from(["any", "pointwise"]))
    if kind == "pointwise":
        groups = draw(st.sampled_from([1, 2, 4]))
        return conv_map(gen, (1, 1), (1, 1), (0, 0), (1, 1), groups, draw(st.booleans()))
    return draw(branches(gen))


@FEW
@given(seed=seeds, data=st.data())
def test_composition_is_exact_or_refused(seed, data):
    gen = torch.Generator().manual_seed(seed)
    first, second = data.draw(first_maps(gen)), data.draw(second_maps(gen))
    x = input_for(gen, data)
    try:
        reference = second.run(first.run(x))
    except RuntimeError:  # the input is too small for this chain: nothing to compare
        assume(False)
    what = f"{second.name} after {first.name}"
    try:
        composed = L.then(first.value, second.value)
    except L.NotExact:
        event("then refused")
        return
    assert_close(evaluate(composed, x), reference, what)
    try:
        fused = L.to_conv(composed)
    except L.NotExact:
        event("then exact, to_conv refused")
        return
    event("then exact, fused")
    assert_close(run_fused(fused, x), reference, what)


def test_pointwise_with_bias_then_padded_conv_is_refused():
    gen = torch.Generator().manual_seed(0)
    first = conv_map(gen, (1, 1), (1, 1), (0, 0), (1, 1), 1, bias=True)
    second = conv_map(gen, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(L.NotExact):
        L.then(first.value, second.value)


def test_pointwise_with_bias_then_unpadded_conv_is_exact():
    gen = torch.Generator().manual_seed(1)
    first = conv_map(gen, (1, 1), (1, 1), (0, 0), (1, 1), 1, bias=True)
    second = conv_map(gen, (3, 3), (1, 1), (0, 0), (1, 1), 1)
    x = randn(gen, 2, CHANNELS, 7, 6)
    fused = L.to_conv(L.then(first.value, second.value))
    assert_close(run_fused(fused, x), second.run(first.run(x)), "3x3 after 1x1 with bias")


# ---- part 2: random programs of linear ops, converted whole --------------------------------------


class Program(nn.Module):
    """A forward that is a random expression tree over one input x.

    Nodes: ("x",), ("mod", name, child) for a child module (conv, BN, pool, ReLU),
    ("pad", pads, child), ("mul", name, child) by a parameter, ("add" | "sub", a, b),
    ("square", child) and ("gate", child) (x * sigmoid(x)).
    """

    def __init__(self, tree: tuple, modules: dict[str, nn.Module], params: dict[str, Tensor]):
        super().__init__()
        self.tree = tree
        for name, module in modules.items():
            self.add_module(name, module)
        for name, value in params.items():
            self.register_parameter(name, nn.Parameter(value))

    def forward(self, x):
        return self._run(self.tree, x, {})

    def _run(self, node: tuple, x, done: dict[int, Tensor]):
        """A node reached twice (a shared source of branches) is computed once."""
        if id(node) not in done:
            done[id(node)] = self._compute(node, x, done)
        return done[id(node)]

    def _compute(self, node: tuple, x, done: dict[int, Tensor]):
        kind = node[0]
        if kind == "x":
            return x
        if kind in ("add", "sub"):
            a, b = self._run(node[1], x, done), self._run(node[2], x, done)
            return a + b if kind == "add" else a - b
        if kind == "square":
            y = self._run(node[1], x, done)
            return y * y
        if kind == "gate":
            y = self._run(node[1], x, done)
            return y * torch.sigmoid(y)
        inner = self._run(node[2], x, done)
        if kind == "pad":
            return F.pad(inner, node[1])
        if kind == "mul":
            return inner * getattr(self, node[1])
        return getattr(self, node[1])(inner)


class Builder:
    """Collects the modules and parameters a tree refers to, under fresh names."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen
        self.modules: dict[str, nn.Module] = {}
        self.params: dict[str, Tensor] = {}

    def module(self, prefix: str, module: nn.Module, child: tuple) -> tuple:
        name = f"{prefix}{len(self.modules)}"
        self.modules[name] = module
        return ("mod", name, child)

    def conv(self, child, size, stride=1, padding=0, dilation=1, groups=1, bias=True, bn=False):
        conv = nn.Conv2d(CHANNELS, CHANNELS, size, stride, padding, dilation, groups, bias)
        node = self.module("conv", conv, child)
        return self.module("bn", nn.BatchNorm2d(CHANNELS), node) if bn else node

    def scaled(self, child: tuple, per_channel: bool) -> tuple:
        name = f"scale{len(self.params)}"
        shape = (1, CHANNELS, 1, 1) if per_channel else ()
        self.params[name] = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        return ("mul", name, child)

    def build(self, tree: tuple) -> Program:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=self.gen)))
        model = Program(tree, self.modules, self.params)
        return randomized(model, int(torch.randint(0, 2**31, (), generator=self.gen)))


def combine(draw, parts: list[tuple]) -> tuple:
    tree = parts[0]
    for part in parts[1:]:
        tree = (draw(st.sampled_from(["add", "sub"])), tree, part)
    return tree


@st.composite
def aligned_programs(draw, builder: Builder) -> tuple:
    """A RepVGG-like block one conv computes: centred branches of one stride, BNs and scales,
    a bias-free 1x1 before and a 1x1 after where that stays one conv of the same cost."""
    stride = draw(st.sampled_from([1, 1, 2]))
    kinds = draw(st.lists(st.sampled_from(["conv", "identity", "pool"]), min_size=0, max_size=2))
    kinds = ["conv", *kinds] if stride == 1 else ["conv", *[k for k in kinds if k != "identity"]]
    dense = draw(st.booleans())  # groups 1 and no pool: a 1x1 may go before or after
    if dense:  # and one identity at most: see test_pointwise_terms_then_1x1_is_one_conv
        kinds = [k for k in kinds if k != "pool"]
        kinds = kinds[:1] + (["identity"] if "identity" in kinds[1:] else [])
    pre = dense and draw(st.booleans())
    source = builder.conv(("x",), 1, bias=False) if pre else ("x",)
    parts = []
    for kind in kinds:
        if kind == "conv":
            size, _, padding, dilation = draw(conv_geometry(stride, centred=True))
            groups = 1 if dense else draw(st.sampled_from([1, 2, 4]))
            bias = draw(st.booleans())
            part = builder.conv(
                source, size, stride, padding, dilation, groups, bias, draw(st.booleans())
            )
        elif kind == "pool":
            k = draw(st.sampled_from([1, 3]))
            part = builder.module("pool", nn.AvgPool2d(k, stride, k // 2), source)
        else:
            part = source
        if draw(st.booleans()):
            part = builder.module("bn", nn.BatchNorm2d(CHANNELS), part) if kind != "conv" else part
        if draw(st.booleans()):
            part = builder.scaled(part, draw(st.booleans()))
        parts.append(part)
    tree = combine(draw, parts)
    if len(parts) > 1 and draw(st.booleans()):
        tree = builder.module("bn", nn.BatchNorm2d(CHANNELS), tree)
    if draw(st.booleans()):
        tree = builder.scaled(tree, draw(st.booleans()))
    if dense and draw(st.booleans()):
        tree = builder.conv(tree, 1, bias=draw(st.booleans()), bn=draw(st.booleans()))
    return tree


@st.composite
def messy_programs(draw, builder: Builder, depth: int = 3) -> tuple:
    """Any tree of same-size linear ops at stride 1: kernels 1..5 of any dilation, even spans
    padded asymmetrically with F.pad, groups, BNs anywhere, pools, scales, sums."""
    kinds = ["x"] if depth == 0 else ["x", "conv", "conv", "bn", "pool", "scale", "sum", "sum"]
    kind = draw(st.sampled_from(kinds))
    if kind == "x":
        return ("x",)
    child = draw(messy_programs(builder, depth - 1))
    if kind == "sum":
        other = draw(messy_programs(builder, depth - 1))
        return (draw(st.sampled_from(["add", "sub"])), child, other)
    if kind == "bn":
        return builder.module("bn", nn.BatchNorm2d(CHANNELS), child)
    if kind == "pool":
        k = draw(st.sampled_from([1, 3]))
        return builder.module("pool", nn.AvgPool2d(k, 1, k // 2), child)
    if kind == "scale":
        return builder.scaled(child, draw(st.booleans()))
    return same_size_conv(draw, builder, child)


def same_size_conv(draw, builder: Builder, child: tuple) -> tuple:
    size, _, padding, dilation = draw(conv_geometry(1))
    spans = [(k - 1) * d + 1 for k, d in zip(size, dilation)]
    centred = all(s % 2 for s in spans) and draw(st.booleans())
    if centred:
        padding = tuple((s - 1) // 2 for s in spans)
    else:  # an explicit zero F.pad of span - 1 in all, split at random
        lo = [draw(st.integers(0, s - 1)) for s in spans]
        child = ("pad", [lo[1], spans[1] - 1 - lo[1], lo[0], spans[0] - 1 - lo[0]], child)
        padding = 0
    groups = draw(st.sampled_from([1, 2, 4]))
    bias, bn = draw(st.booleans()), draw(st.booleans())
    return builder.conv(child, size, 1, padding, dilation, groups, bias, bn)


def convs_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def norms_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def converted(model: nn.Module, x: Tensor) -> engine.Applied:
    """Convert `model` in place; its output must not change."""
    with torch.no_grad():
        reference = model(x)
        shown = repr(model)
        applied = engine.convert_model(model)
        assert_close(model(x), reference, shown)
    return applied


def convert_exactly(model: nn.Module, x: Tensor) -> engine.Applied:
    return converted(model, x)


def image(gen: torch.Generator) -> Tensor:
    return randn(gen, 2, CHANNELS, 10, 9)


@GRAPHS
@given(seed=seeds, data=st.data())
def test_aligned_linear_programs_become_one_conv(seed, data):
    gen = torch.Generator().manual_seed(seed)
    builder = Builder(gen)
    model = builder.build(data.draw(aligned_programs(builder)))
    convert_exactly(model, image(gen))
    assert norms_of(model) == []
    assert len(convs_of(model)) == 1, model


@GRAPHS
@given(seed=seeds, data=st.data())
def test_any_linear_program_is_fused_exactly_or_left(seed, data):
    gen = torch.Generator().manual_seed(seed)
    builder = Builder(gen)
    tree = data.draw(messy_programs(builder))
    model = builder.build(tree)
    before = len(convs_of(model)) + len(norms_of(model))  # a BN + identity region adds a conv
    convert_exactly(model, image(gen))
    assert len(convs_of(model)) + len(norms_of(model)) <= max(before, 1)


NON_LINEAR = ["relu", "square", "gate"]


def subtrees(tree: tuple) -> list[tuple]:
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if node not in found:  # by value: ("x",) once
            found.append(node)
        stack += [c for c in node[1:] if isinstance(c, tuple)]
    return found


def wrapped(tree: tuple, target: tuple, wrap: Callable[[tuple], tuple]) -> tuple:
    """`tree` with every occurrence of the subtree `target` replaced by wrap(target), once."""
    done: dict[int, tuple] = {}

    def visit(node: tuple) -> tuple:
        if node is target or node == target:
            done.setdefault(0, wrap(node))
            return done[0]
        if id(node) not in done:
            done[id(node)] = tuple(visit(c) if isinstance(c, tuple) else c for c in node)
        return done[id(node)]

    return visit(tree)


def conv_names(tree: tuple, modules: dict[str, nn.Module]) -> set[str]:
    return {n[1] for n in subtrees(tree) if n[0] == "mod" and isinstance(modules[n[1]], nn.Conv2d)}


def descendants(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


@GRAPHS
@given(seed=seeds, aligned=st.booleans(), kind=st.sampled_from(NON_LINEAR), data=st.data())
def test_no_region_crosses_a_non_linearity(seed, aligned, kind, data):
    gen = torch.Generator().manual_seed(seed)
    builder = Builder(gen)
    tree = data.draw(aligned_programs(builder) if aligned else messy_programs(builder))
    target = data.draw(st.sampled_from(subtrees(tree)))
    if kind == "relu":
        tree = wrapped(tree, target, lambda t: builder.module("relu", nn.ReLU(), t))
    else:
        tree = wrapped(tree, target, lambda t: (kind, t))
    model = builder.build(tree)
    upstream = conv_names(target, builder.modules)
    downstream = conv_names(tree, builder.modules) - upstream

    graph = tracing.trace(model)
    cut = [n for n in graph.nodes if _is_non_linear(n)]
    assert cut, graph
    after = set().union(*(descendants(n) for n in cut))
    for region in dataflow.analyse(model, graph):
        assert not set(region.nodes) & set(cut)
        if set(region.nodes) & after:  # downstream of the non-linearity: so is its source
            assert region.source in after or region.source in cut, region.describe()

    convert_exactly(model, image(gen))
    if kind == "relu":
        assert any(isinstance(m, nn.ReLU) for m in model.modules())
    if upstream and downstream:
        assert len(convs_of(model)) >= 2, model


def _is_non_linear(node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return str(node.target).startswith("relu")
    square = node.target is operator.mul and node.args[0] is node.args[1]
    return square or node.target is torch.sigmoid


# ---- bugs the properties found (minimal examples) ----------------------------------------------


class ChainedRegions(nn.Module):
    """Two regions in one block, the second reading the first's output."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, (1, 2))

    def forward(self, x):
        return self.conv2(F.pad(self.conv1(x * 2.0), [0, 1, 0, 0]))


def test_chained_regions_in_one_block():
    converted(ChainedRegions().double().eval(), randn(torch.Generator(), 2, CHANNELS, 6, 6))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.b = nn.Conv2d(CHANNELS, CHANNELS, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


class CalledTwice(nn.Module):
    """One block (shared weights) called twice from its parent's forward."""

    def __init__(self):
        super().__init__()
        self.block = Inner()

    def forward(self, x):
        return self.block(torch.relu(self.block(x)))


def test_block_called_twice_plans():
    converted(CalledTwice().double().eval(), randn(torch.Generator(), 2, CHANNELS, 6, 6))


class LeafCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False)
        self.conv1 = nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False)

    def forward(self, x):
        return self.conv1(self.conv0(x)) + self.conv2(self.conv0(x))


def test_leaf_called_twice_is_still_one_region():
    model = LeafCalledTwice().double().eval()
    converted(model, randn(torch.Generator(), 2, CHANNELS, 6, 6))
    assert len(convs_of(model)) == 1


class TwoIdentitiesThen1x1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(CHANNELS, CHANNELS, 1)
        self.conv1 = nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False)

    def forward(self, x):
        return self.conv1(self.conv0(x) + x + x)


def test_pointwise_terms_then_1x1_is_one_conv():
    model = TwoIdentitiesThen1x1().double().eval()
    converted(model, randn(torch.Generator(), 2, CHANNELS, 6, 6))
    assert len(convs_of(model)) == 1


class ComputedKernelThenNorm(nn.Module):
    """No conv module: the forward builds its kernel from parameters (OREPA's weight_gen, here
    grouped) and runs F.conv2d with it, then a BN."""

    def __init__(self):
        super().__init__()
        self.weight_a = nn.Parameter(torch.randn(CHANNELS, CHANNELS // 2, 3, 3))
        self.weight_1x1 = nn.Parameter(torch.randn(CHANNELS, CHANNELS // 2, 1, 1))
        self.vector = nn.Parameter(torch.rand(2, CHANNELS) + 0.5)
        self.bn = nn.BatchNorm2d(CHANNELS)

    def forward(self, x):
        one = F.pad(self.weight_1x1, [1, 1, 1, 1])
        weight = torch.einsum("oihw,o->oihw", self.weight_a, self.vector[0]) + torch.einsum(
            "oihw,o->oihw", one, self.vector[1]
        )
        return torch.relu(self.bn(F.conv2d(x, weight, None, 2, 1, 1, 2)))


def test_computed_kernel_then_norm_is_one_conv():
    """Fails without the three parts of the fix: a module holding no conv module is traced, a
    functional conv fixes its input's channels (else the input has no known shape), and a
    functional conv with its norm is the data-flow pass's (the conv -> BN pass cannot fold it)."""
    model = randomized(ComputedKernelThenNorm())
    applied = converted(model, randn(torch.Generator().manual_seed(3), 2, CHANNELS, 7, 7))
    assert [(e.path, e.rule, e.status) for e in applied.entries] == [("", "dataflow", "fused")]
    assert not norms_of(model) and len(convs_of(model)) == 1
    assert model.reparam.groups == 2 and model.reparam.stride == (2, 2)
    assert set(model.state_dict()) == {"reparam.weight", "reparam.bias"}
