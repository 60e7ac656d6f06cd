"""Each family's rule on its own: matched by structure, exact, and left in its deploy form."""

from __future__ import annotations

import pytest
import torch
from helpers import randomized, rel_error
from torch import nn

from repconv import engine
from repconv.errors import CorruptCheckpoint
from repconv.verification import BlockProbes
from repconv.zoo.blocks import ACBlock, ConvBN, DiverseBranchBlock, RepVGGBlock

F64_LIMIT = 1e-12


def convert_and_compare(train: nn.Module, deploy: nn.Module, x: torch.Tensor) -> engine.Applied:
    """Convert `train` in place; check exactness and that it loads strictly into `deploy`."""
    with torch.no_grad():
        reference = train(x)
        plan = engine.convert_model(train)
        assert rel_error(train(x), reference) < F64_LIMIT
        assert set(train.state_dict()) == set(deploy.state_dict())
        deploy.to(torch.float64).eval()
        deploy.load_state_dict(train.state_dict(), strict=True)
        assert rel_error(deploy(x), reference) < F64_LIMIT
    return plan


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "groups", "use_se"),
    [
        (8, 8, 3, 1, 1, False),  # with identity
        (8, 16, 3, 2, 1, False),  # no identity: stride 2 and in != out
        (8, 8, 3, 2, 1, False),  # no identity: stride 2
        (8, 8, 3, 1, 4, False),  # grouped, identity with groups
        (8, 8, 3, 1, 8, False),  # depthwise
        (16, 16, 5, 1, 2, True),  # 5x5 with SE
    ],
)
def test_repvgg(cin, cout, k, stride, groups, use_se):
    kw = dict(kernel_size=k, stride=stride, padding=k // 2, groups=groups, use_se=use_se)
    train = randomized(RepVGGBlock(cin, cout, **kw))
    deploy = RepVGGBlock(cin, cout, deploy=True, **kw)
    plan = convert_and_compare(train, deploy, torch.randn(2, cin, 11, 11, dtype=torch.float64))
    assert [(e.path, e.rule, e.status) for e in plan.entries] == [("", "repvgg", "fused")]
    assert not hasattr(train, "rbr_dense") and not hasattr(train, "rbr_identity")
    assert plan.entries[0].kernel_shape == (cout, cin // groups, k, k)


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "padding", "groups", "affine", "mode"),
    [
        (4, 8, 3, 1, 1, 1, True, "zeros"),
        (4, 8, 5, 2, 2, 1, True, "zeros"),
        (8, 8, 3, 1, 1, 8, True, "zeros"),  # depthwise
        (4, 8, 3, 1, 0, 1, True, "zeros"),  # crop 1
        (4, 8, 5, 1, 1, 2, False, "zeros"),  # crop 1, affine=False BNs
        (4, 8, 3, 1, 1, 1, True, "reflect"),
        (4, 4, 3, 1, 1, 1, True, "circular"),
    ],
)
def test_acb(cin, cout, k, stride, padding, groups, affine, mode):
    kw = dict(stride=stride, padding=padding, groups=groups, padding_mode=mode)
    train = randomized(ACBlock(cin, cout, k, use_affine=affine, **kw))
    deploy = ACBlock(cin, cout, k, deploy=True, **kw)
    plan = convert_and_compare(train, deploy, torch.randn(2, cin, 13, 12, dtype=torch.float64))
    assert [(e.rule, e.status) for e in plan.entries] == [("acb", "fused")]
    assert train.deploy is True and not hasattr(train, "square_conv")


