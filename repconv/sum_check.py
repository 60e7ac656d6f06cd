"""Whether a block's forward sums exactly the children a block rule folds.

A block rule that recognises a block by its children's names folds their branches as a plain
sum; a forward that does more (a scalar on a branch, a child fed by another, the bare input
added) computes something else. The data-flow analysis answers this from the block's traced
graph, once per layout for the process (`memo.kept`): the answer depends on the block's code and
layout, never on its values.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from repconv import dataflow, memo, tracing
from repconv.errors import BadInput
from repconv.modules import join_path


def sums_exactly(block: nn.Module, children: list[str]) -> bool:
    """Whether the block's forward is, by its data flow, one linear region made of exactly the
    leaves under `children` (no scalar or activation of its own on a branch). A block that does
    not trace cannot be judged this way: True, as a match by names alone was before.

    The answer depends on the block's code and layout, not on its values, so it is found once
    per layout (`memo.kept`).
    """
    key = tracing.layout_key(block)
    return memo.kept(
        "sums exactly",
        None if key is None else (key, tuple(children)),
        lambda: _traced_sum_is_exact(block, children),
    )


def _traced_sum_is_exact(block: nn.Module, children: list[str]) -> bool:
    try:
        graph = tracing.graph_of(block)
    except Exception:
        return True
    expected = {
        join_path(name, path) if path else name
        for name in children
        for path, m in block.get_submodule(name).named_modules()
        if not m._modules
    }
    try:
        regions = [r for r in dataflow.analyse(block, graph) if r.owner == ""]
    except (BadInput, MemoryError):
        raise
    except Exception:  # the analysis cannot follow the block: not proven, the later passes' one
        return False
    return any(
        set(r.module_targets()) == expected
        and r.adds_leaves_only
        and _adds_each_child_once(r, children)
        for r in regions
    )


def _adds_each_child_once(region: dataflow.Region, children: list[str]) -> bool:
    """Whether the region is a tree of additions whose terms are the children, each once and
    each applied to the region's input itself: the sum the rule folds. The same leaves in
    another arrangement (a child fed by another, a child's output added twice, the bare input
    added) compute something else."""
    terms: list[str] = []
    visited: set[fx.Node] = set()

    def walk(node: fx.Node) -> bool:
        visited.add(node)
        kind = dataflow.kind_of(node)
        if kind == "sum":
            return all(walk(a) for a in node.args if isinstance(a, fx.Node))
        if kind == "same" and len(node.all_input_nodes) == 1:
            return walk(node.all_input_nodes[0])
        child = _child_of(node, children)
        while child is not None and _child_of(node, children) == child:
            visited.add(node)
            if len(node.all_input_nodes) != 1:
                return False
            node = node.all_input_nodes[0]
            if node is region.source:
                terms.append(child)
                return True
        return False

    return (
        walk(region.output) and sorted(terms) == sorted(children) and visited == set(region.nodes)
    )


def _child_of(node: fx.Node, children: list[str]) -> str | None:
    if node.op != "call_module":
        return None
    target = str(node.target)
    return next((c for c in children if target == c or target.startswith(c + ".")), None)
