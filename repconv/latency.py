"""Wall-clock latency of a model's forward pass on this machine (median of repeated runs)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Latency:
    median_ms: float
    spread_ms: float  # max - min over the timed runs
    runs: int


def measure_alternating(
    models: Sequence[nn.Module],
    input_shape: Sequence[int],
    batch: int = 1,
    runs: int = 10,
    warmup: int = 3,
) -> list[Latency]:
    """Time several models run by run in turn (the order reversed every run), so a slow spell
    of a shared machine falls on all of them alike instead of on whichever ran then."""
    inputs = []
    for model in models:
        model.eval()
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        inputs.append(torch.randn((batch, *input_shape), dtype=dtype))
    times: list[list[float]] = [[] for _ in models]
    order = list(range(len(models)))
    with torch.inference_mode():
        for i in range(warmup + runs):
            for m in order:
                start = time.perf_counter()
                models[m](inputs[m])
                if i >= warmup:
                    times[m].append((time.perf_counter() - start) * 1000)
            order.reverse()
    return [Latency(statistics.median(t), max(t) - min(t), runs) for t in times]
