"""The data-flow pass is total, and verification runs what upstream code runs (issue 21, 4).

A block the analysis cannot follow (a traced size used as a kernel size, an unknown call,
dynamic control flow, a failure of the analysis itself) is left as it was with a warning naming
it; a rewritten forward that raises or moves the block's output is undone; forwards that build
tensors without a dtype run in the verification dtype. The blocks are test copies
(tests/total_blocks.py).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import repconv
from repconv import dataflow, engine
from repconv.block_check import ProbeCheck
from repconv.cli import main
from repconv.rules import dataflow as dataflow_pass
from tests import total_blocks as T
from tests.helpers import randomized, rel_error

BLOCKS_FILE = Path(T.__file__)


def outcomes(result) -> list[tuple[str, str, str]]:
    return [(o.path, o.rule, o.status) for o in result.plan.entries]


def skipped(result, rule: str = "dataflow") -> dict[str, str]:
    entries = result.plan.entries
    return {o.path: o.reason for o in entries if o.rule == rule and o.status == "skipped"}


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- MobileOne's SE block: a traced size as the pool's window ----------------------------------


@pytest.mark.parametrize("side", [False, True], ids=["size-list", "size-3"])
def test_mobileone_se_without_methods_converts_and_leaves_the_gate(side):
    model = randomized(T.mobileone_se_net(methods=False, side=side))
    gates = {p: copy.deepcopy(model.get_submodule(p)) for p in ("1.se", "2.se")}
    result = repconv.convert(model, input_shape=(3, 32, 32))
    assert result.passed, result.verification.failure_message()
    assert [(p, s) for p, r, s in outcomes(result) if r == "dataflow"] == [
        ("0", "fused"),
        ("1", "fused"),
        ("2", "fused"),
    ]
    for path, before in gates.items():  # the gate is not linear: kept, names and values
        assert same_tensors(result.model.get_submodule(path), before)
        assert "forward" not in vars(result.model.get_submodule(path))


@pytest.mark.parametrize("side", [False, True], ids=["size-list", "size-3"])
def test_mobileone_se_with_methods_uses_them(side):
    result = repconv.convert(
        randomized(T.mobileone_se_net(methods=True, side=side)), input_shape=(3, 32, 32)
    )
    assert result.passed, result.verification.failure_message()
    methods = [(p, s) for p, r, s in outcomes(result) if r == "deploy_method"]
    assert methods == [("0", "fused"), ("1", "fused"), ("2", "fused")]
    keys = set(result.state_dict)
    assert {"1.reparam_conv.weight", "1.se.reduce.weight", "1.se.expand.bias"} <= keys
    assert not any("rbr_" in k for k in keys)


def test_the_functional_pool_with_a_traced_window_is_not_linear():
    model = T.SEBlock(16).eval()
    graph = torch.fx.Tracer().trace(model)
    analysis = dataflow.Analysis(model, graph)
    assert analysis.regions() == [] and analysis.failures == {}
    pool = next(n for n in graph.nodes if n.target is F.avg_pool2d)
    assert dataflow.kind_of(pool) == "pool"  # looked at, then refused as non-linear


@pytest.mark.parametrize("methods", ["true", "false"])
def test_cli_converts_mobileone_se_with_exit_0(tmp_path, methods):
    model = randomized(T.mobileone_se_net(methods=methods == "true"), dtype=torch.float32)
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)
    spec = f"{BLOCKS_FILE}:mobileone_se_net"
    args = ["convert", str(source), str(out), "--arch", spec, "--input-shape", "3,32,32"]
    kwargs = ["--arch-kwargs", f'{{"methods": {methods}}}']
    result = CliRunner().invoke(main, [*args, *kwargs])
    assert result.exit_code == 0, result.output
    assert out.exists()


# ---- a rewritten forward is checked before it stays -------------------------------------------


def test_an_outer_forward_never_calls_what_an_inner_fusion_deleted():
    model = randomized(T.ResidualAroundBlock())
    result = repconv.convert(model, input_shape=(4, 8, 8))
    assert result.passed, result.verification.failure_message()
    assert outcomes(result) == [("a", "dataflow", "fused"), ("", "dataflow", "fused")]
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():  # both forwards run on what the model now holds
        result.model(x)
        result.model.a(x)


def test_a_rewritten_forward_that_raises_is_undone_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm is deprecated; the hook it adds is not
        model = randomized(T.WeightNormedChain())
    with torch.no_grad():
        model(torch.randn(1, 4, 8, 8, dtype=torch.float64))  # the hook sets `conv.weight`
    before = copy.deepcopy(model)
    result = repconv.convert(model, input_shape=(4, 8, 8))
    assert result.passed, result.verification.failure_message()
    reason = skipped(result)[""]
    assert "rewritten forward failed" in reason and "undone" in reason
    assert "TypeError" in reason
    warned = [w for w in result.plan.warnings if w["path"] == ""]
    assert any("dataflow not applied" in w["message"] for w in warned)
    assert same_tensors(result.model, before)
    assert "forward" not in vars(result.model)


def test_a_rewritten_forward_that_moves_the_output_is_undone(monkeypatch):
    model = randomized(nn.Sequential(T.Residual(4), T.Residual(4)))
    wrong = copy.deepcopy(model.get_submodule("1"))
    fused_conv = dataflow_pass._fused_conv
    calls = []

    def off_by_one(value, dtype):  # a fuser bug in the second block only
        fused = fused_conv(value, dtype)
        calls.append(1)
        if len(calls) == 2:
            fused.bias.add_(1.0)
        return fused

    monkeypatch.setattr(dataflow_pass, "_fused_conv", off_by_one)
    result = repconv.convert(model, input_shape=(4, 8, 8))
    assert result.passed, result.verification.failure_message()
    assert outcomes(result) == [("0", "dataflow", "fused"), ("1", "dataflow", "skipped")]
    assert "changed the block's output by" in skipped(result)["1"]
    assert same_tensors(result.model.get_submodule("1"), wrong)
    assert "forward" not in vars(result.model.get_submodule("1"))


# ---- a failure inside the analysis leaves its block ---------------------------------------------


def test_a_node_the_analysis_fails_on_leaves_its_block_and_the_rest_fuses(monkeypatch):
    model = randomized(nn.Sequential(T.Residual(4), T.Residual(4)))
    model[1].conv.explode = True
    conv_map = dataflow._conv_map

    def fragile(conv):
        if getattr(conv, "explode", False):
            raise RuntimeError("cannot follow this conv")
        return conv_map(conv)

    monkeypatch.setattr(dataflow, "_conv_map", fragile)
    before = copy.deepcopy(model[1])
    result = repconv.convert(model, input_shape=(4, 8, 8))
    assert result.passed, result.verification.failure_message()
    assert ("0", "dataflow", "fused") in outcomes(result)
    reason = skipped(result)["1"]
    assert "the data-flow analysis failed" in reason
    assert "RuntimeError: cannot follow this conv" in reason
    # the conv -> BN pass still folds its pair; the data-flow pass left the block's forward
    assert "forward" not in vars(result.model[1])
    assert not any(k.startswith("reparam") for k in result.model[1].state_dict())
    assert result.model[1].conv.weight.shape == before.conv.weight.shape


def test_an_analysis_that_fails_on_a_module_analyses_its_children_alone(monkeypatch):
    model = randomized(nn.Sequential(T.Residual(4), T.Residual(4)))
    regions = dataflow.Analysis.regions

    def fails_at_the_root(self):
        if isinstance(self.root, nn.Sequential):
            raise ValueError("a bug in the analysis")
        return regions(self)

    monkeypatch.setattr(dataflow.Analysis, "regions", fails_at_the_root)
    result = repconv.convert(model, input_shape=(4, 8, 8))
    assert result.passed, result.verification.failure_message()
    assert ("0", "dataflow", "fused") in outcomes(result)
    assert ("1", "dataflow", "fused") in outcomes(result)
    assert "ValueError: a bug in the analysis" in skipped(result)[""]


# ---- forwards that build tensors without a dtype ------------------------------------------------


def test_an_eval_forward_building_a_mask_without_a_dtype_is_verified_in_float64():
    model = randomized(T.on_the_fly_net())
    result = repconv.convert(model, input_shape=(3, 8, 8))
    assert result.passed, result.verification.failure_message()
    assert result.verification.dtype == "float64"
    assert [(p, s) for p, r, s in outcomes(result) if r == "dataflow"] == [
        ("1", "fused"),
        ("2", "fused"),
    ]
    assert all(o.block_error is not None for o in result.plan.entries if o.rule == "dataflow")
    assert torch.get_default_dtype() == torch.float32  # set while running, restored


def test_a_block_building_a_mask_without_a_dtype_has_a_probe():
    block = randomized(T.OnTheFlyIdentity())
    probe = ProbeCheck().probe(block)
    assert probe is not None and probe.input.dtype == torch.float64
    assert probe.error_of(block) == 0.0


class WrittenIdentity(nn.Module):
    """An identity kernel written into `zeros_like` of a parameter, in the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.full((4, 1, 1, 1), 0.5))

    def forward(self, x):
        eye = torch.zeros_like(self.scale)
        eye.fill_(1.0)
        return F.relu(self.bn(self.conv(x)) + F.conv2d(x, eye, groups=4))


class ReadBeforeWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, 1, 1, 1))

    def forward(self, x):
        k = torch.zeros_like(self.scale)
        y = F.conv2d(x, k, groups=4)
        k.fill_(1.0)
        return y + F.conv2d(x, k, groups=4)


def test_a_constant_written_in_place_is_read_as_written():
    """A kernel the forward writes into (`eye.fill_(1)`) is read as written, on a copy
    (the model's tensors untouched); one read before it is written is no constant."""
    block = randomized(WrittenIdentity())
    graph = torch.fx.Tracer().trace(block)
    analysis = dataflow.Analysis(block, graph)
    eye = next(n for n in graph.nodes if n.target is torch.zeros_like)
    assert analysis.constant(eye).eq(1).all()
    assert block.scale.eq(0.5).all()
    result = repconv.convert(block, input_shape=(4, 8, 8))
    assert result.passed, result.verification.failure_message()
    assert outcomes(result) == [("", "dataflow", "fused")]

    model = ReadBeforeWritten()
    graph = torch.fx.Tracer().trace(model)
    analysis = dataflow.Analysis(model, graph)
    with pytest.raises(dataflow._NotLinear):
        analysis.constant(next(n for n in graph.nodes if n.target is torch.zeros_like))
    assert analysis.regions() == []


