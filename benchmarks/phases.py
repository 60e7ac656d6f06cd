"""Where a verified conversion spends its time: CPU seconds per phase of `convert_file`.

For issue 25 (verification nearly free): before deciding what to make cheaper, measure it. Each
model's train checkpoint is converted in this process under cProfile with a CPU-time clock (so a
busy machine slows the phases alike instead of moving them apart), best of `--runs`, and the
cumulative CPU time of the functions that make up each phase is reported. Writes bench/PHASES.md.

    python benchmarks/phases.py [--runs 3] [MODEL ...]
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import tempfile
import time
from pathlib import Path

import torch

from repconv import pipeline
from repconv.zoo.checkpoints import save_train_checkpoint

MODELS = ["repvgg_a0", "repvgg_b1g2", "repvgg_b3", "dbb_resnet18", "convbn_resnet50"]
# phase -> (file suffix, function name) whose cumulative time is the phase's
PHASES = {
    "read": ("checkpoint.py", "read_checkpoint"),
    "build": ("arch.py", "build_loaded"),
    "plan": ("engine.py", "plan"),
    "reference (train, f64)": ("pipeline.py", "_reference"),
    "apply": ("engine.py", "apply"),
    "  of it, block probes": ("verification.py", "__call__"),
    "  of it, probes after": ("verification.py", "block_error"),
    "figures (exact + written, f64)": ("pipeline.py", "_figures"),
    "names check": ("pipeline.py", "_names_check"),
    "write": ("checkpoint.py", "write_checkpoint"),
}


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(
        entry[3]
        for (path, _line, function), entry in stats.stats.items()  # type: ignore[attr-defined]
        if function == name and path.endswith(suffix)
    )


def profile(ckpt: Path, out: Path, name: str, verify: bool) -> dict[str, float]:
    profiler = cProfile.Profile(time.process_time)
    start = time.process_time()
    profiler.enable()
    pipeline.convert_file(ckpt, out, arch_spec=name, verify=verify)
    profiler.disable()
    total = time.process_time() - start
    stats = pstats.Stats(profiler)
    found = {phase: cumulative(stats, *where) for phase, where in PHASES.items()}
    found["total"] = total
    return found


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    return min(runs, key=lambda r: r["total"])


def measure(name: str, work: Path, runs: int) -> tuple[dict[str, float], dict[str, float]]:
    ckpt = work / f"{name}.pth"
    save_train_checkpoint(name, ckpt, randomize_bn=True)
    out = work / f"{name}.safetensors"
    verified, plain = [], []
    for _ in range(runs):  # taking turns, so both see the same machine
        verified.append(profile(ckpt, out, name, verify=True))
        plain.append(profile(ckpt, out, name, verify=False))
    ckpt.unlink()
    return best(verified), best(plain)


def render(rows: dict[str, tuple[dict[str, float], dict[str, float]]], runs: int) -> str:
    names = list(rows)
    lines = [
        "# Where a verified conversion spends its time",
        "",
        f"CPU seconds per phase of `convert_file`, best of {runs}, measured in-process under "
        "cProfile with a CPU clock by `python benchmarks/phases.py` "
        f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "default verification: 2 samples of the default 3x224x224 input in float64, taken at "
        "3x56x56 where that shows a wrong fold as well).",
        "",
        "| phase (CPU s) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for phase in [*PHASES, "total"]:
        cells = [f"{rows[n][0][phase]:.2f}" for n in names]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    cells = [f"{rows[n][1]['total']:.2f}" for n in names]
    lines.append("| total with `--no-verify` | " + " | ".join(cells) + " |")
    share = [
        f"{1 - rows[n][1]['total'] / rows[n][0]['total']:.0%}" if rows[n][0]["total"] else "n/a"
        for n in names
    ]
    lines.append("| verification's share | " + " | ".join(share) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/PHASES.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = {name: measure(name, Path(work), args.runs) for name in args.models}
    args.out.write_text(render(rows, args.runs))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
