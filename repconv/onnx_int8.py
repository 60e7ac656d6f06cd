"""`repconv export --int8`: a QDQ INT8 ONNX model by onnxruntime's own static quantization,
checked with onnxruntime against the float deploy model before it is kept.

The float export is `onnx_export`'s (TorchScript exporter, float32) to a scratch folder; then
`onnxruntime.quantization.quantize_static` writes the QDQ model (weights int8 symmetric per
output channel, activations uint8 per tensor, min-max calibration on the calibration inputs:
the scheme `int8_check` simulates). `--int8-keep-float N` keeps in float the N conv/linear
nodes whose own simulated W8A8 figure is worst (the node's weights and its input quantized,
nothing else: what keeping that node in float saves). The file is run with onnxruntime on the
calibration inputs and compared with the deploy model in float64: its SNR (dB) and max
relative error go into its `metadata_props` (`int8_check`) and the command's report. Under
`tolerances.INT8_ONNX_MIN_DB`, or if any step fails: exit 1 or 2, nothing written.

The figure that decides is the QDQ graph run node by node (graph optimizations off): the
arithmetic the file defines, which a device's INT8 engine implements. onnxruntime's own fused
integer kernels are run too and reported beside it: on an x86 CPU without VNNI they multiply
uint8 by int8 with VPMADDUBSW, whose 16-bit sums saturate (onnxruntime's quantization guide
says so and suggests `reduce_range`), so there that figure is this machine's, not the file's.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repconv import files, int8_check, onnx_export
from repconv import verification as V
from repconv.errors import BadInput, VerificationFailed
from repconv.int8 import finite_or_none
from repconv.outputs import flatten_outputs, measure, worst
from repconv.tolerances import INT8_KERNELS_NOTE_DB, INT8_ONNX_MIN_DB
from repconv.turns import one_at_a_time


def require_quantization() -> Any:
    """onnxruntime.quantization, or BadInput naming the extra."""
    onnx_export.require_onnx()
    try:
        from onnxruntime import quantization
    except ImportError:
        raise BadInput(
            f"INT8 export needs onnxruntime.quantization: {onnx_export.INSTALL_HINT}"
        ) from None
    return quantization


@dataclass
class Int8OnnxCheck:
    """How far onnxruntime's outputs on the INT8 file are from the float deploy model."""

    path: str
    opset: int
    calibration: str
    samples: int
    snr_db: float
    max_relative_error: float
    simulated_snr_db: float  # int8_check's W8A8 simulation, every layer quantized
    kernels_snr_db: float  # the same file run by onnxruntime's fused integer kernels here
    kept_float: list[dict[str, Any]] = field(default_factory=list)  # node, layer, its own dB
    min_db: float = INT8_ONNX_MIN_DB

    @property
    def passed(self) -> bool:
        return self.snr_db >= self.min_db

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "opset": self.opset,
            "format": "QDQ (onnxruntime quantize_static, MinMax; int8 per-channel weights, "
            "uint8 per-tensor activations)",
            "runtime": "onnxruntime CPUExecutionProvider, graph run node by node (Q/DQ as written)",
            "reference": "deploy model (float64)",
            "calibration": self.calibration,
            "samples": self.samples,
            "snr_db": finite_or_none(self.snr_db),
            "max_relative_error": finite_or_none(self.max_relative_error),
            "simulated_w8a8_snr_db": finite_or_none(self.simulated_snr_db),
            "ort_integer_kernels_snr_db": finite_or_none(self.kernels_snr_db),
            "kept_float": self.kept_float,
            "min_db": self.min_db,
            "passed": self.passed,
        }

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        kept = f"; {len(self.kept_float)} node(s) kept in float" if self.kept_float else ""
        return (
            f"onnxruntime INT8 vs deploy model (float64): SNR {self.snr_db:.1f} dB, max relative "
            f"error {self.max_relative_error:.2e} (simulated W8A8 {self.simulated_snr_db:.1f} "
            f"dB; floor {self.min_db:g} dB) {verdict}{kept}{self._kernels_note()}"
        )

    def _kernels_note(self) -> str:
        if abs(self.kernels_snr_db - self.snr_db) < INT8_KERNELS_NOTE_DB:
            return ""
        return (
            f"; onnxruntime's fused integer kernels on this CPU: {self.kernels_snr_db:.1f} dB "
            "(x86 without VNNI saturates uint8 x int8 sums)"
        )


