"""The options object: one source for defaults, checks and the record in deploy metadata."""

from __future__ import annotations

import json
import math
from types import MappingProxyType

import pytest
import torch

import repconv
from repconv import tolerances
from repconv.batch.config import Job
from repconv.errors import BadInput
from repconv.options import ConvertOptions, recorded_options, written_checks
from repconv.zoo.demo import DemoNet

ZOO = "demo_mixed"

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


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"samples": 0}, "--samples: expected an integer from 1 to 64, got 0"),
        ({"samples": 2.5}, "--samples: expected an integer, got 2.5"),
        ({"seed": None}, "--seed: expected an integer, got None"),
        ({"atol": -1.0}, "--atol: expected >= 0, got -1.0"),
        ({"rtol": math.nan}, "--rtol: expected a finite number, got nan"),
        ({"exact_limit": None}, "--exact-limit: expected a number, got None"),
        ({"verify": "yes"}, "--no-verify: expected true or false, got 'yes'"),
        ({"verify_dtype": "int8"}, "--verify-dtype: expected one of float64, float32"),
        ({"verify_dtype": torch.int8}, "--verify-dtype: expected one of float64"),
        ({"arch": ""}, "--arch: expected a non-empty string, got ''"),
        ({"key": 3}, "--key: expected a non-empty string, got 3"),
        ({"input_shape": (3, 0, 8)}, "--input-shape: expected positive integers"),
        ({"input_shape": "3,8,8"}, "--input-shape: expected a sequence of sizes"),
        ({"arch_kwargs": '{"a": 1}'}, "--arch-kwargs: expected a mapping of keyword arguments"),
        ({"arch_kwargs": {1: 2}}, "--arch-kwargs: expected argument names as keys"),
        ({"deploy_arch_kwargs": [1]}, "--deploy-arch-kwargs: expected a mapping"),
    ],
)
def test_every_field_is_checked_when_the_options_are_made(given, message):
    with pytest.raises(BadInput) as made:
        ConvertOptions(**given)
    assert str(made.value).startswith(message)
    with pytest.raises(BadInput) as merged:
        ConvertOptions.merged(ConvertOptions(), given)
    assert str(merged.value) == str(made.value)


def test_a_refused_value_is_quoted_short_and_escaped():
    with pytest.raises(BadInput) as made:
        ConvertOptions(key=["\x1b[2K" * 40])
    text = str(made.value)
    assert "\x1b" not in text and "\\x1b[2K" in text
    assert len(text.splitlines()) == 1 and text.endswith("...")


def test_values_an_api_caller_may_give_are_kept_as_given():
    options = ConvertOptions(
        arch_kwargs=MappingProxyType({"num_classes": 3}),
        input_shape=(3, 8, 8),
        verify_dtype=torch.float32,
        atol=0,
        key=None,
    )
    assert options.verify_dtype == "float32"
    assert options.input_shape == (3, 8, 8) and options.atol == 0
    assert dict(options.arch_kwargs) == {"num_classes": 3}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"arch": ZOO, "deploy_arch": ZOO, "deploy_kwargs": {}},
            "--deploy-kwargs builds the deploy model with --arch; with --deploy-arch give its "
            "keyword arguments as --deploy-arch-kwargs",
        ),
        ({"deploy_arch_kwargs": {}}, "--deploy-arch-kwargs needs --deploy-arch"),
        ({"deploy_kwargs": {}}, "--deploy-kwargs needs --arch (the builder it adds arguments to)"),
    ],
)
def test_deploy_options_that_do_not_go_together_are_refused_when_made(given, message):
    with pytest.raises(BadInput) as made:
        ConvertOptions(**given)
    assert str(made.value) == message


def test_the_workflows_refuse_bad_options_before_reading_anything(tmp_path):
    missing, out = tmp_path / "missing.pth", tmp_path / "out.safetensors"
    with pytest.raises(BadInput, match="--samples: expected an integer from 1 to 64, got 0"):
        repconv.convert_file(missing, out, arch_spec=ZOO, samples=0)
    with pytest.raises(BadInput, match="--samples"):
        repconv.verify(missing, out, samples=0)
    with pytest.raises(BadInput, match="--deploy-kwargs needs --arch"):
        repconv.convert(DemoNet(), deploy_kwargs={"deploy": True})
    assert not out.exists()


def test_a_job_with_options_damaged_in_transit_is_refused():
    job = Job("n", "in.pth", "out.pt", 3, ConvertOptions(arch=ZOO, samples=3))
    text = job.to_json().replace('"samples": 3', '"samples": 0')
    with pytest.raises(BadInput, match="--samples"):
        Job.from_json(text)


def test_help_states_the_limits_of_the_tolerance_table():
    from click.testing import CliRunner

    from repconv.cli import main

    for command, dtype, limit in (("convert", "float16", "written"), ("export", "float16", "onnx")):
        text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        value = getattr(tolerances.limits_of(dtype), limit)
        assert tolerances.format_limit(value) in text, (command, text)
