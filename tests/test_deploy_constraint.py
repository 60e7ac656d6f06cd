"""The user's deploy model decides: what it keeps live of the train model stays out of the fold."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomized, rel_error
from torch import nn

import repconv
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


class ItemInInit(nn.Module):
    """Drop-path rates read with `.item()` in `__init__` (RepLKNet, UniRepLKNet): no meta build."""

    def __init__(self, deploy: bool = False):
        super().__init__()
        self.rates = [x.item() for x in torch.linspace(0, 0.1, 2)]
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=deploy)
        self.bn = nn.Identity() if deploy else nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_deploy_model_that_cannot_be_built_on_meta_is_built_on_cpu_uninitialised(monkeypatch):
    from repconv import arch

    initialised = []
    real = torch.nn.init.kaiming_uniform_
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: initialised.append(t))
    monkeypatch.setattr(arch, "resolve", lambda spec, flag: ItemInInit)
    with arch.skipping_init():
        assert torch.nn.init.kaiming_uniform_ is not real
    model = arch.build_empty("item_in_init", {"deploy": True})
    assert isinstance(model, ItemInInit) and not model.conv.weight.is_meta
    assert initialised == []  # no initialiser ran on the CPU build
    assert model.rates == pytest.approx([0.0, 0.1])


def test_convert_fills_a_deploy_model_built_on_cpu():
    train = randomized(ItemInInit())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = train(x)
    result = repconv.convert(
        train, deploy_model=ItemInInit(deploy=True).double(), input_shape=[3, 8, 8]
    )
    assert result.passed
    with torch.no_grad():
        assert rel_error(result.model(x), want) < 1e-12


class MethodBlock(nn.Module):
    """conv-BN + a 1x1 conv-BN, summed, then a post-sum `bn` the deploy form may keep; its own
    method folds the branches and, with `folds_post_bn`, the post-sum bn too."""

    def __init__(self, folds_post_bn: bool):
        super().__init__()
        self.folds_post_bn = folds_post_bn
        self.dense = conv_bn(4, 4, 3, padding=1)
        self.point = conv_bn(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if hasattr(self, "fused"):
            y = self.fused(x)
            return y if self.folds_post_bn else self.bn(y)
        return self.bn(self.dense(x) + self.point(x))

    def switch_to_deploy(self):
        from repconv import kernels as K
        from repconv.fused_conv import conv_bn_branch, fused_conv_like, norm_stats

        (dense, geometry), (point, _) = (
            conv_bn_branch((m.conv, m.bn)) for m in (self.dense, self.point)
        )
        branch = K.add([dense, K.pad_to(point, (3, 3))])
        if self.folds_post_bn:
            branch = K.add([K.fold_bn(branch, norm_stats(self.bn))])  # the scale applied
            del self.bn
        self.fused = fused_conv_like(self.dense.conv, branch, geometry)
        del self.dense, self.point


@pytest.mark.parametrize("folds_post_bn", [False, True], ids=["keeps-bn", "folds-bn"])
def test_a_method_must_leave_what_the_deploy_model_keeps(folds_post_bn):
    model = randomized(nn.Sequential(MethodBlock(folds_post_bn)))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    kept_bn = {k: v.clone() for k, v in model[0].bn.state_dict().items()}
    applied = engine.apply(model, engine.plan(model, keep=["0.bn"]))
    method = next(o for o in applied.entries if o.rule == "deploy_method")
    assert all(torch.equal(model[0].bn.state_dict()[k], v) for k, v in kept_bn.items())
    if folds_post_bn:  # undone, and the branches go to the data-flow pass with bn a leaf
        assert method.status == "skipped" and "0.bn, which the deploy model keeps" in method.reason
        assert any(o.rule == "dataflow" and o.status == "fused" for o in applied.entries)
    else:
        assert method.status == "fused" and hasattr(model[0], "fused")
    with torch.no_grad():
        assert rel_error(model(x), want) < 1e-12


class IndexedStem(nn.Module):
    """RepLKNet's layout: `stem` a ModuleList the forward indexes (never calls), `spare` a
    ModuleList it never touches; the deploy form keeps both as the train form has them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.ModuleList([conv_bn(3, 4, 3, padding=1), conv_bn(4, 4, 1)])
        self.spare = nn.ModuleList([conv_bn(4, 4, 1)])

    def forward(self, x):
        x = self.stem[0](x)
        for layer in self.stem[1:]:
            x = layer(x)
        return x


def test_a_module_list_counts_as_run_when_a_module_under_it_runs():
    train = IndexedStem()
    with torch.device("meta"):
        deploy = IndexedStem()
    assert kept_by(deploy, train, (3, 8, 8)) == [""]
    deploy.spare = nn.ModuleList([nn.Conv2d(4, 4, 1)])  # the root no longer matches whole
    assert kept_by(deploy, train, (3, 8, 8)) == ["stem"]


def test_a_train_model_built_on_cpu_keeps_the_checkpoints_dtypes(monkeypatch):
    """The CPU fallback assigns the loaded tensors as the meta build does: a float16
    checkpoint stays float16 (and is written so), not copied into float32 parameters."""
    from repconv import arch

    monkeypatch.setattr(arch, "resolve", lambda spec: ItemInInit)
    state = randomized(ItemInInit(), dtype=torch.float16).state_dict()
    model = arch.build_loaded("item_in_init", {}, state)
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {
        torch.float16
    }


class PreNormFFN(nn.Module):
    """RepLKNet's ConvFFN shape: a BN (`pre_bn`) before a 1x1 conv-BN unit (`pw1`), beside a
    residual the data-flow pass could otherwise fold it into. Its deploy form keeps `pre_bn`
    live and folds only `pw1`'s own BN (the conv gains a bias)."""

    def __init__(self, deploy: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pre_bn = nn.BatchNorm2d(4)
        self.pw1 = nn.Sequential()
        self.pw1.add_module("conv", nn.Conv2d(4, 8, 1, bias=deploy))
        if not deploy:
            self.pw1.add_module("bn", nn.BatchNorm2d(8))

    def forward(self, x):
        x = self.stem(x)
        return x.sum(1, keepdim=True) + torch.nn.functional.gelu(self.pw1(self.pre_bn(x)))


def test_a_live_bn_before_a_1x1_conv_is_not_folded_into_it():
    """Folded into `pw1.conv` while the deploy model also runs it, the BN would apply twice."""
    train = randomized(PreNormFFN())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = train(x)
    kept = {k: v.clone() for k, v in train.pre_bn.state_dict().items()}
    result = repconv.convert(train, deploy_model=PreNormFFN(True).double(), input_shape=[3, 8, 8])
    assert result.passed
    assert all(torch.equal(result.state_dict[f"pre_bn.{k}"], v) for k, v in kept.items())
    with torch.no_grad():
        assert rel_error(result.model(x), want) < 1e-12
