"""Conversion options as plain data (no torch): names, defaults, and the canonical record.

The record is written into every deploy file's metadata, so `repconv batch --resume` can tell
whether an existing output was made from the same settings without loading torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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


def split_shape(text: str) -> list[int]:
    """An input shape written as "3,224,224" or "3x224x224" (ValueError if not integers)."""
    return [int(v) for v in text.replace("x", ",").split(",") if v.strip()]


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
