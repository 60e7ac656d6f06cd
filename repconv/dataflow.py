"""Linear analysis of a module's fx graph: which values are one convolution of one input.

The module is traced with torch.fx, convs, norms and the modules other passes own kept as
leaves. Every node whose value is an affine map of a single other node (its *source*) gets a
`LinearValue` (`linear_map`): convs of any kernel, dilation or grouping, eval batch norms, the
identity, average pooling, zero padding, multiplication by a scalar or per-channel parameter,
sums and differences. A **region** is such a value that something non-linear (or the output)
consumes: the nodes that computed it are replaced by one conv of its source.

Sizes read from a traced value (`x.size(3)`, `b, c, h, w = x.shape`, and what is computed from
them alone) are not tensors: an operation reading one as an operand or as a geometric argument
(a kernel size, a padding) is non-linear here. The analysis is total: a node it fails on in any
other way (a call it cannot follow, a bug of its own) is taken as non-linear too, and the block
whose code holds that node is left as it was (`Analysis.failures`, the pass's warnings).

Where an operation has no exact single-conv form (a padded 3x3 after a 3x3, a sum of values of
two different sources...), the analysis cuts: the operand becomes a source of its own, and the
analysis runs again, until every region is exact and no node is shared between regions. It
decides from structure only (shapes, module types, which tensors are zero by construction),
never from values, so a model rebuilt on the meta device (load_deploy) gets the plan its trained
model got.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn import functional as F

from repconv import linear_map as L
from repconv.errors import BadInput, NotFusable
from repconv.geometry import Geometry
from repconv.kernels import NormStats, norm_scale_shift
from repconv.modules import is_foldable_norm, is_norm_like, is_plain_conv

_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_NEG = {operator.neg, torch.neg, "neg"}
_SAME = {"contiguous", "clone", torch.clone}
_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_NORM_RANKS = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
# What reads a traced value's size: the result is a number (or numbers), never a tensor.
_SIZE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
_SIZE_ATTRIBUTES = {"shape", "ndim"}
# Methods and functions whose result may share its input's memory.
_VIEWS = (
    {"getitem", "view", "view_as", "reshape", "reshape_as", "expand", "expand_as"}
    | {"transpose", "permute", "squeeze", "unsqueeze", "flatten", "unflatten", "narrow", "t"}
    | {"diagonal", "select", "unbind", "split", "chunk", "as_strided", "movedim", "swapaxes"}
)
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@dataclass
class Region:
    """A value one conv can compute: `output` as a map of `source`, and the nodes it replaces."""

    output: fx.Node
    source: fx.Node
    nodes: list[fx.Node]  # in graph order, `output` last
    value: L.LinearValue
    owner: str  # the innermost module whose code holds every node ("" = the traced module)

    def module_targets(self) -> list[str]:
        """The modules the region folds (a pass-through one, Identity or Dropout, only when it
        sits on a branch: after a sum it stays the block's)."""
        return [str(n.target) for n in self.nodes if n.op == "call_module" and kind_of(n) != "same"]

    def attribute_targets(self) -> list[str]:
        return [str(n.target) for n in constant_inputs(self.nodes) if n.op == "get_attr"]

    def describe(self) -> str:
        labels = [t.label or "?" for t in self.value.terms]
        text = " + ".join(labels)
        if any(_is_post_norm(n) for n in self.nodes):
            text += ", post-BN"
        return text

    @property
    def convs(self) -> int:
        return sum(1 for n in self.nodes if kind_of(n) == "conv")

    @property
    def is_plain_pair(self) -> bool:
        """Whether the region is one conv with norms before or after it and nothing else (no
        sum, pool, pad or scale): what a deploy form keeping plain pairs keeps live."""
        kinds = [kind_of(n) for n in self.nodes]
        return kinds.count("conv") == 1 and set(kinds) <= {"conv", "norm", "same"}

    @property
    def adds_leaves_only(self) -> bool:
        """Whether the region is its modules' maps added up and nothing of its own: no scalar,
        difference, constant, pad or pool written in the forward."""
        for node in self.nodes:
            kind = kind_of(node)
            if kind == "sum":
                # `branch + 0` is how RepVGG's release adds an absent identity
                numbers = [a for a in node.args if not isinstance(a, fx.Node)]
                if node.target not in _ADD or node.kwargs or any(a != 0 for a in numbers):
                    return False
            elif kind not in ("conv", "norm", "branch", "same"):
                return False
        return not constant_inputs(self.nodes)

    @property
    def worth_fusing(self) -> bool:
        """Whether fusing the region removes an op: a conv, a norm, a branch (a sum of two
        values, a pool, a pad). A lone conv with a scale or a constant on it (a layer scale, an
        SE gate's `+ 3`) is already as cheap as it gets: folded into the conv it would change
        nothing but the meaning of the conv's names. A conv module followed by its norm alone is
        the conv -> BN pass's (it keeps the conv's own name); a functional conv is not that
        pass's: its kernel is computed in the forward (OREPA's weight_gen), so one with its norm
        is fused here."""
        kinds = [kind_of(n) for n in self.nodes]
        if "conv" not in kinds and "norm" not in kinds:
            return False
        substantive = [k for k in kinds if k not in ("same", "branch")]
        if len(substantive) < 2:
            return False
        if substantive == ["conv", "norm"]:
            return any(kind_of(n) == "conv" and n.op == "call_function" for n in self.nodes)
        joins = [
            n
            for n in self.nodes
            if kind_of(n) == "sum" and sum(isinstance(a, fx.Node) for a in n.args) >= 2
        ]
        return self.convs >= 2 or bool(joins) or any(k in ("norm", "pool", "pad") for k in kinds)


def kind_of(node: fx.Node) -> str:
    """What the analysis took a node for: conv, norm, pool, pad, scale, sum, branch (a
    pass-through module on one branch), same (any other pass-through), or ""."""
    return node.meta.get("repconv_kind", "")


def _is_post_norm(node: fx.Node) -> bool:
    return kind_of(node) == "norm" and any(
        isinstance(a, fx.Node) and kind_of(a) == "sum" for a in node.args
    )


def constant_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """get_attr nodes and computations on them (coefficients) that only these nodes read."""
    inside = set(nodes)
    found: list[fx.Node] = []
    frontier = [a for n in nodes for a in n.all_input_nodes if a not in inside]
    while frontier:
        node = frontier.pop()
        if node in inside or node.meta.get("repconv_constant") is not True:
            continue
        if any(u not in inside for u in node.users):
            continue
        inside.add(node)
        found.append(node)
        frontier += node.all_input_nodes
    return found


# ---- shapes known without running anything -----------------------------------------------------


class _Shapes:
    """Channels and spatial rank per node, where the graph's modules fix them.

    Nodes that must share both (operands of a sum, a norm's input and output) are joined;
    a conv fixes its input's and its output's. A node whose shape is unknown or contradictory
    cannot be an identity branch, so it stays out of any region.
    """

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}
        self.known: dict[fx.Node, tuple[int | None, int | None]] = {}
        self.broken: set[fx.Node] = set()

    def find(self, node: fx.Node) -> fx.Node:
        root = self.parent.setdefault(node, node)
        while root is not self.parent[root]:
            root = self.parent[root]
        self.parent[node] = root
        return root

    def join(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        self.parent[rb] = ra
        self.fix(ra, *self.known.pop(rb, (None, None)))
        if rb in self.broken:
            self.broken.add(ra)

    def fix(self, node: fx.Node, channels: int | None, rank: int | None) -> None:
        root = self.find(node)
        have_c, have_r = self.known.get(root, (None, None))
        for have, new in ((have_c, channels), (have_r, rank)):
            if have is not None and new is not None and have != new:
                self.broken.add(root)
        self.known[root] = (
            have_c if channels is None else channels,
            have_r if rank is None else rank,
        )

    def of(self, node: fx.Node) -> tuple[int, int] | None:
        root = self.find(node)
        channels, rank = self.known.get(root, (None, None))
        if root in self.broken or channels is None or rank is None:
            return None
        return channels, rank


# ---- the analysis ------------------------------------------------------------------------------


@dataclass
class _Pass:
    """One run over the graph with a fixed set of cut points."""

    cuts: set[fx.Node]
    values: dict[fx.Node, L.LinearValue] = field(default_factory=dict)
    sources: dict[fx.Node, fx.Node] = field(default_factory=dict)
    new_cuts: set[fx.Node] = field(default_factory=set)


class _Cut(Exception):
    """Raised while evaluating a node: `operand` must become a source of its own."""

    def __init__(self, operand: fx.Node):
        self.operand = operand


class Analysis:
    """The linear regions of one traced graph."""

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        opaque: AbstractSet[int] = frozenset(),
    ):
        self.root = root
        self.opaque = opaque
        self.graph = graph
        self.modules = dict(root.named_modules())
        self.constants: dict[fx.Node, Any] = {}
        self.device = _device_of(root)
        # (owner, reason): sums of branches from one input that are not linear (see _refusals)
        self.refusals: list[tuple[str, str]] = []
        # block -> why: the blocks holding a node the analysis failed on, left as they were
        self.failures: dict[str, str] = {}
        self.shapes = _Shapes()
        self._position = {node: i for i, node in enumerate(graph.nodes)}
        for node in graph.nodes:
            node.meta["repconv_size"] = _is_size(node)
            node.meta["repconv_constant"] = self._is_constant(node)
            node.meta["repconv_kind"] = ""
        for node in graph.nodes:
            self._learn_shapes(node)

    # -- constants (parameters and what is computed from them alone) --

    def _is_constant(self, node: fx.Node) -> bool:
        if node.op == "get_attr":
            return True
        if node.op not in ("call_function", "call_method"):
            return False
        return all(a.meta.get("repconv_constant") is True for a in node.all_input_nodes)

    def constant(self, node: fx.Node) -> Any:
        if node not in self.constants:
            self.constants[node] = self._evaluate_constant(node)
        return self.constants[node]

    def _evaluate_constant(self, node: fx.Node) -> Any:
        """The value a constant node has where the forward reads it. A tensor written in place
        (`k.fill_diagonal_(1)`, `nn.init.zeros_(k)`, `k[...] = v`) is that value once written,
        if every write comes before every read (else, or written through a view, it is not
        taken as a constant); the writes go to a copy, never to the model's tensors."""
        if node.op == "get_attr":
            value = _attribute(self.root, str(node.target))
            if not isinstance(value, Tensor):
                raise _NotLinear
            value = value.detach()
        else:
            value = self._call(node)
        writers = [u for u in node.users if _writes_in_place(u) and u.args[0] is node]
        if any(_writes_in_place(u) for a in _aliases(node) for u in a.users):
            raise _NotLinear  # written through a view
        if not writers:
            return value
        last = max(self._position[w] for w in writers)
        if any(self._position[u] < last for u in node.users if u not in writers):
            raise _NotLinear  # read before it is written: two values under one name
        value = value.clone() if isinstance(value, Tensor) else value
        for writer in sorted(writers, key=self._position.__getitem__):
            self._call(writer, first=value)
        return value

    def _call(self, node: fx.Node, first: Any = None) -> Any:
        """Run a constant node on its inputs' values (`first` in place of its first input);
        an in-place op on a copy of that input."""
        if first is not None:
            args = [first, *fx.node.map_arg(node.args[1:], self.constant)]
        else:
            args = list(fx.node.map_arg(node.args, self.constant))
            if _writes_in_place(node) and isinstance(args[0], Tensor):
                args[0] = args[0].clone()
        kwargs = fx.node.map_arg(node.kwargs, self.constant)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op != "call_function":
            raise _NotLinear
        return node.target(*args, **kwargs)

    # -- shapes --

    def _learn_shapes(self, node: fx.Node) -> None:
        if node.meta["repconv_size"]:
            return
        tensors = [a for a in node.all_input_nodes if _is_tensor_operand(a)]
        if node.op == "call_module":
            module = self.modules.get(str(node.target))
            if is_plain_conv(module) and tensors:
                rank = len(module.kernel_size)
                self.shapes.fix(tensors[0], module.in_channels, rank)
                self.shapes.fix(node, module.out_channels, rank)
                return
            if is_norm_like(module) and tensors:
                self.shapes.join(node, tensors[0])
                rank = next((r for c, r in _NORM_RANKS.items() if isinstance(module, c)), None)
                width = getattr(module, "num_features", None)
                if width is None and getattr(module, "running_mean", None) is not None:
                    width = module.running_mean.numel()
                self.shapes.fix(node, width, rank)
                return
            pool_rank = _module_rank(module)
            if pool_rank is not None and tensors:
                self.shapes.join(node, tensors[0])
                self.shapes.fix(node, None, pool_rank)
            return
        if node.target in _CONV_FUNCTIONS and tensors:
            self._learn_functional_conv_shapes(node, tensors[0])
            return
        if node.op in ("call_function", "call_method") and _preserves_shape(node):
            for tensor in tensors:
                self.shapes.join(node, tensor)

    def _learn_functional_conv_shapes(self, node: fx.Node, operand: fx.Node) -> None:
        """F.conv2d(x, w, ...) with a constant kernel fixes x's and its output's channels as a
        conv module does (OREPA computes its kernel in the forward)."""
        bound = _conv_arguments(node)
        weight, groups = bound.get("weight"), bound.get("groups", 1)
        if bound.get("input") is not operand or not isinstance(groups, int):
            return
        if not isinstance(weight, fx.Node) or weight.meta.get("repconv_constant") is not True:
            return
        try:
            kernel = self.constant(weight)
        except Exception:  # not a tensor or not computable: the conv stays out of any region
            return
        if not isinstance(kernel, Tensor) or kernel.dim() < 3:
            return
        rank = kernel.dim() - 2
        self.shapes.fix(operand, kernel.shape[1] * groups, rank)
        self.shapes.fix(node, kernel.shape[0], rank)

    # -- the fixed point --

    def regions(self) -> list[Region]:
        cuts: set[fx.Node] = set()
        for _ in range(len(self.graph.nodes) + 1):
            run = self._run(cuts)
            found, shared = self._collect(run)
            if not run.new_cuts and not shared:
                self.refusals = _refusals(self.graph, run, self.modules)
                return [r for r in found if r.worth_fusing and not self._touches_failure(r)]
            cuts |= run.new_cuts | shared
        raise AssertionError("the cut points grow with every run; they cannot exceed the nodes")

    def _run(self, cuts: set[fx.Node]) -> _Pass:
        run = _Pass(set(cuts))
        for node in self.graph.nodes:
            try:
                value, source = self._evaluate(node, run)
            except _Cut as cut:
                run.new_cuts.add(cut.operand)
                continue
            except (_NotLinear, L.NotExact, NotFusable):
                continue
            except (BadInput, MemoryError):
                raise
            except Exception as exc:  # the analysis cannot follow this node: non-linear, and
                # its block is left as it was
                self._failed(node, exc)
                continue
            run.values[node], run.sources[node] = value, source
        for node in run.values:
            absorbed = _absorbing_users(node, run)
            if node not in run.cuts and absorbed and len(absorbed) < len(node.users):
                run.new_cuts.add(node)  # both inside a region and used outside it
        return run

    def _failed(self, node: fx.Node, exc: Exception) -> None:
        text = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        reason = f"the data-flow analysis failed on `{node.name}` ({error}); left as it was"
        self.failures.setdefault(_frame(node), reason)

    def _touches_failure(self, region: Region) -> bool:
        """Whether fusing the region would change a block the analysis failed in: the region
        is that block's, or one of its nodes is in that block's own code."""
        if not self.failures:
            return False
        return region.owner in self.failures or any(
            _frame(n) in self.failures for n in region.nodes
        )

    def _collect(self, run: _Pass) -> tuple[list[Region], set[fx.Node]]:
        owner_of: dict[fx.Node, fx.Node] = {}
        shared: set[fx.Node] = set()
        found = []
        for node, value in run.values.items():
            if not node.users:
                continue  # dead code: nothing to fuse it into
            inside = _absorbing_users(node, run)
            if node not in run.cuts and len(inside) == len(node.users):
                continue  # interior: a later node of the same region absorbs it
            nodes = self._interior(node, run)
            for n in nodes:
                if n in owner_of and owner_of[n] is not node:
                    shared.add(n)
                owner_of[n] = node
            ordered = sorted(nodes, key=self._position.__getitem__)
            found.append(Region(node, run.sources[node], ordered, value, _owner(ordered)))
        return found, shared

    def _interior(self, output: fx.Node, run: _Pass) -> list[fx.Node]:
        source = run.sources[output]
        nodes, stack = [output], [output]
        while stack:
            for operand in stack.pop().all_input_nodes:
                if operand is source or operand in run.cuts or operand not in run.values:
                    continue
                if run.sources[operand] is source and operand not in nodes:
                    nodes.append(operand)
                    stack.append(operand)
        return nodes

    # -- one node --

    def _operand(self, node: fx.Node, run: _Pass) -> tuple[L.LinearValue, fx.Node]:
        """`node`'s value as seen by its users: its region's value, or itself as a source."""
        if node in run.values and node not in run.cuts:
            return run.values[node], run.sources[node]
        if not isinstance(node, fx.Node) or not _is_tensor_operand(node):
            raise _NotLinear  # a number, a constant, or a traced size
        shape = self.shapes.of(node)
        if shape is None:
            raise _NotLinear
        return L.identity(shape[0], shape[1], device=self.device), node

    def _evaluate(self, node: fx.Node, run: _Pass) -> tuple[L.LinearValue, fx.Node]:
        if node.meta["repconv_size"]:
            raise _NotLinear  # a number computed from traced sizes
        if node.op == "call_module":
            return self._module_call(node, run)
        if node.op in ("call_function", "call_method"):
            return self._function_call(node, run)
        raise _NotLinear

    def _module_call(self, node: fx.Node, run: _Pass) -> tuple[L.LinearValue, fx.Node]:
        module = self.modules.get(str(node.target))
        if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            raise _NotLinear
        if id(module) in self.opaque:
            raise _NotLinear  # another pass's block
        operand = node.args[0]
        if isinstance(module, PASS_THROUGH):
            value, source = self._operand(operand, run)
            # On a branch (rbr_identity = nn.Identity) it is a train-time part the region
            # folds; after a sum (an `se` placeholder) it stays as the block's own.
            node.meta["repconv_kind"] = "branch" if len(value.terms) == 1 else "same"
            return value, source
        step = self._module_map(node, module)
        return self._then(node, operand, step, run)

    def _module_map(self, node: fx.Node, module: nn.Module | None) -> L.LinearValue | None:
        """The map a leaf module applies, or None for a per-channel affine (see `_then`)."""
        if is_plain_conv(module):
            node.meta["repconv_kind"] = "conv"
            return _conv_map(module)
        if module is not None and is_foldable_norm(module):
            node.meta["repconv_kind"] = "norm"
            return None
        pool = _pool_map(module, self.shapes.of(node), self.device)
        if pool is not None:
            node.meta["repconv_kind"] = "pool"
            return pool
        raise _NotLinear

    def _then(
        self, node: fx.Node, operand: fx.Node, step: L.LinearValue | None, run: _Pass
    ) -> tuple[L.LinearValue, fx.Node]:
        value, source = self._operand(operand, run)
        if source is not operand and _composes_across_modules(node, operand, value, step):
            raise _Cut(operand)
        try:
            return self._apply(node, value, step), source
        except L.NotExact:
            if source is operand:
                raise
            raise _Cut(operand) from None

    def _apply(
        self, node: fx.Node, value: L.LinearValue, step: L.LinearValue | None
    ) -> L.LinearValue:
        if step is None:  # a norm: per-channel affine after the value
            scale, shift = _norm_affine(self.modules[str(node.target)])
            return L.affine(value, scale, shift)
        return L.then(value, step)

    def _function_call(self, node: fx.Node, run: _Pass) -> tuple[L.LinearValue, fx.Node]:
        target = node.target
        if node.meta["repconv_constant"]:
            raise _NotLinear
        if target in _ADD or target in _SUB:
            return self._sum(node, run, negate_second=target in _SUB)
        if target in _MUL or target in _DIV:
            return self._scaled(node, run, divide=target in _DIV)
        if target in _NEG:
            value, source = self._operand(node.args[0], run)
            node.meta["repconv_kind"] = "scale"
            return L.affine(value, _scalar(-1.0, value), None, mark="-"), source
        if target in _SAME or _is_eval_dropout(node):
            node.meta["repconv_kind"] = "same"
            return self._operand(node.args[0], run)
        step = self._functional_map(node)
        return self._then(node, node.args[0], step, run)

    def _functional_map(self, node: fx.Node) -> L.LinearValue:
        if node.target is F.pad:
            node.meta["repconv_kind"] = "pad"
            return _pad_map(node, self.shapes.of(node.args[0]), self.device)
        if node.target in _POOL_FUNCTIONS:
            node.meta["repconv_kind"] = "pool"
            return _functional_pool(node, self.shapes.of(node), self.device)
        if node.target in _CONV_FUNCTIONS:
            node.meta["repconv_kind"] = "conv"
            return _functional_conv(node, self)
        raise _NotLinear

    def _sum(
        self, node: fx.Node, run: _Pass, *, negate_second: bool
    ) -> tuple[L.LinearValue, fx.Node]:
        args = list(node.args)
        alpha = node.kwargs.get("alpha", 1)
        if len(args) != 2 or set(node.kwargs) - {"alpha"} or not isinstance(alpha, (int, float)):
            raise _NotLinear
        sign = -alpha if negate_second else alpha
        a, b = args
        if not isinstance(a, fx.Node) and isinstance(b, fx.Node):
            if negate_second:
                raise _NotLinear  # number - x: a negation then a shift; rare, left alone
            a, b = b, a
        value, source = self._operand(a, run)
        node.meta["repconv_kind"] = "sum"
        if _is_coefficient(b):  # a constant shift: a number or a per-channel tensor
            shift = _per_channel(self.constant(b) if isinstance(b, fx.Node) else b, value)
            return L.affine(value, None, shift * sign), source
        if not isinstance(b, fx.Node):
            raise _NotLinear
        other, other_source = self._operand(b, run)
        if other_source is not source:
            raise _NotLinear  # two different inputs: no single conv computes this
        if sign != 1:
            other = L.affine(other, _scalar(float(sign), other), None, mark=f"*{sign:g}")
        return L.plus(value, other), source

    def _scaled(self, node: fx.Node, run: _Pass, *, divide: bool) -> tuple[L.LinearValue, fx.Node]:
        if len(node.args) != 2 or node.kwargs:
            raise _NotLinear
        a, b = node.args
        if not divide and _is_coefficient(a) and not _is_coefficient(b):
            a, b = b, a
        if not isinstance(a, fx.Node) or not _is_coefficient(b):
            raise _NotLinear
        value, source = self._operand(a, run)
        factor = self.constant(b) if isinstance(b, fx.Node) else b
        scale = _per_channel(factor, value)
        if divide:
            scale = 1.0 / scale
        node.meta["repconv_kind"] = "scale"
        name = _coefficient_name(b)
        return L.affine(value, scale, None, mark=("/" if divide else "*") + name), source


