"""End to end on a mixed ResNet-style model, in every checkpoint layout users bring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized
from mixed_resnet import build
from safetensors.torch import load_file, save_file

import repconv
from repconv.cli import main

ARCH = str(Path(__file__).with_name("mixed_resnet.py")) + ":build"
SHAPE = "3,24,24"


def train_state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same conv weights every call
    return randomized(build(), seed=1, dtype=dtype).state_dict()


def save_layout(layout: str, path: Path) -> None:
    state = train_state()
    if layout == "plain":
        torch.save(state, path)
    elif layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif layout == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif layout == "compiled_ddp":
        torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, path)
    elif layout == "lightning":
        torch.save({"epoch": 7, "state_dict": state, "optimizer_states": []}, path)
    elif layout in ("model", "model_state_dict", "model_ema", "state_dict_ema", "ema"):
        torch.save({"epoch": 3, layout: state, "lr": 0.1}, path)
    else:
        raise AssertionError(layout)


LAYOUTS = {
    "plain": ".pth",
    "safetensors": ".safetensors",
    "ddp": ".pt",
    "compiled_ddp": ".pth",
    "lightning": ".ckpt",
    "model": ".pth",
    "model_state_dict": ".pth",
    "model_ema": ".pth",
    "state_dict_ema": ".pth",
    "ema": ".pth",
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_converts_and_loads_into_the_deploy_twin(layout, tmp_path):
    source = tmp_path / f"train{LAYOUTS[layout]}"
    save_layout(layout, source)
    out = tmp_path / "deploy.safetensors"
    args = ["convert", str(source), str(out), "--arch", ARCH, "--input-shape", SHAPE, "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["plan"]["fused_by_rule"] == {"acb": 2, "dbb": 3, "repvgg": 1, "conv_bn": 2}
    assert doc["plan"]["warnings"] == []
    assert doc["verification"]["exact_max"] < 1e-12
    state = load_file(out)
    assert not [k for k in state if "running_var" in k or ".bn" in k]

    train, deploy = build().eval(), build(deploy=True).eval()
    train.load_state_dict(train_state())
    deploy.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        want, got = train(x), deploy(x)
    for a, b in [(got["logits"], want["logits"]), (got["features"][0], want["features"][0])]:
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_key_chooses_between_nested_state_dicts(tmp_path):
    source = tmp_path / "both.pth"
    good = train_state()
    torch.save({"state_dict": {"junk": torch.zeros(1)}, "state_dict_ema": good}, source)
    out = tmp_path / "deploy.safetensors"
    base = ["convert", str(source), str(out), "--arch", ARCH, "--input-shape", SHAPE]
    assert CliRunner().invoke(main, base).exit_code == 2  # auto-detect takes state_dict
    result = CliRunner().invoke(main, [*base, "--key", "state_dict_ema", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["source"]["key"] == "state_dict_ema"


def test_python_api_convert_and_load_deploy(tmp_path):
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    save_layout("plain", source)
    result = repconv.convert_file(source, out, arch_spec=ARCH, input_shape=(3, 24, 24))
    assert result.passed and result.plan.fused_by_rule()["dbb"] == 3
    with pytest.raises(repconv.BadInput, match="trust"):
        repconv.load_deploy(out)  # a file spec in the metadata is not run unasked
    model = repconv.load_deploy(out, trust_metadata=True)
    assert set(model.state_dict()) == set(load_file(out))
    from_module = repconv.load_deploy(out, build())
    assert set(from_module.state_dict()) == set(model.state_dict())
    verification, notes = repconv.verify(source, out, input_shape=(3, 24, 24), trust_metadata=True)
    assert verification.passed and notes == {}


def test_verify_dtype_float32_and_no_verify(tmp_path):
    source = tmp_path / "train.pth"
    save_layout("plain", source)
    runner = CliRunner()
    base = ["convert", str(source), "--arch", ARCH, "--input-shape", SHAPE, "--json"]
    result = runner.invoke(
        main, [*base[:2], str(tmp_path / "a.safetensors"), *base[2:], "--verify-dtype", "float32"]
    )
    doc = json.loads(result.output)
    assert result.exit_code == 0 and doc["verification"]["dtype"] == "float32"
    assert doc["verification"]["exact_max"] is None and doc["verification"]["written_max"] < 1e-5
    result = runner.invoke(
        main, [*base[:2], str(tmp_path / "b.safetensors"), *base[2:], "--no-verify"]
    )
    assert result.exit_code == 0 and json.loads(result.output)["verification"] is None
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_writes_nothing(tmp_path):
    source, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    save_layout("plain", source)
    args = ["convert", str(source), str(out), "--arch", ARCH, "--input-shape", SHAPE, "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "nothing written" in result.output
    assert not out.exists()
