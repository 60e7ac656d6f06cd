"""One policy for an existing output path, in `convert` and `batch`: it is replaced by a new
regular file, a symlink there never followed; temp files carry their owner, and a clean-up
removes only its own."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from repconv.batch import load_config
from repconv.batch.task import _remove_partial_outputs, up_to_date
from repconv.cli import main
from repconv.files import remove_temp_files_of, replacing, temp_file_beside
from repconv.zoo.checkpoints import save_train_checkpoint

ARCH = ("--arch", "demo_mixed", "--samples", "1")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def train(tmp_path) -> Path:
    path = tmp_path / "train.pth"
    save_train_checkpoint("demo_mixed", path, randomize_bn=True, seed=1)
    return path


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A file outside the output folder that nobody asked to write."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    target = folder / "precious.safetensors"
    target.write_bytes(b"not yours to write")
    return target


def test_convert_replaces_a_symlinked_output_and_leaves_its_target(tmp_path, train, outside):
    link = tmp_path / "deploy.safetensors"
    link.symlink_to(outside)
    result = CliRunner().invoke(main, ["convert", str(train), str(link), *ARCH])
    assert result.exit_code == 0, result.output
    assert not link.is_symlink() and link.is_file()
    assert outside.read_bytes() == b"not yours to write"
    assert load_file(link)  # the deploy tensors


def test_a_symlink_to_the_input_as_output_is_replaced_not_written_through(tmp_path, train):
    before = digest(train)
    link = tmp_path / "link.pth"
    link.symlink_to(train)
    result = CliRunner().invoke(main, ["convert", str(train), str(link), *ARCH])
    assert result.exit_code == 0, result.output
    assert digest(train) == before and not link.is_symlink()
    assert torch.load(link, weights_only=True)


def _config(folder: Path, output: str) -> Path:
    path = folder / "batch.toml"
    text = f"""
        [[model]]
        input = "train.pth"
        arch = "demo_mixed"
        samples = 1
        output = "{output}"
    """
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_batch_keeps_a_symlinked_output_path_as_given(tmp_path, train, outside):
    link = tmp_path / "deploy" / "train.safetensors"
    link.parent.mkdir()
    link.symlink_to(outside)
    job = load_config(_config(tmp_path, "deploy/{stem}.safetensors")).jobs[0]
    assert Path(job.output) == link  # not the target it points to
    assert up_to_date(job) is None  # a symlink is never taken for an up-to-date output


def test_batch_resolves_a_symlinked_output_folder(tmp_path, train):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "deploy").symlink_to(real)
    job = load_config(_config(tmp_path, "deploy/{stem}.safetensors")).jobs[0]
    assert Path(job.output) == real / "train.safetensors"


@pytest.mark.slow
def test_batch_replaces_a_symlinked_output_and_leaves_its_target(tmp_path, train, outside):
    link = tmp_path / "deploy" / "train.safetensors"
    link.parent.mkdir()
    link.symlink_to(outside)
    config = _config(tmp_path, "deploy/{stem}.safetensors")
    result = CliRunner().invoke(main, ["batch", str(config), "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert outside.read_bytes() == b"not yours to write"
    assert not link.is_symlink() and load_file(link)


def test_temp_files_carry_their_owner(tmp_path):
    output = tmp_path / "out.safetensors"
    fd, tmp = temp_file_beside(output)
    os.close(fd)
    assert Path(tmp).name.startswith(f".out.safetensors.{os.getpid()}.")
    assert Path(tmp).name.endswith(".tmp")
    with replacing(output) as other:
        assert Path(other).name != Path(tmp).name  # a random part apart from the pid


class _DeadWorker:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def test_clean_up_removes_only_its_own_temp_files(tmp_path):
    output = tmp_path / "[odd] out.safetensors"  # glob characters in the name are literal
    mine = tmp_path / f".{output.name}.4242.k3j2h1.tmp"
    theirs = tmp_path / f".{output.name}.4243.a1b2c3.tmp"
    longer_pid = tmp_path / f".{output.name}.42420.a1b2c3.tmp"
    for path in (mine, theirs, longer_pid):
        path.write_bytes(b"half a file")
    _remove_partial_outputs(_DeadWorker(4242), output)
    assert not mine.exists() and theirs.exists() and longer_pid.exists()
    remove_temp_files_of(4243, output)
    assert not theirs.exists() and longer_pid.exists()
