"""Batch throughput and memory, for `make bench`: `repconv batch` with --jobs 1 against --jobs 2.

Converts the checkpoints of configs/zoo.toml (written once by zoo_checkpoints.py) and a second
snapshot of each (20 checkpoints, as a zoo with EMA snapshots would have) in whole
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
from repconv.zoo.checkpoints import save_train_checkpoint

CHILD = str(Path(__file__).with_name("child.py"))
CONFIG = Path("configs/zoo.toml")
SNAPSHOT = "-snapshot2"


def write_snapshots() -> None:
    """A second checkpoint of each zoo entry (another seed), as a zoo's EMA snapshots would be."""
    for seed, job in enumerate(load_config(CONFIG).jobs, start=100):
        snapshot = Path(job.input).with_name(f"{Path(job.input).stem}{SNAPSHOT}.pth")
        if not snapshot.exists():
            save_train_checkpoint(job.arch, snapshot, randomize_bn=True, seed=seed)


def config_for(work: Path, verify_dtype: str, no_verify: bool = False) -> Path:
    """configs/zoo.toml's entries and their snapshots, absolute paths, writing into `work`."""
    lines = ["[defaults]", f'verify_dtype = "{verify_dtype}"', "timeout = 1800"]
    lines += ["no_verify = true", ""] if no_verify else [""]
    for job in load_config(CONFIG).jobs:
        source = Path(job.input)
        lines += [
            "[[model]]",
            f"input = {json.dumps(str(source.with_name(f'{source.stem}*.pth')))}",
            f'output = "{work / "deploy" / "{stem}.safetensors"}"',
            f'arch = "{job.arch}"',
        ]
        if job.input_shape:
            lines.append(f"input_shape = {job.input_shape}")
        lines.append("")
    path = work / f"zoo-{verify_dtype}{'-no-verify' if no_verify else ''}.toml"
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
        failed = [
            f"{e['name']}: {e.get('failure')}: {e.get('reason')}"
            for e in json.loads(report.read_text())["entries"]
            if e["status"] == "failed"
        ]
        raise RuntimeError("batch failed:\n" + "\n".join(failed or [done.stderr[-3000:]]))
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
    parser.add_argument("--runs", type=int, default=5, help="pairs of --jobs 1 / --jobs 2 runs")
    parser.add_argument("--out", type=Path, default=Path("bench/BATCH.md"))
    options = parser.parse_args()
    write_missing(CONFIG)
    write_snapshots()
    results: dict = {"pairs": [], "pairs_no_verify": [], "memory": {}, "parent_peak_mib": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        f64 = config_for(work, "float64")
        for run in range(options.runs):
            one, parent1, doc1 = run_batch(f64, 1, work)
            two, parent2, doc = run_batch(f64, 2, work)
            entry_seconds = [
                sum(e["measured"]["seconds"] for e in d["entries"]) for d in (doc1, doc)
            ]
            results["pairs"].append(
                {
                    "jobs1_s": one,
                    "jobs2_s": two,
                    "ratio": one / two,
                    "entry_slowdown": entry_seconds[1] / entry_seconds[0],
                }
            )
            results["parent_peak_mib"] += [parent1["peak_rss"], parent2["peak_rss"]]
            print(f"pair {run + 1}: {one:.1f} s / {two:.1f} s", file=sys.stderr, flush=True)
        results["memory"]["float64"] = memory_rows(doc)
        plain = config_for(work, "float64", no_verify=True)
        for _ in range(max(1, options.runs // 2)):
            one, _, _ = run_batch(plain, 1, work)
            two, _, _ = run_batch(plain, 2, work)
            results["pairs_no_verify"].append({"jobs1_s": one, "jobs2_s": two, "ratio": one / two})
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
        f"{results['entries']} checkpoints: the ten of configs/zoo.toml and a second snapshot "
        "of each (another seed); default options (float64 "
        f"verification), each entry in its own worker process; --jobs 1 gives a worker 2 torch "
        f"threads, --jobs 2 gives each 1. {len(pairs)} pairs, run alternately.",
        "",
        "## Throughput",
        "",
        "| pair | --jobs 1 (s) | --jobs 2 (s) | throughput ratio | entry time, jobs 2 / jobs 1 "
        "| bound 2 / that |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {i + 1} | {p['jobs1_s']:.1f} | {p['jobs2_s']:.1f} | {p['ratio']:.2f}x "
        f"| {p['entry_slowdown']:.2f} | {2 / p['entry_slowdown']:.2f}x |"
        for i, p in enumerate(pairs)
    ]
    plain = results["pairs_no_verify"]
    plain_ratio = statistics.median(p["ratio"] for p in plain)
    lines += [
        "",
        f"**Median throughput ratio --jobs 2 / --jobs 1: {ratio:.2f}x** (target >= 1.6x).",
        "",
        "Most of an entry's time is the float64 verification's convolutions, which --jobs 1 "
        "already runs on both cores (2 torch threads): an entry takes longer on one thread next "
        "to another worker (column 5), and --jobs 2 can gain at most 2 / that (column 6). "
        "With `no_verify = true` an entry takes about half a second and the one-time start of "
        "the worker server (it imports torch, ~3 s, before any entry can run) is a large serial "
        f"share: --jobs 2 / --jobs 1 = {plain_ratio:.2f}x "
        f"(median of {len(plain)} pairs: "
        + ", ".join(f"{p['jobs1_s']:.1f} s / {p['jobs2_s']:.1f} s" for p in plain)
        + ").",
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
        largest = max(rows, key=lambda r: r["ckpt_mib"])
        heaviest = max(rows, key=lambda r: r["peak_mib"])
        zoo_budget = 1.5 * largest["ckpt_mib"] + largest["base_mib"]
        lines += [
            f"### verify_dtype = {dtype}",
            "",
            f"Whole zoo: the heaviest worker ({heaviest['model']}) peaks at "
            f"{heaviest['peak_mib']:.0f} MiB against 1.5 x the largest checkpoint "
            f"({largest['model']}, {largest['ckpt_mib']:.0f} MiB) + the runtime = "
            f"{zoo_budget:.0f} MiB: ratio {heaviest['peak_mib'] / zoo_budget:.2f}. "
            f"Per entry, against its own checkpoint: worst ratio {worst:.2f}.",
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
