"""Bad input: exit code 2, a one-line error naming the problem, no output, input untouched."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized
from safetensors.torch import save_file
from torch import nn

from repconv.cli import main
from repconv.files import CorruptZipMember, file_sha256
from repconv.zoo.demo import DemoNet


class Evil:
    """Unpickling this would create a marker file: proof that code from the file ran."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


class WholeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.body(x)


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def demo_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return randomized(DemoNet(), dtype=torch.float32).state_dict()


def expect_bad_input(
    tmp_path: Path, source: Path, *args: str, needle: str, out: Path | None = None
):
    """Run `convert source out args`; check the whole bad-input contract; return the message."""
    out = out or tmp_path / "out" / "deploy.safetensors"
    out.parent.mkdir(exist_ok=True)
    before = digest(source)
    result = CliRunner().invoke(main, ["convert", str(source), str(out), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    if out.resolve() != source.resolve():
        assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert digest(source) == before
    return lines[0]


@pytest.fixture()
def good(tmp_path) -> Path:
    path = tmp_path / "train.pth"
    torch.save(demo_state(), path)
    return path


ARCH = ("--arch", "demo_mixed", "--samples", "1")


def test_missing_file(tmp_path):
    expect_bad_input(tmp_path, tmp_path / "nope.pth", *ARCH, needle="no such file")


def test_directory(tmp_path):
    folder = tmp_path / "dir.pth"
    folder.mkdir()
    expect_bad_input(tmp_path, folder, *ARCH, needle="is a directory")


def test_truncated_empty_text_and_corrupt_files(tmp_path, good):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expect_bad_input(tmp_path, truncated, *ARCH, needle="truncated or not a PyTorch checkpoint")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    expect_bad_input(tmp_path, empty, *ARCH, needle="is empty")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n" * 20)
    expect_bad_input(tmp_path, text, *ARCH, needle="not a PyTorch checkpoint")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(300))
    expect_bad_input(tmp_path, corrupt, *ARCH, needle="not a safetensors file")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def largest_member(path: Path) -> tuple[zipfile.ZipInfo, int]:
    """The zip member holding the most bytes, and where its data starts (past its local header)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.compress_size)
        start_dir = archive.start_dir
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info, info.header_offset + 30 + name_length + extra_length, start_dir


def test_torch_writes_correct_crcs(good):
    with zipfile.ZipFile(good) as archive:
        assert archive.testzip() is None


def test_a_flipped_byte_in_a_tensor_fails_the_crc_check(tmp_path, good):
    info, data_start, _ = largest_member(good)
    assert "/data/" in info.filename
    flip_byte(good, data_start + info.compress_size // 2)
    message = expect_bad_input(tmp_path, good, *ARCH, needle="fails its CRC check")
    assert message == (
        f"error: cannot read train.pth: member {info.filename} fails its CRC check "
        "(file is corrupt)"
    )


def test_a_flipped_byte_in_the_directorys_crc_fails_too(tmp_path, good):
    info, _, start_dir = largest_member(good)
    data = good.read_bytes()
    entry = data.index(info.filename.encode(), start_dir) - 46  # central directory entry
    assert data[entry : entry + 4] == b"PK\x01\x02"
    flip_byte(good, entry + 16)  # its CRC-32 field
    expect_bad_input(tmp_path, good, *ARCH, needle=f"member {info.filename} fails its CRC")


def test_intact_zip_and_legacy_checkpoints_convert(tmp_path, good):
    legacy = tmp_path / "legacy.pth"
    torch.save(demo_state(), legacy, _use_new_zipfile_serialization=False)  # no CRCs to check
    for source in (good, legacy):
        out = tmp_path / f"{source.stem}.safetensors"
        result = CliRunner().invoke(main, ["convert", str(source), str(out), *ARCH])
        assert result.exit_code == 0, result.output
        assert out.is_file()


def test_crc_check_reads_zip64_members(tmp_path):
    path = tmp_path / "zip64.zip"
    payload = os.urandom(5000)
    with zipfile.ZipFile(path, "w") as archive:  # stored, as torch writes
        archive.writestr("small", b"abc")
        with archive.open("big", "w", force_zip64=True) as member:
            member.write(payload)
    assert file_sha256(path, check_zip_crcs=True) == hashlib.sha256(path.read_bytes()).hexdigest()
    info, data_start, _ = largest_member(path)
    # Its local header carries a zip64 extra field (20 bytes) between the name and the data.
    assert info.filename == "big" and data_start == info.header_offset + 30 + len("big") + 20
    flip_byte(path, data_start + 4999)
    with pytest.raises(CorruptZipMember, match="member big fails its CRC check"):
        file_sha256(path, check_zip_crcs=True)
    file_sha256(path)  # without the check it is only hashed


def test_malicious_pickle_never_runs(tmp_path):
    Evil.marker = str(tmp_path / "PWNED")
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": Evil()}}, path)
    expect_bad_input(tmp_path, path, *ARCH, needle="--trust-pickle")
    assert not Path(Evil.marker).exists()


def test_whole_module_needs_trust_pickle(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(randomized(WholeModel(), dtype=torch.float32), path)
    expect_bad_input(tmp_path, path, needle="--trust-pickle")
    out = tmp_path / "deploy.safetensors"
    args = ["convert", str(path), str(out), "--trust-pickle", "--input-shape", "3,8,8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.exists()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_such_pkg.mod:fn", "cannot import 'no_such_pkg.mod'"),
        ("missing_dir/models.py:build", "does not exist"),
        ("repconv.zoo.demo:no_such_fn", "has no attribute 'no_such_fn'"),
        ("resnet9000", "not a built-in model"),
    ],
)
def test_bad_arch(tmp_path, good, spec, needle):
    expect_bad_input(tmp_path, good, "--arch", spec, needle=needle)


def test_arch_file_that_raises_on_import(tmp_path, good):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom at import')\n")
    expect_bad_input(tmp_path, good, "--arch", f"{bad}:build", needle="boom at import")


def test_state_dict_that_does_not_fit(tmp_path):
    state = demo_state()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    state["stem.conv.weight"] = torch.zeros(16, 3, 5, 5)
    path = tmp_path / "misfit.pth"
    torch.save(state, path)
    message = expect_bad_input(tmp_path, path, *ARCH, needle="does not fit")
    assert "fc.bias" in message and "extra.weight" in message and "stem.conv.weight" in message


def test_output_equal_to_input(tmp_path, good):
    expect_bad_input(tmp_path, good, *ARCH, needle="same file as INPUT", out=good)
    other_spelling = tmp_path / "sub" / ".." / "train.pth"
    (tmp_path / "sub").mkdir()
    expect_bad_input(tmp_path, good, *ARCH, needle="same file as INPUT", out=other_spelling)


def test_output_folder_missing_and_bad_extensions(tmp_path, good):
    runner = CliRunner()
    out = tmp_path / "missing" / "deploy.safetensors"
    result = runner.invoke(main, ["convert", str(good), str(out), *ARCH])
    assert result.exit_code == 2 and "does not exist" in result.stderr and not out.exists()
    expect_bad_input(
        tmp_path,
        good,
        *ARCH,
        needle="unknown output extension",
        out=tmp_path / "out" / "model.onnx",
    )
    h5 = tmp_path / "weights.h5"
    h5.write_bytes(good.read_bytes())
    expect_bad_input(tmp_path, h5, *ARCH, needle="unknown extension")


@pytest.mark.parametrize(
    ("tensor", "value", "needle"),
    [
        ("running_var", float("nan"), "NaN"),
        ("running_mean", float("inf"), "Inf"),
        ("running_var", -0.5, "negative"),
    ],
)
def test_corrupt_statistics_name_the_module(tmp_path, tensor, value, needle):
    state = demo_state()
    state[f"repvgg.rbr_dense.bn.{tensor}"][3] = value
    path = tmp_path / "corrupt.pth"
    torch.save(state, path)
    message = expect_bad_input(tmp_path, path, *ARCH, needle="corrupt checkpoint")
    assert "repvgg.rbr_dense.bn" in message and needle in message


UNFOLDABLE = """
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
"""


def test_strict_refuses_unfoldable_norms(tmp_path):
    model_file = tmp_path / "prenorm.py"
    model_file.write_text(textwrap.dedent(UNFOLDABLE))
    path = tmp_path / "prenorm.pth"
    torch.save(
        randomized(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), dtype=torch.float32
        ).state_dict(),
        path,
    )
    args = ("--arch", f"{model_file}:build", "--input-shape", "3,8,8")
    expect_bad_input(tmp_path, path, *args, "--strict", needle="--strict")
    out = tmp_path / "ok.safetensors"
    result = CliRunner().invoke(main, ["convert", str(path), str(out), *args])
    assert result.exit_code == 0 and out.exists()
    assert "warning: 2: norm left in place" in result.stderr


def test_bad_arch_kwargs_and_input_shape(tmp_path, good):
    expect_bad_input(tmp_path, good, *ARCH, "--arch-kwargs", "{oops", needle="not valid JSON")
    expect_bad_input(tmp_path, good, *ARCH, "--arch-kwargs", "[1]", needle="JSON object")
    expect_bad_input(tmp_path, good, *ARCH, "--input-shape", "5,32,32", needle="--input-shape")


def test_key_errors_and_checkpoints_without_tensors(tmp_path):
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": demo_state(), "epoch": 1}, nested)
    message = expect_bad_input(tmp_path, nested, *ARCH, "--key", "nonexistent", needle="no key")
    assert "state_dict" in message and "epoch" in message
    hollow = tmp_path / "hollow.pth"
    torch.save({"epoch": 3}, hollow)
    expect_bad_input(tmp_path, hollow, *ARCH, needle="no state dict")


def test_verbose_shows_a_traceback_and_json_reports_errors(tmp_path):
    source = tmp_path / "nope.pth"
    out = tmp_path / "o.safetensors"
    result = CliRunner().invoke(main, ["convert", str(source), str(out), *ARCH, "-v"])
    assert result.exit_code == 2 and "Traceback" in result.stderr
    result = CliRunner().invoke(main, ["convert", str(source), str(out), *ARCH, "--json"])
    doc = json.loads(result.stdout)
    assert doc == {"ok": False, "exit_code": 2, "error": doc["error"]}
    assert "no such file" in doc["error"]


def test_verify_bad_inputs(tmp_path, good):
    result = CliRunner().invoke(main, ["verify", str(good), str(tmp_path / "none.safetensors")])
    assert result.exit_code == 2 and "no such file" in result.stderr
    misfit = tmp_path / "misfit.safetensors"
    save_file({"fc.weight": torch.zeros(10, 64)}, misfit, metadata={"arch": "demo_mixed"})
    result = CliRunner().invoke(main, ["verify", str(good), str(misfit)])
    # Keys the train checkpoint converts to but the file lacks: the file is not that conversion.
    assert result.exit_code == 1 and "15 missing from the file: stem." in result.stdout
    assert "written not run" in result.stdout


SHIFTED = """
import torch
from torch import nn


class Shifted(nn.Module):
    '''RepVGG-shaped, but the train form adds a constant no fused conv reproduces.'''

    def __init__(self, deploy=False):
        super().__init__()
        self.rbr_dense = nn.Sequential()
        self.rbr_dense.add_module("conv", nn.Conv2d(3, 3, 3, padding=1, bias=False))
        self.rbr_dense.add_module("bn", nn.BatchNorm2d(3))
        self.rbr_1x1 = nn.Sequential()
        self.rbr_1x1.add_module("conv", nn.Conv2d(3, 3, 1, bias=False))
        self.rbr_1x1.add_module("bn", nn.BatchNorm2d(3))
        self.rbr_identity = nn.BatchNorm2d(3)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.rbr_reparam(x)
        return self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x) + 0.1


def build():
    return nn.Sequential(nn.Conv2d(3, 3, 1), Shifted())
"""


def test_failed_verification_writes_nothing_unless_forced(tmp_path):
    model_file = tmp_path / "shifted.py"
    model_file.write_text(textwrap.dedent(SHIFTED))
    namespace: dict = {}
    exec(compile(SHIFTED, "shifted", "exec"), namespace)
    path = tmp_path / "shifted.pth"
    torch.save(namespace["build"]().state_dict(), path)
    out = tmp_path / "deploy.safetensors"
    base = [
        "convert",
        str(path),
        str(out),
        "--arch",
        f"{model_file}:build",
        "--input-shape",
        "3,8,8",
    ]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 1
    assert "verification failed" in result.stderr and "1 (repvgg" in result.stderr
    assert not out.exists()
    result = CliRunner().invoke(main, [*base, "--force"])
    assert result.exit_code == 1 and out.exists()
