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


def measure(
    model: nn.Module, input_shape: Sequence[int], batch: int = 1, runs: int = 10, warmup: int = 3
) -> Latency:
    """Time `model` on a random batch in inference mode, after `warmup` untimed runs."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.randn((batch, *input_shape), dtype=dtype)
    times = []
    model.eval()
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return Latency(statistics.median(times), max(times) - min(times), runs)
