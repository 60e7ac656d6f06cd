"""conv -> BN is folded only where data flow proves it exact; fallback and third-party rules."""

from __future__ import annotations

import pytest
import torch
from helpers import randomized, rel_error
from torch import nn

import repconv
from repconv import engine
from repconv.rules import Fused, Rule, unregister_rule
from repconv.zoo.blocks import RepVGGBlock


def converted(model: nn.Module, x: torch.Tensor) -> engine.Applied:
    """Convert; check outputs are unchanged."""
    with torch.no_grad():
        reference = model(x)
        applied = engine.convert_model(model)
        assert rel_error(model(x), reference) < 1e-12
    return applied


def fused_pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """Convert; check outputs are unchanged; return the (conv, norm) pairs the conv -> BN pass
    folded (blocks the data-flow pass fuses are listed with a None norm)."""
    applied = converted(model, x)
    return [(e.path, e.norm_path) for e in applied.entries if e.status == "fused"]


class Residual(nn.Module):
    """conv's output feeds the BN *and* the residual add: folding the BN into the conv alone
    would change the add (the whole sum is one conv, which the data-flow pass finds)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ActBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class DeclaredOutOfOrder(nn.Module):
    """The BN is declared right after conv_a but consumes conv_b's output."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv_a(x) + self.bn(self.conv_b(x))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx; the Sequential inside is still safe."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def x4(*spatial):
    return torch.randn(2, 4, *spatial, dtype=torch.float64)


def test_conv_with_a_second_user_is_not_folded_as_a_pair():
    model = randomized(Residual())
    plan = engine.plan(model)
    assert [(s.rule, s.structure) for s in plan.entries] == [("dataflow", "3x3 + 3x3")]
    assert fused_pairs(model, x4(6, 6)) == [("", None)]
    # The sum bn(conv(x)) + conv(x) is one conv of a name of its own: kept in `conv`, the class's
    # own forward (its norm as Identity) would add the conv twice (issue 21: names never lie).
    assert set(model.state_dict()) == {"reparam.weight", "reparam.bias"}
    assert engine.leftover_norm_warnings(model) == []


def test_activation_between_conv_and_bn_is_not_folded():
    assert fused_pairs(randomized(ActBetween()), x4(6, 6)) == []


def test_pairs_follow_data_flow_not_declaration_order():
    model = randomized(DeclaredOutOfOrder())
    (step,) = engine.plan(model).entries
    assert step.rule == "dataflow" and set(step.claims) == {"conv_a", "conv_b", "bn"}
    assert fused_pairs(model, x4(6, 6)) == [("", None)]
    assert set(model.state_dict()) == {"reparam.weight", "reparam.bias"}


def test_shared_conv_is_never_folded_as_a_pair():
    model = randomized(SharedConv())
    assert fused_pairs(model, x4(6, 6)) == [("", None)]  # the whole sum: one new conv
    assert set(model.state_dict()) == {"reparam.weight", "reparam.bias"}


def test_module_reachable_at_two_paths_is_never_folded():
    conv = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(4)), nn.Sequential(conv))
    assert fused_pairs(randomized(model), x4(5, 5)) == []


def test_untraceable_module_falls_back_to_sequential_adjacency():
    model = randomized(Untraceable())
    assert fused_pairs(model, x4(6, 6)) == [("body.0", "body.1")]
    assert isinstance(model.body[1], nn.Identity)


@pytest.mark.parametrize(
    ("layers", "shape"),
    [
        ([nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6)], (2, 4, 9)),
        ([nn.Conv3d(4, 6, 3, padding=1, groups=2), nn.BatchNorm3d(6)], (2, 4, 5, 5, 5)),
        ([nn.Linear(4, 6), nn.BatchNorm1d(6)], (2, 4)),
        (
            [
                nn.Conv2d(4, 6, 3, dilation=2, padding=2, padding_mode="reflect"),
                nn.SyncBatchNorm(6),
            ],
            (2, 4, 7, 7),
        ),
        ([nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6, affine=False, eps=1e-3)], (2, 4, 7, 7)),
    ],
)
def test_conv_bn_variants(layers, shape):
    model = randomized(nn.Sequential(*layers))
    x = torch.randn(*shape, dtype=torch.float64)
    assert fused_pairs(model, x) == [("0", "1")]
    assert set(model.state_dict()) == {"0.weight", "0.bias"}


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision's / detectron2's: buffers only, eval formula."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(
            1, -1, 1, 1
        )


def test_frozen_batch_norm_folds_like_bn():
    model = nn.Sequential(nn.Conv2d(4, 6, 3), FrozenBatchNorm2d(6)).double()
    with torch.no_grad():
        for buf, value in zip(model[1].buffers(), torch.rand(4, 6) + 0.5):
            buf.copy_(value)
    assert fused_pairs(model, x4(7, 7)) == [("0", "1")]


