"""Names never lie (issue 21): a deploy file read into the train class by the conv-BN convention
(folded norms as Identity, convs gaining the file's bias) computes what the train model does, or
fails that strict load loudly."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized, rel_error
from safetensors.torch import load_file
from torch import nn

import repconv
from repconv import metadata
from repconv.cli import main
from repconv.convention import NamesLie, loaded_by_convention, structure_of
from repconv.files import read_safetensors_metadata
from repconv.modules import param_count
from repconv.rules import dataflow as dataflow_pass
from repconv.zoo.blocks import RepVGGBlock, conv_bn

SHAPE = [4, 8, 8]


class ResidualNorm(nn.Module):
    """y = conv(x); relu(bn(y) + y): the conv's output feeds its BN and a residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y) + y)


class Untraceable(nn.Module):
    """A parent fx cannot trace (control flow on values) around a ResidualNorm."""

    def __init__(self):
        super().__init__()
        self.inner = ResidualNorm()

    def forward(self, x):
        return self.inner(x) if x.sum() > -1e9 else x


class SEGate(nn.Module):
    """MobileNetV3 / RepGhost-style gate: x * relu6(conv_expand(relu(conv_reduce(s))) + 3) / 6."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(4, 4, 3, padding=1)
        self.conv_reduce = nn.Conv2d(4, 2, 1)
        self.conv_expand = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        s = torch.relu(self.conv_reduce(x.mean((2, 3), keepdim=True)))
        return x * (nn.functional.relu6(self.conv_expand(s) + 3) / 6)


class LayerScaled(nn.Module):
    """FastViT-style: x + gamma * fc2(relu(fc1(bn(conv(x))))); the deploy form keeps gamma."""

    def __init__(self):
        super().__init__()
        self.mix = conv_bn(4, 4, 3, padding=1, groups=4)
        self.fc1 = nn.Conv2d(4, 8, 1)
        self.fc2 = nn.Conv2d(8, 4, 1)
        self.layer_scale = nn.Parameter(torch.full((4, 1, 1), 0.1))

    def forward(self, x):
        x = self.mix(x)
        return x + self.layer_scale * self.fc2(torch.relu(self.fc1(x)))


def convert(model: nn.Module):
    train = randomized(model)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        want = train(x)
    structure = structure_of(train)
    result = repconv.convert(train, input_shape=SHAPE)
    assert result.passed
    return result, structure, x, want


def read_by_convention(structure, state):
    wide = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    return loaded_by_convention(structure, wide)


@pytest.mark.parametrize("model", [ResidualNorm, Untraceable], ids=["root", "untraceable"])
def test_a_fold_that_needs_the_rewritten_forward_gets_a_name_of_its_own(model):
    result, structure, _, _ = convert(model())
    assert any(k.endswith("reparam.weight") for k in result.state_dict)
    assert not any(k.endswith("conv.weight") for k in result.state_dict)
    assert read_by_convention(structure, result.state_dict) is None  # the load fails loudly
    assert result.convention is not None and not result.convention.loads


@pytest.mark.parametrize("model", [SEGate, LayerScaled], ids=["se-gate", "layer-scale"])
def test_a_scale_or_constant_on_a_lone_conv_is_not_folded(model):
    result, structure, x, want = convert(model())
    kept = "conv_expand" if model is SEGate else "fc2"
    fused = {o.path for o in result.plan.entries if o.status == "fused"}
    assert fused == {"stem.conv" if model is SEGate else "mix.conv"}  # only the conv -> BN pair
    assert f"{kept}.weight" in result.state_dict
    loaded = read_by_convention(structure, result.state_dict)
    assert loaded is not None and result.convention.loads
    with torch.no_grad():
        assert rel_error(loaded(x), want) < 1e-6


@pytest.fixture
def lying_fold(monkeypatch):
    """The data-flow pass as it was: every region with one conv of the fused shape keeps the
    conv's name, whatever the region computes besides."""
    monkeypatch.setattr(dataflow_pass, "_conv_then_norms", lambda block, region: True)


