"""--input-shape as C,H,W or N,C,H,W, read by the first layer; rejected shapes explained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_robustness import expect_bad_input
from torch import nn

from repconv import arch
from repconv.cli import main
from repconv.zoo.checkpoints import save_train_checkpoint

ARCH = ("--arch", "demo_mixed")


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "train.pth"
    save_train_checkpoint("demo_mixed", path, randomize_bn=True)
    return path


def convert_json(tmp_path: Path, source: Path, shape: str) -> dict:
    out = tmp_path / f"deploy-{shape}.safetensors"
    args = ["convert", str(source), str(out), *ARCH, "--input-shape", shape, "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_both_forms_convert_with_the_same_figures(tmp_path, good):
    plain = convert_json(tmp_path, good, "3,32,32")
    batched = convert_json(tmp_path, good, "1,3,32,32")
    assert plain["verification"] == batched["verification"]
    assert batched["verification"]["input_shape"] == [3, 32, 32]
    # N is dropped: verification always runs --samples inputs of batch 1.
    assert convert_json(tmp_path, good, "8x3x32x32")["verification"] == plain["verification"]


def test_the_first_conv_decides_the_form():
    conv2d = nn.Sequential(nn.Conv2d(3, 4, 3))
    # Ambiguous by value (N == C): the number of sizes decides, read as N,C,H,W.
    assert arch.input_shape_for(conv2d, [3, 3, 16, 16]) == [3, 16, 16]
    assert arch.input_shape_for(conv2d, [3, 16, 16]) == [3, 16, 16]
    # For a 3-d conv, four sizes are C,D,H,W and five are N,C,D,H,W.
    conv3d = nn.Sequential(nn.Conv3d(1, 4, 3))
    assert arch.input_shape_for(conv3d, [1, 8, 16, 16]) == [1, 8, 16, 16]
    assert arch.input_shape_for(conv3d, [2, 1, 8, 16, 16]) == [1, 8, 16, 16]
    # A linear first layer cannot tell a batch from a token axis: taken as written.
    assert arch.input_shape_for(nn.Sequential(nn.Linear(5, 2)), [7, 5]) == [7, 5]
    assert arch.input_shape_for(conv2d, None) == [3, 224, 224]


@pytest.mark.parametrize("shape", ["4,32,32", "1,4,32,32"])
def test_wrong_channels_name_the_first_conv_without_suggesting_the_flag(tmp_path, good, shape):
    message = expect_bad_input(tmp_path, good, *ARCH, "--input-shape", shape, needle="stem")
    assert message == (
        "error: the model expects 3 input channels as [N, 3, H, W] (first conv stem.conv), "
        "got input shape [1, 4, 32, 32]"
    )


class FourChannels(nn.Module):
    """The weights of four.py's model below (whose config claims 3 channels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_default_shape_rejected_suggests_the_flag(tmp_path):
    model_file = tmp_path / "four.py"
    model_file.write_text(
        "from torch import nn\n"
        "class Four(nn.Module):\n"
        "    pretrained_cfg = {'input_size': (3, 16, 16)}\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(4, 4, 3)\n"
        "        self.bn = nn.BatchNorm2d(4)\n"
        "    def forward(self, x):\n"
        "        return self.bn(self.conv(x))\n"
    )
    source = tmp_path / "train.pth"
    torch.save(FourChannels().state_dict(), source)
    message = expect_bad_input(
        tmp_path, source, "--arch", f"{model_file}:Four", needle="set --input-shape"
    )
    assert "expects 4 input channels as [N, 4, H, W] (first conv conv)" in message


def test_verify_and_bench_read_both_forms_and_explain_rejections(tmp_path, good):
    deploy = tmp_path / "deploy.safetensors"
    args = ["convert", str(good), str(deploy), *ARCH, "--input-shape", "3,32,32"]
    assert CliRunner().invoke(main, args).exit_code == 0
    verify = ["verify", str(good), str(deploy), *ARCH, "--json"]
    one = CliRunner().invoke(main, [*verify, "--input-shape", "3,32,32"])
    other = CliRunner().invoke(main, [*verify, "--input-shape", "1,3,32,32"])
    assert one.exit_code == other.exit_code == 0, other.output
    assert json.loads(one.stdout) == json.loads(other.stdout)
    bench = ["bench", str(good), *ARCH, "--runs", "3", "--warmup", "0", "--batch-sizes", "1"]
    for command in (verify, bench):
        result = CliRunner().invoke(main, [*command, "--input-shape", "1,5,32,32"])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (
            "error: the model expects 3 input channels as [N, 3, H, W] (first conv stem.conv), "
            "got input shape [1, 5, 32, 32]"
        )
