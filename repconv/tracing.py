"""fx graphs of modules as the passes see them, and the forward a rewritten graph becomes.

Convs, norms and the modules other passes own are leaves; every other module's code is
inlined. A graph is what fx records from a module's Python code, its structure and the plain
values its code can read, never from tensor values: two modules equal in all of that (their
`layout_key`) trace to the same graph, so inside one `memo.scope` a layout is traced once and
each module gets its own copy. fx patches `torch.nn.Module` for every thread while it traces:
repconv's entry points take turns (`repconv.turns`).
"""

from __future__ import annotations

import copy
import enum
import functools
import struct
import types
from collections.abc import Hashable
from collections.abc import Set as AbstractSet
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from repconv import memo
from repconv.errors import NotFusable
from repconv.modules import is_norm_like, is_plain_conv

# What torch keeps in every module's __dict__: registries and hooks, not the model's own values.
_BOOKKEEPING = frozenset(vars(nn.Module()))
_HOOK_TABLES = tuple(sorted(name for name in _BOOKKEEPING if "hook" in name))
_CLASS_BOOKKEEPING = frozenset(vars(type("Empty", (), {}))) | {"__annotations__"}
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)
_BY_IDENTITY = (types.FunctionType, types.BuiltinFunctionType, type)


class LeafTracer(fx.Tracer):
    """Convs, norms and the modules in `opaque` (by id) stay whole; other code is inlined."""

    def __init__(self, opaque: AbstractSet[int] = frozenset()):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return (
            id(m) in self.opaque
            or is_plain_conv(m)
            or is_norm_like(m)
            or super().is_leaf_module(m, qualified_name)
        )


def trace(root: nn.Module, opaque: AbstractSet[int] = frozenset()) -> fx.Graph:
    """`root`'s graph with convs, norms and `opaque` modules as leaves (fx errors propagate)."""
    return LeafTracer(opaque).trace(root)


def graph_of(
    module: nn.Module, opaque: AbstractSet[int] = frozenset(), *, by_layout: bool = False
) -> fx.Graph:
    """The module's graph as its forward runs it, instance-level forwards included; a graph
    the caller owns (it may rewrite it). `by_layout`: inside a `memo.scope`, modules of one
    `layout_key` share one trace (worth it for blocks, not for a model traced once)."""
    own = vars(module).get("forward")
    if isinstance(own, GraphForward):
        return copy.deepcopy(own.graph)
    if own is not None:
        function = getattr(own, "__func__", None)
        if getattr(own, "__self__", None) is not module or function is None:
            raise NotFusable("its forward was replaced on the instance by something untraceable")
        tracer = LeafTracer(opaque)
        tracer.traced_func_name = function.__name__
        return tracer.trace(module)
    if not by_layout:
        return trace(module, opaque)
    key = layout_key(module, opaque)
    traced = []

    def first_of_its_layout() -> fx.Graph:
        traced.append(trace(module, opaque))
        return copy.deepcopy(traced[0])

    shared = memo.remembered("fx graph", key, first_of_its_layout)
    if not traced:
        return copy.deepcopy(shared)
    if key is not None and layout_key(module, opaque) != key:
        # Tracing changed the module (fx stored a tensor constant on it, or the forward set an
        # attribute): the graph may name what only this module has.
        memo.forget("fx graph", key)
    return traced[0]


class _NotPlain(Exception):
    pass


def layout_key(module: nn.Module, opaque: AbstractSet[int] = frozenset()) -> Hashable | None:
    """Everything tracing `module` can depend on: for each module inside, its path, class and
    forward, what its classes outside torch hold (class attributes, methods), whether it is
    opaque or shared, its training flag, its parameter and buffer names, and every plain value
    (numbers, strings, tuples of them, dtypes; functions and classes by identity) in its
    `__dict__`. None when something a forward could read is not plain (a tensor or any other
    object kept as an attribute, a hook, a buffer of a module whose code is inlined): no key is
    safe then. Floats are compared by their bits (0.0 is not -0.0). Tensor shapes are left out,
    as fx hands a forward proxies, not tensors."""
    first_path: dict[int, str] = {}
    parts = []
    try:
        leaves = LeafTracer(opaque)
        for path, m in module.named_modules(remove_duplicate=False):
            inlined_code = not path or not leaves.is_leaf_module(m, path)
            if inlined_code and any(b is not None for b in m._buffers.values()):
                # fx hands an inlined forward its buffers as tensors, not proxies: `if
                # self.flag` or `float(self.scale)` records the value in the graph
                raise _NotPlain
            shared = first_path.setdefault(id(m), path)
            code = getattr(type(m), "forward", None)  # torch's classes' too can be reassigned
            parts.append((path, type(m), code, _class_values(type(m)), shared, id(m) in opaque))
            parts.append(_own_values(m))
    except _NotPlain:
        return None
    return tuple(parts)


