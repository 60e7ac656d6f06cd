"""The benchmark suite behind `make bench`: cost, memory, fidelity and speed-up per zoo model.

Writes bench/RESULTS.md. Every ratio is computed pair by pair within one run (A then B, A then
B, ...) and the median of the ratios is reported, so a noisy machine moves both sides together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from repconv import arch, checkpoint, engine
from repconv import convert as convert_model
from repconv.bench import compare
from repconv.zoo import registry
from repconv.zoo.checkpoints import save_train_checkpoint

MODELS = ["repvgg_a0", "repvgg_b3", "dbb_resnet18", "acb_resnet18", "convbn_resnet50"]
CHILD = str(Path(__file__).with_name("child.py"))
SHAPE = (3, 224, 224)


def median(values):
    return statistics.median(values)


def step_vs_floor(ckpt: Path, name: str, work: Path, runs: int) -> dict:
    """In one process: conversion step alone against load + write of the same tensors."""
    ratios, steps, floors = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        loaded = checkpoint.read_checkpoint(ckpt)
        checkpoint.write_checkpoint(work / "floor.safetensors", loaded.state_dict, {})
        floor = time.perf_counter() - start
        model = arch.build_loaded(name, {}, loaded.state_dict)
        start = time.perf_counter()
        engine.apply(model, engine.plan(model))
        step = time.perf_counter() - start
        steps.append(step)
        floors.append(floor)
        ratios.append(step / floor)
        del model, loaded
    return {"step_s": median(steps), "floor_s": median(floors), "ratio": median(ratios)}


def run_child(*args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, CHILD, *args], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"child failed: {args}\n{done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def processes(ckpt: Path, name: str, work: Path, runs: int) -> dict:
    """Whole processes: convert (default verification), convert --no-verify, the I/O floor."""
    out = str(work / "deploy.safetensors")
    rows = {"verify": [], "no_verify": [], "floor": [], "ratio_verify": [], "ratio_no_verify": []}
    peaks = {"verify": [], "no_verify": [], "floor": []}
    after_imports = []
    for _ in range(runs):
        floor_s, floor = run_child("floor", str(ckpt), str(work / "floor.safetensors"))
        verify_s, verify = run_child("convert", str(ckpt), out, "--arch", name)
        plain_s, plain = run_child("convert", str(ckpt), out, "--arch", name, "--no-verify")
        rows["floor"].append(floor_s)
        rows["verify"].append(verify_s)
        rows["no_verify"].append(plain_s)
        rows["ratio_verify"].append(verify_s / floor_s)
        rows["ratio_no_verify"].append(plain_s / floor_s)
        peaks["floor"].append(floor["peak_rss"])
        peaks["verify"].append(verify["peak_rss"])
        peaks["no_verify"].append(plain["peak_rss"])
        after_imports.append(verify["rss_after_imports"])
    result = {k: median(v) for k, v in rows.items()}
    result.update({f"peak_{k}_mib": median(v) for k, v in peaks.items()})
    result["rss_after_imports_mib"] = median(after_imports)
    return result


def fidelity(ckpt: Path, name: str) -> dict:
    """max|deploy - train| / max|train| in float32 (as shipped) and in float64 (held in f64)."""
    state = checkpoint.read_checkpoint(ckpt).state_dict
    f32 = convert_model(arch.build_loaded(name, {}, state), verify_dtype="float32")
    state64 = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    f64 = convert_model(arch.build_loaded(name, {}, state64))
    return {
        "float32": f32.verification.to_dict()["written_max"],
        "float64": f64.verification.to_dict()["written_max"],
    }


def speedup(ckpt: Path, name: str, runs: int) -> dict:
    """On one thread: train (eval) / repconv's deploy model, and the release's deploy-mode
    model (the zoo's deploy form, holding the same weights) / repconv's deploy model."""
    state = checkpoint.read_checkpoint(ckpt).state_dict
    train = arch.build_loaded(name, {}, state)
    deploy = arch.build_loaded(name, {}, state)
    engine.convert_model(deploy)
    release = registry.build(name, deploy=True)
    release.load_state_dict(deploy.state_dict(), strict=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = compare(train, deploy, SHAPE, (1, 8), runs=runs, warmup=2)
        theirs = compare(release, deploy, SHAPE, (1, 8), runs=runs, warmup=2)
    finally:
        torch.set_num_threads(threads)
    return {
        **{f"b{r.batch}": r.speedup for r in ours.rows},
        **{f"release_b{r.batch}": r.speedup for r in theirs.rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in options.models:
            ckpt = work / f"{name}.pth"
            save_train_checkpoint(name, ckpt, randomize_bn=True)
            size_mib = ckpt.stat().st_size / 2**20
            print(f"{name}: {size_mib:.0f} MiB", file=sys.stderr, flush=True)
            row = {"model": name, "ckpt_mib": size_mib}
            row["step"] = step_vs_floor(ckpt, name, work, options.runs)
            row["process"] = processes(ckpt, name, work, options.runs)
            row["fidelity"] = fidelity(ckpt, name)
            row["speedup"] = speedup(ckpt, name, options.runs)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(render(rows, options.runs))
    print(f"wrote {options.out}", file=sys.stderr)


def render(rows: list[dict], runs: int) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# repconv benchmarks",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}. "
        f"Medians of {runs} runs; ratios pair by pair. Produced by `make bench`.",
        "",
        "| model | ckpt MiB | step / load+save | convert / I/O process | --no-verify / I/O "
        "process | peak RSS MiB (verify, no-verify, I/O) | peak / (ckpt + imports) | "
        "fidelity f32 | fidelity f64 | speed-up b1 | speed-up b8 | release deploy / ours b1, b8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, p, f, u = r["step"], r["process"], r["fidelity"], r["speedup"]
        base = r["ckpt_mib"] + p["rss_after_imports_mib"]
        lines.append(
            f"| {r['model']} | {r['ckpt_mib']:.0f} | {s['ratio']:.2f} "
            f"({s['step_s']:.2f} s / {s['floor_s']:.2f} s) | {p['ratio_verify']:.2f} | "
            f"{p['ratio_no_verify']:.2f} | {p['peak_verify_mib']:.0f}, "
            f"{p['peak_no_verify_mib']:.0f}, {p['peak_floor_mib']:.0f} | "
            f"{p['peak_verify_mib'] / base:.2f}, {p['peak_no_verify_mib'] / base:.2f} | "
            f"{f['float32']:.1e} | {f['float64']:.1e} | {u['b1']:.2f} | {u['b8']:.2f} | "
            f"{u['release_b1']:.2f}, {u['release_b8']:.2f} |"
        )
    lines += [
        "",
        "- step: plan + fuse (rules, math, module surgery), no verification, against reading the",
        "  same checkpoint and writing its tensors as safetensors, in the same process.",
        "- process: wall time of `repconv convert` (default float64 verification, 2 samples at",
        "  224x224) and of `--no-verify`, against a process that only reads and writes the file.",
        "- fidelity: max |deploy - train| / max |train| over the verification samples; f32 is the",
        "  float32 model checked in float32, f64 the same checkpoint held and converted in",
        "  float64.",
        "- speed-up: train model in eval mode / deploy model latency, batch 1 and 8, one torch",
        "  thread. release deploy / ours: the release's deploy-mode model (the zoo's deploy form,",
        "  loaded with the same weights) / repconv's deploy model; 1.00 means equally fast.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
