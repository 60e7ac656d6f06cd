"""Third-party rules arrive through the `repconv.rules` entry-point group."""

from __future__ import annotations

import sys
import textwrap

import torch
from torch import nn

from repconv import engine
from repconv.rules import registry


def test_entry_point_rules_are_loaded_and_ordered_after_builtins(tmp_path, monkeypatch):
    plugin = tmp_path / "sum_plugin.py"
    plugin.write_text(
        textwrap.dedent(
            """
            from repconv.kernels import add, as_branch
            from repconv.rules import Fused, Rule
            from repconv.rules.base import fused_conv_like, replace_children

            def match(m):
                names = set(dict(m.named_children()))
                return "left + right" if {"left", "right"} <= names else None

            def fuse(m):
                b = add([as_branch(m.left.weight, m.left.bias),
                         as_branch(m.right.weight, m.right.bias)])
                replace_children(m, "merged", fused_conv_like(m.left, b), ["left", "right"])
                return Fused("merged", tuple(b.kernel.shape), ["left", "right"])

            def rules():
                return [Rule("plugin_sum", "plugin", "left + right", match, fuse)]
            """
        )
    )
    dist = tmp_path / "sum_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sum-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[repconv.rules]\nsum = sum_plugin:rules\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_registered", [])
    try:
        names = [r.name for r in registry.block_rules()]
        assert names == ["repvgg", "dbb", "acb", "plugin_sum"]
        assert [row["name"] for row in registry.describe()][-3:] == [
            "plugin_sum",
            "deploy_method",
            "conv_bn",
        ]

        class TwoConvs(nn.Module):
            def __init__(self):
                super().__init__()
                self.left = nn.Conv2d(3, 3, 3, padding=1)
                self.right = nn.Conv2d(3, 3, 3, padding=1)

            def forward(self, x):
                if hasattr(self, "merged"):
                    return self.merged(x)
                return self.left(x) + self.right(x)

        model = TwoConvs().double().eval()
        x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
        reference = model(x)
        assert engine.convert_model(model).fused_by_rule() == {"plugin_sum": 1}
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-12)
    finally:
        sys.modules.pop("sum_plugin", None)