class _NotLinear(Exception):
    """The node is not a linear map this analysis knows."""


def _refusals(graph: fx.Graph, run: _Pass, modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """Sums that look like a re-parameterizable block but are not one linear map of one input:
    a branch ends in a non-linear step (an activation, a product with the input, a reflect
    padded conv) applied to a linear value of the input the other branches read. A residual
    sum whose branch holds convs after its non-linearity (ResNet) is not such a look-alike."""
    found = []
    for node in graph.nodes:
        if node in run.values or not (node.target in _ADD or node.target in _SUB):
            continue
        operands = [a for a in node.args if isinstance(a, fx.Node) and not a.meta["repconv_size"]]
        sources = {run.sources[a] for a in operands if a in run.values}
        sources |= {a for a in operands if a.op == "placeholder"}
        for operand in operands:
            step = _last_non_linear_step(operand, run)
            if step is None:
                continue
            reads = [run.sources.get(i, i) if i in run.values else i for i in step.all_input_nodes]
            if sources & set(reads):
                reason = (
                    f"the branches summed at `{node.name}` are not one linear map of the input: "
                    f"{_describe(step, modules)} on a branch is not linear"
                )
                found.append((_frame(node), reason))
                break
    return found


def _last_non_linear_step(operand: fx.Node, run: _Pass) -> fx.Node | None:
    """The non-linear node a branch ends with, possibly followed by norms or scales only."""
    if operand in run.values:
        if any(not t.diagonal for t in run.values[operand].terms):
            return None  # convs after it: a branch of its own (a ResNet body), not a look-alike
        operand = run.sources[operand]
    return None if operand.op in ("placeholder", "get_attr") else operand


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        text = f"{type(module).__name__} `{node.target}`"
        mode = getattr(module, "padding_mode", "zeros")
        return text + (f" (padding_mode={mode!r})" if mode != "zeros" else "")
    name = getattr(node.target, "__name__", str(node.target))
    return f"`{name}`"


def _frame(node: fx.Node) -> str:
    """The module whose code made this node (for a leaf call, the code that called it)."""
    stack = _stack(node)
    return stack[-1] if stack else ""


def _composes_across_modules(
    node: fx.Node, operand: fx.Node, value: L.LinearValue, step: L.LinearValue | None
) -> bool:
    """A conv after a conv is merged only inside one module's code: two consecutive layers of
    different blocks stay two layers (each block keeps its own deploy form)."""
    if step is None or all(t.diagonal for t in step.terms):
        return False
    if all(t.diagonal for t in value.terms):
        return False
    return _frame(node) != _frame(operand)


def _absorbing_users(node: fx.Node, run: _Pass) -> list[fx.Node]:
    """The users whose value (in the same region) takes `node`'s value in."""
    if node in run.cuts:
        return []
    source = run.sources[node]
    return [u for u in node.users if u in run.values and run.sources[u] is source]


def _device_of(root: nn.Module) -> torch.device:
    tensor = next(iter([*root.parameters(), *root.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _coefficient_name(arg: Any) -> str:
    if not isinstance(arg, fx.Node):
        return f"{arg:g}"
    stack = [arg]
    while stack:
        node = stack.pop()
        if node.op == "get_attr":
            return str(node.target).rpartition(".")[2]
        stack += node.all_input_nodes
    return "c"


def _attribute(root: nn.Module, target: str) -> Any:
    owner = root
    *parents, name = target.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return getattr(owner, name)


def _preserves_shape(node: fx.Node) -> bool:
    """Channels and rank stay: sums, scales, zero padding, pooling (space may change)."""
    return (
        node.target is F.pad
        or node.target in _POOL_FUNCTIONS
        or node.target in _ADD
        or node.target in _SUB
        or node.target in _MUL
        or node.target in _DIV
        or node.target in _NEG
        or node.target in _SAME
        or _is_eval_dropout(node)
    )


def _is_eval_dropout(node: fx.Node) -> bool:
    if node.target not in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
        return False
    return node.kwargs.get("training", True) is False or (
        len(node.args) > 2 and node.args[2] is False
    )


def _name_of(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _writes_in_place(node: fx.Node) -> bool:
    """`t[...] = v`, `t.fill_(v)`, `nn.init.zeros_(t)`: the node writes into its first input."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return False
    if not isinstance(node.args[0], fx.Node):
        return False
    if node.target is operator.setitem:
        return True
    name = _name_of(node)
    return name.endswith("_") and not name.endswith("__")


def _aliases(node: fx.Node) -> list[fx.Node]:
    """The nodes that may share `node`'s memory: its views, and theirs."""
    found: list[fx.Node] = []
    stack = [node]
    while stack:
        for user in stack.pop().users:
            first = user.args[0] if user.args else None
            if first in (node, *found) and _name_of(user) in _VIEWS and user not in found:
                found.append(user)
                stack.append(user)
    return found


def _is_size(node: fx.Node) -> bool:
    """Whether the node computes a number from traced sizes (and constants) alone: a size,
    a shape, an element of one, arithmetic on them, a tensor of those shapes."""
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return True
    if node.op != "call_function" and node.op != "call_method":
        return False
    if node.target is getattr and len(node.args) > 1 and node.args[1] in _SIZE_ATTRIBUTES:
        return True
    if node.target is len:
        return True
    inputs = [a for a in node.all_input_nodes if a.meta.get("repconv_constant") is not True]
    return bool(inputs) and all(a.meta.get("repconv_size") is True for a in inputs)


def _is_tensor_operand(node: fx.Node) -> bool:
    """A value a linear map may act on: neither a constant nor a traced size."""
    return (
        node.meta.get("repconv_constant") is not True and node.meta.get("repconv_size") is not True
    )


def _holds_node(value: Any) -> bool:
    """Whether an argument is, or holds (in a list, tuple or dict), a traced value."""
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _numbers(value: Any, analysis: Analysis) -> Any:
    """A geometric argument with each constant node in it evaluated (a size of a parameter);
    _NotLinear when it holds anything else (a size read from a traced value)."""

    def number(node: fx.Node) -> Any:
        if node.meta.get("repconv_constant") is not True:
            raise _NotLinear
        found = analysis.constant(node)
        if isinstance(found, Tensor):
            raise _NotLinear
        return found

    return fx.node.map_arg(value, number)


def _is_coefficient(arg: Any) -> bool:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return True
    return isinstance(arg, fx.Node) and arg.meta.get("repconv_constant") is True


def _scalar(number: float, value: L.LinearValue) -> Tensor:
    device = value.terms[0].weights.device
    return torch.tensor(number, dtype=torch.float64, device=device)


def _per_channel(factor: Any, value: L.LinearValue) -> Tensor:
    """A multiplier as a per-output-channel vector (or 0-dim), if it broadcasts that way."""
    if isinstance(factor, (int, float)):
        return _scalar(float(factor), value)
    if not isinstance(factor, Tensor) or not factor.is_floating_point():
        raise _NotLinear
    full = value.rank + 2
    if factor.dim() > full:
        raise _NotLinear
    shape = (1,) * (full - factor.dim()) + tuple(factor.shape)
    if factor.numel() == 1:
        return factor.to(torch.float64).reshape(())
    if shape[0] != 1 or shape[1] != value.channels_out or any(s != 1 for s in shape[2:]):
        raise _NotLinear  # it would scale along space or the batch: not one conv
    return factor.to(torch.float64).reshape(-1)


def _norm_affine(norm: nn.Module) -> tuple[Tensor, Tensor]:
    affine = getattr(norm, "affine", True)
    stats = NormStats(
        norm.running_mean.detach(),
        norm.running_var.detach(),
        norm.weight.detach() if affine and norm.weight is not None else None,
        norm.bias.detach() if affine and norm.bias is not None else None,
        float(norm.eps),
    )
    return norm_scale_shift(stats)


def _conv_map(conv: nn.Module) -> L.LinearValue:
    geometry = Geometry.of(conv)
    if conv.padding_mode != "zeros" and any(p > 0 for p in geometry.padding):
        raise _NotLinear  # reflect/replicate/circular padding depends on the input's border
    window = L.Window.conv(
        geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation
    )
    bias = None if conv.bias is None else conv.bias.detach()
    label = "x".join(map(str, geometry.kernel_size))
    if any(d > 1 for d in geometry.dilation):
        label += "/d" + "x".join(map(str, geometry.dilation))
    if conv.groups > 1:
        label += " dw" if conv.groups == conv.in_channels else f" g{conv.groups}"
    return L.conv(conv.weight.detach(), conv.groups, window, bias, label=label)


def _module_rank(module: Any) -> int | None:
    return next((r for c, r in _POOLS.items() if isinstance(module, c)), None)


def _pool_map(module: Any, shape: tuple[int, int] | None, device) -> L.LinearValue | None:
    stock = next((c for c in _POOLS if isinstance(module, c)), None)
    if stock is None or type(module).forward is not stock.forward:
        return None
    if shape is None:
        raise _NotLinear
    options = (module.kernel_size, module.stride, module.padding, module.ceil_mode)
    extra = (getattr(module, "count_include_pad", True), getattr(module, "divisor_override", None))
    return _pool(shape[0], _POOLS[stock], *options, *extra, device=device)


def _functional_pool(node: fx.Node, shape: tuple[int, int] | None, device) -> L.LinearValue:
    if shape is None:
        raise _NotLinear
    names = [
        "input",
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    ]
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    defaults = {
        "stride": None,
        "padding": 0,
        "ceil_mode": False,
        "count_include_pad": True,
        "divisor_override": None,
    }
    options = defaults | bound
    if any(_holds_node(options[k]) for k in names[1:] if k in options):
        raise _NotLinear  # a size read from the input (a global pool): not one fixed window
    return _pool(
        shape[0],
        shape[1],
        options["kernel_size"],
        options["stride"],
        options["padding"],
        options["ceil_mode"],
        options["count_include_pad"],
        options["divisor_override"],
        device=device,
    )


def _tuple(value: Any, rank: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(value)
    if len(value) == 1:
        return value * rank
    if len(value) != rank:
        raise _NotLinear
    return value


def _pool(
    channels, rank, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor, *, device
):
    size = _tuple(kernel_size, rank)
    stride = size if stride is None or stride == [] or stride == () else _tuple(stride, rank)
    padding = _tuple(padding, rank)
    if ceil_mode or divisor is not None or (not count_include_pad and any(padding)):
        raise _NotLinear  # outputs counted or averaged by the input's border
    taps = torch.full(size, 1.0 / math.prod(size), dtype=torch.float64, device=device)
    window = L.Window.conv(size, stride, padding, (1,) * rank)
    label = "avgpool " + "x".join(map(str, size))
    return L.diagonal(channels, taps, window, label=label)


def _pad_map(node: fx.Node, shape: tuple[int, int] | None, device) -> L.LinearValue:
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    fill = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if _holds_node([mode, fill]) or shape is None or mode != "constant":
        raise _NotLinear
    if fill not in (None, 0, 0.0):
        raise _NotLinear
    channels, rank = shape
    if (
        not isinstance(pads, (list, tuple))
        or len(pads) != 2 * rank
        or not all(isinstance(p, int) and p >= 0 for p in pads)
    ):
        raise _NotLinear
    # F.pad lists the last axis first, (left, right) each.
    lo = tuple(pads[2 * (rank - 1 - a)] for a in range(rank))
    hi = tuple(pads[2 * (rank - 1 - a) + 1] for a in range(rank))
    window = L.Window(
        (1,) * rank,
        tuple(-p for p in lo),
        (1,) * rank,
        (1,) * rank,
        tuple(a + b - 1 for a, b in zip(lo, hi)),
    )
    taps = torch.ones((1,) * rank, dtype=torch.float64, device=device)
    return L.diagonal(channels, taps, window, label="pad")


def _conv_arguments(node: fx.Node) -> dict[str, Any]:
    """F.conv*d's arguments by name, however the call passed them."""
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    return dict(zip(names, node.args)) | dict(node.kwargs)


def _functional_conv(node: fx.Node, analysis: Analysis) -> L.LinearValue:
    bound = _conv_arguments(node)
    weight, bias = bound.get("weight"), bound.get("bias")
    if not _is_coefficient(weight) or isinstance(weight, (int, float)):
        raise _NotLinear
    if bias is not None and not (isinstance(bias, fx.Node) and _is_coefficient(bias)):
        raise _NotLinear
    for key in ("stride", "padding", "dilation", "groups"):
        if key in bound:  # `padding=self.weight.size(2) // 2` is a number; `x.size(2)` is not
            bound[key] = _numbers(bound[key], analysis)
    kernel = analysis.constant(weight)
    if not isinstance(kernel, Tensor) or kernel.dim() < 3:
        raise _NotLinear
    rank = kernel.dim() - 2
    stride = _tuple(bound.get("stride", 1), rank)
    padding = bound.get("padding", 0)
    dilation = _tuple(bound.get("dilation", 1), rank)
    if isinstance(padding, str):
        raise _NotLinear
    window = L.Window.conv(tuple(kernel.shape[2:]), stride, _tuple(padding, rank), dilation)
    groups = bound.get("groups", 1)
    bias_value = None if bias is None else analysis.constant(bias)
    label = "x".join(map(str, kernel.shape[2:])) + " (functional)"
    return L.conv(kernel, groups, window, bias_value, label=label)


def _owner(nodes: list[fx.Node]) -> str:
    """The innermost module whose forward holds all `nodes` (by fx's module stacks)."""
    paths = [_stack(node) for node in nodes]
    common: list[str] = []
    for level in zip(*paths):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return common[-1] if common else ""


def _stack(node: fx.Node) -> list[str]:
    """The paths of the modules whose code is running when `node` is made, outermost first
    (for a leaf's call, its caller's). fx keys a second call of a module `path@1`; the path
    itself is in the value."""
    stack = [str(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack


def analyse(
    root: nn.Module, graph: fx.Graph, opaque: AbstractSet[int] = frozenset()
) -> list[Region]:
    """The regions worth fusing in `graph` (traced from `root`), in graph order; the modules
    in `opaque` (by id) are other passes' and count as non-linear."""
    return Analysis(root, graph, opaque).regions()


__all__ = [
    "Analysis",
    "Region",
    "analyse",
    "constant_inputs",
    "kind_of",
]
