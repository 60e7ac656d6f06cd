"""Without a deploy model, the file is the library's own deploy form (issue 21): a model whose
blocks carry deploy methods keeps its plain conv + BN pairs live, as the library's deploy
constructor does, so the file loads strictly into that constructor's model.

The copy below follows timm's FastViT (`RepMixerBlock`: a re-parameterizable token mixer with
`reparameterize()`, then `ConvMlp`, whose `conv` is a conv + BN pair that timm's reparameterized
model keeps, and a layer scale the deploy form keeps too); `inference_mode=True` is its deploy
constructor; its conv + BN units are `method_blocks.ConvNorm` (timm's ConvNormAct without an act).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import by_conv_bn_convention, randomized, rel_error
from method_blocks import ConvNorm, folded
from torch import nn
from torch.nn import functional as F

import repconv
from repconv.cli import main
from repconv.deploy_form import PLAIN_PAIRS_KEPT, carries_own_deploy_form
from repconv.options import ConvertOptions

DIM, SHAPE = 4, [4, 8, 8]


def _folded(branch: ConvNorm, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = folded(branch.conv, branch.bn)
    pad = (k - weight.shape[-1]) // 2
    return F.pad(weight, [pad] * 4), bias


class TokenMixer(nn.Module):
    """A depthwise kxk + 1x1 + identity-BN sum, with its own `reparameterize()` (MobileOne's)."""

    def __init__(self, dim: int, k: int = 3, inference_mode: bool = False):
        super().__init__()
        self.k = k
        if inference_mode:
            self.reparam_conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        else:
            self.reparam_conv = None
            self.conv_kxk = nn.ModuleList([ConvNorm(dim, dim, k, groups=dim)])
            self.conv_scale = ConvNorm(dim, dim, 1, groups=dim)
            self.identity = nn.BatchNorm2d(dim)

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        out = self.conv_scale(x) + self.identity(x)
        for branch in self.conv_kxk:
            out = out + branch(x)
        return out

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        weights, biases = zip(
            _folded(self.conv_kxk[0], self.k), _folded(self.conv_scale, self.k), self._identity()
        )
        conv = self.conv_kxk[0].conv
        self.reparam_conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, self.k, padding=self.k // 2, groups=conv.groups
        ).to(conv.weight.dtype)
        self.reparam_conv.weight.data = sum(weights)
        self.reparam_conv.bias.data = sum(biases)
        for name in ("conv_kxk", "conv_scale", "identity"):
            delattr(self, name)

    def _identity(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn, dim = self.identity, self.identity.num_features
        kernel = torch.zeros(dim, 1, self.k, self.k, dtype=bn.weight.dtype)
        kernel[:, 0, self.k // 2, self.k // 2] = 1
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv = ConvNorm(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x * self.gamma


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, inference_mode: bool = False):
        super().__init__()
        self.token_mixer = TokenMixer(dim, inference_mode=inference_mode)
        self.mlp = ConvMlp(dim, 2 * dim)
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale(self.mlp(x))


class TinyFastViT(nn.Module):
    def __init__(self, inference_mode: bool = False):
        super().__init__()
        self.stages = nn.Sequential(*(RepMixerBlock(DIM, inference_mode) for _ in range(2)))

    def forward(self, x):
        return self.stages(x)


def deploy_model() -> TinyFastViT:
    return TinyFastViT(inference_mode=True).double().eval()


def converted(**options):
    train = randomized(TinyFastViT())
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        want = train(x)
    result = repconv.convert(train, input_shape=SHAPE, **options)
    assert result.passed, result.verification.failure_message()
    return result, x, want


def test_the_default_file_loads_strictly_into_the_librarys_deploy_model():
    result, x, want = converted()
    assert {o.rule for o in result.plan.entries} == {"deploy_method"}
    deploy = deploy_model()
    deploy.load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        assert rel_error(deploy(x), want) < 1e-12
    kept = {w["path"] for w in result.plan.warnings if PLAIN_PAIRS_KEPT in w["message"]}
    assert kept == {f"stages.{i}.mlp.conv.bn" for i in range(2)}
    # `reparam_conv` is the deploy class's name, None in the train class: that load fails loudly
    assert result.convention is not None and not result.convention.loads


def test_fold_plain_bn_folds_them_by_the_conv_bn_convention():
    result, x, want = converted(fold_plain_bn=True)
    assert not any(k.endswith("mlp.conv.bn.weight") for k in result.state_dict)
    with pytest.raises(RuntimeError, match="Missing key"):
        deploy_model().load_state_dict(result.state_dict, strict=True)
    loaded = by_conv_bn_convention(deploy_model(), result.state_dict)  # the deploy class's names
    assert loaded is not None
    with torch.no_grad():
        assert rel_error(loaded.double()(x), want) < 1e-12


def test_a_model_without_deploy_methods_has_its_pairs_folded():
    plain = nn.Sequential(ConvNorm(DIM, DIM, 3), nn.ReLU())
    assert not carries_own_deploy_form(plain) and carries_own_deploy_form(TinyFastViT())
    result = repconv.convert(randomized(plain), input_shape=SHAPE)
    assert [o.rule for o in result.plan.entries] == ["conv_bn"]
    assert result.plan.record().left_out == {}


def test_the_rebuild_and_verify_replay_the_form_the_file_records(tmp_path):
    train = randomized(TinyFastViT(), dtype=torch.float32)
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    torch.save(train.state_dict(), source)
    spec = f"{__file__}:TinyFastViT"
    for extra in ([], ["--fold-plain-bn"]):
        args = ["convert", str(source), str(out), "--arch", spec, "--samples", "1", *extra]
        assert CliRunner().invoke(main, args).exit_code == 0
        verified = CliRunner().invoke(main, ["verify", str(source), str(out), "--arch", spec])
        assert verified.exit_code == 0, verified.output
        rebuilt = repconv.load_deploy(out, spec)
        live = any(k.endswith("mlp.conv.bn.weight") for k in rebuilt.state_dict())
        assert live is not extra


def test_fold_plain_bn_with_a_deploy_model_is_refused():
    with pytest.raises(repconv.BadInput, match="--fold-plain-bn"):
        ConvertOptions(deploy_arch="x:y", fold_plain_bn=True)
