"""Conversion options as plain data (no torch): names, defaults, and the canonical record.

The record is written into every deploy file's metadata, so `repconv batch --resume` can tell
whether an existing output was made from the same settings without loading torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from repconv.errors import BadInput

VERIFY_DTYPES = ("float64", "float32", "float16", "bfloat16")

# The keyword defaults of pipeline.convert (a test keeps the two equal).
CONVERT_DEFAULTS: dict[str, Any] = {
    "input_shape": None,
    "samples": 2,
    "seed": 0,
    "verify": True,
    "verify_dtype": "float64",
    "exact_limit": 1e-6,
    "atol": None,
    "rtol": None,
}


# Bounds that no real input reaches; what fits in memory is checked when inputs are made.
MAX_SAMPLES = 64
MAX_BATCH_SIZE = 1024
MAX_SHAPE_DIMS = 8
MAX_SHAPE_SIDE = 1 << 20
SHAPE_EXAMPLE = "3,224,224 or 3x224x224"


def split_shape(text: str) -> list[int]:
    """An input shape written as "3,224,224" or "3x224x224".

    ValueError if any part is not an integer, including an empty part ("3,,4", "3,x,4").
    """
    parts = re.split(r"[x,]", text.strip())
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"expected integers like {SHAPE_EXAMPLE}") from None


def shape_problem(shape: Sequence[int]) -> str | None:
    """Why `shape` cannot be an input shape (without batch), or None if it can."""
    if not shape or any(v <= 0 for v in shape):
        return f"expected positive integers like {SHAPE_EXAMPLE}"
    if len(shape) > MAX_SHAPE_DIMS:
        return f"expected at most {MAX_SHAPE_DIMS} sizes"
    if max(shape) > MAX_SHAPE_SIDE:
        return f"expected sizes of at most {MAX_SHAPE_SIDE}"
    return None


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """--arch-kwargs: a JSON object (empty when not given)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"--arch-kwargs is not valid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    if not isinstance(value, dict):
        raise BadInput("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def recorded_options(
    arch_spec: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    *,
    key: str | None = None,
    strict: bool = False,
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Every option that shapes a deploy file, defaults filled in, as JSON-ready values."""
    unknown = set(options) - set(CONVERT_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown conversion option(s): {', '.join(sorted(unknown))}")
    merged = {**CONVERT_DEFAULTS, **options}
    shape = merged["input_shape"]
    record = {
        **merged,
        "arch": arch_spec,
        "arch_kwargs": dict(arch_kwargs or {}),
        "key": key,
        "strict": strict,
        "force": force,
        "input_shape": list(shape) if shape else None,
        "verify_dtype": str(merged["verify_dtype"]).removeprefix("torch."),
    }
    return json.loads(json.dumps(record))  # what reading it back from metadata gives
