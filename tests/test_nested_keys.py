"""Nested checkpoints: a misfit hints at the shared prefix or the entry that fits, `verify`
reads the train file with the --key the deploy file records, and the text says which key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import demo_state, one_line

from repconv.cli import main

ARCH = ("--arch", "demo_mixed", "--samples", "1")


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def lightning(tmp_path) -> Path:
    """As Lightning saves a module holding the net as `self.model`, with an EMA copy."""
    state = demo_state()
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "epoch": 7,
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "state_dict_ema": dict(state),
        },
        path,
    )
    return path


def test_a_misfit_names_the_nested_entry_that_fits(tmp_path, lightning):
    line = one_line(run("convert", lightning, tmp_path / "out.safetensors", *ARCH))
    assert "does not fit the architecture" in line
    assert "the file's entry 'state_dict_ema' fits: pass --key state_dict_ema" in line


def test_a_misfit_names_the_prefix_every_unexpected_key_shares(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in demo_state().items()}}, path)
    line = one_line(run("convert", path, tmp_path / "out.safetensors", *ARCH))
    assert "every unexpected key starts with 'model.'" in line
    assert "removeprefix('model.')" in line


def test_text_says_which_key_it_read_and_verify_reuses_the_recorded_key(tmp_path, lightning):
    deploy = tmp_path / "deploy.safetensors"
    result = run("convert", lightning, deploy, *ARCH, "--key", "state_dict_ema")
    assert result.exit_code == 0, result.output
    assert "read the weights of last.ckpt under key 'state_dict_ema'" in result.stdout
    # Without --key, verify reads the train file as the conversion did (else 'state_dict',
    # the first usual key, would be read and would not fit).
    result = run("verify", lightning, deploy, "--samples", "1")
    assert result.exit_code == 0, result.output
    assert (
        "note: read the weights of last.ckpt under key 'state_dict_ema' "
        "(the --key deploy.safetensors records)"
    ) in result.stderr
    result = run("verify", lightning, deploy, "--samples", "1", "--json")
    assert result.exit_code == 0, result.output
    assert "state_dict_ema" in json.loads(result.stdout)["notes"]["key"]
    # A --key given wins over the recorded one.
    line = one_line(run("verify", lightning, deploy, "--samples", "1", "--key", "state_dict"))
    assert "does not fit" in line
