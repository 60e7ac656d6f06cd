"""Blocks of one layout share a trace inside a conversion, and only blocks that trace alike."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import randomized, rel_error
from torch import nn

from repconv import engine, memo, tracing
from repconv.zoo.blocks import RepVGGBlock, conv_bn


class ScaledSum(nn.Module):
    """3x3 conv-BN + `k` * 1x1 conv-BN: `k` is a plain float the forward reads."""

    def __init__(self, width: int, k: float):
        super().__init__()
        self.k = k
        self.dense = conv_bn(width, width, 3, padding=1)
        self.one = conv_bn(width, width, 1)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.k * self.one(x))


class ModedRepVGG(nn.Module):
    """RepVGG's child names; `mode` (a string) decides whether the 1x1 branch counts twice, so
    the repvgg rule may fuse the "sum" blocks only."""

    def __init__(self, width: int, mode: str):
        super().__init__()
        self.mode = mode
        self.rbr_dense = conv_bn(width, width, 3, padding=1)
        self.rbr_1x1 = conv_bn(width, width, 1)
        self.rbr_identity = nn.BatchNorm2d(width)
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):  # the rule's deploy form
            return self.nonlinearity(self.rbr_reparam(x))
        one = self.rbr_1x1(x)
        if self.mode == "double":
            one = 2 * one
        return self.nonlinearity(self.rbr_dense(x) + one + self.rbr_identity(x))


class ConstantBias(nn.Module):
    """fx stores the tensor made in forward on the traced module as `_tensor_constant0`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + torch.ones(4, 1, 1)


@pytest.fixture
def traces(monkeypatch) -> list[nn.Module]:
    """The modules `tracing` traces, in order."""
    seen: list[nn.Module] = []
    original = tracing.trace

    def counted(root, opaque=frozenset()):
        seen.append(root)
        return original(root, opaque)

    monkeypatch.setattr(tracing, "trace", counted)
    return seen


def test_layout_key_tells_apart_what_a_forward_can_read():
    a, b = RepVGGBlock(4, 4), RepVGGBlock(4, 4)
    assert tracing.layout_key(a) == tracing.layout_key(b)
    assert tracing.layout_key(a) != tracing.layout_key(RepVGGBlock(4, 8))
    assert tracing.layout_key(a) != tracing.layout_key(a, opaque={id(a.rbr_1x1)})
    b.groups = True  # 1 == True, but a forward can tell them apart
    assert tracing.layout_key(a) != tracing.layout_key(b)
    assert tracing.layout_key(ScaledSum(4, 1.0)) != tracing.layout_key(ScaledSum(4, 2.0))


@pytest.mark.parametrize(
    "spoil",
    [
        lambda m: setattr(m, "table", torch.ones(3)),  # a tensor outside the registries
        lambda m: setattr(m, "config", object()),
        lambda m: m.register_forward_hook(lambda *args: None),
        lambda m: setattr(m.rbr_dense, "cache", [object()]),
    ],
    ids=["tensor", "object", "hook", "nested-object"],
)
def test_no_layout_key_when_a_forward_could_read_something_unplain(spoil):
    block = RepVGGBlock(4, 4)
    spoil(block)
    assert tracing.layout_key(block) is None


def test_blocks_of_one_layout_are_traced_once_per_scope(traces):
    blocks = [RepVGGBlock(4, 4) for _ in range(3)]
    with memo.scope():
        graphs = [tracing.graph_of(b, by_layout=True) for b in blocks]
    assert traces == blocks[:1]
    assert len({id(g) for g in graphs}) == 3  # each caller owns its copy
    assert [len(g.nodes) for g in graphs] == [len(graphs[0].nodes)] * 3
    for b in blocks:
        tracing.graph_of(b, by_layout=True)  # no scope: nothing is kept
    assert len(traces) == 4


def test_a_trace_that_changes_its_module_is_not_shared(traces):
    first, second = ConstantBias(), ConstantBias()
    with memo.scope():
        tracing.graph_of(first, by_layout=True)
        graph = tracing.graph_of(second, by_layout=True)
    assert traces == [first, second]
    targets = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    assert targets and all(hasattr(second, t) for t in targets)


def test_blocks_that_differ_in_a_plain_value_are_fused_each_by_its_own_graph():
    model = randomized(nn.Sequential(ScaledSum(4, 1.0), ScaledSum(4, 2.0), ScaledSum(4, 1.0)))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        applied = engine.convert_model(model)
        assert rel_error(model(x), want) < 1e-12
    assert [(e.rule, e.status) for e in applied.entries] == [("dataflow", "fused")] * 3


