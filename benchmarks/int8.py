"""The INT8 figures behind bench/INT8.md: the readiness report and the checked INT8 ONNX file
on the zoo's RepVGG, DBB, ACB and conv-BN models and on the tests' RepVGG / QARepVGG copies.

    PYTHONPATH=. python3 benchmarks/int8.py --out bench/INT8.md

Each model: built seeded, its BN statistics randomized (`repconv zoo save --randomize-bn`; the
tests' nets are settled like trained ones), converted in memory with the INT8 report on the
verification's seeded inputs, then written as INT8 ONNX (onnxruntime static QDQ on the same
inputs) with no node kept in float and with the `--keep` worst kept. Random weights and inputs:
the figures compare models and options, they say nothing of accuracy.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from repconv import onnx_int8, pipeline
from repconv.calibration import Calibration
from repconv.zoo import registry
from repconv.zoo.blocks import randomize_bn_
from tests import int8_blocks

ZOO = ["repvgg_a0", "dbb_resnet18", "acb_resnet18", "convbn_resnet18"]
COPIES = {
    "RepVGG copy (settled)": int8_blocks.repvgg_net,
    "RepVGG copy, planted identity outlier": int8_blocks.planted_net,
    "QARepVGG copy (settled)": int8_blocks.qa_net,
}


def _zoo(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn_(registry.build(name), torch.Generator().manual_seed(0))


def figures(model: torch.nn.Module, shape: tuple[int, ...], keep: int) -> dict[str, object]:
    result = pipeline.convert(model, input_shape=shape, samples=4, int8=Calibration())
    report = result.int8
    inputs = result.reference.inputs
    row: dict[str, object] = {
        "worst block": f"{report.blocks[0].path} ({report.worst_block_db:.1f} dB)",
        "flagged": len(report.flagged),
        "W8A8 model dB": report.model_snr_db,
    }
    with tempfile.TemporaryDirectory() as scratch:
        for kept, label in ((0, "none kept"), (keep, "N kept")):
            check = onnx_int8.export_int8(
                result.model, Path(scratch) / f"m{kept}.onnx", inputs,
                calibration="seeded random", keep_float=kept,
            )  # fmt: skip
            row[f"ORT INT8 dB, {label}"] = check.snr_db
            row[f"ORT INT8 rel. err, {label}"] = check.max_relative_error
            if not kept:
                row["ORT kernels dB, none kept"] = check.kernels_snr_db
    row["N"] = keep
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/INT8.md"))
    parser.add_argument("--side", type=int, default=64, help="input height and width")
    parser.add_argument("--keep", type=int, default=3, help="nodes kept in float (second run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = {}
    for name in ZOO:
        rows[name] = figures(_zoo(name), (3, args.side, args.side), args.keep)
        print(name, rows[name], flush=True)
    for name, make in COPIES.items():
        rows[name] = figures(make(), (3, 16, 16), 1)
        print(name, rows[name], flush=True)
    args.out.write_text(_markdown(rows, args))


def _vnni() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags unknown"
    return "VNNI" if "vnni" in flags else "no VNNI"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value < 1 else f"{value:.1f}"
    return str(value)


def _markdown(rows: dict[str, dict[str, object]], args: argparse.Namespace) -> str:
    columns = list(next(iter(rows.values())))
    lines = [
        "# INT8 readiness: simulated W8A8 against onnxruntime's INT8",
        "",
        f"Machine: {platform.machine()} ({_vnni()}), torch {torch.__version__}, Python "
        f"{platform.python_version()}. Made by `PYTHONPATH=. python3 benchmarks/int8.py` "
        f"(zoo models at 3x{args.side}x{args.side}, the copies at 3x16x16; 4 seeded random "
        "calibration inputs, the verification's).",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[c]) for c in columns) + " |")
    lines += [
        "",
        "- worst block: the block whose own simulated W8A8 SNR is lowest (run on its float "
        "input, its output quantized as the next layer reads it; every channel counting alike).",
        "- W8A8 model dB: the whole deploy model simulated in torch (weights int8 per channel, "
        "every conv/linear input uint8 per tensor, min-max), energy SNR of the output.",
        "- ORT INT8: `repconv export --int8` (onnxruntime quantize_static, QDQ, MinMax), run "
        "with onnxruntime against the float64 deploy model: energy SNR of the output and max "
        "relative error; N kept: with `--int8-keep-float N`. The graph runs node by node, "
        "its Q/DQ pairs as written (the arithmetic the file defines).",
        "- ORT kernels: the same file run by onnxruntime's fused integer kernels on this CPU; "
        "on x86 without VNNI their uint8 x int8 sums (VPMADDUBSW) saturate, so there that "
        "figure is the machine's, not the file's.",
        "- Random weights (zoo: randomized BN statistics) and random inputs: the figures "
        "compare models and options; they say nothing of accuracy on a dataset.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
