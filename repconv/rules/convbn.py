"""Plain conv -> BN (and Linear -> BatchNorm1d): the fold every CNN needs.

Unlike the block families this is found by data flow, never by declaration order: inside a stock
nn.Sequential by adjacency, elsewhere only where torch.fx proves the norm's sole input is the conv's
output and the conv's output goes nowhere else. A conv or norm reachable at two paths, or called
twice, is never folded. Deploy form: the conv (or linear) gains a bias; the norm becomes
nn.Identity, so its state-dict keys disappear. A norm-plus-activation module (timm's
BatchNormAct2d and kin, see `base.is_norm_act`) becomes a NormActTail: its drop and act stay.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from repconv import kernels as K
from repconv import tracing
from repconv.fused_conv import norm_stats
from repconv.modules import (
    NormActTail,
    holds_unclaimed,
    is_foldable_norm,
    is_norm_act,
    is_norm_like,
    is_plain_conv,
    join_path,
    param_count,
)
from repconv.rules.base import Pass, Step

NAME = "conv_bn"
SUMMARY = "Conv1d/2d/3d -> BatchNorm (or Linear -> BatchNorm1d) whose output feeds only the norm"
DEPLOY_FORM = "the conv gains a bias; the norm becomes Identity (a norm-act: its drop + act)"


@dataclass(frozen=True)
class Pair:
    conv_path: str
    norm_path: str
    found_by: str  # "sequential" or "trace"


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def _fits(conv: nn.Module, norm: nn.Module) -> bool:
    if not is_foldable_norm(norm, with_act=True):
        return False
    width = norm.running_mean.numel()
    if is_plain_conv(conv):
        return conv.out_channels == width
    return _is_linear(conv) and isinstance(norm, nn.BatchNorm1d) and conv.out_features == width


def _pairs_in_graph(root: nn.Module, graph: fx.Graph, prefix: str) -> list[Pair]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    found = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or node.kwargs:
            continue
        if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or calls[source.target] != 1 or len(source.users) != 1:
            continue
        conv, norm = root.get_submodule(source.target), root.get_submodule(node.target)
        if _fits(conv, norm):
            found.append(
                Pair(join_path(prefix, source.target), join_path(prefix, node.target), "trace")
            )
    return found


def _pairs_in_sequential(seq: nn.Sequential, prefix: str) -> list[Pair]:
    names = list(seq._modules)
    found = []
    for first, second in itertools.pairwise(names):
        if _fits(seq._modules[first], seq._modules[second]):
            found.append(Pair(join_path(prefix, first), join_path(prefix, second), "sequential"))
    return found


def find_pairs(root: nn.Module, opaque: AbstractSet[int], at: str = "") -> list[Pair]:
    """Every foldable conv -> norm pair outside the `opaque` modules (by id), in `root`, the
    module at path `at` of the model (paths are the model's)."""
    uses = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    pairs = _search(root, at, opaque)
    modules = {join_path(at, p): m for p, m in root.named_modules()}
    return [
        p
        for p in pairs
        if all(
            uses[id(modules[path])] == 1 and id(modules[path]) not in opaque
            for path in (p.conv_path, p.norm_path)
        )
    ]


def _search(module: nn.Module, prefix: str, opaque: AbstractSet[int]) -> list[Pair]:
    if not holds_unclaimed(module, opaque, is_norm_like):
        return []
    try:
        graph = tracing.graph_of(module, opaque)
    except Exception:
        graph = None
    if graph is not None:
        return _pairs_in_graph(module, graph, prefix)
    found: list[Pair] = []
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        found += _pairs_in_sequential(module, prefix)
    for name, child in module.named_children():
        found += _search(child, join_path(prefix, name), opaque)
    return found


def fuse_pair(model: nn.Module, pair: Pair) -> tuple[int, ...]:
    """Fold the norm into the conv in place; the norm's slot becomes nn.Identity (a norm-act
    module's becomes a NormActTail holding its own drop and act)."""
    conv = model.get_submodule(pair.conv_path)
    norm = model.get_submodule(pair.norm_path)
    folded = K.fold_bn(K.as_branch(conv.weight, conv.bias), norm_stats(norm, with_act=True))
    fused = K.add([folded], dtype=conv.weight.dtype)
    trainable = conv.weight.requires_grad
    conv.weight = nn.Parameter(fused.kernel, requires_grad=trainable)
    conv.bias = nn.Parameter(fused.bias, requires_grad=trainable)
    parent_path, _, name = pair.norm_path.rpartition(".")
    rest = NormActTail(norm.drop, norm.act) if is_norm_act(norm) else nn.Identity()
    setattr(model.get_submodule(parent_path), name, rest)
    return tuple(fused.kernel.shape)


class ConvBnPass(Pass):
    """The data-flow pass: every foldable conv -> norm pair outside the claimed blocks."""

    name = NAME
    family = "conv-BN"
    summary = SUMMARY
    deploy_form = DEPLOY_FORM
    kind = "pairs"
    folds_plain_pairs_only = True

    def find(self, root: nn.Module, claimed: AbstractSet[int], at: str = "") -> list[Step]:
        modules = {join_path(at, p): m for p, m in root.named_modules()}
        steps = []
        for pair in find_pairs(root, claimed, at):
            conv, norm = modules[pair.conv_path], modules[pair.norm_path]
            structure = f"{type(conv).__name__} -> {type(norm).__name__} ({pair.found_by})"
            params = param_count(conv) + param_count(norm)
            chain = (pair.conv_path, pair.norm_path)
            steps.append(Step(pair.conv_path, self, self.family, structure, params, chain))
        return steps

    def fuse_step(self, model: nn.Module, step: Step) -> tuple[int, ...]:
        conv_path, norm_path = step.chain
        return fuse_pair(model, Pair(conv_path, norm_path, ""))


PASS = ConvBnPass()
