"""Comparing model outputs: tensors or nested tuples/lists/dicts of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def flatten_outputs(output: Any, name: str = "output") -> list[tuple[str, Tensor]]:
    """(name, tensor) for every tensor in a nested output, in a stable order."""
    if isinstance(output, Tensor):
        return [(name, output)]
    if isinstance(output, Mapping):
        items = []
        for key in output:
            items += flatten_outputs(output[key], f"{name}[{key!r}]")
        return items
    if isinstance(output, (tuple, list)):
        items = []
        for i, value in enumerate(output):
            items += flatten_outputs(value, f"{name}[{i}]")
        return items
    return []


def relative_error(actual: Tensor, reference: Tensor) -> float:
    """max |actual - reference| / max |reference|, computed in float64 (inf on shape mismatch)."""
    if actual.shape != reference.shape:
        return float("inf")
    if reference.numel() == 0:
        return 0.0
    ref = reference.detach().to(torch.float64)
    diff = (actual.detach().to(torch.float64) - ref).abs().max()
    scale = ref.abs().max()
    if not torch.isfinite(diff):
        return float("inf")
    return float(diff / scale) if scale > 0 else float(diff)


def compare_outputs(actual: Any, reference: Any) -> dict[str, float]:
    """Relative error per output tensor; a structural mismatch is an infinite error."""
    got, want = flatten_outputs(actual), flatten_outputs(reference)
    if [n for n, _ in got] != [n for n, _ in want]:
        return {"output structure": float("inf")}
    return {name: relative_error(a, r) for (name, a), (_, r) in zip(got, want)}