def _class_values(cls: type) -> tuple:
    """What a forward reads from its class and the classes it inherits outside torch: a class
    attribute (`mode = "sum"`), a method, the forward itself. A class is mutable, and the
    rule check's answers last the process: plain values by value, the rest by identity."""
    return tuple(
        (name, _frozen_or_same(value))
        for owner in cls.__mro__
        if owner is not object and not owner.__module__.startswith("torch")
        for name, value in vars(owner).items()
        if name not in _CLASS_BOOKKEEPING
    )


def _frozen_or_same(value: Any) -> Hashable:
    try:
        return _frozen(value)
    except _NotPlain:
        return _Same(value)


class _Same:
    """Equal only to a `_Same` of the very same object (kept alive, so its id is not reused)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _own_values(module: nn.Module) -> tuple:
    if any(getattr(module, table, None) for table in _HOOK_TABLES):
        raise _NotPlain
    values = tuple(
        (name, _frozen(value)) for name, value in vars(module).items() if name not in _BOOKKEEPING
    )
    params = tuple((name, p is None) for name, p in module._parameters.items())
    buffers = tuple((name, b is None) for name, b in module._buffers.items())
    return module.training, values, params, buffers


def _frozen(value: Any) -> Hashable:
    """A hashable stand-in equal only for values no forward can tell apart (1 and True differ)."""
    if isinstance(value, (float, complex)):
        # by bits: 0.0 == -0.0, yet math.copysign or 1 / x in a forward tells them apart
        return type(value), struct.pack("<dd", value.real, value.imag)
    if isinstance(value, _PLAIN):
        return type(value), value
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return dict, tuple((_frozen(k), _frozen(v)) for k, v in value.items())
    if isinstance(value, _BY_IDENTITY):
        return _Same(value)
    raise _NotPlain


class GraphForward:
    """A block's forward after its regions were fused: the Python code fx generates from the
    rewritten graph, run with the block as `self`.

    Set on the instance, so the block keeps its class and every attribute. Copyable
    (`copy.deepcopy`), and picklable: pickled, it becomes the `forward` of a
    `torch.fx.GraphModule` holding the same submodules and parameters (`picklable_forward`),
    which torch alone loads back, so a pickled deploy model needs no repconv to load.
    """

    def __init__(self, block: nn.Module, graph: fx.Graph):
        self.block = block
        self.graph = graph
        code = graph.python_code(root_module="self")
        scope = dict(code.globals)
        exec(_compiled(code.src, f"<repconv fused forward of {type(block).__name__}>"), scope)
        self._function = scope["forward"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(self.block, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphForward:
        return GraphForward(copy.deepcopy(self.block, memo), self.graph)

    def __reduce__(self) -> Any:
        return getattr, (picklable_forward(self.block, self.graph), "forward")


def picklable_forward(block: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running `graph` on `block`'s own submodules and parameters (the same
    objects, not copies), for pickling. A graph reading a buffer of the block is refused: a
    module's buffers are replaced, not updated, when it is cast (`.float()`), and the
    GraphModule would keep the old ones."""
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, name = str(node.target).rpartition(".")
        module = block.get_submodule(owner) if owner else block
        if name in module._buffers:
            raise TypeError(
                f"the forward repconv rewrote for {type(block).__name__} reads the buffer "
                f"{node.target}, which a pickled copy of that forward would not follow"
            )
    own = copy.deepcopy(graph)
    # torch re-traces a GraphModule's code when it loads one, with the tracer that made the
    # graph: torch's own, so loading needs nothing of repconv's.
    own._tracer_cls, own._tracer_extras = None, None
    return fx.GraphModule(block, own, class_name=f"{type(block).__name__}Fused")


@functools.lru_cache(maxsize=256)
def _compiled(source: str, filename: str) -> types.CodeType:
    """Blocks of one layout get the same source: it is compiled once (a code object depends
    on nothing else)."""
    return compile(source, filename, "exec")


__all__ = ["GraphForward", "LeafTracer", "graph_of", "layout_key", "trace"]
