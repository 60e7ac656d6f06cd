"""A deploy file's metadata is data anyone may have written: whatever a JSON field holds (a
nesting bomb, a value of the wrong type), reading it is bad input for the commands that need
it, and "convert again" for `batch --resume`, never a crash."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from repconv import load_deploy, metadata
from repconv.checkpoint import read_deploy, write_checkpoint
from repconv.cli import main
from repconv.errors import BadInput
from repconv.files import TENSORS_DIGEST_KEY
from repconv.zoo.checkpoints import save_train_checkpoint

ARCH = ("--arch", "demo_mixed", "--input-shape", "3,32,32", "--samples", "1")
BOMB = "[" * 100_000  # json.loads recurses once per level: RecursionError without a bound
FIELDS = ("options", "plan", "arch_kwargs")


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("converted")
    train, deploy = folder / "train.pth", folder / "deploy.safetensors"
    save_train_checkpoint("demo_mixed", train, randomize_bn=True, seed=1)
    assert run("convert", train, deploy, *ARCH).exit_code == 0
    return train, deploy


def rewritten(source: Path, target: Path, **fields: str) -> Path:
    """`source` with some metadata fields replaced, its tensors (and their digest) intact."""
    state, meta = read_deploy(source)
    meta.pop(TENSORS_DIGEST_KEY)
    write_checkpoint(target, state, {**meta, **fields}, tensors_digest=True)
    return target


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: broken.safetensors: metadata ")
    assert all(n in line for n in needles), line
    return line


@pytest.mark.parametrize("field", FIELDS)
def test_a_nesting_bomb_is_bad_input_for_verify(converted, tmp_path, field):
    train, deploy = converted
    broken = rewritten(deploy, tmp_path / "broken.safetensors", **{field: BOMB})
    result = run("verify", train, broken, "--samples", "1")
    one_line_error(result, repr(field), "nests deeper than 64 levels")


@pytest.mark.parametrize("field", FIELDS)
def test_a_nesting_bomb_is_bad_input_for_load_deploy(converted, tmp_path, field):
    broken = rewritten(converted[1], tmp_path / "broken.safetensors", **{field: BOMB})
    with pytest.raises(BadInput, match=f"metadata '{field}' nests deeper than 64 levels"):
        load_deploy(broken)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx is not installed")
@pytest.mark.parametrize("field", FIELDS)
def test_a_nesting_bomb_is_bad_input_for_export(converted, tmp_path, field):
    broken = rewritten(converted[1], tmp_path / "broken.safetensors", **{field: BOMB})
    onnx_path = tmp_path / "model.onnx"
    result = run("export", broken, onnx_path)
    one_line_error(result, repr(field), "nests deeper than 64 levels")
    assert not onnx_path.exists()


def test_a_nesting_bomb_is_bad_input_for_bench_deploy(converted, tmp_path):
    train, deploy = converted
    broken = rewritten(deploy, tmp_path / "broken.safetensors", plan=BOMB)
    result = run("bench", train, "--deploy", broken, "--arch", "demo_mixed", "--runs", "3")
    one_line_error(result, "'plan'", "nests deeper than 64 levels")


def test_the_bounds_are_checked_before_parsing():
    with pytest.raises(metadata.MetadataError, match="longer than 16 MiB"):
        metadata.parse_json("arch_kwargs", " " * (metadata.MAX_FIELD_CHARS + 1))
    deep = "[" * 64 + "]" * 64
    assert metadata.parse_json("plan", deep) == json.loads(deep)
    with pytest.raises(metadata.MetadataError, match="nests deeper than 64"):
        metadata.parse_json("plan", "[" + deep + "]")
    # brackets inside strings are text, escaped quotes included
    assert metadata.parse_json("plan", json.dumps(["[" * 100, '"{' * 100])) is not None


def resume_config(tmp_path: Path, train: Path) -> Path:
    config = tmp_path / "batch.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [[model]]
            input = "{train}"
            output = "deploy/out.safetensors"
            arch = "demo_mixed"
            input_shape = [3, 32, 32]
            samples = 1
            """
        )
    )
    return config


def resume_status(config: Path) -> str:
    result = run("batch", config, "--json", "--resume")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["entries"][0]["status"]


@pytest.mark.parametrize(
    "fields",
    [{field: BOMB} for field in FIELDS]
    + [{"verification": json.dumps({"passed": True, "written_max": "abc"})}],
    ids=[*FIELDS, "written_max text"],
)
def test_resume_converts_an_unreadable_record_again(converted, tmp_path, fields):
    config = resume_config(tmp_path, converted[0])
    output = tmp_path / "deploy/out.safetensors"
    assert resume_status(config) == "converted"
    assert resume_status(config) == "up to date"
    intact = output.read_bytes()
    rewritten(output, output, **fields)
    assert output.read_bytes() != intact
    # The summary (not only --json) is printed: the figures it shows were read and checked.
    result = run("batch", config, "--resume")
    assert result.exit_code == 0, result.output
    assert "1 converted, 0 up to date, 0 failed" in result.output
    assert output.read_bytes() == intact


def test_a_wrong_typed_figure_is_unreadable_metadata():
    record = metadata.read({"verification": json.dumps({"written_max": "abc"})})
    with pytest.raises(metadata.MetadataError, match="'written_max' that is not a number"):
        _ = record.verification
    extra = {"passed": False, "written_max": None, "from_elsewhere": [1]}
    record = metadata.read({"verification": json.dumps(extra)})
    assert record.verification == {"passed": False, "written_max": None}  # only checked keys
