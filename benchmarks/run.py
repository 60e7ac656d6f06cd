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
from collections import Counter
from pathlib import Path

import torch

from repconv import arch, checkpoint, engine
from repconv import convert as convert_model
from repconv.bench import compare
from repconv.rules import registry as rule_registry
from repconv.zoo import registry
from repconv.zoo.checkpoints import save_train_checkpoint

MODELS = ["repvgg_a0", "repvgg_b1g2", "repvgg_b3", "dbb_resnet18", "acb_resnet18"]
MODELS += ["convbn_resnet50"]
# Models whose blocks are also fused by the generic data-flow pass, the repvgg rule disabled.
GENERIC_MODELS = ["repvgg_a0", "repvgg_b3"]
GENERIC_HEADING = "## Generic data-flow pass vs the repvgg rule"
# Both deploy models must agree this closely (relative to the train output) in float64.
EXACT = 1e-12
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


def _fuse_timed(ckpt: Path, name: str, rules: list | None) -> tuple[float, float]:
    """The step figure's timing, plan + apply on a freshly loaded model: (wall, CPU) seconds.

    CPU time (all threads of the process) is reported too: on a shared machine it does not
    count the time spent waiting for a core.
    """
    model = arch.build_loaded(name, {}, checkpoint.read_checkpoint(ckpt).state_dict)
    wall, cpu = time.perf_counter(), time.process_time()
    engine.apply(model, engine.plan(model, rules))
    return time.perf_counter() - wall, time.process_time() - cpu


def without_repvgg_rule() -> list:
    """The block rules as usual minus repvgg, so the data-flow pass meets every RepVGG block."""
    return [r for r in rule_registry.block_rules() if r.name != "repvgg"]


def generic_vs_rule(ckpt: Path, name: str, runs: int) -> dict:
    """The fuse step with the repvgg rule against the same step left to the data-flow pass.

    One pair per run, the order reversed every run; the ratio is generic / rule, pair by pair.
    """
    generic_rules = without_repvgg_rule()
    rule_s, generic_s, ratios, cpu_ratios = [], [], [], []
    for run in range(runs):
        if run % 2 == 0:
            rule, generic = _fuse_timed(ckpt, name, None), _fuse_timed(ckpt, name, generic_rules)
        else:
            generic, rule = _fuse_timed(ckpt, name, generic_rules), _fuse_timed(ckpt, name, None)
        rule_s.append(rule[0])
        generic_s.append(generic[0])
        ratios.append(generic[0] / rule[0])
        cpu_ratios.append(generic[1] / rule[1])
    return {
        "rule_s": median(rule_s),
        "generic_s": median(generic_s),
        "ratio": median(ratios),
        "cpu_ratio": median(cpu_ratios),
        **generic_exactness(ckpt, name),
    }


def _fused_paths(applied: engine.Applied, rule: str) -> list[str]:
    """The blocks fused, checked to be fused by `rule` alone with nothing left unfolded."""
    wrong = [(o.path, o.rule, o.status) for o in applied.entries]
    wrong = [w for w in wrong if w[1:] != (rule, "fused")]
    if wrong or applied.warnings:
        raise RuntimeError(f"expected every block fused by {rule}: {wrong} {applied.warnings}")
    return [o.path for o in applied.entries]


def _output_f64(
    ckpt: Path, name: str, x: torch.Tensor, *, fuse: bool, rules: list | None = None
) -> tuple:
    """The checkpoint held in float64: its output on x, as trained or fused with `rules`."""
    state = checkpoint.read_checkpoint(ckpt).state_dict
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    model = arch.build_loaded(name, {}, state)
    applied = engine.convert_model(model, rules=rules) if fuse else None
    with torch.no_grad():
        return model(x), applied