class _Reader:
    """The calibration inputs as onnxruntime's CalibrationDataReader takes them."""

    def __init__(self, inputs: Sequence[Tensor]):
        self.inputs = iter([{onnx_export.INPUT_NAME: x.float().numpy()} for x in inputs])

    def get_next(self) -> dict[str, Any] | None:
        return next(self.inputs, None)


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs advice on the root logger at every call."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def worst_layers(model: nn.Module, inputs: Sequence[Tensor], count: int) -> list[tuple[str, float]]:
    """The `count` conv/linear layers whose own simulated W8A8 figure is worst, worst first."""
    layers = list(int8_check.quantized_layers(model))
    simulation = int8_check.simulate(model, inputs, layers, quantize_outputs=False)
    ranked = sorted(simulation.blocks.items(), key=lambda kv: kv[1])
    return ranked[:count]


def _node_names(onnx_model: Any, layers: Sequence[str]) -> dict[str, str]:
    """The ONNX node reading each layer's weight (the exporter keeps state-dict names)."""
    wanted = {f"{path}.weight": path for path in layers}
    found = {}
    for node in onnx_model.graph.node:
        for name in node.input:
            if name in wanted:
                found[wanted[name]] = node.name
    return found


@one_at_a_time
def export_int8(
    model: nn.Module,
    output_path: str | Path,
    inputs: Sequence[Tensor],
    *,
    calibration: str,
    opset: int = onnx_export.DEFAULT_OPSET,
    keep_float: int = 0,
    metadata: dict[str, Any] | None = None,
) -> Int8OnnxCheck:
    """Write `model` as a QDQ INT8 ONNX file calibrated on `inputs`, checked with onnxruntime
    against the model in float64; nothing is written unless the check passes."""
    onnx, _ = onnx_export.require_onnx()
    quantization = require_quantization()
    output_path = Path(output_path)
    held = copy.deepcopy(model).float().eval()
    fed = [x.float() for x in inputs]
    simulated = int8_check.simulate(held, fed, []).model
    kept = worst_layers(held, fed, keep_float) if keep_float else []
    references = V.run_model(copy.deepcopy(model).double().eval(), [x.double() for x in inputs])
    flat = [tuple(t for _, t in flatten_outputs(r)) for r in references]
    with tempfile.TemporaryDirectory() as scratch, files.replacing(output_path) as tmp:
        float_path = str(Path(scratch) / "float.onnx")
        onnx_export.export_model(held, float_path, fed[0], torch.float32, opset, False)
        nodes = _node_names(onnx.load(float_path), [p for p, _ in kept])
        with _quiet():
            quantization.quantize_static(
                float_path, tmp, _Reader(fed),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
                nodes_to_exclude=list(nodes.values()),
            )  # fmt: skip
        outputs = onnx_export.run_onnx(tmp, fed, torch.float32, optimized=False)
        kernels = onnx_export.run_onnx(tmp, fed, torch.float32)
        listed = [
            {"layer": p, "node": nodes.get(p), "w8a8_snr_db": finite_or_none(db)} for p, db in kept
        ]
        check = Int8OnnxCheck(
            str(output_path), opset, calibration, len(fed),
            int8_check.output_snr_db(outputs, flat), worst(measure(outputs, flat)) or 0.0,
            simulated, int8_check.output_snr_db(kernels, flat), listed, INT8_ONNX_MIN_DB,
        )  # fmt: skip
        if not check.passed:
            raise VerificationFailed(f"{output_path.name} not written: {check.summary()}")
        onnx_export.write_metadata(onnx, tmp, {**(metadata or {}), "int8_check": check.to_dict()})
    return check


@one_at_a_time
def export_int8_deploy_file(
    deploy_path: str | Path,
    output_path: str | Path,
    options: Any = None,
    *,
    calibration: Any = None,
    opset: int = onnx_export.DEFAULT_OPSET,
    keep_float: int = 0,
    trust_metadata: bool = False,
) -> Int8OnnxCheck:
    """`repconv export --int8`: the deploy model of a deploy checkpoint (`load_deploy`) as a
    checked INT8 ONNX file, calibrated on `calibration` (a `calibration.Calibration`; by
    default the seeded random inputs of the options' samples and seed, only a proxy)."""
    from repconv import arch, pipeline
    from repconv.calibration import Calibration
    from repconv.options import ConvertOptions

    require_quantization()
    options = options or ConvertOptions()
    calibration = calibration or Calibration()
    deploy_path, output_path = Path(deploy_path), Path(output_path)
    onnx_export.check_paths(deploy_path, output_path)
    calibration.check()
    model = pipeline.load_deploy_with(deploy_path, options, trust_metadata=trust_metadata)
    shape = arch.input_shape_for(model, options.input_shape)
    inputs = calibration.load(shape)
    if inputs is None:
        inputs = V.make_inputs(shape, options.samples, options.seed, torch.float32)
    recorded = {"deploy_sha256": files.file_sha256(deploy_path), "arch": options.arch}
    return export_int8(
        model, output_path, inputs, calibration=calibration.source, opset=opset,
        keep_float=keep_float, metadata=recorded,
    )  # fmt: skip
