"""The options object: one source for defaults, checks and the record in deploy metadata."""

from __future__ import annotations

import json

import pytest

from repconv.batch.config import Job
from repconv.options import ConvertOptions, recorded_options, written_checks

# Records written by repconv before ConvertOptions existed: `batch --resume` compares records
# in old files with new ones, so the same settings must give these very bytes.
DEFAULT_RECORD = (
    '{"arch": null, "arch_kwargs": {}, "atol": null, "exact_limit": 1e-06, "force": false, '
    '"input_shape": null, "key": null, "rtol": null, "samples": 2, "seed": 0, "strict": false, '
    '"verify": true, "verify_dtype": "float64"}'
)
SET_RECORD = (
    '{"arch": "repvgg_a0", "arch_kwargs": {"num_classes": 10}, "atol": 0.5, '
    '"exact_limit": 1e-05, "force": true, "input_shape": [3, 32, 32], "key": "ema", '
    '"rtol": 0.0, "samples": 3, "seed": 7, "strict": true, "verify": false, '
    '"verify_dtype": "float32"}'
)


def record_text(options: ConvertOptions) -> str:
    return json.dumps(recorded_options(options), sort_keys=True)  # as metadata_for writes it


def test_the_record_is_byte_identical_to_earlier_versions():
    assert record_text(ConvertOptions()) == DEFAULT_RECORD
    options = ConvertOptions(
        arch="repvgg_a0",
        arch_kwargs={"num_classes": 10},
        key="ema",
        trust_pickle=True,  # how the file is read, not recorded
        strict=True,
        force=True,
        input_shape=(3, 32, 32),
        samples=3,
        seed=7,
        verify=False,
        verify_dtype="float32",
        exact_limit=1e-5,
        atol=0.5,
        rtol=0.0,
    )
    assert record_text(options) == SET_RECORD


def test_keywords_merge_over_an_options_object_and_unknown_ones_are_refused():
    base = ConvertOptions(samples=5, seed=1)
    merged = ConvertOptions.merged(base, {"seed": 9, "arch_spec": "demo_mixed"})
    assert (merged.samples, merged.seed, merged.arch) == (5, 9, "demo_mixed")
    assert base.seed == 1  # frozen: merging makes a new object
    with pytest.raises(TypeError, match=r"unknown conversion option.*sampels"):
        ConvertOptions.merged(None, {"sampels": 3})


def test_written_names_and_checks_come_from_the_fields():
    checks = written_checks()
    assert "no_verify" in checks and "verify" not in checks
    assert checks["samples"](64) == 64
    with pytest.raises(ValueError, match="from 1 to 64"):
        checks["samples"](65)
    assert ConvertOptions.from_written({"no_verify": True, "samples": 3}) == ConvertOptions(
        verify=False, samples=3
    )


def test_a_job_travels_as_json_with_its_options():
    options = ConvertOptions(arch="demo_mixed", arch_kwargs={"a": 1}, input_shape=[3, 8, 8])
    job = Job("n", "in.pth", "out.pt", 3, options, timeout=5.0)
    again = Job.from_json(job.to_json())
    assert again == job and again.options == options
    assert (again.arch, again.input_shape) == ("demo_mixed", [3, 8, 8])
    with pytest.raises(AttributeError):
        again.no_such_thing  # noqa: B018


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('samples = "two"', "c.toml: samples: expected an integer, got 'two'"),
        ("no_verify = 1", "c.toml: no_verify: expected true or false, got 1"),
        ('verify_dtype = "int8"', "c.toml: verify_dtype: expected one of float64, float32"),
    ],
)
def test_a_command_config_is_checked_as_a_batch_config_is(tmp_path, line, words):
    """--config values are checked by the same options object before any file is read."""
    from click.testing import CliRunner

    from repconv.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'arch = "demo_mixed"\n{line}\n')
    out = tmp_path / "deploy.safetensors"
    args = ["convert", str(tmp_path / "missing.pth"), str(out), "--config", str(config)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert not out.exists()
