"""Every tolerance repconv judges by, in one table (torch-free: dtypes go by name).

A figure is a relative error, max |got - want| / max |want|, per output tensor. What it may reach
depends on what was rounded and to which dtype:

- exact: the fused math alone, weights unrounded, activations in float64. Only a wrong fold moves
  it past 1e-6; a right one stays near 1e-15.
- written: the weights rounded as the file holds them (about 1e-6 relative in float32, 1e-3 in
  float16 on a small net); the limits leave room for depth without hiding a lost branch.
- block: a block's own deploy method, judged on a probe run in the block's dtype: float64 blocks
  by the exact limit, narrower ones by what their rounding allows.
- onnx: onnxruntime computes every activation in the file's dtype, so the figure holds the
  weights' rounding plus the activations'; as the written limit in float32, 1e-2 in float16.
"""

from __future__ import annotations

from dataclasses import dataclass

EXACT_LIMIT = 1e-6


@dataclass(frozen=True)
class Limits:
    """The limits of one dtype (None: that figure is never taken in it)."""

    written: float
    block: float
    onnx: float | None = None


LIMITS: dict[str, Limits] = {
    "float64": Limits(written=1e-9, block=EXACT_LIMIT),
    "float32": Limits(written=1e-4, block=1e-4, onnx=1e-4),
    "float16": Limits(written=1e-2, block=1e-2, onnx=1e-2),
    "bfloat16": Limits(written=5e-2, block=1e-2),
}
# A dtype not in the table (float8, a future one) is judged as float16 is.
FALLBACK = LIMITS["float16"]


def dtype_name(dtype: object) -> str:
    """ "float32" for torch.float32 or "float32" alike."""
    return str(dtype).removeprefix("torch.")


def limits_of(dtype: object) -> Limits:
    return LIMITS.get(dtype_name(dtype), FALLBACK)


def written_limit(dtype: object) -> float:
    """The written figure's default relative limit for weights held in `dtype`."""
    return limits_of(dtype).written


def block_limit(dtype: object) -> float:
    """How far a block's own deploy method may move the block's output, probed in `dtype`."""
    return limits_of(dtype).block


def onnx_limit(dtype: object) -> float:
    """The ONNX check's relative limit for a file exported in `dtype`."""
    limit = limits_of(dtype).onnx
    if limit is None:
        raise ValueError(f"no ONNX export is made in {dtype_name(dtype)}")
    return limit


def format_limit(limit: float) -> str:
    """A limit as people write it: 1e-4, not 0.0001 or 1e-04."""
    mantissa, exponent = f"{limit:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


# ---- INT8 readiness (repconv.int8_check): what counts as collapsing --------------------------
# A channel wider than this many times the median channel of its kernel is an outlier: one
# per-tensor scale then spends most of the int8 grid on it.
INT8_OUTLIER_RATIO = 8.0
# A block whose output, run in simulated W8A8 on its own float input, keeps less than this
# signal-to-quantization-noise ratio (dB) is flagged and gets advice: noise above about 3% of
# the signal's amplitude.
INT8_BLOCK_DB = 30.0
# An INT8 ONNX file (`repconv export --int8`) is written only if onnxruntime's outputs keep at
# least this SNR (dB) against the float deploy model on the calibration inputs: below it (noise
# at a third of the signal) the file has collapsed, whatever is kept in float.
INT8_ONNX_MIN_DB = 10.0
# The INT8 file is checked as written (Q/DQ node by node) and by onnxruntime's fused integer
# kernels on this CPU; figures closer than this (dB) are one figure, wider apart both are said.
INT8_KERNELS_NOTE_DB = 1.0