def test_the_rule_check_is_answered_per_layout_not_per_class():
    """The repvgg rule's data-flow check must not carry a "sum" block's answer over to a
    "double" block of the same structure."""
    model = randomized(nn.Sequential(ModedRepVGG(4, "sum"), ModedRepVGG(4, "double")))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        applied = engine.convert_model(model)
        assert rel_error(model(x), want) < 1e-12
    assert [(e.path, e.rule) for e in applied.entries] == [("0", "repvgg"), ("1", "dataflow")]


def test_memo_keeps_answers_for_one_scope_only():
    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    assert memo.remembered("k", 1, compute) == 1  # no scope: computed every time
    with memo.scope():
        assert memo.remembered("k", 1, compute) == 2
        with memo.scope():  # nested: the outer scope's answers
            assert memo.remembered("k", 1, compute) == 2
        assert memo.remembered("k", None, compute) == 3  # no key: never kept
        memo.forget("k", 1)
        assert memo.remembered("k", 1, compute) == 4
    with memo.scope():
        assert memo.remembered("k", 1, compute) == 5


def test_kept_answers_last_the_process_within_a_bound(monkeypatch):
    monkeypatch.setattr(memo, "PROCESS_LIMIT", 2)
    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    kind = "test answers"
    assert [memo.kept(kind, k, compute) for k in (1, 2, 1)] == [1, 2, 1]
    assert memo.kept(kind, 3, compute) == 3  # the bound drops the oldest: 2
    assert memo.kept(kind, 1, compute) == 1
    assert memo.kept(kind, 2, compute) == 4
    assert memo.kept(kind, None, compute) == 5  # no key: never kept


def test_a_class_whose_forward_is_reassigned_gets_a_new_key(monkeypatch):
    block = ModedRepVGG(4, "sum")
    before = tracing.layout_key(block)
    monkeypatch.setattr(ModedRepVGG, "forward", lambda self, x: x)
    assert tracing.layout_key(block) != before


class RepVGGForm(nn.Module):
    """RepVGG's child names; `body` is the training forward under test, the deploy form is
    the repvgg rule's."""

    def __init__(self, width: int = 4, identity: bool = True):
        super().__init__()
        self.rbr_dense = conv_bn(width, width, 3, padding=1)
        self.rbr_1x1 = conv_bn(width, width, 1)
        self.rbr_identity = nn.BatchNorm2d(width) if identity else None
        self.nonlinearity = nn.ReLU()

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.rbr_reparam(x))
        return self.nonlinearity(self.body(x))


class ChildFeedsChild(RepVGGForm):
    def body(self, x):
        return self.rbr_dense(x) + self.rbr_1x1(self.rbr_identity(x))


class ChildAddedTwice(RepVGGForm):
    def body(self, x):
        one = self.rbr_1x1(x)
        return self.rbr_dense(x) + one + one + self.rbr_identity(x)


class BareInputAdded(RepVGGForm):
    def body(self, x):
        return self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x) + x


class InPlaceSum(RepVGGForm):
    def body(self, x):
        out = self.rbr_dense(x)
        out += self.rbr_1x1(x)
        out += self.rbr_identity(x)
        return out


class TorchAddSum(RepVGGForm):
    def body(self, x):
        return torch.add(torch.add(self.rbr_dense(x), self.rbr_1x1(x)), self.rbr_identity(x))


class BuiltinSum(RepVGGForm):
    def body(self, x):
        return sum([self.rbr_dense(x), self.rbr_1x1(x), self.rbr_identity(x)])


class ReleaseSum(RepVGGForm):
    """The RepVGG release's forward: `id_out = 0` when there is no identity branch."""

    def body(self, x):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.rbr_dense(x) + self.rbr_1x1(x) + id_out


