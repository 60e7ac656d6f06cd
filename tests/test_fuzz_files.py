"""Random damage to a small .pth zip and .safetensors files, through `convert` and `verify`:
every run ends in exit 0 with the right weights (exit 1 from `verify` only for a deploy file
whose tensors really differ), or exit 2 with one line, nothing written and the input untouched.

Seeded, so a failure names a case that can be replayed: `CASES` mutations per file kind
(REPCONV_FUZZ_CASES=400 for a longer run).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from repconv import pipeline
from repconv.cli import main

CASES = int(os.environ.get("REPCONV_FUZZ_CASES", "40"))
SHAPE = "3,8,8"

TINY_NET = """
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 2, 1, bias=False), nn.BatchNorm2d(2),
    )
"""


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = _net()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    return net.state_dict()


def _net() -> nn.Module:
    namespace: dict = {}
    exec(TINY_NET, namespace)  # the test's own model source, written below for --arch
    return namespace["build"]()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The tiny net's source, its train checkpoint in both formats, and a good deploy file."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "tiny.py").write_text(textwrap.dedent(TINY_NET))
    state = tiny_state()
    torch.save(state, folder / "train.pth")
    save_file(state, folder / "train.safetensors")
    args = ["--arch", f"{folder / 'tiny.py'}:build", "--input-shape", SHAPE, "--samples", "1"]
    deploy = folder / "deploy.safetensors"
    result = CliRunner().invoke(main, ["convert", str(folder / "train.pth"), str(deploy), *args])
    assert result.exit_code == 0, result.output
    return {"folder": folder, "args": args, "state": state, "deploy": load_file(deploy)}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)


def _truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data)) :]


def _zip_field(data: bytearray, rng: random.Random) -> None:
    """A random field of a local header, a directory entry or the end record, set at random
    (sizes, offsets, name lengths, methods, CRCs)."""
    signatures = [b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"]
    spots = [i for sig in signatures for i in _find_all(data, sig)]
    spot = rng.choice(spots)
    offset = spot + rng.choice([4, 6, 8, 10, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 42])
    width = rng.choice([1, 2, 4])
    value = rng.choice([0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, rng.getrandbits(8 * width)])
    data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def _find_all(data: bytearray, needle: bytes) -> list[int]:
    found, start = [], data.find(needle)
    while start != -1:
        found.append(start)
        start = data.find(needle, start + 1)
    return found


def _deflated(source: bytes, rng: random.Random) -> bytearray:
    """The same archive with some (or all) members deflated, as re-zipping tools write it."""
    import io

    chosen = rng.random()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(source)) as old, zipfile.ZipFile(out, "w") as new:
        for info in old.infolist():
            method = zipfile.ZIP_DEFLATED if rng.random() < chosen else zipfile.ZIP_STORED
            new.writestr(info.filename, old.read(info.filename), compress_type=method)
    return bytearray(out.getvalue())


def _pth_mutation(source: bytes, rng: random.Random) -> bytearray:
    kind = rng.choice(["flip", "truncate", "field", "deflate", "deflate+flip", "deflate+field"])
    data = _deflated(source, rng) if kind.startswith("deflate") else bytearray(source)
    if kind.endswith("flip"):
        _flip(data, rng)
    elif kind == "truncate":
        _truncate(data, rng)
    elif kind.endswith("field"):
        _zip_field(data, rng)
    return data


def _header_edit(data: bytearray, rng: random.Random) -> bytearray:
    """A safetensors header with one field changed (or the length prefix), re-encoded."""
    size = int.from_bytes(data[:8], "little")
    if rng.random() < 0.2:
        data[:8] = rng.choice([0, 1, size - 1, size + 8, 1 << 40]).to_bytes(8, "little")
        return data
    header = json.loads(data[8 : 8 + size])
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    edit = rng.choice(["dtype", "shape", "offsets", "metadata", "drop"])
    if edit == "dtype":
        entry["dtype"] = rng.choice(["F16", "F64", "I64", "BOOL", "X9", 7])
    elif edit == "shape":
        entry["shape"] = rng.choice([[], [0], [1 << 40], ["a"], [-1], entry["shape"][::-1]])
    elif edit == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, end + 4], [0, 4], [start]])
    elif edit == "metadata":
        header["__metadata__"] = rng.choice(
            [{"arch": "x" * 10}, {"plan": "[" * 5000}, {"options": "{]"}, {"k": 5}, []]
        )
    else:
        del header[name]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return bytearray(len(text).to_bytes(8, "little") + text + data[8 + size :])


def _safetensors_mutation(source: bytes, rng: random.Random) -> bytearray:
    kind = rng.choice(["flip", "flip", "truncate", "header", "header"])
    data = bytearray(source)
    if kind == "flip":
        _flip(data, rng)
    elif kind == "truncate":
        _truncate(data, rng)
    else:
        data = _header_edit(data, rng)
    return data


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, case: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
    assert "internal error" not in lines[0], (case, lines[0])


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _converted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The oracle for a train file that reads as other tensors: the in-memory conversion."""
    net = _net()
    net.load_state_dict(state)
    result = pipeline.convert(net.eval(), input_shape=(3, 8, 8), samples=1)
    return {k: v for k, v in result.state_dict.items()}


