"""`repconv bench`: how much faster and smaller the deploy model is, on this machine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from repconv import latency
from repconv.modules import param_count
from repconv.verification import check_inputs_fit


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of convs and linears for one input of `input_shape` (batch 1)."""
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.in_channels // module.groups
            for k in module.kernel_size:
                per_output *= k
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    try:
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape), dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return total


@dataclass
class BenchRow:
    batch: int
    train_ms: float
    train_spread_ms: float
    deploy_ms: float
    deploy_spread_ms: float

    @property
    def speedup(self) -> float:
        return self.train_ms / self.deploy_ms


@dataclass
class BenchResult:
    input_shape: list[int]
    threads: int
    runs: int
    train_params: int
    deploy_params: int
    train_macs: int
    deploy_macs: int
    rows: list[BenchRow]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = [{**asdict(r), "speedup": r.speedup} for r in self.rows]
        return data


def compare(
    train: nn.Module,
    deploy: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8),
    runs: int = 10,
    warmup: int = 3,
) -> BenchResult:
    """Latency of both models at each batch size (taking turns run by run), params, MACs."""
    train.eval()
    deploy.eval()
    dtype = next((p.dtype for p in train.parameters()), torch.float32)
    # measure_alternating holds one input of the largest batch per model.
    check_inputs_fit(input_shape, 2 * max(batch_sizes, default=1), dtype)
    rows = []
    for batch in batch_sizes:
        before, after = latency.measure_alternating(
            [train, deploy], input_shape, batch, runs, warmup
        )
        rows.append(
            BenchRow(batch, before.median_ms, before.spread_ms, after.median_ms, after.spread_ms)
        )
    return BenchResult(
        list(input_shape),
        torch.get_num_threads(),
        runs,
        param_count(train),
        param_count(deploy),
        count_macs(train, input_shape),
        count_macs(deploy, input_shape),
        rows,
    )
