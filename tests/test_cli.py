"""End to end through the command line: convert, verify, inspect, rules, exit codes, JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from repconv.cli import main
from repconv.zoo.demo import DemoNet

HERE = Path(__file__).parent


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def demo_state(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return randomized(DemoNet(), seed=seed, dtype=dtype).state_dict()


@pytest.fixture()
def train_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "train.pth"
    torch.save(demo_state(), path)
    return path


def run(runner: CliRunner, *args: str):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_convert_then_verify_and_load_strictly(runner, train_ckpt, tmp_path):
    out = tmp_path / "deploy.safetensors"
    result = run(runner, "convert", train_ckpt, out, "--arch", "demo_mixed")
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.output
    state = load_file(out)
    assert not any("bn" in k or "rbr_dense" in k or "square" in k for k in state)
    deployed = DemoNet(deploy=True)
    deployed.load_state_dict(state, strict=True)
    train = DemoNet()
    train.load_state_dict(torch.load(train_ckpt, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(deployed.eval()(x), train.eval()(x), rtol=1e-4, atol=1e-4)

    result = run(runner, "verify", train_ckpt, out)
    assert result.exit_code == 0, result.output


def test_metadata_schema(runner, train_ckpt, tmp_path):
    out = tmp_path / "deploy.safetensors"
    assert run(runner, "convert", train_ckpt, out, "--arch", "demo_mixed").exit_code == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert set(meta) == {
        "format",
        "version",
        "torch",
        "arch",
        "arch_kwargs",
        "source_sha256",
        "plan",
        "verification",
        "options",
        "params_before",
        "params_after",
        "tensors_sha256",
    }
    assert meta["format"] == "repconv.deploy/1"
    data = out.read_bytes()
    data_section = data[8 + int.from_bytes(data[:8], "little") :]
    assert meta["tensors_sha256"] == hashlib.sha256(data_section).hexdigest()
    options = json.loads(meta["options"])
    assert options["arch"] == "demo_mixed" and options["samples"] == 2
    assert options["verify_dtype"] == "float64" and options["input_shape"] is None
    assert int(meta["params_before"]) > int(meta["params_after"]) > 0
    assert meta["arch"] == "demo_mixed" and json.loads(meta["arch_kwargs"]) == {}

    assert meta["source_sha256"] == hashlib.sha256(train_ckpt.read_bytes()).hexdigest()
    plan = json.loads(meta["plan"])
    assert plan["fused_by_rule"] == {"acb": 1, "repvgg": 2, "dbb": 2, "conv_bn": 2}
    verification = json.loads(meta["verification"])
    assert verification["passed"] and verification["exact_max"] < 1e-12


def test_json_output_and_determinism(runner, train_ckpt, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    result = run(runner, "convert", train_ckpt, first, "--arch", "demo_mixed", "--json")
    doc = json.loads(result.output)
    assert doc["ok"] and doc["exit_code"] == 0 and doc["output"] == str(first)
    assert doc["params_after"] < doc["params_before"]
    run(runner, "convert", train_ckpt, second, "--arch", "demo_mixed")
    assert first.read_bytes() == second.read_bytes()


def test_a_deploy_checkpoint_is_recognised_and_not_converted_again(runner, train_ckpt, tmp_path):
    out = tmp_path / "deploy.safetensors"
    again = tmp_path / "again.safetensors"
    assert run(runner, "convert", train_ckpt, out, "--arch", "demo_mixed").exit_code == 0
    # The deploy form built directly (deploy=True) holds nothing to fold: said in one line,
    # exit 2, nothing written; --allow-noop makes it exit 0, still writing nothing.
    deploy_arch = ["--arch", "demo_mixed", "--arch-kwargs", '{"deploy": true}']
    result = run(runner, "convert", out, again, *deploy_arch)
    assert result.exit_code == 2 and "already in deploy form" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not again.exists()
    result = run(runner, "convert", out, again, *deploy_arch, "--allow-noop", "--json")
    doc = json.loads(result.output)
    assert result.exit_code == 0 and doc["noop"] and doc["output"] is None
    assert doc["plan"]["blocks"] == [] and not again.exists()
    result = run(runner, "inspect", out, *deploy_arch, "--json")
    assert json.loads(result.output)["form"] == "deploy"
    result = run(runner, "inspect", train_ckpt, "--arch", "demo_mixed", "--json")
    doc = json.loads(result.output)
    assert doc["form"] == "train" and doc["train_blocks"] == len(doc["blocks"]) > 0
    assert {"RepVGG", "DBB", "ACB"} <= set(doc["families"])


def test_inspect_and_rules(runner, train_ckpt):
    result = run(runner, "inspect", train_ckpt, "--arch", "demo_mixed", "--json")
    doc = json.loads(result.output)
    rules = {b["path"]: b["rule"] for b in doc["blocks"]}
    assert rules["acb"] == "acb" and rules["dbb_dw"] == "dbb" and rules["repvgg"] == "repvgg"
    assert rules["stem.conv"] == "conv_bn" and rules["head_conv.0"] == "conv_bn"
    result = run(runner, "rules")
    assert result.exit_code == 0
    names = [line.split()[1] for line in result.output.splitlines()[2:] if line.strip()]
    assert names == ["repvgg", "dbb", "acb", "deploy_method", "dataflow", "conv_bn"]


def test_config_file(runner, train_ckpt, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('arch = "demo_mixed"\ninput_shape = [3, 40, 40]\nsamples = 3\n')
    out = tmp_path / "deploy.safetensors"
    result = run(runner, "convert", train_ckpt, out, "--config", config, "--json")
    doc = json.loads(result.output)
    assert doc["verification"]["input_shape"] == [3, 40, 40]
    assert doc["verification"]["samples"] == 3
    # a flag on the command line wins over the file
    result = run(runner, "convert", train_ckpt, out, "--config", config, "--samples", "1", "--json")
    assert json.loads(result.output)["verification"]["samples"] == 1


def test_verify_detects_a_tampered_deploy_file(runner, train_ckpt, tmp_path):
    out = tmp_path / "deploy.safetensors"
    assert run(runner, "convert", train_ckpt, out, "--arch", "demo_mixed").exit_code == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    state = load_file(out)
    state["dbb.dbb_reparam.bias"] = state["dbb.dbb_reparam.bias"] + 0.5
    save_file(state, out, metadata=meta)
    result = run(runner, "verify", train_ckpt, out, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["passed"] is False


def test_half_precision_checkpoint(runner, tmp_path):
    train = tmp_path / "train16.pth"
    torch.save(demo_state(dtype=torch.float16), train)
    out = tmp_path / "deploy16.safetensors"
    result = run(runner, "convert", train, out, "--arch", "demo_mixed", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["verification"]["exact_max"] < 1e-12
    assert {t.dtype for t in load_file(out).values() if t.is_floating_point()} == {torch.float16}


def test_pth_output(runner, train_ckpt, tmp_path):
    out = tmp_path / "deploy.pt"
    assert run(runner, "convert", train_ckpt, out, "--arch", "demo_mixed").exit_code == 0
    DemoNet(deploy=True).load_state_dict(torch.load(out, weights_only=True), strict=True)


@pytest.mark.slow
def test_byte_identical_across_processes(train_ckpt, tmp_path):
    """Two separate processes (different hash seeds) write the same bytes."""
    import os
    import subprocess
    import sys

    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"p{seed}.safetensors"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        cmd = [sys.executable, "-m", "repconv", "convert", str(train_ckpt), str(out)]
        subprocess.run([*cmd, "--arch", "demo_mixed"], check=True, env=env, capture_output=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
