"""Messages that name the real cause: numpy values beside the weights (which key to pass), a
pickled object (under which key), a signal after the output is complete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import demo_state, one_line
from safetensors.torch import load_file

from repconv import checkpoint, files
from repconv.cli import main
from repconv.interrupts import EXIT_TERMINATED, Terminated
from repconv.pickle_scan import top_level

ARCH = ("--arch", "demo_mixed", "--samples", "1")
REPO = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this would create a marker file: proof that code from the file ran."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def convert(source: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["convert", str(source), str(out), *ARCH, *args])


@pytest.fixture()
def with_numpy(tmp_path) -> Path:
    path = tmp_path / "train.pth"
    torch.save({"state_dict": demo_state(), "best_acc": np.float64(0.93), "epoch": 3}, path)
    return path


def test_numpy_values_name_their_key_and_the_key_to_pass(tmp_path, with_numpy):
    out = tmp_path / "out.safetensors"
    line = one_line(convert(with_numpy, out))
    assert "key 'best_acc' holds numpy values" in line
    assert "pass --key state_dict" in line and "safe_globals" in line
    assert "whole model" not in line and not out.exists()


def test_with_the_key_of_the_weights_numpy_values_beside_them_read_as_numbers(tmp_path, with_numpy):
    out = tmp_path / "out.safetensors"
    result = convert(with_numpy, out, "--key", "state_dict")
    assert result.exit_code == 0, result.output
    assert load_file(out)
    # A key holding the numpy values themselves is no way round: the same message.
    line = one_line(convert(with_numpy, tmp_path / "other.safetensors", "--key", "best_acc"))
    assert "pass --key state_dict" in line


def test_a_pickled_object_names_the_key_it_is_under_and_never_runs(tmp_path):
    Evil.marker = str(tmp_path / "PWNED")
    path = tmp_path / "train.pth"
    torch.save({"state_dict": demo_state(), "extra": {"hook": Evil()}}, path)
    for key in (None, "state_dict"):  # --key does not let an object that runs code through
        args = () if key is None else ("--key", key)
        line = one_line(convert(path, tmp_path / "out.safetensors", *args))
        assert "--trust-pickle" in line and "found under key 'extra'" in line, line
    scan = top_level(path, ["os.makedirs"])
    assert scan.refused == {"extra": ("os.makedirs",)} and scan.weights == ("state_dict",)
    assert not Path(Evil.marker).exists()


def test_a_signal_after_the_output_is_complete_says_so(tmp_path, monkeypatch):
    train, out = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    torch.save(demo_state(), train)
    real_write = checkpoint.write_checkpoint

    def write_then_terminated(*args, **kwargs):
        real_write(*args, **kwargs)
        raise Terminated()  # SIGTERM arrives just after the rename

    monkeypatch.setattr(checkpoint, "write_checkpoint", write_then_terminated)
    result = convert(train, out)
    assert result.exit_code == EXIT_TERMINATED
    assert result.stderr.strip() == f"error: terminated after writing {out} (complete)"
    assert load_file(out)


def test_a_signal_right_after_the_rename_still_counts_the_file(tmp_path, monkeypatch):
    out = tmp_path / "file.txt"
    real_replace = os.replace

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", replace_then_signal)
    mark = files.writes_so_far()
    with pytest.raises(KeyboardInterrupt):
        files.write_text_atomically(out, "whole")
    assert files.completed_since(mark) == [out] and out.read_text() == "whole"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
def test_a_signal_once_the_command_is_done_exits_with_its_code():
    # The entry point, once a command has finished: a SIGTERM while the interpreter shuts
    # down ends the process with the command's own code, not a silent 143.
    code = (
        "import os, signal, sys, time\n"
        "from repconv import cli\n"
        "sys.argv = ['repconv', 'rules']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done
    assert "repvgg" in done.stdout and not done.stderr
