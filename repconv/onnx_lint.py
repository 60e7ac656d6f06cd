"""Find, in an ONNX graph, the training-time structures a deploy model should no longer hold.

A correct deploy export of a re-parameterized model has one conv where the train model had
several branches, and no BatchNormalization after a conv. When a block was missed, its export
still shows the branches, and no later tool (TensorRT, onnxruntime, OpenVINO) folds parallel
convs. `lint_model` reports every such place; it is a pure function over a ModelProto.

Only the main graph is walked: subgraphs of If/Loop and model-local functions are not.
onnx is imported lazily (the optional extra `repconv[onnx]`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from repconv.errors import BadInput

INSTALL_HINT = "ONNX support needs the onnx package: pip install 'repconv[onnx]'"

LINEAR_OPS = {"Conv": "conv-BN", "ConvTranspose": "conv-BN", "Gemm": "linear-BN"}
LINEAR_OPS["MatMul"] = "linear-BN"
SUM_OPS = ("Add", "Sum")
# Ops a branch's value passes through unchanged in kind before it is summed: which input
# carries the data. Mul is handled apart (the data is its one non-constant input).
PASS_THROUGH = {"Identity": 0, "BatchNormalization": 0, "Pad": 0, "Slice": 0, "Cast": 0}
# BNAndPad (DBB) pads with torch.where(mask, padded, values): the data is Where's input 1.
PASS_THROUGH["Where"] = 1


@dataclass(frozen=True)
class Finding:
    """One place in the graph that looks like an unfused train-time structure."""

    pattern: str  # bn-after-conv, bn-after-linear, parallel-convs, identity-branch, avgpool-branch
    family: str  # the repconv family it looks like: RepVGG, ACB, DBB, conv-BN, linear-BN
    nodes: tuple[str, ...]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nodes": list(self.nodes)}


def import_onnx() -> Any:
    """The onnx module, or BadInput with the install hint when the extra is missing."""
    try:
        import onnx
    except ImportError:
        raise BadInput(INSTALL_HINT) from None
    return onnx


def load_model(path: str | Path) -> Any:
    """Read an ONNX file; any unreadable or corrupt file is BadInput in one line."""
    onnx = import_onnx()
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path} is a directory, not an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise BadInput(f"{path.name} is empty")
    try:
        # external tensor data is not needed: only the graph's structure is read
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not ONNX
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInput(f"{path.name} is not a valid ONNX model: {first}") from None
    if not model.graph.node:
        raise BadInput(f"{path.name} is not a valid ONNX model: its graph has no nodes")
    return model


def lint_file(path: str | Path) -> list[Finding]:
    """`lint_model` of the ONNX file at `path`."""
    return lint_model(load_model(path))


class _Graph:
    """Who produces each tensor and which tensors are constants."""

    def __init__(self, graph: Any):
        self.nodes = list(graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output if out}
        self.constants = {t.name for t in graph.initializer}
        self.constants |= {n.output[0] for n in self.nodes if n.op_type == "Constant" and n.output}
        self.shapes = {t.name: tuple(t.dims) for t in graph.initializer}
        self._names = {id(n): n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)}
        self._order = {id(n): i for i, n in enumerate(self.nodes)}

    def in_order(self, nodes: list[Any]) -> list[Any]:
        return sorted(nodes, key=lambda n: self._order[id(n)])

    def name(self, node: Any) -> str:
        return self._names[id(node)]

    def skip_identity(self, tensor: str) -> str:
        node = self.producer.get(tensor)
        while node is not None and node.op_type == "Identity":
            tensor = node.input[0]
            node = self.producer.get(tensor)
        return tensor

    def data_input(self, node: Any) -> str | None:
        """The input a pass-through node carries the branch's value on, else None."""
        if node.op_type == "Mul":
            varying = [t for t in node.input if t not in self.constants]
            return varying[0] if len(varying) == 1 else None
        index = PASS_THROUGH.get(node.op_type)
        return node.input[index] if index is not None and len(node.input) > index else None

    def walk_up(self, tensor: str) -> list[str]:
        """The tensors from `tensor` up through pass-through ops, `tensor` first."""
        path = [tensor]
        node = self.producer.get(tensor)
        while node is not None:
            data = self.data_input(node)
            if data is None or data in path:
                break
            path.append(data)
            node = self.producer.get(data)
        return path

    def kernel(self, conv: Any) -> tuple[int, ...]:
        for attr in conv.attribute:
            if attr.name == "kernel_shape":
                return tuple(attr.ints)
        return self.shapes.get(conv.input[1], ())[2:] if len(conv.input) > 1 else ()


def lint_model(model: Any) -> list[Finding]:
    """Every unfused train-time pattern in `model`'s main graph, in graph order."""
    graph = _Graph(model.graph)
    findings = list(_norms_after_linear(graph))
    roots = _sum_roots(graph)
    for root in roots:
        findings.extend(_branch_findings(graph, root, roots))
    return findings


