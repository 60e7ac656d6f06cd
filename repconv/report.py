"""Rendering results: rich tables on a terminal, aligned plain text when piped, JSON for CI."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from repconv.plan_record import PlanRecord
from repconv.terminal import shown

if TYPE_CHECKING:  # rendering needs no torch; only its inputs come from torch code
    from repconv.bench import BenchResult
    from repconv.verification import Verification


class Recordable(Protocol):
    """What has a recorded plan (`engine.Applied`): the tables read the record, not the
    engine's objects."""

    def record(self) -> PlanRecord: ...


def _record(plan: PlanRecord | Recordable) -> PlanRecord:
    return plan if isinstance(plan, PlanRecord) else plan.record()


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def table(out: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table: boxed and styled on a terminal, plain aligned columns otherwise."""
    # cells and titles quote a file's paths, keys and records: escaped, never raw to a terminal
    title, cells = shown(title), [[shown(_cell(v)) for v in row] for row in rows]
    if out.is_terminal:
        t = Table(title=Text(title), title_justify="left")  # Text: a file's "[" is no markup
        for name in columns:
            t.add_column(name, overflow="fold")
        for row in cells:
            t.add_row(*map(Text, row))
        out.print(t)
        return
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    out.file.write("\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def millions(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 100_000 else f"{n:,}"


def plan_table(out: Console, plan: PlanRecord | Recordable, title: str = "Blocks") -> None:
    rows = [
        [
            e.path or "<root>",
            e.rule,
            e.structure,
            e.status,
            e.kernel_shape,
            e.params_before,
            e.params_after,
            e.block_error,
        ]
        for e in _record(plan).blocks
    ]
    table(
        out,
        title,
        ["path", "rule", "structure", "status", "kernel", "params before", "after", "block err"],
        rows,
    )


def warnings_block(out: Console, plan: PlanRecord | Recordable) -> None:
    for w in _record(plan).warnings:
        out.print(shown(f"warning: {w.path or '<root>'}: {w.message}"), markup=False)


def verification_lines(out: Console, v: Verification) -> None:
    from repconv.outputs import worst

    status = "passed" if v.passed else "FAILED"
    exact = worst(v.exact)
    parts = [f"verification {status}", f"{v.samples} sample(s) of {v.input_shape} in {v.dtype}"]
    if exact is not None:
        parts.append(f"exact {exact:.3g} (limit {v.exact_limit:g})")
    if v.written is None:
        parts.append("written not run (the file does not fit the model)")
    else:
        parts.append(
            f"written {worst(v.written):.3g} (rtol {v.written_rtol:g}, atol {v.written_atol:g})"
        )
    out.print(": ".join(parts[:1]) + ": " + ", ".join(parts[1:]), markup=False)
    if v.tensors is not None:  # names the file's keys
        out.print(shown(f"tensors: {v.tensors.summary()}"), markup=False)


def convention_line(out: Console, convention: Mapping[str, Any] | None) -> None:
    """Whether the file loads into the train class by the conv-BN convention (the names never
    lie either way: a file that does not load fails loudly with missing or unexpected keys)."""
    if convention is None:
        answer = "not checked"
    else:
        answer = "yes" if convention.get("loads_into_train_class") else "no"
    out.print(f"loads into the train class by the conv-BN convention: {answer}", markup=False)


def summary_line(out: Console, plan: PlanRecord | Recordable, before: int, after: int) -> None:
    counts = _record(plan).fused_by_rule
    fused = ", ".join(f"{n} {rule}" for rule, n in sorted(counts.items())) or "nothing"
    out.print(
        shown(f"fused: {fused}; params {millions(before)} -> {millions(after)}"), markup=False
    )


def form_line(out: Console, plan: PlanRecord | Recordable) -> None:
    """Whether the model holds train-time blocks (how many, of which families) or is already
    in deploy form."""
    form = _record(plan).form()
    if form["form"] == "deploy":
        out.print(
            "form: deploy (no train-time blocks or conv-BN pairs: nothing to fold)", markup=False
        )
        return
    families = ", ".join(f"{n} {family}" for family, n in sorted(form["families"].items()))
    out.print(
        shown(f"form: train ({form['train_blocks']} block(s) to fold: {families})"), markup=False
    )


def layout_lines(out: Console, entries: Mapping[str, str], others: Mapping[str, Any]) -> None:
    """A same-layout output: what became of each entry, then the other models' checks."""
    what = ", ".join(f"{key or '<file>'} {fate}" for key, fate in entries.items())
    out.print(shown(f"layout kept: {what}"), markup=False)
    for key, result in others.items():
        if result.verification is not None:
            out.print(shown(f"{key}:"), end=" ", markup=False)
            verification_lines(out, result.verification)


def rules_table(out: Console, rows: Sequence[dict[str, Any]]) -> None:
    """`repconv rules`: the rules in the order they are tried."""
    table(
        out,
        "Rules (first match wins, top-down)",
        ["#", "name", "family", "kind", "matches", "deploy form"],
        [
            [r["order"], r["name"], r["family"], r["kind"], r["matches"], r["deploy_form"]]
            for r in rows
        ],
    )


def zoo_table(out: Console, rows: Sequence[dict[str, Any]]) -> None:
    """`repconv zoo list`: the built-in models and their parameter counts."""
    table(
        out,
        "Built-in models",
        ["name", "family", "train params", "deploy params", "description"],
        [
            [
                r["name"],
                r["family"],
                millions(r["train_params"]),
                millions(r["deploy_params"]),
                r["description"],
            ]
            for r in rows
        ],
    )


def bench_report(out: Console, result: BenchResult) -> None:
    """`repconv bench`: latency per batch size, then parameters and MACs of both models."""
    table(
        out,
        f"Latency, input {'x'.join(map(str, result.input_shape))}, {result.threads} "
        f"thread(s), median of {result.runs} runs (spread = max - min)",
        ["batch", "train ms", "spread", "deploy ms", "spread", "speed-up"],
        [
            [
                r.batch,
                r.train_ms,
                r.train_spread_ms,
                r.deploy_ms,
                r.deploy_spread_ms,
                f"{r.speedup:.2f}x",
            ]
            for r in result.rows
        ],
    )
    out.print(
        f"params {millions(result.train_params)} -> {millions(result.deploy_params)}; MACs "
        f"{result.train_macs / 1e9:.3f}G -> {result.deploy_macs / 1e9:.3f}G",
        markup=False,
    )


class JsonDocument:
    """The one JSON document a --json command prints, on the stdout it was started with."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self.emitted = stream, False

    def emit(self, document: dict[str, Any]) -> None:
        self._stream.write(json.dumps(document, indent=2, default=str) + "\n")
        self._stream.flush()
        self.emitted = True


_owner: JsonDocument | None = None


@contextmanager
def json_owns_stdout(document: JsonDocument) -> Iterator[None]:
    """While it runs, `emit_json` writes `document` and any other print goes to stderr: user
    code that prints (many model constructors do) cannot corrupt the document CI parses."""
    global _owner
    previous, _owner = _owner, document
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _owner = previous


def emit_json(document: dict[str, Any]) -> None:
    if _owner is not None:
        _owner.emit(document)
    else:
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _db(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def int8_table(out: Console, doc: dict[str, Any], limit: int = 12) -> None:
    """The INT8 report (`int8_check.Int8Report.to_dict()`): blocks worst first, then the whole
    model's figure and what the numbers rest on."""
    rows = []
    for block in doc["blocks"][:limit]:
        layers = list(block["layers"].values())
        worst = min(layers, key=lambda f: f["snr_per_tensor_db"] or 1e9) if layers else None
        outliers = block["outliers"]
        rows.append(
            [
                block["path"] or "<root>",
                _db(block["w8a8_snr_db"]),
                "-" if worst is None else _db(worst["snr_per_tensor_db"]),
                "-" if worst is None else _db(worst["snr_per_channel_db"]),
                None if worst is None else worst["range_ratio"],
                "-" if outliers is None else outliers["dominant"],
                block["advice"] or "ok",
            ]
        )
    columns = ["block", "W8A8 dB", "w/tensor dB", "w/channel dB", "widest/median"]
    title = f"INT8 readiness (worst {len(rows)} of {len(doc['blocks'])} blocks)"
    table(out, title, [*columns, "outliers from", "advice"], rows)
    flagged = sum(1 for b in doc["blocks"] if b["flagged"])
    out.print(
        f"whole model W8A8 SNR {_db(doc['model_w8a8_snr_db'])} dB; {flagged} block(s) under "
        f"{doc['scheme']['flag_below_db']:g} dB; {doc['samples']} calibration input(s) from "
        f"{shown(doc['calibration'])}",
        markup=False,
    )
    out.print(f"note: {doc['note']}", markup=False)
