"""The generic pass: every linear region, found by data flow, becomes one conv.

`repconv.dataflow` finds the regions (sums of linear branches from one input); this pass groups
them by the module whose code holds them (the block), and fuses a block's regions in one step.

Deploy form: the block keeps its path, its class and its non-linear parts. Each region becomes
one conv: the region's only conv when the fused kernel has that conv's shape (it gains the
fold, as a conv -> BN fold leaves it), else the one conv of that shape the forward never used
(a deploy conv its library builds at init), else a new child conv named `reparam`
(`reparam_1`, ... for more regions in one block). The modules and parameters the regions
consumed are deleted, and the block's forward becomes its traced code with each region replaced
by its conv call, set on the instance (`GraphForward`). `load_deploy` rebuilds that form by
replaying the plan.

The pass is total: a module whose analysis fails is left as it was (a refusal, with the reason,
shown as a warning; its children are analysed alone), and so is a block whose code holds a node
the analysis failed on (`dataflow.Analysis.failures`). Inner blocks are fused before the blocks
holding them, so an outer block's rewritten forward is traced from its inner blocks' fused
forwards. A rewritten forward is checked on the block before it stays (the check the engine
hands the pass, `block_check.ProbeCheck` by default: the block probed before and after): one
that raises (it reads what the fusion deleted) or moves the output is undone, the block put
back as it was (`_Snapshot`), with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from repconv import dataflow, tracing
from repconv import linear_map as L
from repconv.errors import BadInput, NotFusable
from repconv.fused_conv import stock_conv
from repconv.modules import (
    floating_dtype,
    holds_unclaimed,
    is_foldable_norm,
    is_plain_conv,
    join_path,
    param_count,
)
from repconv.paths import within
from repconv.rules.base import Pass, PassRun, RunContext, Step

NAME = "dataflow"
SUMMARY = (
    "any sum of linear branches from one input (convs of any kernel or dilation, BN before or "
    "after, identity, avg-pool, zero pad, scalars) that one conv computes"
)
DEPLOY_FORM = (
    "the block keeps its path and non-linear parts; each region becomes one conv (`reparam`, or "
    "its single conv with the fold) that the block's forward calls"
)
FUSED_NAME = "reparam"


@dataclass(frozen=True)
class Opaque:
    """A data-flow step's payload: the modules inside its block that other steps own, which the
    block's trace keeps whole when it is fused (paths in the model)."""

    paths: tuple[str, ...]


def _conv_or_norm(module: nn.Module) -> bool:
    # A norm with no conv module beside it may still follow a functional conv whose kernel the
    # forward computes (OREPA): such a module is worth tracing too.
    return is_plain_conv(module) or is_foldable_norm(module)


def _any_region(region: dataflow.Region) -> bool:
    return True


def _not_plain_pair(region: dataflow.Region) -> bool:
    return not region.is_plain_pair


def _is_plain_pair(region: dataflow.Region) -> bool:
    return region.is_plain_pair


