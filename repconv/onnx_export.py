"""Export a deploy model to ONNX and check the file with onnxruntime against a reference.

The exporter is torch's TorchScript-based one (`torch.onnx.export(..., dynamo=False)`): it runs
the model's `__call__`, so blocks whose forward the data-flow pass replaced on the instance
(`repconv.tracing.GraphForward`) export as fused, and it writes the requested opset as is. The
torch.export-based exporter (`dynamo=True`) runs them too, but its lowest opset is 18 (it failed
to convert the demo net down to 17), it needs onnxscript and it takes about ten times longer.

The check runs the written file with onnxruntime (CPUExecutionProvider) on the verification
inputs (`verification.make_inputs`, float64, rounded to the file's dtype) and measures it against
the reference outputs (the train model's when converting, the deploy model's in float64 when
exporting a deploy file), with the usual figure: max |onnx - ref| / max |ref| per output.

Tolerance: `tolerances.onnx_limit` (the activations are rounded to the file's dtype too).

onnx and onnxruntime are an optional extra (`pip install 'repconv[onnx]'`), imported on first use.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repconv import files, onnx_lint
from repconv import verification as V
from repconv.errors import BadInput, VerificationFailed
from repconv.outputs import Figure, flatten_outputs, measure, worst
from repconv.tolerances import onnx_limit
from repconv.turns import one_at_a_time
from repconv.version import __version__

INSTALL_HINT = "pip install 'repconv[onnx]'"
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 9, 20  # the TorchScript exporter's range in torch 2.13
INPUT_NAME, OUTPUT_NAME = "input", "output"


def require_onnx() -> tuple[Any, Any]:
    """onnx and onnxruntime, or BadInput naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        name = exc.name or "onnx"
        raise BadInput(
            f"ONNX export needs {name}, which is not installed: {INSTALL_HINT}"
        ) from None
    return onnx, onnxruntime


@dataclass
class OnnxCheck:
    """How far onnxruntime's outputs on the written file are from the reference."""

    path: str
    opset: int
    dtype: str
    dynamic_batch: bool
    figures: dict[str, Figure]
    limit: float
    reference: str  # what the outputs were compared against
    lint: list[dict[str, Any]] = field(default_factory=list)  # `repconv lint` findings

    @property
    def worst(self) -> float:
        return worst(self.figures) or 0.0

    @property
    def passed(self) -> bool:
        return all(f.passes(0.0, self.limit) for f in self.figures.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "opset": self.opset,
            "dtype": self.dtype,
            "dynamic_batch": self.dynamic_batch,
            "reference": self.reference,
            "runtime": "onnxruntime CPUExecutionProvider",
            "max_relative_error": _finite_or_none(self.worst),
            "limit": self.limit,
            "passed": self.passed,
            "lint_findings": self.lint,
        }

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        lint = f"; lint: {len(self.lint)} unfused pattern(s)" if self.lint else "; lint: clean"
        return (
            f"onnxruntime vs {self.reference}: max relative error {self.worst:.2e} "
            f"(limit {self.limit:.0e}, {self.dtype}) {verdict}{lint}"
        )


def _finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def reference_of(
    model: nn.Module, shape: Sequence[int], samples: int, seed: int
) -> tuple[list[torch.Tensor], list[Any]]:
    """Verification inputs and the outputs of a copy of `model` held in float64 (the model
    itself is left as it is)."""
    inputs = V.make_inputs(shape, samples, seed, torch.float64)
    held = copy.deepcopy(model).to(torch.float64).eval()
    return inputs, V.reference_outputs(held, inputs, shape)


@one_at_a_time
def export_checked(
    model: nn.Module,
    output_path: str | Path,
    inputs: Sequence[torch.Tensor],
    references: Sequence[Any],
    *,
    reference: str,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    fp16: bool = False,
    metadata: dict[str, Any] | None = None,
) -> OnnxCheck:
    """Export `model` to `output_path`, run it with onnxruntime on `inputs`, compare with
    `references`; the file replaces `output_path` only when the check passes (else
    VerificationFailed, and nothing is written)."""
    onnx, _ = require_onnx()
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadInput(f"--opset must be from {MIN_OPSET} to {MAX_OPSET}, got {opset}")
    output_path = Path(output_path)
    dtype = torch.float16 if fp16 else torch.float32
    with files.replacing(output_path) as tmp:
        export_model(model, tmp, inputs[0], dtype, opset, dynamic_batch)
        outputs = run_onnx(tmp, inputs, dtype, batch_of_three=dynamic_batch)
        # ONNX outputs are a flat list: compare them with the references' tensors in order.
        flat = [tuple(t for _, t in flatten_outputs(r)) for r in references]
        figures = measure(outputs, flat)
        check = OnnxCheck(
            str(output_path), opset, str(dtype).removeprefix("torch."), dynamic_batch, figures,
            onnx_limit(dtype), reference,
        )  # fmt: skip
        if not check.passed:
            raise VerificationFailed(f"{output_path.name} not written: {check.summary()}")
        # What `repconv lint` would say of the file: a deploy export should hold no train-time
        # structure; findings are reported (and recorded), the file stays valid.
        check.lint = [f.to_dict() for f in onnx_lint.lint_model(onnx.load(tmp))]
        write_metadata(onnx, tmp, {**(metadata or {}), "onnx_check": check.to_dict()})
    return check


