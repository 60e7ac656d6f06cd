"""A deploy file's metadata is data: naming an architecture in it never runs code by itself."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized

import repconv
from repconv import checkpoint
from repconv.cli import main
from repconv.zoo.demo import DemoNet


@pytest.fixture()
def converted(tmp_path: Path) -> tuple[Path, Path]:
    train = tmp_path / "train.pth"
    torch.save(randomized(DemoNet(), dtype=torch.float32).state_dict(), train)
    deploy = tmp_path / "deploy.safetensors"
    result = CliRunner().invoke(
        main, ["convert", str(train), str(deploy), "--arch", "demo_mixed", "--samples", "1"]
    )
    assert result.exit_code == 0, result.output
    return train, deploy


def rewrite_arch(deploy: Path, spec: str, kwargs: dict) -> None:
    """What a hostile file looks like: the same tensors, another architecture recorded."""
    state, meta = checkpoint.read_deploy(deploy)
    meta.update(arch=spec, arch_kwargs=json.dumps(kwargs))
    checkpoint.write_checkpoint(deploy, state, meta)


def shell_command(marker: Path) -> tuple[str, dict]:
    return "subprocess:run", {"args": f"touch {marker}", "shell": True}


def model_file(tmp_path: Path, marker: Path) -> Path:
    """A file spec whose module code, if ever imported, leaves a marker behind."""
    path = tmp_path / "models.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from repconv.zoo.demo import DemoNet

            Path({str(marker)!r}).touch()

            def build():
                return DemoNet()
            """
        )
    )
    return path


def verify(*args: str):
    return CliRunner().invoke(main, ["verify", *map(str, args), "--samples", "1"])


def test_verify_refuses_a_recorded_shell_command(converted, tmp_path):
    train, deploy = converted
    marker = tmp_path / "ran"
    rewrite_arch(deploy, *shell_command(marker))
    result = verify(train, deploy)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "'subprocess:run'" in line and "--trust-metadata" in line
    # the refusal names the spec and the option to pass it as, but hands over no command line
    # that would run the file's payload
    assert "pass it yourself as --arch" in line
    assert "--arch subprocess:run" not in line and "--arch-kwargs" not in line
    assert "touch" not in line  # the recorded kwargs (the payload) are not quoted either
    assert not marker.exists()


def test_a_refusal_shows_control_characters_escaped_on_one_line(converted, tmp_path):
    """A recorded arch holding ESC/CR (which on a terminal erase the error line) is shown with
    its escapes visible, and no command line is suggested."""
    train, deploy = converted
    marker = tmp_path / "ran"
    _, kwargs = shell_command(marker)
    rewrite_arch(deploy, "subprocess:run\x1b[2K\rverification passed", kwargs)
    result = verify(train, deploy)
    assert result.exit_code == 2, result.output
    assert "\x1b" not in result.stderr and "\r" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "'subprocess:run\\x1b[2K\\rverification passed'" in lines[0]
    assert "--arch '" not in lines[0] and "--arch-kwargs" not in lines[0]
    assert "--trust-metadata" in lines[0]
    with pytest.raises(repconv.BadInput) as refused:
        repconv.load_deploy(deploy)
    assert "\x1b" not in str(refused.value) and "\\x1b[2K\\r" in str(refused.value)
    assert not marker.exists()


def test_verify_refuses_a_recorded_file_and_never_imports_it(converted, tmp_path):
    train, deploy = converted
    marker = tmp_path / "imported"
    rewrite_arch(deploy, f"{model_file(tmp_path, marker)}:build", {})
    assert verify(train, deploy).exit_code == 2
    assert not marker.exists()


def test_load_deploy_refuses_what_metadata_names(converted, tmp_path):
    _, deploy = converted
    marker = tmp_path / "ran"
    rewrite_arch(deploy, *shell_command(marker))
    with pytest.raises(repconv.BadInput, match="--trust-metadata"):
        repconv.load_deploy(deploy)
    assert not marker.exists()


def test_trust_is_given_on_the_command_line(converted, tmp_path):
    train, deploy = converted
    marker = tmp_path / "imported"
    spec = f"{model_file(tmp_path, marker)}:build"
    rewrite_arch(deploy, spec, {})
    result = verify(train, deploy, "--trust-metadata")
    assert result.exit_code == 0, result.output
    assert marker.exists()
    marker.unlink()
    assert verify(train, deploy, "--arch", spec).exit_code == 0
    assert marker.exists()
    marker.unlink()
    assert isinstance(repconv.load_deploy(deploy, trust_metadata=True), DemoNet)
    assert marker.exists()


def test_a_recorded_zoo_name_needs_no_trust(converted):
    train, deploy = converted
    assert verify(train, deploy).exit_code == 0
    assert isinstance(repconv.load_deploy(deploy), DemoNet)


def test_bad_json_in_recorded_kwargs_is_bad_input(converted):
    train, deploy = converted
    state, meta = checkpoint.read_deploy(deploy)
    meta["arch_kwargs"] = "{not json"
    checkpoint.write_checkpoint(deploy, state, meta)
    result = verify(train, deploy)
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == "error: deploy.safetensors: metadata 'arch_kwargs' is not valid JSON"
    )


def test_recorded_kwargs_go_only_with_the_recorded_architecture(converted, tmp_path):
    train, deploy = converted
    rewrite_arch(deploy, *shell_command(tmp_path / "ran"))
    # the user's own --arch is built with its own (no) kwargs, not the file's
    assert verify(train, deploy, "--arch", "demo_mixed").exit_code == 0
    state, meta = checkpoint.read_deploy(deploy)
    meta.update(arch="demo_mixed", arch_kwargs=json.dumps({"unknown": 1}))
    checkpoint.write_checkpoint(deploy, state, meta)
    result = verify(train, deploy, "--arch", "demo_mixed")  # same arch: the recorded kwargs
    assert result.exit_code == 2 and "unexpected keyword argument 'unknown'" in result.stderr
