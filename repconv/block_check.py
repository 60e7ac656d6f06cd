"""The check a pass is handed for a change it cannot prove: probe the block, before and after.

A block's own deploy method is library code: it may raise, leave the wrong deploy form, or fold
a branch twice; a forward the data-flow pass rewrote may read what the fusion deleted. The block
is run once on a seeded input before the change and once after; the output may move by
`tolerances.block_limit` of its dtype. The input is shaped (1, channels, side, ...) in the
block's dtype, its channels those of the block's first conv's input, else of another conv's or
norm's inside (a block may start with a norm, or list its convs out of order); a block that runs
on none of the shapes tried has no probe and is judged by the whole-model verification alone. A
block built on the meta device (a rebuild, to be loaded) has no values to judge: no probe
either. Both runs have torch's default dtype set to the block's (`modules.default_dtype`), so a
forward that builds tensors without a dtype runs as it does in the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from repconv.modules import default_dtype, floating_dtype, is_norm_like
from repconv.outputs import compare_outputs
from repconv.tolerances import block_limit

# Spatial sizes tried for a block's probe input, smallest first.
PROBE_SIDES = (16, 64)
# How many channel counts (of the convs and norms inside, in order) a probe input may try.
PROBE_WIDTHS = 3


class Probe:
    """A block's output on one seeded input, taken before anything changed it."""

    def __init__(self, input: torch.Tensor, output: Any, dtype: torch.dtype):
        self.input, self.output = input, output
        self.limit = block_limit(dtype)

    def error_of(self, module: nn.Module) -> float:
        """The worst relative error of `module`'s outputs on the probe's input (float64; a
        changed output structure is infinite)."""
        with torch.no_grad(), default_dtype(self.input.dtype):
            after = module(self.input)
        return max(compare_outputs(after, self.output).values(), default=0.0)


def _input_widths(block: nn.Module) -> list[tuple[int, int]]:
    """(channels, spatial rank) a probe input may have: the first conv's input first, then the
    other convs' and the norms' (a norm takes the rank of the convs), each once."""
    convs = [m for m in block.modules() if isinstance(m, _ConvNd)]
    if not convs:
        return []
    rank = len(convs[0].kernel_size)
    found = [(c.in_channels, len(c.kernel_size)) for c in convs]
    for m in block.modules():
        width = getattr(m, "num_features", None)
        if is_norm_like(m) and isinstance(width, int):
            found.append((width, rank))
    return list(dict.fromkeys(found))[:PROBE_WIDTHS]


class ProbeCheck:
    """The `rules.base.BlockCheck` the engine hands the passes unless told otherwise."""

    def probe(self, block: nn.Module) -> Probe | None:
        if any(t.is_meta for t in block.parameters()):
            return None
        dtype = floating_dtype(block) or torch.get_default_dtype()
        for side in PROBE_SIDES:
            for channels, dims in _input_widths(block):
                generator = torch.Generator().manual_seed(0)
                shape = (1, channels, *[side] * dims)
                x = torch.randn(shape, generator=generator, dtype=dtype)
                try:
                    with torch.no_grad(), default_dtype(dtype):
                        return Probe(x, block(x), dtype)
                except Exception:  # not this shape (or not a conv input at all)
                    continue
        return None
