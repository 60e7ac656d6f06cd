"""Third-party rules arrive through the `repconv.rules` entry-point group."""

from __future__ import annotations

import sys
import textwrap

import torch
from torch import nn

from repconv import engine
from repconv.rules import registry
from repconv.rules.base import Pass, Rule, Step
from repconv.zoo.blocks import RepVGGBlock


def test_entry_point_rules_are_loaded_and_ordered_after_builtins(tmp_path, monkeypatch):
    plugin = tmp_path / "sum_plugin.py"
    plugin.write_text(
        textwrap.dedent(
            """
            from repconv.kernels import add, as_branch
            from repconv.rules import Fused, Rule
            from repconv.fused_conv import fused_conv_like, replace_children

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
    monkeypatch.setattr(registry, "DEFAULT", registry.Registry())  # entry points not yet read
    try:
        names = [r.name for r in registry.block_rules()]
        assert names == ["repvgg", "dbb", "acb", "plugin_sum"]
        assert [row["name"] for row in registry.describe()][-4:] == [
            "plugin_sum",
            "deploy_method",
            "dataflow",
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


class _ScaleBeforeConv(Pass):
    """A data-flow pass for the test: folds the x2 a `_Doubled` applies into its conv.

    It only takes modules no earlier pass claimed, and records which ids it was told are claimed.
    """

    name = "scale_into_conv"
    family = "test"
    summary = "scale -> conv"
    kind = "pairs"

    def __init__(self):
        self.offered_claimed = None

    def find(self, root, claimed, at=""):
        self.offered_claimed = set(claimed)
        steps = []
        for path, module in root.named_modules():
            if id(module) in claimed or not isinstance(getattr(module, "scaled", None), nn.Conv2d):
                continue
            steps.append(Step(f"{path}.scaled" if path else "scaled", self, "test", "x2", 0))
        return steps

    def fuse_step(self, model, step):
        conv = model.get_submodule(step.path)
        conv.weight.data.mul_(2.0)
        model.get_submodule(step.path.rpartition(".")[0]).doubled = False
        return tuple(conv.weight.shape)


class _Doubled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.doubled = True

    def forward(self, x):
        return self.scaled(2.0 * x if self.doubled else x)


def test_a_new_pass_is_one_object_in_the_registry(monkeypatch):
    extra = _ScaleBeforeConv()
    # Before the data-flow pass, which would otherwise fold the scale into the conv itself.
    later = list(registry.LATER_PASSES)
    later.insert(later.index(registry.dataflow.PASS), extra)
    monkeypatch.setattr(registry, "DEFAULT", registry.Registry(later=later))
    assert [row["name"] for row in registry.describe()][-3:] == [
        "scale_into_conv",
        "dataflow",
        "conv_bn",
    ]
    model = nn.Sequential(RepVGGBlock(4, 4), _Doubled()).double().eval()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        applied = engine.convert_model(model)
        assert torch.allclose(model(x), reference, rtol=0, atol=1e-12)
    # It runs after the walk, offered the modules the block rules claimed, and fuses its step.
    assert id(model[0]) in extra.offered_claimed
    assert [(o.path, o.rule, o.status) for o in applied.entries] == [
        ("0", "repvgg", "fused"),
        ("1.scaled", "scale_into_conv", "fused"),
    ]
    assert applied.entries[1].kernel_shape == (4, 4, 3, 3)


def test_apply_returns_outcomes_and_leaves_the_plan_as_planned():
    model = nn.Sequential(RepVGGBlock(4, 4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    plan = engine.plan(model)
    planned = plan.to_dict()
    applied = engine.apply(model, plan)
    assert plan.to_dict() == planned
    assert [b["status"] for b in planned["blocks"]] == ["planned", "planned"]
    assert [o.status for o in applied.entries] == ["fused", "fused"]
    assert applied.plan is plan and [o.step for o in applied.entries] == plan.entries
    assert list(applied.to_dict()["blocks"][0]) == list(planned["blocks"][0])  # same keys, order


def test_registering_from_many_threads_keeps_each_name_once(monkeypatch):
    """Threads registering at once: every distinct rule lands once, and of one name registered
    by many threads exactly one succeeds (the check and the insert are one step)."""
    import threading
    import time

    fresh = registry.Registry()
    monkeypatch.setattr(registry, "DEFAULT", fresh)
    listed = fresh.block_rules

    def listed_slowly() -> list[Rule]:  # widens the window between the name check and the insert
        rules = listed()
        time.sleep(0.001)
        return rules

    monkeypatch.setattr(fresh, "block_rules", listed_slowly)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        start = threading.Barrier(16)
        outcomes: list[str] = []

        def register(index: int) -> None:
            start.wait()
            for n in range(20):
                registry.register_rule(_rule(f"own_{index}_{n}"))
            try:
                registry.register_rule(_rule("shared"))
                outcomes.append("registered")
            except ValueError:
                outcomes.append("refused")

        threads = [threading.Thread(target=register, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    names = [r.name for r in listed()]
    assert len(names) == len(set(names)) == 3 + 16 * 20 + 1
    assert sorted(outcomes) == ["refused"] * 15 + ["registered"]


def _rule(name: str) -> Rule:
    return Rule(name, "test", "never matches", lambda m: None, lambda m: None)
