"""Batch throughput and memory, for `make bench`: `repconv batch` with --jobs 1 against --jobs 2.

Converts the checkpoints of configs/zoo.toml (written once by zoo_checkpoints.py) in whole
`repconv batch` processes, --jobs 1 then --jobs 2 in pairs, and writes bench/BATCH.md with:
the throughput ratio per pair (median), each entry's worker peak RSS against its budget
(1.5x the train checkpoint + the worker's RSS after imports) for float64 and float32
verification, and the peak RSS of the batch process itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zoo_checkpoints import write_missing

from repconv.batch import load_config

CHILD = str(Path(__file__).with_name("child.py"))
CONFIG = Path("configs/zoo.toml")


def config_for(work: Path, verify_dtype: str) -> Path:
    """configs/zoo.toml's entries with absolute paths, writing into `work`."""
    lines = ["[defaults]", f'verify_dtype = "{verify_dtype}"', "timeout = 1800", ""]
    for job in load_config(CONFIG).jobs:
        lines += [
            "[[model]]",
            f"input = {json.dumps(job.input)}",
            f'output = "{work / "deploy" / "{stem}.safetensors"}"',
            f'arch = "{job.arch}"',
        ]
        if job.input_shape:
            lines.append(f"input_shape = {job.input_shape}")
        lines.append("")
    path = work / f"zoo-{verify_dtype}.toml"
    path.write_text("\n".join(lines))
    return path


def run_batch(config: Path, jobs: int, work: Path) -> tuple[float, dict, dict]:
    shutil.rmtree(work / "deploy", ignore_errors=True)
    report = work / "report.json"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, CHILD, "batch", str(config), "--jobs", str(jobs), "--report", str(report)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    parent = json.loads(done.stdout.strip().splitlines()[-1])
    if parent["code"] != 0:
        raise RuntimeError(f"batch failed:\n{done.stderr[-3000:]}")
    return seconds, parent, json.loads(report.read_text())


def memory_rows(doc: dict) -> list[dict]:
    rows = []
    for entry in doc["entries"]:
        measured = entry["measured"]
        ckpt_mib = measured["input_bytes"] / 2**20
        budget = 1.5 * ckpt_mib + measured["base_rss_mib"]
        rows.append(
            {
                "model": entry["name"],
                "ckpt_mib": ckpt_mib,
                "base_mib": measured["base_rss_mib"],
                "peak_mib": measured["peak_rss_mib"],
                "budget_mib": budget,
                "ratio": measured["peak_rss_mib"] / budget,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="pairs of --jobs 1 / --jobs 2 runs")
    parser.add_argument("--out", type=Path, default=Path("bench/BATCH.md"))
    options = parser.parse_args()
    write_missing(CONFIG)
    results: dict = {"pairs": [], "memory": {}, "parent_peak_mib": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        f64 = config_for(work, "float64")
        for run in range(options.runs):
            one, parent1, _ = run_batch(f64, 1, work)
            two, parent2, doc = run_batch(f64, 2, work)
            results["pairs"].append({"jobs1_s": one, "jobs2_s": two, "ratio": one / two})
            results["parent_peak_mib"] += [parent1["peak_rss"], parent2["peak_rss"]]
            print(f"pair {run + 1}: {one:.1f} s / {two:.1f} s", file=sys.stderr, flush=True)
        results["memory"]["float64"] = memory_rows(doc)
        _, _, doc32 = run_batch(config_for(work, "float32"), 2, work)
        results["memory"]["float32"] = memory_rows(doc32)
        results["entries"] = len(doc["entries"])
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(render(results))
    print(f"wrote {options.out}", file=sys.stderr)


def render(results: dict) -> str:
    pairs = results["pairs"]
    ratio = statistics.median(p["ratio"] for p in pairs)
    cpu = platform.processor() or platform.machine()
    lines = [
        "# repconv batch: throughput and memory",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"{results['entries']} checkpoints of configs/zoo.toml, default options (float64 "
        f"verification), each entry in its own worker process; --jobs 1 gives a worker 2 torch "
        f"threads, --jobs 2 gives each 1. {len(pairs)} pairs, run alternately.",
        "",
        "## Throughput",
        "",
        "| pair | --jobs 1 (s) | --jobs 2 (s) | throughput ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {i + 1} | {p['jobs1_s']:.1f} | {p['jobs2_s']:.1f} | {p['ratio']:.2f}x |"
        for i, p in enumerate(pairs)
    ]
    lines += [
        "",
        f"**Median throughput ratio --jobs 2 / --jobs 1: {ratio:.2f}x** (target >= 1.6x).",
        "",
        f"Peak RSS of the `repconv batch` process itself: "
        f"{max(results['parent_peak_mib']):.0f} MiB (it holds the job list and the results, "
        "never a model).",
        "",
        "## Worker memory",
        "",
        "Budget = 1.5 x the train checkpoint + the worker's RSS after imports (the torch "
        "runtime). Ratio = worker peak RSS / budget (target <= 1).",
        "",
    ]
    for dtype, rows in results["memory"].items():
        worst = max(r["ratio"] for r in rows)
        lines += [
            f"### verify_dtype = {dtype} (worst ratio {worst:.2f})",
            "",
            "| model | ckpt MiB | after imports MiB | peak MiB | budget MiB | ratio |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['ckpt_mib']:.0f} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} "
            f"| {r['budget_mib']:.0f} | {r['ratio']:.2f} |"
            for r in rows
        ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