class BatchNormAct(nn.BatchNorm2d):
    """A norm subclass that adds behaviour: folding it would drop the activation."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_norm_that_adds_behaviour_is_left_and_warned():
    model = randomized(nn.Sequential(nn.Conv2d(4, 6, 3), BatchNormAct(6)))
    assert fused_pairs(model, x4(7, 7)) == []
    (warning,) = engine.leftover_norm_warnings(model)
    assert warning["path"] == "1" and "overrides forward" in warning["message"]


def test_batch_statistics_norm_is_left_and_warned():
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False))
    model = model.double().eval()
    assert fused_pairs(model, x4(7, 7)) == []
    (warning,) = engine.leftover_norm_warnings(model)
    assert "track_running_stats=False" in warning["message"]


class OwnDeployBlock(nn.Module):
    """A block from 'another library': unknown structure, but its own reparameterize()."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.called = 0

    def forward(self, x):
        if hasattr(self, "merged"):
            return self.merged(x)
        return self.a(x) + self.b(x)

    def reparameterize(self):
        self.called += 1
        conv, bn = self.a
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        merged = nn.Conv2d(4, 4, 3, padding=1).to(conv.weight.dtype)
        merged.weight.data = conv.weight * scale.view(-1, 1, 1, 1) + self.b.weight
        merged.bias.data = bn.bias - bn.running_mean * scale + self.b.bias
        del self.a, self.b
        self.merged = merged


def test_deploy_method_fallback():
    model = randomized(nn.Sequential(OwnDeployBlock(), nn.ReLU()))
    x = x4(6, 6)
    reference = model(x)
    plan = engine.convert_model(model)
    assert [(e.path, e.rule, e.structure) for e in plan.entries] == [
        ("0", "deploy_method", "reparameterize()")
    ]
    assert model[0].called == 1
    assert rel_error(model(x), reference) < 1e-12
    # Now in deploy form (no norm left): converting again does not call the method again.
    engine.convert_model(model)
    assert model[0].called == 1


def test_structural_rules_win_over_a_blocks_own_method():
    class RepWithMethod(RepVGGBlock):
        def switch_to_deploy(self):  # pragma: no cover - must not be called
            raise AssertionError("structural rule should have handled this block")

    model = randomized(RepWithMethod(4, 4))
    assert engine.convert_model(model).fused_by_rule() == {"repvgg": 1}


def test_register_rule_adds_a_family():
    def match(m):
        return "sum" if {"left", "right"} <= set(dict(m.named_children())) else None

    def fuse(m):
        from repconv.fused_conv import fused_conv_like, replace_children
        from repconv.kernels import add, as_branch

        branch = add(
            [as_branch(m.left.weight, m.left.bias), as_branch(m.right.weight, m.right.bias)]
        )
        replace_children(m, "merged", fused_conv_like(m.left, branch), ["left", "right"])
        return Fused("merged", tuple(branch.kernel.shape), ["left", "right"])

    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            if hasattr(self, "merged"):
                return self.merged(x)
            return self.left(x) + self.right(x)

    rule = Rule("two_convs", "custom", "left + right", match, fuse)
    repconv.register_rule(rule)
    try:
        with pytest.raises(ValueError, match="already registered"):
            repconv.register_rule(rule)
        model = TwoConvs().double().eval()
        x = x4(5, 5)
        reference = model(x)
        assert engine.convert_model(model).fused_by_rule() == {"two_convs": 1}
        assert rel_error(model(x), reference) < 1e-12
    finally:
        unregister_rule("two_convs")


def test_broken_rule_is_caught_by_verification_and_named():
    """A rule that drops a branch: the exact figure is ~1 and the block is named."""

    def drop_identity(m):
        from repconv.rules import repvgg

        m.rbr_identity = None
        return repvgg.fuse(m)

    from repconv.rules import repvgg

    bad = Rule("bad_repvgg", "RepVGG", "drops the identity", repvgg.match, drop_identity)
    model = randomized(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 4)), dtype=torch.float32)
    model[1].rbr_identity = None  # only block 0 is affected by the bug
    result = repconv.convert(model, rules=[bad], input_shape=(4, 8, 8))
    assert not result.passed
    verification = result.verification
    assert verification.to_dict()["exact_max"] > 1e-3
    assert [s["path"] for s in verification.suspects] == ["0"]
    assert "0 (bad_repvgg" in verification.failure_message()


class SummedConvs(nn.Module):
    """Its own forward sums its two convs: the region belongs to this module itself."""

    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.a(x) + self.b(x)))


class DataDependentRoot(nn.Module):
    """fx cannot trace this root (a branch on a value), so its children are traced alone."""

    def __init__(self):
        super().__init__()
        self.block = SummedConvs(4)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1
        return self.block(x)


def test_a_region_of_a_child_traced_alone_is_planned_at_the_childs_path():
    """The region's owner is the traced child itself: its step was planned at "block." (an
    internal error on apply)."""
    model = randomized(DataDependentRoot())
    applied = converted(model, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert [(e.path, e.rule, e.status) for e in applied.entries] == [("block", "dataflow", "fused")]


class WithDeployConvs(nn.Module):
    """super-gradients style: deploy convs built at init that the train forward never calls."""

    def __init__(self, spare_convs: int):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.point = nn.Conv2d(4, 4, 1)
        for i in range(spare_convs):
            self.add_module(f"deploy_{i}", nn.Conv2d(4, 4, 3, padding=1))
        self.spare_1x1 = nn.Conv2d(4, 4, 1)  # unused, but not of the fused shape

    def forward(self, x):
        return torch.relu(self.dense(x) + self.point(x) + x)


def test_the_fold_goes_into_the_one_unused_conv_of_its_shape():
    model = randomized(nn.Sequential(WithDeployConvs(1)))
    converted(model, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert set(model[0].state_dict()) == {
        "deploy_0.weight",
        "deploy_0.bias",
        "spare_1x1.weight",
        "spare_1x1.bias",
    }


def test_with_two_unused_convs_of_its_shape_the_fold_gets_a_conv_of_its_own():
    model = randomized(nn.Sequential(WithDeployConvs(2)))
    converted(model, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    assert {"reparam.weight", "reparam.bias"} <= set(model[0].state_dict())