class _Search:
    """One `find`: the pass planning (steps name it), and which regions it fuses (all of them,
    or, where the deploy form keeps plain pairs live, all but those)."""

    def __init__(
        self,
        by: DataflowPass,
        claimed: AbstractSet[int],
        wanted: Callable[[dataflow.Region], bool] = _any_region,
    ):
        self.by, self.claimed, self.wanted = by, claimed, wanted

    def search(self, module: nn.Module, prefix: str) -> list[Step]:
        """The smallest traceable modules from the top, as the conv -> BN pass scopes them."""
        if not holds_unclaimed(module, self.claimed, _conv_or_norm):
            return []
        try:
            graph = tracing.graph_of(module, self.claimed)
        except Exception:  # untraceable here: its children may trace
            return self.children(module, prefix)
        try:
            return self.analysed(module, graph, prefix)
        except (BadInput, MemoryError):
            raise
        except Exception as exc:  # the analysis must never end a conversion: left as it was
            reason = f"the data-flow analysis failed on it ({_first_line(exc)}); left as it was"
            return [self.refused(module, prefix, "", reason), *self.children(module, prefix)]

    def children(self, module: nn.Module, prefix: str) -> list[Step]:
        named = module.named_children()
        return [s for n, c in named for s in self.search(c, join_path(prefix, n))]

    def analysed(self, module: nn.Module, graph: fx.Graph, prefix: str) -> list[Step]:
        """One step per block holding regions, and a refusal for each block that holds a sum
        that is not linear or a node the analysis failed on."""
        analysis = dataflow.Analysis(module, graph, self.claimed)
        regions = [r for r in analysis.regions() if self.wanted(r)]
        steps = [self.step(module, prefix, owner, group) for owner, group in _by_owner(regions)]
        fused = {r.owner for r in regions}
        reasons = dict(analysis.refusals) | analysis.failures
        for owner, reason in reasons.items():
            if owner not in fused:  # a block with a region says what it fused, not what it left
                steps.append(self.refused(module, prefix, owner, reason))
        return steps

    def refused(self, module: nn.Module, prefix: str, owner: str, reason: str) -> Step:
        block = module.get_submodule(owner)
        path = join_path(prefix, owner)
        family = self.by.family
        return Step(path, self.by, family, "not linear", param_count(block), refusal=reason)

    def step(
        self, root: nn.Module, prefix: str, owner: str, regions: list[dataflow.Region]
    ) -> Step:
        block = root.get_submodule(owner)
        inside = join_path(prefix, owner)
        parts = sorted({join_path(prefix, t) for r in regions for t in r.module_targets()})
        opaque = [p for p, m in block.named_modules() if p and id(m) in self.claimed]
        return Step(
            path=inside,
            by=self.by,
            family=self.by.family,
            structure="; ".join(r.describe() for r in regions),
            params_before=param_count(block),
            claims=tuple(parts),
            payload=Opaque(tuple(join_path(inside, p) for p in opaque)),
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _inner_first(steps: list[Step]) -> list[Step]:
    """The steps in their order, except that a block comes after every block inside it: an
    outer block's rewritten forward inlines its inner blocks' code, so it is traced once they
    are fused (else it would call what their fusion deletes)."""
    ordered: list[Step] = []
    placed: set[int] = set()

    def place(index: int) -> None:
        placed.add(index)
        outer = steps[index].path
        for inner, step in enumerate(steps):
            if inner not in placed and step.path != outer and within(step.path, outer):
                place(inner)
        ordered.append(steps[index])

    for index in range(len(steps)):
        if index not in placed:
            place(index)
    return ordered


def _by_owner(regions: list[dataflow.Region]) -> list[tuple[str, list[dataflow.Region]]]:
    groups: dict[str, list[dataflow.Region]] = {}
    for region in regions:
        groups.setdefault(region.owner, []).append(region)
    return list(groups.items())


# ---- fusing one block ---------------------------------------------------------------------------


def fuse_block(model: nn.Module, step: Step) -> tuple[int, ...]:
    """Fuse the regions of the block at `step.path`; NotFusable before any change if the block
    no longer holds the regions the plan found."""
    block = model.get_submodule(step.path)
    opaque = {id(m) for m in _present(model, step.payload.paths)}
    try:
        graph = tracing.graph_of(block, opaque, by_layout=True)
    except NotFusable:
        raise
    except Exception as exc:
        raise NotFusable(f"its forward no longer traces ({type(exc).__name__}: {exc})") from None
    analysis = dataflow.Analysis(block, graph, opaque)
    regions = [r for r in analysis.regions() if r.owner == ""]
    targets = sorted({join_path(step.path, t) for r in regions for t in r.module_targets()})
    if not regions or targets != sorted(step.claims):
        raise NotFusable("its linear regions are not the ones planned (the block changed)")
    values = [r.value for r in regions]  # computed from the block's own tensors already
    dtype = floating_dtype(block) or torch.float64
    convs = [_fused_conv(v, dtype) for v in values]
    names = _fresh_names(block, len(regions))
    consumed = {t for r in regions for t in [*r.module_targets(), *r.attribute_targets()]}
    shapes = []
    replaced: dict[fx.Node, fx.Node] = {}  # a region's output, by the conv call now making it
    for region, fused, name in zip(regions, convs, names):
        target = _install(block, graph, region, fused, name, model, consumed)
        replaced[region.output] = _rewire(graph, region, target, replaced)
        shapes.append(tuple(fused.kernel.shape))
    _drop_consumed(block, graph, consumed)
    graph.lint()
    block.forward = tracing.GraphForward(block, graph)
    return shapes[0]


def _present(model: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
    found = []
    for path in paths:
        try:
            found.append(model.get_submodule(path))
        except AttributeError:  # fused away by its own step
            continue
    return found


def _fused_conv(value: L.LinearValue, dtype: torch.dtype) -> L.FusedConv:
    try:
        return L.to_conv(value, dtype=dtype)
    except L.NotExact as exc:
        raise NotFusable(str(exc)) from None


def _fresh_names(block: nn.Module, how_many: int) -> list[str]:
    taken = set(dir(block))
    candidates = (FUSED_NAME if i == 0 else f"{FUSED_NAME}_{i}" for i in count())
    return list(islice((name for name in candidates if name not in taken), how_many))


def _reached_once(model: nn.Module, module: nn.Module) -> bool:
    paths = (p for p, m in model.named_modules(remove_duplicate=False) if m is module)
    return len(list(islice(paths, 2))) == 1


def _install(
    block: nn.Module,
    graph: fx.Graph,
    region: dataflow.Region,
    fused: L.FusedConv,
    name: str,
    model: nn.Module,
    consumed: AbstractSet[str],
) -> str:
    """Put the fused conv in the block: into the region's only conv if it has that shape, else
    into a conv of that shape the forward never uses (and no other path of the model reaches
    the conv either way). A conv an earlier region of the block consumed is not unused: it
    was that region's (installing a second head's conv there would give it the first's name)."""
    absorbing = _absorbing_conv(block, graph, region, fused) or _unused_conv(
        block, graph, fused, consumed
    )
    if absorbing is not None and not _reached_once(model, block.get_submodule(absorbing)):
        absorbing = None
    if absorbing is not None:
        conv = block.get_submodule(absorbing)
        trainable = conv.weight.requires_grad
        conv.weight = nn.Parameter(fused.kernel, requires_grad=trainable)
        conv.bias = nn.Parameter(fused.bias, requires_grad=trainable)
        return absorbing
    setattr(block, name, _new_conv(fused, region.value))
    return name


def _absorbing_conv(
    block: nn.Module, graph: fx.Graph, region: dataflow.Region, fused: L.FusedConv
) -> str | None:
    """The region's own conv, when the fold may keep its name: the region is that conv and the
    norms after it, in a chain (the conv-BN convention: the class's own forward, its norms as
    Identity, computes the fused conv). Any other region (a branch added, a scale) needs the
    rewritten forward, so its conv gets a name of its own."""
    if not _conv_then_norms(block, region):
        return None
    target = str(region.nodes[0].target)
    if sum(1 for n in graph.nodes if n.op == "call_module" and n.target == target) != 1:
        return None  # called elsewhere too: its weights must stay as they are
    return target if _same_geometry(block.get_submodule(target), fused) else None


def _conv_then_norms(block: nn.Module, region: dataflow.Region) -> bool:
    """A plain conv module fed by the region's input, then only norms, each the one user of
    the node before it."""
    first, *rest = region.nodes  # in graph order
    if first.op != "call_module" or not is_plain_conv(_module(block, first)):
        return False
    if first.all_input_nodes != [region.source]:
        return False
    previous = first
    for node in rest:
        if dataflow.kind_of(node) != "norm" or node.all_input_nodes != [previous]:
            return False
        if len(previous.users) != 1:
            return False
        previous = node
    return previous is region.output


def _unused_conv(
    block: nn.Module, graph: fx.Graph, fused: L.FusedConv, consumed: AbstractSet[str] = frozenset()
) -> str | None:
    """The one conv of the fused conv's shape that the block holds and its forward never uses:
    a deploy conv its library builds at init and fills when it fuses (super-gradients'
    `rbr_reparam`), so the block ends with its library's deploy keys. None if there are several."""
    used = _graph_targets(graph)
    found = [
        path
        for path, m in block.named_modules()
        if path
        and path not in consumed
        and is_plain_conv(m)
        and not _referenced(path, used)
        and _same_geometry(m, fused)
    ]
    return found[0] if len(found) == 1 else None


def _same_geometry(conv: nn.Module, fused: L.FusedConv) -> bool:
    return (
        tuple(conv.weight.shape) == tuple(fused.kernel.shape)
        and tuple(conv.stride) == fused.stride
        and conv.padding == fused.padding
        and tuple(conv.dilation) == fused.dilation
        and conv.groups == fused.groups
        and conv.padding_mode == "zeros"
    )


def _graph_targets(graph: fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}


def _referenced(path: str, targets: set[str]) -> bool:
    """Whether the graph reaches the module at `path`: itself, inside it, or a module holding it."""
    return any(t == path or t.startswith(path + ".") or path.startswith(t + ".") for t in targets)


def _module(block: nn.Module, node: fx.Node) -> nn.Module | None:
    try:
        return block.get_submodule(str(node.target))
    except AttributeError:
        return None


def _new_conv(fused: L.FusedConv, value: L.LinearValue) -> nn.Module:
    return stock_conv(
        value.channels_in,
        fused.kernel,
        fused.bias,
        stride=fused.stride,
        padding=fused.padding,
        dilation=fused.dilation,
        groups=fused.groups,
    )


def _rewire(
    graph: fx.Graph, region: dataflow.Region, target: str, replaced: dict[fx.Node, fx.Node]
) -> fx.Node:
    """The region's output now comes from one conv call; its nodes go. A region reading an
    earlier region's output (`replaced`) reads that region's conv call."""
    source = replaced.get(region.source, region.source)
    with graph.inserting_before(region.output):
        call = graph.call_module(target, (source,))
    region.output.replace_all_uses_with(call)
    doomed = [*region.nodes, *dataflow.constant_inputs(region.nodes)]
    for node in sorted(doomed, key=_position(graph), reverse=True):
        if not node.users:
            graph.erase_node(node)
    return call


def _position(graph: fx.Graph):
    order = {node: i for i, node in enumerate(graph.nodes)}
    return lambda node: order.get(node, -1)


def _drop_consumed(block: nn.Module, graph: fx.Graph, consumed: set[str]) -> None:
    """Delete what the regions consumed and nothing in the new graph reads, then the
    containers left empty by that (a Sequential whose conv and norm are gone)."""
    used = _graph_targets(graph)
    for path in sorted(consumed, key=len, reverse=True):
        if _referenced(path, used):
            continue
        _delete(block, path)
        parent = path.rpartition(".")[0]
        while parent and not _referenced(parent, used) and _is_empty(block.get_submodule(parent)):
            _delete(block, parent)
            parent = parent.rpartition(".")[0]


def _delete(block: nn.Module, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    if hasattr(parent, name):
        delattr(parent, name)


def _is_empty(module: nn.Module) -> bool:
    return not (module._modules or module._parameters or module._buffers)


class DataflowPass(Pass):
    """Linear regions outside the claimed blocks, one step per block that holds them."""

    name = NAME
    family = "linear region"
    summary = SUMMARY
    deploy_form = DEPLOY_FORM
    kind = "regions"

    def __init__(self, plain_pairs: bool = True):
        self.plain_pairs = plain_pairs

    def find(self, root: nn.Module, claimed: AbstractSet[int], at: str = "") -> list[Step]:
        wanted = _any_region if self.plain_pairs else _not_plain_pair
        return _inner_first(_Search(self, claimed, wanted).search(root, at))

    def keeping_plain_pairs(self) -> DataflowPass:
        return KEEPING_PLAIN_PAIRS

    def plain_pairs_in(self, root: nn.Module) -> list[Step]:
        if self.plain_pairs:
            return []
        found = _Search(PASS, set(), _is_plain_pair).search(root, "")
        return [s for s in found if s.refusal is None]

    def fuse_step(self, model: nn.Module, step: Step) -> tuple[int, ...]:
        return fuse_block(model, step)

    def open(self, context: RunContext) -> DataflowRun:
        return DataflowRun(self, context)


class _Snapshot:
    """A block as it was before it was fused, kept without copying a tensor: each module's own
    entries (attributes, an instance forward, children, parameters, buffers). Fusing only adds,
    replaces and deletes entries (a conv absorbing the fold gets new Parameters), never writes
    into a tensor, so putting the entries back is the block as it was."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.entries = [(m, dict(vars(m)), [dict(t) for t in _tables(m)]) for m in block.modules()]
        self.tensors = {id(t) for m in block.modules() for t in _tensors(m)}

    def round_new_tensors(self, dtype: torch.dtype) -> None:
        """Round the floating tensors the fusion added (left in float64) to `dtype`, as the
        engine will, without writing into any tensor the block had before."""
        for module in self.block.modules():
            for table in _tables(module)[1:]:
                for name, tensor in table.items():
                    if tensor is None or id(tensor) in self.tensors:
                        continue
                    if tensor.is_floating_point() and tensor.dtype != dtype:
                        rounded = tensor.detach().to(dtype)
                        if isinstance(tensor, nn.Parameter):
                            rounded = nn.Parameter(rounded, requires_grad=tensor.requires_grad)
                        table[name] = rounded

    def restore(self) -> None:
        for module, attributes, saved in self.entries:
            vars(module).clear()
            vars(module).update(attributes)  # the same tables, emptied and refilled next
            for table, entries in zip(_tables(module), saved):
                table.clear()
                table.update(entries)


def _tables(module: nn.Module) -> list[dict[str, Any]]:
    return [module._modules, module._parameters, module._buffers]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]


class DataflowRun(PassRun):
    """The pass in one apply: each block fused, then checked on its probe, undone if wrong."""

    def fuse(self, step: Step) -> tuple[int, ...]:
        model = self.context.model
        block = model.get_submodule(step.path)
        probe = self.context.check.probe(block)
        dtype = floating_dtype(block)
        snapshot = _Snapshot(block)
        with _undone_on_failure(snapshot, "fusing it failed"):
            shape = fuse_block(model, step)
            if dtype is not None:  # as the engine will round it
                snapshot.round_new_tensors(dtype)
        with _undone_on_failure(snapshot, "its rewritten forward failed"):
            error = probe.error_of(block) if probe is not None else 0.0
        if probe is not None and not error <= probe.limit:
            snapshot.restore()
            raise NotFusable(
                f"its rewritten forward changed the block's output by {error:.3g} (relative, "
                f"limit {probe.limit:g}); undone, block left as it was"
            )
        return shape


@contextmanager
def _undone_on_failure(snapshot: _Snapshot, what: str) -> Iterator[None]:
    """Any failure puts the block back as it was; one of the analysis or of the rewritten
    forward (not bad input, memory or an interrupt) becomes NotFusable: a warning, not a crash."""
    try:
        yield
    except (BadInput, MemoryError, NotFusable):
        snapshot.restore()
        raise
    except Exception as exc:
        snapshot.restore()
        raise NotFusable(f"{what}, undone, block left as it was: {_first_line(exc)}") from None
    except BaseException:
        snapshot.restore()
        raise


PASS = DataflowPass()
# The pass where the deploy form keeps plain pairs live (`Pass.keeping_plain_pairs`).
KEEPING_PLAIN_PAIRS = DataflowPass(plain_pairs=False)
