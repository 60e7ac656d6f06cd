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
from repconv.errors import BadInput
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
    shape = ("--input-shape", "5,32,32")
    expect_bad_input(tmp_path, good, *ARCH, *shape, needle="expects 3 input channels")


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
    '''RepVGG-shaped, but its deploy forward adds a constant the train form does not.'''

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
            return self.rbr_reparam(x) + 0.1
        return self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x)


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


# Issue 10, part 7: each of these was a traceback, a wall of text, a wrong exit code, or silence.


def expect_usage_error(*args: str, needle: str) -> str:
    """A bad option value: click's usage error, exit 2, naming the problem."""
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.output
    return result.stderr


def test_integer_checkpoint_is_one_line_naming_tensor_and_dtype(tmp_path):
    state = demo_state()
    state["stem.conv.weight"] = (state["stem.conv.weight"] * 100).to(torch.int8)
    path = tmp_path / "train.pth"
    torch.save(state, path)
    message = expect_bad_input(tmp_path, path, *ARCH, needle="stem.conv.weight is int8")
    assert "float16/bfloat16/float32/float64" in message and message.startswith("error: train")


def test_state_dict_without_batch_counters_loads_and_converts(tmp_path):
    from safetensors.torch import load_file

    from repconv import arch, checkpoint, engine

    state = {k: v for k, v in demo_state().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    loaded = checkpoint.read_checkpoint(path)
    model = arch.build_loaded("demo_mixed", {}, loaded.state_dict)
    # Built on the meta device and assigned the loaded tensors, and nothing is left on meta.
    assert model.stem.conv.weight.data_ptr() == loaded.state_dict["stem.conv.weight"].data_ptr()
    assert not arch._has_meta_tensors(model)
    assert int(model.stem.bn.num_batches_tracked) == 0
    out = tmp_path / "deploy.safetensors"
    result = CliRunner().invoke(main, ["convert", str(path), str(out), *ARCH])
    assert result.exit_code == 0, result.output
    deploy = DemoNet()
    engine.convert_model(deploy)
    deploy.load_state_dict(load_file(out), strict=True)


def test_unfolded_norm_without_batch_counter_is_written_loadable(tmp_path):
    from safetensors.torch import load_file

    model_file = tmp_path / "prenorm.py"
    model_file.write_text(textwrap.dedent(UNFOLDABLE))
    train = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    state = randomized(train, dtype=torch.float32).state_dict()
    del state["2.num_batches_tracked"]
    path = tmp_path / "prenorm.pth"
    torch.save(state, path)
    out = tmp_path / "deploy.safetensors"
    args = ["--arch", f"{model_file}:build", "--input-shape", "3,8,8"]
    result = CliRunner().invoke(main, ["convert", str(path), str(out), *args])
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert "2.num_batches_tracked" in written
    train.load_state_dict(written, strict=True)


@pytest.mark.parametrize("text", ["3,x,4", "3,,4", "3,224,", "3xx224", "x"])
def test_input_shape_with_an_empty_part_is_refused(tmp_path, good, text):
    out = tmp_path / "o.safetensors"
    args = ["convert", str(good), str(out), *ARCH, "--input-shape", text]
    stderr = expect_usage_error(*args, needle="expected integers like 3,224,224 or 3x224x224")
    assert repr(text) in stderr and not out.exists()


def test_input_shape_spellings_and_bounds():
    from repconv.options import shape_problem, split_shape

    assert split_shape("3x224x224") == split_shape(" 3, 224 ,224 ") == [3, 224, 224]
    assert shape_problem([3, 2_000_000, 4]) and shape_problem([1] * 9) and shape_problem([3, 0])
    assert shape_problem([3, 224, 224]) is None


@pytest.mark.parametrize(
    ("tensor", "where", "value"),
    [
        ("stem.conv.weight", (0, 0, 0, 0), float("nan")),
        ("repvgg.rbr_dense.bn.weight", (1,), float("inf")),
        ("repvgg.rbr_dense.bn.bias", (2,), float("-inf")),
        ("fc.weight", (0, 0), float("nan")),
    ],
)
def test_non_finite_weights_are_a_corrupt_checkpoint(tmp_path, tensor, where, value):
    state = demo_state()
    state[tensor][where] = value
    path = tmp_path / "corrupt.pth"
    torch.save(state, path)
    message = expect_bad_input(tmp_path, path, *ARCH, needle="corrupt checkpoint")
    count = state[tensor].numel()
    assert f"tensor {tensor} holds 1 NaN or Inf value(s) of {count}" in message


def test_non_finite_count_is_exact_across_chunks(monkeypatch):
    from repconv import engine

    monkeypatch.setattr(engine, "FINITE_CHUNK", 7)
    values = torch.randn(100)
    values[[3, 40, 41, 99]] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38])
    assert engine.non_finite_count(values) == 3
    # Finite float16 values whose sum overflows are not counted.
    assert engine.non_finite_count(torch.full((50,), 60000.0, dtype=torch.float16)) == 0
    assert engine.non_finite_count(torch.full((50,), 1e308, dtype=torch.float64)) == 0


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_unwritable_output_folder_fails_before_any_work(tmp_path, good, monkeypatch):
    from repconv import checkpoint

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("the checkpoint was read before the output was known writable")

    monkeypatch.setattr(checkpoint, "read_checkpoint", must_not_run)
    result = CliRunner().invoke(main, ["convert", str(good), "/proc/x.safetensors", *ARCH])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: cannot write /proc/x.safetensors: " + os.strerror(2)