def _converted_by(model: nn.Module, width: int = 4) -> list[tuple[str, str]]:
    model = randomized(model)
    x = torch.randn(2, width, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        applied = engine.convert_model(model)
        assert rel_error(model(x), want) < 1e-12
    return [(e.path, e.rule) for e in applied.entries]


@pytest.mark.parametrize("block", [ChildFeedsChild, ChildAddedTwice, BareInputAdded])
def test_the_rule_check_refuses_the_children_arranged_other_than_one_sum(block):
    """The same leaves, added only, in another arrangement than the sum the repvgg rule
    folds: the rule must leave the block to the data-flow pass."""
    assert _converted_by(nn.Sequential(block())) == [("0", "dataflow")]


@pytest.mark.parametrize(
    "block",
    [InPlaceSum, TorchAddSum, BuiltinSum, ReleaseSum, lambda: ReleaseSum(identity=False)],
    ids=["in-place", "torch.add", "builtin-sum", "release", "release-no-identity"],
)
def test_the_rule_check_keeps_every_spelling_of_the_plain_sum(block):
    assert _converted_by(nn.Sequential(block())) == [("0", "repvgg")]


def test_the_rule_check_keeps_the_zoo_block_with_se():
    model = nn.Sequential(RepVGGBlock(16, 16, use_se=True), RepVGGBlock(16, 16))
    assert _converted_by(model, width=16) == [("0", "repvgg"), ("1", "repvgg")]


class SignedSum(nn.Module):
    """3x3 conv-BN +/- 1x1 conv-BN, the sign taken from a float at trace time."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k
        self.dense = conv_bn(4, 4, 3, padding=1)
        self.one = conv_bn(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.dense(x) + math.copysign(1.0, self.k) * self.one(x))


class BufferScaledSum(nn.Module):
    """3x3 conv-BN + k * 1x1 conv-BN, `k` a buffer the forward reads as a number."""

    def __init__(self, k: float):
        super().__init__()
        self.register_buffer("k", torch.tensor(k))
        self.dense = conv_bn(4, 4, 3, padding=1)
        self.one = conv_bn(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.dense(x) + float(self.k) * self.one(x))


class BufferModedRepVGG(RepVGGForm):
    """A bool buffer decides whether the 1x1 branch counts twice."""

    def __init__(self, twice: bool):
        super().__init__()
        self.register_buffer("one_twice", torch.tensor(twice))

    def body(self, x):
        one = self.rbr_1x1(x)
        if self.one_twice:
            one = 2 * one
        return self.rbr_dense(x) + one + self.rbr_identity(x)


def test_floats_equal_but_not_alike_are_different_layouts():
    assert tracing.layout_key(SignedSum(0.0)) != tracing.layout_key(SignedSum(-0.0))
    model = nn.Sequential(SignedSum(0.0), SignedSum(-0.0))
    assert _converted_by(model) == [("0", "dataflow"), ("1", "dataflow")]


def test_no_layout_key_when_an_inlined_forward_could_read_a_buffer():
    assert tracing.layout_key(BufferScaledSum(1.0)) is None
    assert tracing.layout_key(RepVGGBlock(4, 4)) is not None  # the norms' buffers: leaves
    model = nn.Sequential(BufferScaledSum(1.0), BufferScaledSum(2.0))
    assert _converted_by(model) == [("0", "dataflow"), ("1", "dataflow")]


def test_the_rule_check_is_not_kept_for_a_block_whose_buffer_steers_its_forward():
    model = nn.Sequential(BufferModedRepVGG(False), BufferModedRepVGG(True))
    assert _converted_by(model) == [("0", "repvgg"), ("1", "dataflow")]


class ClassModedRepVGG(RepVGGForm):
    """A class attribute decides whether the 1x1 branch counts twice."""

    mode = "sum"

    def body(self, x):
        one = self.rbr_1x1(x)
        if self.mode == "double":
            one = 2 * one
        return self.rbr_dense(x) + one + self.rbr_identity(x)


def test_the_rule_check_kept_for_the_process_sees_a_class_attribute_change(monkeypatch):
    assert _converted_by(nn.Sequential(ClassModedRepVGG())) == [("0", "repvgg")]
    monkeypatch.setattr(ClassModedRepVGG, "mode", "double")
    assert _converted_by(nn.Sequential(ClassModedRepVGG())) == [("0", "dataflow")]


def test_repconv_calls_in_threads_take_turns(monkeypatch):
    """fx patches torch.nn.Module for every thread while it traces, so another thread's model
    run meanwhile fails ('module is not installed as a submodule'): a second thread's plan
    starts only when the first thread's call has ended."""
    import threading
    import time

    from repconv.rules import Rule

    inside, release = threading.Event(), threading.Event()

    def blocking_match(module):
        if isinstance(module, RepVGGBlock):
            inside.set()
            release.wait(10)
        return None

    def never_fuses(module):
        raise AssertionError("never matched")

    rule = Rule("blocking", "test", "blocks the first plan", blocking_match, never_fuses)
    seen: list[bool] = []
    check = engine.check_norm_statistics

    def recording(model):
        if isinstance(model, ModedRepVGG):
            seen.append(release.is_set())  # True: the first plan had ended
        return check(model)

    monkeypatch.setattr(engine, "check_norm_statistics", recording)
    first = threading.Thread(target=engine.plan, args=(RepVGGBlock(4, 4).eval(), [rule]))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=engine.plan, args=(ModedRepVGG(4, "sum").eval(),))
    second.start()
    time.sleep(0.3)  # room for the second plan to run, were it not waiting
    release.set()
    first.join(10)
    second.join(10)
    assert seen == [True]