def test_block_that_cannot_fold_exactly_is_left_alone_and_reported():
    # A DBB look-alike whose 1x1 -> kxk branch zero-pads after a BN: the border pixels see the
    # BN's shift only partly, which no single conv reproduces.
    block = DiverseBranchBlock(4, 4, 3, padding=1)
    block.dbb_1x1_kxk.bn1 = nn.BatchNorm2d(4)
    block.dbb_1x1_kxk.conv2.padding = (1, 1)
    block = randomized(block)
    x = torch.randn(1, 4, 10, 10, dtype=torch.float64)
    reference = block(x)
    plan = engine.convert_model(block)
    assert plan.entries[0].status == "skipped"
    assert "zero padding" in plan.entries[0].reason
    assert any(w["path"] == "" and "dbb not applied" in w["message"] for w in plan.warnings)
    assert hasattr(block, "dbb_origin") and not hasattr(block, "dbb_reparam")
    assert rel_error(block(x), reference) == 0


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "groups", "internal"),
    [
        (8, 8, 3, 1, 1, None),  # idconv1
        (8, 16, 3, 2, 1, None),
        (8, 8, 3, 1, 2, None),
        (8, 8, 5, 1, 1, 12),  # conv1 with internal channels != in
        (8, 8, 3, 1, 8, None),  # depthwise: no dbb_1x1, avg without conv, 2x internal
        (8, 8, 3, 2, 8, None),  # depthwise, strided
    ],
)
def test_dbb(cin, cout, k, stride, groups, internal):
    kw = dict(stride=stride, padding=k // 2, groups=groups, internal_channels_1x1_3x3=internal)
    train = randomized(DiverseBranchBlock(cin, cout, k, **kw))
    deploy = DiverseBranchBlock(cin, cout, k, deploy=True, **kw)
    plan = convert_and_compare(train, deploy, torch.randn(2, cin, 12, 12, dtype=torch.float64))
    assert [(e.rule, e.status) for e in plan.entries] == [("dbb", "fused")]


def test_convbn_unit():
    train = randomized(ConvBN(4, 8, 3, padding=1, nonlinear=nn.ReLU()))
    deploy = ConvBN(4, 8, 3, padding=1, deploy=True, nonlinear=nn.ReLU())
    plan = convert_and_compare(train, deploy, torch.randn(2, 4, 9, 9, dtype=torch.float64))
    assert [(e.path, e.norm_path, e.rule) for e in plan.entries] == [("conv", "bn", "conv_bn")]


def test_blocks_in_other_codebases_match_by_structure_not_class():
    class MyRepBlock(nn.Module):  # a copy under another name, with nn.Sequential(conv, bn)
        def __init__(self):
            super().__init__()
            self.rbr_dense = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
            self.rbr_identity = nn.BatchNorm2d(4)
            self.act = nn.SiLU()

        def forward(self, x):
            if hasattr(self, "rbr_reparam"):
                return self.act(self.rbr_reparam(x))
            return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x))

    block = randomized(MyRepBlock())
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    reference = block(x)
    plan = engine.convert_model(block)
    assert plan.fused_by_rule() == {"repvgg": 1}
    assert set(block.state_dict()) == {"rbr_reparam.weight", "rbr_reparam.bias"}
    assert rel_error(block(x), reference) < F64_LIMIT


def test_converting_a_deployed_model_is_a_no_op():
    model = randomized(nn.Sequential(RepVGGBlock(4, 4), ACBlock(4, 4, 3, padding=1)))
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    engine.convert_model(model)
    after_first = model(x)
    keys = set(model.state_dict())
    plan = engine.convert_model(model)
    assert plan.entries == [] and plan.warnings == []
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), after_first)


def test_nan_running_var_is_corrupt_and_names_the_module():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model[1].running_var[2] = float("nan")
    with pytest.raises(CorruptCheckpoint, match=r"norm 1 "):
        engine.plan(model)
    model[1].running_var[2] = -1.0
    with pytest.raises(CorruptCheckpoint, match="negative"):
        engine.plan(model)


def test_probe_records_each_blocks_own_error():
    model = randomized(nn.Sequential(RepVGGBlock(4, 4), DiverseBranchBlock(4, 4, 3, padding=1)))
    probes = BlockProbes({"0": [1, 4, 8, 8], "1": [1, 4, 8, 8]})
    applied = engine.apply(model, engine.plan(model), observer=probes)
    assert [e.block_error is not None and e.block_error < F64_LIMIT for e in applied.entries] == [
        True,
        True,
    ]


def test_half_precision_block_keeps_its_dtype():
    block = randomized(RepVGGBlock(4, 4), dtype=torch.float16)
    engine.convert_model(block)
    assert block.rbr_reparam.weight.dtype == torch.float16
    assert block.rbr_reparam.bias.dtype == torch.float16
