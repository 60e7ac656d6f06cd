"""linear_map.then: composing with the source's identity map is the map itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repconv import linear_map as L


def _conv_value(size: int, channels: int = 4) -> L.LinearValue:
    weight = torch.randn(channels, channels, size, size, dtype=torch.float64)
    window = L.Window.conv((size, size), (1, 1), (size // 2,) * 2, (1, 1))
    return L.conv(weight, 1, window, torch.randn(channels, dtype=torch.float64), label=f"{size}")


def _run(value: L.LinearValue, x: torch.Tensor) -> torch.Tensor:
    fused = L.to_conv(value)
    return F.conv2d(
        x, fused.kernel, fused.bias, fused.stride, fused.padding, fused.dilation, fused.groups
    )


def test_identity_then_a_map_is_that_map_untouched():
    # Every region starts as identity(source); composing through it used to copy the kernel
    # and multiply it by ones, and push a 1x1 through a dense C x C identity matrix.
    for size in (1, 3):
        conv = _conv_value(size)
        assert L.then(L.identity(4, 2), conv) is conv
    meta = L.identity(4, 2, device="meta")
    assert L.then(meta, _conv_value(3)).terms[0].label == "3"


def test_a_scaled_identity_still_composes_exactly():
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    scale = torch.rand(4, dtype=torch.float64) + 0.5
    for size in (1, 3):
        conv = _conv_value(size)
        scaled = L.affine(L.identity(4, 2), scale, None)
        composed = L.then(scaled, conv)
        assert composed is not conv
        want = _run(conv, x * scale.reshape(1, -1, 1, 1))
        assert torch.allclose(_run(composed, x), want, rtol=0, atol=1e-12)