def test_a_file_whose_names_would_lie_is_an_internal_error(lying_fold):
    with pytest.raises(NamesLie, match="names lie"):
        repconv.convert(randomized(ResidualNorm()), input_shape=SHAPE)


def test_a_lying_block_is_caught_even_when_the_whole_load_fails(lying_fold, tmp_path):
    """A renamed block elsewhere (RepVGG's rbr_reparam) makes the whole-model load fail loudly;
    the block's own check still catches the lying one, and nothing is written."""
    model = randomized(nn.Sequential(RepVGGBlock(4, 4), ResidualNorm()))
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)
    with pytest.raises(NamesLie, match=r"block 1's tensors"):
        repconv.convert(model, input_shape=SHAPE)
    spec = f"{__file__}:two_blocks"
    result = CliRunner().invoke(main, ["convert", str(source), str(out), "--arch", spec])
    assert result.exit_code == 3, result.output
    assert "names lie" in result.stderr and not out.exists()


def two_blocks() -> nn.Module:
    return nn.Sequential(RepVGGBlock(4, 4), ResidualNorm())


def test_the_check_is_recorded_in_the_file_and_json(tmp_path):
    model = randomized(nn.Sequential(conv_bn(4, 4, 3, padding=1), nn.ReLU()))
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)
    spec = f"{__file__}:plain_pair"
    result = CliRunner().invoke(
        main, ["convert", str(source), str(out), "--arch", spec, "--input-shape", "4,8,8", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert '"loads_into_train_class": true' in result.stdout
    assert set(load_file(out)) == {"0.conv.weight", "0.conv.bias"}
    recorded = metadata.read(read_safetensors_metadata(out)).verification["convention"]
    assert recorded == {
        "loads_into_train_class": True,
        "error": pytest.approx(0.0, abs=1e-6),
        "blocks_loading_into_their_class": 0,
    }


def plain_pair() -> nn.Module:
    return nn.Sequential(conv_bn(4, 4, 3, padding=1), nn.ReLU())


@pytest.mark.parametrize(
    ("layers", "answer"),
    [("plain_pair", "yes"), ("two_blocks", "no")],
    ids=["conv-bn", "renamed-block"],
)
def test_convert_and_inspect_show_the_recorded_check(tmp_path, layers, answer):
    """`inspect` of a deploy file shows what it records, from its header alone: no --arch,
    nothing built; `convert` prints the same line."""
    model = randomized(globals()[layers]())
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    torch.save(model.state_dict(), source)
    args = ["convert", str(source), str(out), "--arch", f"{__file__}:{layers}"]
    converted = CliRunner().invoke(main, [*args, "--input-shape", "4,8,8"])
    assert converted.exit_code == 0, converted.output
    line = f"loads into the train class by the conv-BN convention: {answer}"
    assert line in converted.stdout
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert line in shown.stdout and "(as recorded)" in shown.stdout
    as_json = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).stdout)
    assert as_json["recorded"] is True
    assert as_json["convention"]["loads_into_train_class"] is (answer == "yes")
    assert as_json["params_before"] == param_count(model)


class TwoHeads(nn.Module):
    """Two RepVGG-style heads of the same shape summed at the model root: two regions of one
    block. Each fused conv needs the rewritten forward, so each gets a name of its own; the
    second region's conv never moves into a conv the first one consumed (that would name
    the regression head after the classification head's `cls_a.0`)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 3, padding=1)
        self.cls_a, self.cls_b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)
        self.reg_a, self.reg_b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(self.cls_a(x) + self.cls_b(x)), torch.relu(self.reg_a(x) + self.reg_b(x))


def test_a_second_region_never_takes_the_name_of_a_conv_the_first_consumed():
    result = repconv.convert(randomized(TwoHeads()), input_shape=SHAPE)
    assert result.passed
    assert {k.rpartition(".")[0] for k in result.state_dict} == {"stem", "reparam", "reparam_1"}
