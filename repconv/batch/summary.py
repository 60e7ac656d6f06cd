"""A batch's outcome: the summary table, and the JSON or Markdown report CI keeps and diffs.

The report is deterministic for the same inputs: entries in config order, keys sorted, paths
relative to the config. Only the `measured` part of an entry (seconds, memory) varies between
runs, so `jq 'del(.entries[].measured)'` gives a document that changes only when results do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from repconv import report
from repconv.batch.config import BatchConfig
from repconv.terminal import shown

REPORT_FORMAT = "repconv.batch/1"
STATUSES = ("converted", "up to date", "failed")
_MEASURED = ("seconds", "peak_rss_mib", "base_rss_mib", "input_bytes")
_RESULTS = (
    "status",
    "failure",
    "reason",
    "fused_by_rule",
    "unfolded",
    "params_before",
    "params_after",
    "max_error",
    "exact_error",
)


def counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    return {status: sum(r["status"] == status for r in rows) for status in STATUSES}


def document(config: BatchConfig, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    entries = []
    for row in rows:
        entry = {
            "name": row["name"],
            "input": config.display_path(row["input"]),
            "output": config.display_path(row["output"]),
        }
        entry.update({k: row.get(k) for k in _RESULTS})
        entry["measured"] = {k: row.get(k) for k in _MEASURED}
        entries.append(entry)
    tally = counts(rows)
    return {
        "format": REPORT_FORMAT,
        "config": str(config.path),
        "ok": tally["failed"] == 0,
        "counts": tally,
        "entries": entries,
    }


def as_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _fused(by_rule: dict[str, int] | None) -> str:
    if not by_rule:
        return "-"
    return ", ".join(f"{rule} {n}" for rule, n in sorted(by_rule.items()))


def _params(row: dict[str, Any]) -> str:
    if row.get("params_before") is None:
        return "-"
    return f"{report.millions(row['params_before'])} -> {report.millions(row['params_after'])}"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def status_text(row: dict[str, Any]) -> str:
    return f"failed ({row['failure']})" if row["status"] == "failed" else row["status"]


def _cells(row: dict[str, Any]) -> list[str]:
    seconds = row.get("seconds", row.get("measured", {}).get("seconds"))
    return [
        row["name"],
        status_text(row),
        _fused(row.get("fused_by_rule")),
        _params(row),
        _error(row.get("max_error")),
        "-" if seconds is None else f"{seconds:.1f}",
    ]


COLUMNS = ["model", "status", "blocks fused per rule", "params before -> after", "max error", "s"]


def tally_line(tally: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in tally.items())


def print_summary(out: Console, config: BatchConfig, rows: Sequence[dict[str, Any]]) -> None:
    report.table(out, f"Batch {config.path}", COLUMNS, [_cells(r) for r in rows])
    for row in rows:
        if row["status"] == "failed":
            out.print(shown(f"{row['name']}: {row['reason']}"), markup=False)
    out.print(tally_line(counts(rows)), markup=False)


def as_markdown(doc: dict[str, Any]) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        f"# repconv batch: {doc['config']}",
        "",
        tally_line(doc["counts"]),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(escape(c) for c in _cells(e)) + " |" for e in doc["entries"]]
    failures = [e for e in doc["entries"] if e["status"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- **{escape(e['name'])}**: {escape(e['reason'] or '')}" for e in failures]
    return "\n".join(lines) + "\n"


def entry_rows(config: BatchConfig) -> list[dict[str, Any]]:
    """`batch --dry-run`: the entries the config expands to, paths as the report shows them."""
    return [
        {
            "name": job.name,
            "input": config.display_path(job.input),
            "output": config.display_path(job.output),
            "line": job.line,
            "arch": job.options.arch,
        }
        for job in config.jobs
    ]


def print_entries(out: Console, config: BatchConfig, rows: Sequence[dict[str, Any]]) -> None:
    report.table(
        out,
        f"{config.path}: {len(rows)} entries (dry run, nothing converted)",
        ["name", "input", "output", "arch", "line"],
        [[r["name"], r["input"], r["output"], r["arch"], r["line"]] for r in rows],
    )