def _check_convert(world: dict, train: Path, case: str, expected: Callable[[], dict]) -> None:
    out = train.parent / "out" / "deploy.safetensors"
    out.parent.mkdir(exist_ok=True)
    before = _digest(train)
    result = _run("convert", train, out, *world["args"])
    assert _digest(train) == before, case
    leftovers = [p.name for p in out.parent.iterdir() if p.name != out.name]
    assert not leftovers, (case, leftovers)
    if result.exit_code == 0:
        assert _equal(load_file(out), expected()), case
        out.unlink()
        return
    assert result.exit_code == 2, (case, result.exit_code, result.output)
    _one_line_error(result, case)
    assert not out.exists(), case


def _check_verify(world: dict, train: Path, deploy: Path, case: str, differs: bool) -> None:
    files = sorted(p.name for p in train.parent.iterdir())
    result = _run("verify", train, deploy, *world["args"])
    assert sorted(p.name for p in train.parent.iterdir()) == files, case
    if result.exit_code == 0:
        return
    if result.exit_code == 1:
        assert differs, (case, result.output)
        return
    assert result.exit_code == 2, (case, result.exit_code, result.output)
    _one_line_error(result, case)


def _case_folder(world: dict, name: str) -> Path:
    folder = world["folder"] / name
    folder.mkdir()
    return folder


def test_damaged_pth_zips(world):
    source = (world["folder"] / "train.pth").read_bytes()
    deploy = world["folder"] / "deploy.safetensors"
    for seed in range(CASES):
        rng = random.Random(seed)
        folder = _case_folder(world, f"pth-{seed}")
        train = folder / "train.pth"
        train.write_bytes(bytes(_pth_mutation(source, rng)))
        case = f"pth seed {seed}"
        # Every member is CRC-checked: a file that reads at all reads as the original tensors.
        _check_convert(world, train, case, lambda: world["deploy"])
        _check_verify(world, train, deploy, case, differs=False)


def _tensors_or_none(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(path)
    except Exception:
        return None


def test_damaged_safetensors_train_files(world):
    source = (world["folder"] / "train.safetensors").read_bytes()
    for seed in range(CASES):
        rng = random.Random(1000 + seed)
        folder = _case_folder(world, f"st-{seed}")
        train = folder / "train.safetensors"
        train.write_bytes(bytes(_safetensors_mutation(source, rng)))
        read = _tensors_or_none(train)
        # safetensors holds no checksums: a changed byte is other weights, converted faithfully.
        expected = world["deploy"] if read is not None and _equal(read, world["state"]) else None
        case = f"train.safetensors seed {seed}"
        _check_convert(world, train, case, lambda e=expected, r=read: e or _converted(r))


def test_damaged_deploy_files(world):
    source_bytes = (world["folder"] / "deploy.safetensors").read_bytes()
    train = world["folder"] / "train.pth"
    for seed in range(CASES):
        rng = random.Random(2000 + seed)
        folder = _case_folder(world, f"deploy-{seed}")
        damaged = folder / "deploy.safetensors"
        damaged.write_bytes(bytes(_safetensors_mutation(source_bytes, rng)))
        read = _tensors_or_none(damaged)
        differs = read is not None and not _equal(read, world["deploy"])
        _check_verify(world, train, damaged, f"deploy seed {seed}", differs)