def test_input_too_large_for_memory_names_shape_and_bytes(tmp_path, good):
    shape = ("--input-shape", "3,100000,100000")
    message = expect_bad_input(tmp_path, good, *ARCH, *shape, needle="not enough memory")
    assert "[3, 100000, 100000]" in message and "240000000000 bytes" in message
    expect_usage_error(
        "convert", str(good), "o.pth", *ARCH, "--input-shape", "3,2000000,4", needle="at most"
    )


def test_verify_and_bench_refuse_inputs_too_large_for_memory(tmp_path, good):
    deploy = tmp_path / "deploy.safetensors"
    assert CliRunner().invoke(main, ["convert", str(good), str(deploy), *ARCH]).exit_code == 0
    for args in (
        ["verify", str(good), str(deploy), "--input-shape", "3,100000,100000"],
        ["bench", str(good), *ARCH[:2], "--input-shape", "3,30000,30000", "--batch-sizes", "1024"],
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "not enough memory for inputs of shape" in lines[0], lines


GREEDY = """
import torch
from torch import nn


class Greedy(nn.Sequential):
    def forward(self, x):
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: no machine has it
        return super().forward(x)


def build():
    return Greedy(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
"""


def test_running_out_of_memory_in_the_model_is_one_line(tmp_path):
    model_file = tmp_path / "greedy.py"
    model_file.write_text(textwrap.dedent(GREEDY))
    namespace: dict = {}
    exec(compile(GREEDY, "greedy", "exec"), namespace)
    path = tmp_path / "greedy.pth"
    torch.save(namespace["build"]().state_dict(), path)
    args = ("--arch", f"{model_file}:build", "--input-shape", "3,8,8")
    message = expect_bad_input(tmp_path, path, *args, needle="not enough memory to run the model")
    assert "[3, 8, 8]" in message and "ran out of memory" in message


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="needs /proc/meminfo (Linux)")
def test_allocations_beyond_available_memory_fail_instead_of_waking_the_oom_killer():
    import resource

    from repconv import verification as V

    before = resource.getrlimit(resource.RLIMIT_DATA)
    too_much = V.available_memory() + (1 << 30)
    expected = pytest.raises(BadInput, match=r"shape \[3, 4\]: it ran out of memory")
    with expected, V.reporting_out_of_memory([3, 4]):
        torch.empty(too_much, dtype=torch.uint8)  # never touched, so never resident
    assert resource.getrlimit(resource.RLIMIT_DATA) == before


def test_deploy_metadata_that_is_not_json_is_one_line(tmp_path, good):
    from safetensors.torch import load_file

    from repconv import load_deploy
    from repconv.files import read_safetensors_metadata

    deploy = tmp_path / "deploy.safetensors"
    assert CliRunner().invoke(main, ["convert", str(good), str(deploy), *ARCH]).exit_code == 0
    for value, needle in (("{bad", "is not valid JSON"), ("[1]", "is not a JSON object")):
        meta = {**read_safetensors_metadata(deploy), "arch_kwargs": value}
        broken = tmp_path / "broken.safetensors"
        save_file(load_file(deploy), broken, metadata=meta)
        result = CliRunner().invoke(main, ["verify", str(good), str(broken), "--samples", "1"])
        assert result.exit_code == 2, result.output
        expected = f"error: broken.safetensors: metadata 'arch_kwargs' {needle}"
        assert result.stderr.strip() == expected
        with pytest.raises(BadInput, match=needle):
            load_deploy(broken)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    import random

    path = tmp_path / "noise.pth"
    path.write_bytes(random.Random(0).randbytes(3000))
    message = expect_bad_input(tmp_path, path, *ARCH, needle="not a PyTorch checkpoint")
    assert message.endswith("(unrecognised data)") and "weights_only" not in message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--samples", "100000"),
        ("--samples", "0"),
        ("--atol", "nan"),
        ("--rtol", "inf"),
        ("--exact-limit", "nan"),
    ],
)
def test_option_bounds(tmp_path, good, option, value):
    out = tmp_path / "o.safetensors"
    expect_usage_error(
        "convert", str(good), str(out), "--arch", "demo_mixed", option, value, needle=f"'{option}'"
    )
    assert not out.exists()


def test_bench_batch_sizes_are_bounded(good):
    args = ("bench", str(good), "--arch", "demo_mixed", "--batch-sizes", "1,100000")
    expect_usage_error(*args, needle="expected integers from 1 to 1024")