def export_model(
    model: nn.Module,
    path: str,
    example: torch.Tensor,
    dtype: torch.dtype,
    opset: int,
    dynamic_batch: bool,
) -> None:
    """The TorchScript exporter on a copy of `model` in `dtype`, its chatter silenced."""
    exported = copy.deepcopy(model).to(dtype).eval()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        torch.no_grad(),
    ):
        # The exporter warns that it is the legacy one on every call (see the module's doc).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exported,
            (example.to(dtype),),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
        )


def run_onnx(
    path: str | Path,
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    *,
    batch_of_three: bool = False,
    optimized: bool = True,
) -> list[Any]:
    """onnxruntime's outputs (a tuple of float64 tensors) on each input of batch 1, fed in
    `dtype`.

    Not `optimized`, the graph runs node by node as written (a QDQ model's Q/DQ pairs as the
    arithmetic they define, instead of fused into this CPU's integer kernels).

    With `batch_of_three`, the inputs run as one batch of at least three (repeated as needed;
    a dynamic batch axis must take it) and each output row goes back to its input.
    """
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # deterministic and polite on a shared machine
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        got = session.run(None, {INPUT_NAME: x.to(dtype).numpy()})
        return [torch.from_numpy(t).to(torch.float64) for t in got]

    if batch_of_three:
        count = len(inputs)
        batched = run(torch.cat([inputs[i % count] for i in range(max(3, count))]))
        rows = [[t[i : i + 1] for t in batched] for i in range(count)]
    else:
        rows = [run(x) for x in inputs]
    return [tuple(r) for r in rows]


def write_metadata(onnx: Any, path: str, fields: dict[str, Any]) -> None:
    """Set `metadata_props` (strings; objects as JSON) on the file at `path`."""
    model = onnx.load(path)
    fields = {"repconv_version": __version__, **fields}
    for key, value in fields.items():
        if value is None:
            continue
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    model.producer_name = "repconv"
    onnx.save(model, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's `metadata_props` (BadInput if it cannot be read)."""
    onnx, _ = require_onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BadInput(f"{Path(path).name} is not an ONNX model: {exc}") from None
    return {p.key: p.value for p in model.metadata_props}


@dataclass
class ExportSettings:
    """How to write the ONNX file (the command's --opset, --dynamic-batch, --fp16)."""

    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False
    fp16: bool = False


@one_at_a_time
def export_deploy_file(
    deploy_path: str | Path,
    output_path: str | Path,
    options: Any = None,
    settings: ExportSettings | None = None,
    *,
    trust_metadata: bool = False,
) -> OnnxCheck:
    """Build the deploy model of a deploy checkpoint (`load_deploy`), export it and check the
    file against that model run in float64. The train-against-deploy figure is the one the
    checkpoint records; both go into the file's `metadata_props`."""
    from repconv import arch, metadata, pipeline
    from repconv.options import ConvertOptions

    require_onnx()
    options = options or ConvertOptions()
    deploy_path, output_path = Path(deploy_path), Path(output_path)
    check_paths(deploy_path, output_path)
    # The models are chosen where every workflow's are (`model_choice`, via the loader).
    model = pipeline.load_deploy_with(deploy_path, options, trust_metadata=trust_metadata)
    shape = arch.input_shape_for(model, options.input_shape)
    inputs, references = reference_of(model, shape, options.samples, options.seed)
    is_safetensors = deploy_path.suffix.lower() == ".safetensors"
    record = metadata.read(files.read_safetensors_metadata(deploy_path) if is_safetensors else {})
    recorded = {
        "source_sha256": record.source_sha256,
        "deploy_sha256": files.file_sha256(deploy_path),
        "arch": options.arch or record.arch,
        "verification": _recorded_verification(record),
    }
    return export_checked(
        model, output_path, inputs, references, reference="deploy model (float64)",
        metadata=recorded, **vars(settings or ExportSettings()),
    )  # fmt: skip


def _recorded_verification(record: Any) -> dict[str, Any] | None:
    """The deploy file's recorded verification; a damaged record is left out, not fatal."""
    try:
        return record.verification
    except ValueError:
        return None


def check_paths(source: Path, output: Path) -> None:
    """Refuse an output that is not .onnx, is the input, or cannot be written; before work."""
    if output.suffix.lower() != ".onnx":
        raise BadInput(f"{output}: the ONNX output must end in .onnx")
    if output.resolve() == source.resolve():
        raise BadInput(f"{output} is the input file; write the ONNX model elsewhere")
    files.check_report_path(output)


@one_at_a_time
def export_conversion(
    result: Any, output_path: str | Path, settings: ExportSettings | None = None
) -> OnnxCheck:
    """Export a conversion's deploy model (`pipeline.Result`) and check the file against the
    train model's reference outputs (or, converted without verification, against the deploy
    model in float64)."""
    output_path = Path(output_path)
    reference = result.reference
    if reference is not None and not reference.reduced:
        inputs, references, against = reference.inputs, reference.outputs, "train model"
    else:  # the file is traced at the full input shape, which the figures were not taken at
        from repconv import arch

        full = reference.full_shape if reference is not None else None
        shape = full or arch.input_shape_for(result.model, None)
        inputs, references = reference_of(result.model, shape, 4, 0)
        against = "deploy model (float64)"
    recorded = {
        "source_sha256": result.source.get("sha256"),
        "arch": result.source.get("arch"),
        "verification": None if result.verification is None else result.verification.to_dict(),
    }
    return export_checked(
        result.model, output_path, inputs, references, reference=against,
        metadata=recorded, **vars(settings or ExportSettings()),
    )  # fmt: skip