# ---- property: the pass never raises, what it fuses is exact, what it refuses it leaves ---------

C, SIDE = 4, 8


class ConvBN(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(C, C, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.conv(x))


class RepLike(nn.Module):
    """Linear branches from one input: what the pass fuses."""

    def __init__(self):
        super().__init__()
        self.dense, self.point = ConvBN(3), ConvBN(1)

    def forward(self, x):
        return F.relu(self.dense(x) + self.point(x) + x)


class PoolByItsSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = ConvBN(3)

    def forward(self, x):
        gate = torch.sigmoid(F.avg_pool2d(x, kernel_size=x.size(3)))
        return self.branch(x) * gate + x


class PoolBySizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = ConvBN(1)

    def forward(self, x):
        *_, h, w = x.shape
        return self.branch(x) + F.avg_pool2d(x, [h, w])


class ReshapedBySizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = ConvBN(3)

    def forward(self, x):
        y = self.branch(x)
        return y.view(y.size(0), y.size(1), -1).view(y.shape) + x


class ScaledBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = ConvBN(3)

    def forward(self, x):
        return self.branch(x) * (x.size(1) / C) + x


class RolledBySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = ConvBN(3)

    def forward(self, x):
        return torch.roll(self.branch(x), shifts=x.size(3) // 2, dims=3) + x


class PaddedByWeightSize(nn.Module):
    """A functional conv whose padding is read from its weight's size: a number."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C, 3, 3) * 0.1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight, padding=self.weight.size(2) // 2)) + x


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch, self.other = ConvBN(3), ConvBN(1)

    def forward(self, x):
        return torch.erf(self.branch(x)) + self.other(x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = ConvBN(3)

    def forward(self, x):
        if x.sum() > 0:  # dynamic control flow: fx cannot trace it
            return self.branch(x) + x
        return self.branch(x) - x


class Parallel(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


LEAVES = [RepLike, PoolByItsSize, PoolBySizes, ReshapedBySizes, ScaledBySize, RolledBySize]
LEAVES += [PaddedByWeightSize, Unknown, DataDependent, ConvBN]


def build(tree) -> nn.Module:
    if isinstance(tree, tuple):
        return Parallel(build(tree[0]), build(tree[1]))
    if isinstance(tree, list):
        return nn.Sequential(*[build(t) for t in tree])
    return LEAVES[tree]()


leaf = st.integers(0, len(LEAVES) - 1)
trees = st.recursive(
    leaf,
    lambda inner: st.tuples(inner, inner) | st.lists(inner, min_size=1, max_size=3),
    max_leaves=5,
)


def fused_paths(applied: engine.Applied) -> list[str]:
    found = []
    for o in applied.entries:
        if o.status == "fused":
            found += [o.path, *o.step.claims]
    return found


def inside(key: str, paths: list[str]) -> bool:
    return any(not p or key == p or key.startswith(p + ".") for p in paths)


@settings(max_examples=25, deadline=None)
@given(tree=trees, seed=st.integers(0, 2**31 - 1))
def test_the_pass_is_total_exact_and_leaves_what_it_refuses(tree, seed):
    model = randomized(nn.Sequential(build(tree)), seed=seed)
    before = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, SIDE, SIDE, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        want = before(x)
    plan = engine.plan(model)  # never raises
    applied = engine.apply(model, plan)  # never raises
    with torch.no_grad():
        assert rel_error(model(x), want) <= 1e-9
    fused = fused_paths(applied)
    for o in applied.entries:
        if o.rule != "dataflow" or o.status != "skipped":
            continue
        block, old = model.get_submodule(o.path), before.get_submodule(o.path)
        assert "forward" not in vars(block), o
        now, then = block.state_dict(), old.state_dict()
        for key, tensor in then.items():
            if not inside(f"{o.path}.{key}" if o.path else key, [p for p in fused if p != o.path]):
                assert torch.equal(now[key], tensor), (o.path, key)
