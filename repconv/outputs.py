"""How far one output is from another: the one error measure every check uses.

A model's output is a tensor or any nesting of them (tuples, lists, dicts); each tensor is
compared by name. The figure of one tensor is max |got - want| / max |want| (max |got - want| when
`want` is all zeros), in float64; another structure or shape is infinitely far, and so is a NaN.
Over several samples a `Figure` keeps the worst difference and the largest reference value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass
class Figure:
    """The worst error of one output tensor over all samples."""

    max_abs: float = 0.0
    scale: float = 0.0

    @property
    def relative(self) -> float:
        if self.max_abs != self.max_abs:  # NaN
            return float("inf")
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs

    def passes(self, atol: float, rtol: float) -> bool:
        return self.max_abs <= atol + rtol * self.scale

    def add(self, actual: Tensor, reference: Tensor) -> None:
        """Take one more sample of this tensor into the figure."""
        if actual.shape != reference.shape:
            self.max_abs = float("inf")
            return
        ref = reference.detach().to(torch.float64)
        diff = (actual.detach().to(torch.float64) - ref).abs()
        worst_diff = float(diff.max()) if diff.numel() else 0.0
        self.max_abs = max(self.max_abs, worst_diff if worst_diff == worst_diff else float("inf"))
        self.scale = max(self.scale, float(ref.abs().max()) if ref.numel() else 0.0)


STRUCTURE = "output structure"


def measure(outputs: Sequence[Any], references: Sequence[Any]) -> dict[str, Figure]:
    """Per output tensor: worst |diff| and the reference's max |value| over the samples."""
    figures: dict[str, Figure] = {}
    for out, ref in zip(outputs, references, strict=True):
        got, want = flatten_outputs(out), flatten_outputs(ref)
        if [n for n, _ in got] != [n for n, _ in want]:
            figures[STRUCTURE] = Figure(float("inf"), 1.0)
            continue
        for (name, a), (_, r) in zip(got, want):
            figures.setdefault(name, Figure()).add(a, r)
    return figures


def compare_outputs(actual: Any, reference: Any) -> dict[str, float]:
    """Relative error per output tensor of one sample; a structural mismatch is infinite."""
    return {name: f.relative for name, f in measure([actual], [reference]).items()}


def worst(figures: Mapping[str, Figure] | None) -> float | None:
    """The largest relative error among the figures (None: no figures were taken)."""
    if figures is None:
        return None
    return max((f.relative for f in figures.values()), default=0.0)