def generic_exactness(ckpt: Path, name: str) -> dict:
    """Both fusions of the checkpoint held in float64: same blocks, same outputs.

    Errors are max |a - b| / max |train| on one random input; raises if they are not within
    float64 rounding (EXACT) or a block was fused by another pass. One model at a time, so
    RepVGG-B3 in float64 stays within memory.
    """
    x = torch.randn(2, SHAPE[0], 64, 64, generator=torch.Generator().manual_seed(0)).double()
    want, _ = _output_f64(ckpt, name, x, fuse=False)
    by_rule, rule_applied = _output_f64(ckpt, name, x, fuse=True)
    generic, applied = _output_f64(ckpt, name, x, fuse=True, rules=without_repvgg_rule())
    rule_paths = _fused_paths(rule_applied, "repvgg")
    if _fused_paths(applied, "dataflow") != rule_paths:
        raise RuntimeError("the data-flow pass fused other blocks than the repvgg rule")
    scale = float(want.abs().max())
    errors = {
        "generic_vs_rule": float((generic - by_rule).abs().max()) / scale,
        "generic_vs_train": float((generic - want).abs().max()) / scale,
        "blocks": len(rule_paths),
        "structures": dict(Counter(o.structure for o in applied.entries)),
    }
    if max(errors["generic_vs_rule"], errors["generic_vs_train"]) > EXACT:
        raise RuntimeError(f"{name}: the data-flow pass is not exact: {errors}")
    return errors


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
    kinds = ["verify", "no_verify", "floor"] + (["release"] if name.startswith("repvgg") else [])
    rows: dict[str, list] = {k: [] for k in kinds}
    rows.update({f"ratio_{k}": [] for k in kinds if k != "floor"})
    peaks: dict[str, list] = {k: [] for k in kinds}
    after_imports = []
    commands = {
        "floor": ("floor", str(ckpt), str(work / "floor.safetensors")),
        "verify": ("convert", str(ckpt), out, "--arch", name),
        "no_verify": ("convert", str(ckpt), out, "--arch", name, "--no-verify"),
        "release": ("release", name, str(ckpt), str(work / "release.pth")),
    }
    for _ in range(runs):  # taking turns, so every kind sees the same machine
        seconds, figures = {}, {}
        for kind in kinds:
            seconds[kind], figures[kind] = run_child(*commands[kind])
            rows[kind].append(seconds[kind])
            peaks[kind].append(figures[kind]["peak_rss"])
        for kind in kinds:
            if kind != "floor":
                rows[f"ratio_{kind}"].append(seconds[kind] / seconds["floor"])
        after_imports.append(figures["verify"]["rss_after_imports"])
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
        runtimes = onnxruntime_latency(deploy, SHAPE, runs) or {}
    finally:
        torch.set_num_threads(threads)
    return {
        **{f"b{r.batch}": r.speedup for r in ours.rows},
        **{f"release_b{r.batch}": r.speedup for r in theirs.rows},
        **runtimes,
    }


