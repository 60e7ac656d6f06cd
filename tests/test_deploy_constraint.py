"""The user's deploy model decides: what it keeps live of the train model stays out of the fold."""

from __future__ import annotations

import copy

import torch
from helpers import randomized, rel_error
from torch import nn

from repconv import engine
from repconv.deploy_constraint import kept_by
from repconv.zoo.blocks import RepVGGBlock, conv_bn


def test_a_kept_module_is_left_as_it_is_and_no_step_consumes_its_block():
    model = randomized(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 4)))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    identity = model[0].rbr_identity
    before = {k: v.clone() for k, v in identity.state_dict().items()}
    plan = engine.plan(model, keep=["0.rbr_identity"])
    assert sorted((s.path, s.rule) for s in plan.entries) == [("0", "dataflow"), ("1", "repvgg")]
    assert all("0.rbr_identity" not in s.claims for s in plan.entries)
    engine.apply(model, plan)
    assert model[0].rbr_identity is identity  # still the train module, still run
    assert all(torch.equal(identity.state_dict()[k], v) for k, v in before.items())
    assert not hasattr(model[0], "rbr_dense") and hasattr(model[1], "rbr_reparam")
    with torch.no_grad():
        assert rel_error(model(x), want) < 1e-12


class LivePair(nn.Module):
    """A deploy form keeping `kept` (a conv + BN) live and `dead` built but never run."""

    def __init__(self, fused: bool):
        super().__init__()
        self.kept = conv_bn(4, 4, 3, padding=1)
        self.dead = conv_bn(4, 4, 1)
        self.fused = fused
        if fused:
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.kept(x)
        return self.conv(x) if self.fused else self.dead(x) + x


def test_a_module_the_deploy_forward_does_not_run_is_not_kept():
    train = LivePair(fused=False)
    with torch.device("meta"):
        deploy = LivePair(fused=True)
    assert kept_by(deploy, train, (4, 8, 8)) == ["kept"]
    assert kept_by(copy.deepcopy(train), train, (4, 8, 8)) == [""]
