"""The check a pass is handed for a change it cannot prove: probe the block, before and after.

A block's own deploy method is library code: it may raise, leave the wrong deploy form, or fold
a branch twice. The block is run once on a seeded input before the method and once after; the
output may move by `tolerances.block_limit` of its dtype. The input is shaped after the block's
first conv, (1, in_channels, side, ...), in the block's dtype; a block that runs on none of the
sizes tried (its input is not a conv's) has no probe and is judged by the whole-model
verification alone. A block built on the meta device (a rebuild, to be loaded) has no values to
judge: no probe either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from repconv.modules import floating_dtype
from repconv.outputs import compare_outputs
from repconv.tolerances import block_limit

# Spatial sizes tried for a block's probe input, smallest first.
PROBE_SIDES = (16, 64)


class Probe:
    """A block's output on one seeded input, taken before anything changed it."""

    def __init__(self, input: torch.Tensor, output: Any, dtype: torch.dtype):
        self.input, self.output = input, output
        self.limit = block_limit(dtype)

    def error_of(self, module: nn.Module) -> float:
        """The worst relative error of `module`'s outputs on the probe's input (float64; a
        changed output structure is infinite)."""
        with torch.no_grad():
            after = module(self.input)
        return max(compare_outputs(after, self.output).values(), default=0.0)


class ProbeCheck:
    """The `rules.base.BlockCheck` the engine hands the passes unless told otherwise."""

    def probe(self, block: nn.Module) -> Probe | None:
        conv = next((m for m in block.modules() if isinstance(m, _ConvNd)), None)
        if conv is None or any(t.is_meta for t in block.parameters()):
            return None
        dtype = floating_dtype(block) or torch.get_default_dtype()
        dims = len(conv.kernel_size)
        for side in PROBE_SIDES:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn((1, conv.in_channels, *[side] * dims), generator=generator, dtype=dtype)
            try:
                with torch.no_grad():
                    return Probe(x, block(x), dtype)
            except Exception:  # not this size (or not a conv input at all)
                continue
        return None