def onnxruntime_latency(deploy: torch.nn.Module, shape: tuple, runs: int) -> dict | None:
    """Batch-1 latency in ms of the deploy model in torch and of its ONNX export (repconv's
    exporter settings) in onnxruntime, one thread each, taking turns run by run so a slow
    spell of the machine falls on both; None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    from repconv import onnx_export

    deploy.eval()
    x = torch.randn(1, *shape, dtype=next(deploy.parameters()).dtype)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "deploy.onnx")
        onnx_export.export_model(deploy, path, x, x.dtype, onnx_export.DEFAULT_OPSET, False)
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {onnx_export.INPUT_NAME: x.numpy()}
    with torch.inference_mode():
        torch_ms, ort_ms = _alternating_ms(
            [lambda: deploy(x), lambda: session.run(None, feed)], runs, warmup=2
        )
    return {"torch_b1_ms": torch_ms, "onnxruntime_b1_ms": ort_ms}


def _alternating_ms(calls: list, runs: int, warmup: int) -> list[float]:
    """Median wall time in ms of each call, the calls taking turns (order reversed each run)."""
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for i in range(warmup + runs):
        for c in order:
            start = time.perf_counter()
            calls[c]()
            if i >= warmup:
                times[c].append((time.perf_counter() - start) * 1000)
        order.reverse()
    return [statistics.median(t) for t in times]


def _runtime_cell(figures: dict) -> str:
    if "onnxruntime_b1_ms" not in figures:
        return "n/a (no onnxruntime)"
    return f"{figures['torch_b1_ms']:.1f}, {figures['onnxruntime_b1_ms']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument(
        "--generic-only",
        action="store_true",
        help="only the generic-vs-rule figure (default models: "
        f"{', '.join(GENERIC_MODELS)}); replaces that section of --out, keeps the rest",
    )
    options = parser.parse_args()
    models = options.models or (GENERIC_MODELS if options.generic_only else MODELS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            rows.append(measure(name, Path(tmp), options.runs, options.generic_only))
    options.out.parent.mkdir(parents=True, exist_ok=True)
    generic = render_generic(rows, options.runs)
    if options.generic_only:
        old = options.out.read_text() if options.out.exists() else ""
        options.out.write_text(replace_section(old, generic))
    else:
        old = options.out.read_text() if options.out.exists() else ""
        kept = "".join("\n" + section for section in hand_written_sections(old))
        options.out.write_text(render(rows, options.runs) + kept + "\n" + generic)
    print(f"wrote {options.out}", file=sys.stderr)


def measure(name: str, work: Path, runs: int, generic_only: bool) -> dict:
    """Every figure of one zoo model (with --generic-only, the generic-vs-rule one alone)."""
    ckpt = work / f"{name}.pth"
    save_train_checkpoint(name, ckpt, randomize_bn=True)
    size_mib = ckpt.stat().st_size / 2**20
    print(f"{name}: {size_mib:.0f} MiB", file=sys.stderr, flush=True)
    row = {"model": name, "ckpt_mib": size_mib}
    if not generic_only:
        row["step"] = step_vs_floor(ckpt, name, work, runs)
        row["process"] = processes(ckpt, name, work, runs)
        row["fidelity"] = fidelity(ckpt, name)
        row["speedup"] = speedup(ckpt, name, runs)
    if name in GENERIC_MODELS:
        row["generic"] = generic_vs_rule(ckpt, name, runs)
    print(json.dumps(row), file=sys.stderr, flush=True)
    ckpt.unlink()
    return row


def render_generic(rows: list[dict], runs: int) -> str:
    """The generic-vs-rule section: one line per model that has the figure."""
    lines = [
        GENERIC_HEADING,
        "",
        "| model | blocks | generic step / rule step (wall) | (CPU) | generic, rule step | "
        "generic vs rule f64 | generic vs train f64 | structures the pass found |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "generic" not in r:
            continue
        g = r["generic"]
        lines.append(
            f"| {r['model']} | {g['blocks']} | {g['ratio']:.2f} | {g['cpu_ratio']:.2f} | "
            f"{g['generic_s']:.2f} s, "
            f"{g['rule_s']:.2f} s | {g['generic_vs_rule']:.1e} | {g['generic_vs_train']:.1e} | "
            f"{_counted(g['structures'])} |"
        )
    lines += [
        "",
        "- The fuse step (plan + apply, timed as `step` above) with the block rules as usual",
        "  against the same step with the repvgg rule removed, so that the data-flow pass fuses",
        f"  every block; medians of {runs} pairs, the order reversed each pair, ratios pair by",
        "  pair. Exact: both fused from the checkpoint held in float64, every block by the",
        "  expected pass, outputs on one 64x64 input compared (max |a - b| / max |train|).",
        "  CPU: the same pairs in process CPU time, which does not count waiting for a core.",
        "  Alone: `python benchmarks/run.py --generic-only [--runs N]`.",
        "",
    ]
    return "\n".join(lines)


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n}x {what}" for what, n in counts.items())


def hand_written_sections(text: str) -> list[str]:
    """The `## ` sections of `text` that no run writes (measured by hand): a full run keeps
    them, between its table and the generic-vs-rule section."""
    sections = ["## " + part for part in text.split("\n## ")[1:]]
    return [s.rstrip("\n") + "\n" for s in sections if not s.startswith(GENERIC_HEADING)]


def replace_section(text: str, section: str) -> str:
    """`text` with its generic-vs-rule section (up to the next `## ` heading) replaced."""
    if GENERIC_HEADING not in text:
        return text.rstrip("\n") + "\n\n" + section
    before, _, rest = text.partition(GENERIC_HEADING)
    following = rest.find("\n## ")
    after = rest[following + 1 :] if following >= 0 else ""
    return before + section + ("\n" + after if after else "")


def _release_cell(process: dict) -> str:
    if "ratio_release" not in process:
        return "n/a"
    return f"{process['ratio_release']:.2f} ({process['peak_release_mib']:.0f} MiB)"


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
        "process | release route / I/O process | peak RSS MiB (verify, no-verify, I/O) | "
        "peak / (ckpt + imports) | "
        "fidelity f32 | fidelity f64 | speed-up b1 | speed-up b8 | release deploy / ours b1, b8 | "
        "deploy b1 ms: torch, onnxruntime |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, p, f, u = r["step"], r["process"], r["fidelity"], r["speedup"]
        base = r["ckpt_mib"] + p["rss_after_imports_mib"]
        lines.append(
            f"| {r['model']} | {r['ckpt_mib']:.0f} | {s['ratio']:.2f} "
            f"({s['step_s']:.2f} s / {s['floor_s']:.2f} s) | {p['ratio_verify']:.2f} | "
            f"{p['ratio_no_verify']:.2f} | {_release_cell(p)} | {p['peak_verify_mib']:.0f}, "
            f"{p['peak_no_verify_mib']:.0f}, {p['peak_floor_mib']:.0f} | "
            f"{p['peak_verify_mib'] / base:.2f}, {p['peak_no_verify_mib'] / base:.2f} | "
            f"{f['float32']:.1e} | {f['float64']:.1e} | {u['b1']:.2f} | {u['b8']:.2f} | "
            f"{u['release_b1']:.2f}, {u['release_b8']:.2f} | {_runtime_cell(u)} |"
        )
    lines += [
        "",
        "- step: plan + fuse (rules, math, module surgery), no verification, against reading the",
        "  same checkpoint and writing its tensors as safetensors, in the same process.",
        "- process: wall time of `repconv convert` (default float64 verification, 2 samples at",
        "  224x224, taken at 56x56 where that shows a wrong fold too) and of `--no-verify`,",
        "  against a process that only reads and writes the file; release route: our copy of",
        "  what the RepVGG release's convert.py does (build, torch.load, deepcopy, each block",
        "  folds itself in float32, torch.save; no check), `benchmarks/release_route.py`.",
        "- fidelity: max |deploy - train| / max |train| over the verification samples; f32 is the",
        "  float32 model checked in float32, f64 the same checkpoint held and converted in",
        "  float64.",
        "- speed-up: train model in eval mode / deploy model latency, batch 1 and 8, one torch",
        "  thread. release deploy / ours: the release's deploy-mode model (the zoo's deploy form,",
        "  loaded with the same weights) / repconv's deploy model; 1.00 means equally fast.",
        "- deploy b1 ms: repconv's deploy model in torch and its ONNX export (as `repconv",
        "  export` writes it) in onnxruntime's CPU provider, batch 1, one thread each, taking",
        "  turns; n/a without",
        "  onnxruntime (`pip install 'repconv[onnx]'`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