def _norms_after_linear(graph: _Graph) -> Iterator[Finding]:
    for node in graph.nodes:
        if node.op_type != "BatchNormalization" or not node.input:
            continue
        source = graph.producer.get(graph.skip_identity(node.input[0]))
        if source is None or source.op_type not in LINEAR_OPS:
            continue
        family = LINEAR_OPS[source.op_type]
        pattern = "bn-after-conv" if family == "conv-BN" else "bn-after-linear"
        names = (graph.name(source), graph.name(node))
        yield Finding(
            pattern, family, names, f"BatchNormalization {names[1]} follows {names[0]} unfused"
        )


def _sum_roots(graph: _Graph) -> list[Any]:
    """Add/Sum nodes whose output is not only summed further: the top of each sum tree."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.nodes:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    roots = []
    for node in graph.nodes:
        if node.op_type not in SUM_OPS:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type not in SUM_OPS for u in users) or len(users) > 1:
            roots.append(node)
    return roots


def _sum_terms(graph: _Graph, root: Any, roots: list[Any]) -> tuple[list[str], list[Any]]:
    """The tensors a sum tree adds up, and its Add/Sum nodes (a + b + c is two Adds)."""
    terms, adds, pending = [], [], [root]
    while pending:
        node = pending.pop()
        adds.append(node)
        for tensor in node.input:
            inner = graph.producer.get(graph.skip_identity(tensor))
            if inner is not None and inner.op_type in SUM_OPS and inner not in roots:
                pending.append(inner)
            else:
                terms.append(tensor)
    return terms, adds


@dataclass
class _Branches:
    """A sum's terms sorted by kind; convs grouped by the tensor they read."""

    by_source: dict[str, list[Any]]
    identities: list[tuple[str, str]]  # (term, the conv source it is)
    pools: list[Any]
    chained: set[str]  # names of 1x1 convs feeding a kxk branch conv (DBB's 1x1-kxk)


def _conv_source(graph: _Graph, conv: Any) -> tuple[str, Any | None]:
    """The tensor a branch conv reads, past padding and BN; and the 1x1 conv before it, if
    that 1x1 conv is itself fed from outside (DBB's 1x1 -> kxk branch)."""
    source = graph.walk_up(conv.input[0])[-1]
    before = graph.producer.get(source)
    if (
        before is not None
        and before.op_type == "Conv"
        and all(k == 1 for k in graph.kernel(before))
    ):
        return graph.walk_up(before.input[0])[-1], before
    return source, None


def _sort_branches(graph: _Graph, terms: list[str]) -> _Branches:
    ends = {t: graph.walk_up(t) for t in terms}
    convs = {}
    for term, path in ends.items():
        node = graph.producer.get(path[-1])
        if node is not None and node.op_type == "Conv" and node.input:
            convs[term] = node
    sources = {t: _conv_source(graph, c) for t, c in convs.items()}
    source_of = {s: t for t, (s, _) in sources.items()}
    branches = _Branches({}, [], [], set())
    for term, path in ends.items():
        hit = next((p for p in path if p in source_of and source_of[p] != term), None)
        if hit is not None:  # the term is what a summed conv reads: an identity branch
            branches.identities.append((term, hit))
        elif term in convs:
            source, chained = sources[term]
            branches.by_source.setdefault(source, []).append(convs[term])
            if chained is not None:
                branches.chained.add(graph.name(chained))
        else:
            node = graph.producer.get(path[-1])
            if node is not None and node.op_type == "AveragePool":
                branches.pools.append(node)
    return branches


def _family(graph: _Graph, branches: _Branches) -> str:
    """The repconv family a multi-branch sum looks like, from its branches' shapes."""
    if branches.pools or branches.chained:
        return "DBB"
    convs = [c for group in branches.by_source.values() for c in group]
    if any(len(set(graph.kernel(c))) > 1 for c in convs):  # a kx1 or 1xk kernel
        return "ACB"
    return "RepVGG"


def _branch_findings(graph: _Graph, root: Any, roots: list[Any]) -> Iterator[Finding]:
    terms, adds = _sum_terms(graph, root, roots)
    branches = _sort_branches(graph, terms)
    family = _family(graph, branches)
    sum_names = tuple(graph.name(a) for a in graph.in_order(adds))
    at = f"summed by {sum_names[-1]}"
    for source, convs in branches.by_source.items():
        if len(convs) < 2:
            continue
        names = tuple(graph.name(c) for c in graph.in_order(convs))
        yield Finding(
            "parallel-convs",
            family,
            (*names, *sum_names),
            f"{len(convs)} convs reading {source} {at}: unfused branches ({', '.join(names)})",
        )
    for term, source in branches.identities:
        readers = tuple(graph.name(c) for c in branches.by_source.get(source, []))
        # the branch's own node (a BN, a Mul) when the input is not added as it is
        branch = graph.producer.get(term) if term != source else None
        own = (graph.name(branch),) if branch is not None else ()
        yield Finding(
            "identity-branch",
            family,
            (*readers, *own, *sum_names),
            f"{source} is added back to the conv reading it ({', '.join(readers)}) {at}: "
            "an unfused identity branch",
        )
    convs = graph.in_order([c for group in branches.by_source.values() for c in group])
    if branches.pools and convs:
        names = tuple(graph.name(n) for n in [*branches.pools, *convs])
        yield Finding(
            "avgpool-branch",
            family,
            (*names, *sum_names),
            f"average-pool branch and conv branch {at}: unfused ({', '.join(names)})",
        )
