"""repconv's modules import only downwards: no cycle, no import of a higher layer.

Every import counts, at the top of a module or inside a function (lazy) or under TYPE_CHECKING:
a lazy import is still a dependency. Same-layer imports are allowed as long as they form no
cycle. A new module must be given its layer here (and its line in ARCHITECTURE.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "repconv"

# Bottom to top; ARCHITECTURE.md ("The layers") says what each holds.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "foundation",
        {"errors", "version", "terminal", "tolerances", "turns", "interrupts", "latency", "paths"}
        | {"memo", "pages", "memory", "zoo", "zoo.registry", "zoo.blocks"},
    ),
    (
        "records",
        {
            "files",
            "options",
            "deploy_map",
            "metadata",
            "plan_record",
            "pickle_scan",
            "onnx_lint",
            "batch.config",
        },
    ),
    ("module facts and math", {"modules", "kernels", "geometry", "linear_map", "outputs", "int8"}),
    ("analysis", {"tracing", "dataflow", "sum_check", "fused_conv", "block_check"}),
    (
        "passes",
        {"rules.base", "rules.repvgg", "rules.acb", "rules.dbb", "rules.convbn"}
        | {"rules.dataflow", "rules.deploy_method"},
    ),
    ("registry", {"rules.registry", "rules"}),
    ("engine", {"engine"}),
    (
        "models and judging",
        {"dtypes", "arch", "verification", "bench", "deploy_constraint", "convention"}
        | {"deploy_form", "int8_check"}
        | {"zoo.repvgg", "zoo.dbb_nets", "zoo.demo"},
    ),
    ("checkpoint I/O", {"checkpoint", "layout", "zoo.checkpoints", "model_choice", "calibration"}),
    ("workflows", {"pipeline", "onnx_export", "onnx_int8", "batch.worker"}),
    (
        "interface",
        {"report", "showcase", "cli", "__main__", "", "batch", "batch.executors", "int8_plot"}
        | {"batch.runner", "batch.task", "batch.summary", "batch.progress"},
    ),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, known: set[str], name: str | None = None) -> set[str]:
    """The repconv modules a file imports (relative to the package, "" being repconv itself)."""
    name = module_name(path) if name is None else name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            elif node.module and (node.module + ".").startswith("repconv."):
                target = node.module.removeprefix("repconv").lstrip(".")
            else:
                continue
            for alias in node.names:
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.name + ".").startswith("repconv."):
                    found.add(alias.name.removeprefix("repconv").lstrip("."))
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def test_every_module_has_a_layer():
    assert sorted(set(import_graph()) - set(LAYER_OF)) == []


def test_imports_point_down_only():
    graph = import_graph()

    def shown(name: str) -> str:
        return f"{name or 'repconv'} ({LAYERS[LAYER_OF[name]][0]})"

    upward = sorted(
        f"{shown(name)} imports {shown(dep)}"
        for name, deps in graph.items()
        for dep in deps
        if LAYER_OF.get(dep, -1) > LAYER_OF.get(name, len(LAYERS))
    )
    assert upward == []


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*trail[trail.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*trail, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_checks_see_lazy_and_type_checking_imports(tmp_path):
    """The reader counts an import inside a function and one under TYPE_CHECKING."""
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from repconv.engine import Plan\n"
        "def f():\n    from repconv import pipeline\n    import repconv.cli\n"
    )
    known = {"engine", "pipeline", "cli"}
    assert imports_of(source, known, name="sample") == known
