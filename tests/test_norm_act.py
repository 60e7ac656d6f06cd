"""timm-style norm-plus-activation modules: the norm folds into its conv, drop and act stay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import randomized, rel_error
from norm_act_net import (
    FrozenBatchNormAct2dCopy,
    NormAct2d,
    ScaledNormAct2d,
    ShiftedFrozenBatchNormAct2dCopy,
    build,
    build_frozen,
)
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repconv
from repconv import engine
from repconv.modules import NormActTail, is_frozen_norm, is_norm_act, is_norm_like

ARCH = str(Path(__file__).with_name("norm_act_net.py")) + ":build"


def norms_in(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if isinstance(m, _BatchNorm)]


def converted_keeping_activation(model: nn.Module, norms_in) -> engine.Applied:
    """Convert; exact; both norms folded; the first stage still applies its ReLU."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        applied = engine.convert_model(model)
        assert rel_error(model(x), reference) < 1e-12
    assert [(e.path, e.norm_path, e.status) for e in applied.entries] == [
        ("0", "1", "fused"),
        ("2", "3", "fused"),
    ]
    assert norms_in(model) == [] and applied.warnings == []
    assert isinstance(model[1], NormActTail) and isinstance(model[1].act, nn.ReLU)
    with torch.no_grad():  # the ReLU is still applied: the first stage never goes negative
        first = model[1](model[0](x))
        assert float(first.min()) == 0.0 and float(model[0](x).min()) < 0
    return applied


def test_norm_act_folds_exactly_and_keeps_its_activation():
    torch.manual_seed(0)
    model = randomized(build())
    converted_keeping_activation(model, norms_in)
    assert isinstance(model[3].act, nn.Identity)


def test_norm_act_with_other_math_is_left_and_warned():
    model = randomized(build(ScaledNormAct2d))
    assert not is_norm_act(model[1])
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        applied = engine.convert_model(model)
        assert rel_error(model(x), reference) < 1e-12
    assert [e.status for e in applied.entries] == []
    assert norms_in(model) == ["1", "3"]
    assert all("overrides forward" in w["message"] for w in applied.warnings)
    assert len(applied.warnings) == 2


def test_norm_act_recognition_is_precise():
    assert is_norm_act(NormAct2d(4, nn.SiLU()))
    assert not is_norm_act(nn.BatchNorm2d(4))  # plain: folded as before, no tail
    extra = NormAct2d(4)
    extra.gate = nn.Sigmoid()  # a third child may change the math
    assert not is_norm_act(extra)
    with torch.device("meta"):  # judged the same on the meta device (load_deploy's rebuild)
        assert is_norm_act(NormAct2d(4, nn.ReLU()))
        assert not is_norm_act(ScaledNormAct2d(4, nn.ReLU()))


def test_norm_act_deploy_file_round_trips(tmp_path):
    torch.manual_seed(0)
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    torch.save(randomized(build(), dtype=torch.float32).state_dict(), source)
    result = repconv.convert_file(source, out, arch_spec=ARCH, input_shape=(3, 8, 8))
    assert result.passed and result.plan.fused_by_rule() == {"conv_bn": 2}
    written = load_file(out)
    assert not any("running_mean" in key for key in written)
    for model in [repconv.load_deploy(out, trust_metadata=True), repconv.load_deploy(out, build())]:
        assert set(model.state_dict()) == set(written) and norms_in(model) == []
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert rel_error(model.eval()(x), result.model(x)) < 1e-6


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU()])
def test_norm_act_in_a_traced_block(act):
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, padding=1)
            self.bn = NormAct2d(5, act)

        def forward(self, x):
            return self.bn(self.conv(x)) + 1

    model = randomized(Stem())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        engine.convert_model(model)
        assert rel_error(model(x), reference) < 1e-12
    assert isinstance(model.bn, NormActTail) and norms_in(model) == []


FROZEN_ARCH = str(Path(__file__).with_name("norm_act_net.py")) + ":build_frozen"


def frozen_norms_in(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if is_norm_like(m)]


def randomized_frozen(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Random convs and random frozen statistics (randomized() knows only _BatchNorm)."""
    generator = torch.Generator().manual_seed(1)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNormAct2dCopy):
                n = module.weight.numel()
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator))
                module.running_mean.copy_(torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model


def test_frozen_norm_act_folds_exactly_and_keeps_its_activation():
    torch.manual_seed(0)
    converted_keeping_activation(randomized_frozen(build_frozen()), frozen_norms_in)


def test_frozen_norm_act_is_not_a_plain_frozen_norm():
    # A plain frozen norm would become Identity and lose the activation.
    assert not is_frozen_norm(FrozenBatchNormAct2dCopy(4, nn.ReLU()))
    assert is_norm_like(FrozenBatchNormAct2dCopy(4, nn.ReLU()))
    assert is_norm_act(FrozenBatchNormAct2dCopy(4, nn.ReLU()))
    assert not is_norm_act(ShiftedFrozenBatchNormAct2dCopy(4, nn.ReLU()))
    with torch.device("meta"):
        assert is_norm_act(FrozenBatchNormAct2dCopy(4, nn.ReLU()))


def test_frozen_norm_act_with_other_math_is_left_and_warned():
    model = randomized_frozen(build_frozen("shifted"))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        applied = engine.convert_model(model)
        assert rel_error(model(x), reference) < 1e-12
    assert applied.entries == [] and frozen_norms_in(model) == ["1", "3"]
    assert len(applied.warnings) == 2


def test_frozen_norm_act_deploy_file_round_trips(tmp_path):
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    torch.save(randomized_frozen(build_frozen(), torch.float32).state_dict(), source)
    result = repconv.convert_file(source, out, arch_spec=FROZEN_ARCH, input_shape=(3, 8, 8))
    assert result.passed and result.plan.fused_by_rule() == {"conv_bn": 2}
    written = load_file(out)
    assert not any("running_mean" in key for key in written)
    rebuilt = [
        repconv.load_deploy(out, trust_metadata=True),
        repconv.load_deploy(out, build_frozen()),
    ]
    for model in rebuilt:
        assert set(model.state_dict()) == set(written) and frozen_norms_in(model) == []
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert rel_error(model.eval()(x), result.model(x)) < 1e-6
