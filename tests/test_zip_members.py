"""Zip checkpoints read as torch.load without mmap reads them: compressed members decompressed
(never mapped as tensor data), every member's CRC checked, decompressed sizes bounded first."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import demo_state
from safetensors.torch import load_file

from repconv import checkpoint
from repconv.cli import main
from repconv.files import CorruptZipMember, ZipRefused, checked_read

ARCH = ("--arch", "demo_mixed", "--samples", "1")


def rezip(source: Path, target: Path, method: int = zipfile.ZIP_DEFLATED, only=None) -> Path:
    """`source`'s members written again, compressed with `method` (those `only` accepts)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            chosen = method if only is None or only(info.filename) else zipfile.ZIP_STORED
            new.writestr(info.filename, old.read(info.filename), compress_type=chosen)
    return target


@pytest.fixture()
def good(tmp_path) -> Path:
    path = tmp_path / "train.pth"
    torch.save(demo_state(), path)
    return path


def convert(source: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["convert", str(source), str(out), *ARCH, *args])


def one_error_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("which", ["tensors", "all"])
def test_deflated_members_give_the_weights_torch_reads(tmp_path, good, which):
    only = (lambda name: "/data/" in name) if which == "tensors" else None
    deflated = rezip(good, tmp_path / "deflated.pth", only=only)
    assert checked_read(deflated).compressed  # the fix's trigger: read whole, not mapped
    loaded = checkpoint.read_checkpoint(deflated)
    for key, value in demo_state().items():
        assert torch.equal(loaded.state_dict[key], value), key
    outputs = []
    for source in (good, deflated):
        out = tmp_path / f"{source.stem}.safetensors"
        result = convert(source, out)
        assert result.exit_code == 0, result.output
        outputs.append(load_file(out))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def test_a_flipped_byte_in_a_deflated_member_fails_its_crc(tmp_path, good):
    deflated = rezip(good, tmp_path / "deflated.pth", only=lambda name: name.endswith("data/0"))
    with zipfile.ZipFile(deflated) as archive:
        info = archive.getinfo(next(n for n in archive.namelist() if n.endswith("data/0")))
    data = bytearray(deflated.read_bytes())
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26 : local + 30])
    start = local + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0x01
    deflated.write_bytes(bytes(data))
    with pytest.raises(CorruptZipMember, match=info.filename):
        checked_read(deflated)
    out = tmp_path / "out.safetensors"
    line = one_error_line(convert(deflated, out), f"member {info.filename}")
    assert "file is corrupt" in line and not out.exists()


def test_a_member_torch_cannot_decompress_is_refused_by_name(tmp_path, good):
    packed = rezip(good, tmp_path / "bz.pth", zipfile.ZIP_BZIP2, only=lambda n: "/data/" in n)
    out = tmp_path / "out.safetensors"
    line = one_error_line(convert(packed, out), "is compressed with bzip2")
    assert "member " in line and "/data/" in line and not out.exists()


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.pth"
    state = {"w": torch.zeros(4 << 20)}  # 16 MiB of zeros: a few KiB deflated
    torch.save(state, tmp_path / "plain.pth")
    rezip(tmp_path / "plain.pth", bomb)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ZipRefused, match="more than the 1048576 bytes of memory available"):
        checked_read(bomb, memory=1 << 20)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1 << 20)
    out = tmp_path / "out.safetensors"
    one_error_line(convert(bomb, out), "would take")
    assert not out.exists()


def _patch_directory_size(path: Path, member_suffix: str, size: int) -> None:
    """Rewrite the uncompressed size the central directory records for one member."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(member_suffix))
        entry = data.index(name.encode(), archive.start_dir) - 46
    assert data[entry : entry + 4] == b"PK\x01\x02"
    data[entry + 24 : entry + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(data))


def test_a_directory_that_lies_about_a_deflated_size_is_corrupt(tmp_path, good):
    deflated = rezip(good, tmp_path / "deflated.pth", only=lambda n: n.endswith("data/0"))
    _patch_directory_size(deflated, "data/0", 8)  # the data decompresses to more
    with pytest.raises(CorruptZipMember, match="holds more than the 8 bytes recorded"):
        checked_read(deflated)
    _patch_directory_size(deflated, "data/0", 0xFFFFFFF0)  # more than deflate can give
    with pytest.raises(CorruptZipMember, match="more than deflate can give"):
        checked_read(deflated)


def test_a_torchscript_archive_says_what_it_is(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 3)), path)
    out = tmp_path / "out.safetensors"
    line = one_error_line(convert(path, out), "is a TorchScript archive")
    assert "truncated" not in line and not out.exists()
