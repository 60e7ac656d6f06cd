"""`repconv verify` recomputes the deploy tensors and compares them with the file's, element by
element (within one ulp), besides running both models (the written figure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from repconv import arch, checkpoint, pipeline
from repconv import verification as V
from repconv.cli import main
from repconv.zoo.demo import DemoNet

ARCH = ["--arch", "demo_mixed"]
QUICK = ["--samples", "1"]


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def save_train(path: Path, dtype: torch.dtype = torch.float32) -> Path:
    torch.save(randomized(DemoNet(), dtype=dtype).state_dict(), path)
    return path


def convert(train: Path, deploy: Path, *extra: str) -> Path:
    result = cli("convert", train, deploy, *ARCH, *QUICK, *extra)
    assert result.exit_code == 0, result.output
    return deploy


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """One float32 conversion; examples mutate its tensors and write them next to it."""
    folder = tmp_path_factory.mktemp("verify")
    train = save_train(folder / "train.pth")
    deploy = convert(train, folder / "deploy.safetensors")
    state, meta = checkpoint.read_deploy(deploy)
    return train, deploy, state, meta


@pytest.fixture(autouse=True)
def one_thread():
    """Many small float64 runs: on a busy machine a second thread costs more than it gives.

    The module's file is converted before this applies, with the default thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def verify_mutated(converted, change: dict[str, torch.Tensor], name: str = "mutated"):
    """verify_files on the converted file with some tensors replaced (or added)."""
    train, deploy, state, meta = converted
    path = deploy.with_name(f"{name}.safetensors")
    checkpoint.write_checkpoint(path, {**state, **change}, meta)
    # 8x8 inputs (the net pools globally): the float64 runs cost a sixteenth of 32x32.
    return pipeline.verify_files(train, path, samples=1, input_shape=(3, 8, 8))


def floating_keys(state: dict) -> list[str]:
    return sorted(k for k, v in state.items() if v.is_floating_point())


def test_an_untouched_file_passes_with_every_tensor_equal(converted):
    train, deploy, state, _ = converted
    for threads in (1, 2):  # float64 sums may be ordered by the thread count
        torch.set_num_threads(threads)
        verification, notes = pipeline.verify_files(train, deploy, samples=1)
        tensors = verification.tensors
        assert verification.passed and notes == {}
        assert tensors.compared == len(state) and tensors.differing == 0
        assert tensors.bit_exact + tensors.within_ulp == len(state)
        assert not tensors.missing and not tensors.unexpected
    result = cli("verify", train, deploy, *QUICK)
    assert result.exit_code == 0, result.output
    assert f"tensors: {len(state)} of {len(state)} equal to the recomputed ones (" in result.output


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_element_changed_by_1e_3_fails_naming_its_tensor(converted, data):
    """Absolute +-1e-3, which is a real change for any value, zero and tiny ones included."""
    state = converted[2]
    key = data.draw(st.sampled_from(floating_keys(state)), label="key")
    index = data.draw(st.integers(0, state[key].numel() - 1), label="element")
    sign = data.draw(st.sampled_from([1.0, -1.0]), label="sign")
    changed = state[key].clone()
    changed.view(-1)[index] += sign * 1e-3
    verification, _ = verify_mutated(converted, {key: changed})
    assert not verification.passed
    assert verification.tensors.differing == 1
    assert verification.tensors.first_differences[0].key == key
    assert key in verification.failure_message()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_nonzero_element_scaled_by_1_plus_1e_3_fails(converted, data):
    """Relative 1e-3 is ~8000 float32 ulps at any magnitude (and no change at all for 0)."""
    state = converted[2]
    key = data.draw(st.sampled_from(floating_keys(state)), label="key")
    index = data.draw(st.integers(0, state[key].numel() - 1), label="element")
    changed = state[key].clone()
    assume(float(changed.view(-1)[index]) != 0.0)
    changed.view(-1)[index] *= 1 + 1e-3
    verification, _ = verify_mutated(converted, {key: changed})
    assert not verification.passed
    assert [d.key for d in verification.tensors.first_differences] == [key]


def test_classifier_bias_plus_1e_3_fails_through_the_cli(converted):
    train, deploy, state, meta = converted
    tampered = deploy.with_name("bias.safetensors")
    checkpoint.write_checkpoint(tampered, {**state, "fc.bias": state["fc.bias"] + 1e-3}, meta)
    result = cli("verify", train, tampered, *QUICK, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["passed"] is False and doc["tensors"]["differing"] == 1
    assert doc["tensors"]["first_differences"][0]["key"] == "fc.bias"
    human = cli("verify", train, tampered, *QUICK)
    assert human.exit_code == 1 and "fc.bias (" in human.output and "ulp" in human.output


def test_one_ulp_passes_and_two_ulps_fail(converted):
    state = converted[2]
    weight = state["fc.weight"]
    one_up = weight.clone()
    one_up.view(-1)[3] = torch.nextafter(weight.view(-1)[3], torch.tensor(float("inf")))
    verification, _ = verify_mutated(converted, {"fc.weight": one_up})
    assert verification.passed and verification.tensors.within_ulp == 1
    two_up = one_up.clone()
    two_up.view(-1)[3] = torch.nextafter(one_up.view(-1)[3], torch.tensor(float("inf")))
    verification, _ = verify_mutated(converted, {"fc.weight": two_up})
    assert not verification.passed
    assert verification.tensors.first_differences[0].ulps == 2


def test_a_key_on_one_side_only_fails(converted):
    extra = {"fc.extra": torch.zeros(3)}
    verification, _ = verify_mutated(converted, extra)
    assert not verification.passed and verification.tensors.unexpected == ["fc.extra"]
    assert verification.written is None  # a file that does not fit is not run
    train, deploy, state, meta = converted
    missing = deploy.with_name("missing.safetensors")
    checkpoint.write_checkpoint(missing, {k: v for k, v in state.items() if k != "fc.bias"}, meta)
    result = cli("verify", train, missing, *QUICK)
    assert result.exit_code == 1 and "1 missing from the file: fc.bias" in result.output


def test_a_recorded_plan_that_differs_is_noted(converted):
    train, deploy, state, meta = converted
    plan = json.loads(meta["plan"])
    dropped = plan["blocks"].pop()
    other = deploy.with_name("other-plan.safetensors")
    checkpoint.write_checkpoint(other, state, {**meta, "plan": json.dumps(plan)})
    verification, notes = pipeline.verify_files(train, other, samples=1)
    assert verification.passed
    assert "only recomputed" in notes["plan"] and dropped["path"] in notes["plan"]


def test_the_train_checkpoint_is_read_once_and_one_model_built(converted, monkeypatch):
    calls = {"read": 0, "build": 0}
    read, build = checkpoint.read_checkpoint, arch.build_loaded

    def counting_read(*args, **kwargs):
        calls["read"] += 1
        return read(*args, **kwargs)

    def counting_build(*args, **kwargs):
        calls["build"] += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_checkpoint", counting_read)
    monkeypatch.setattr(arch, "build_loaded", counting_build)
    verification, _ = pipeline.verify_files(converted[0], converted[1], samples=1)
    assert verification.passed and calls == {"read": 1, "build": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_float16_and_float64_checkpoints_verify(tmp_path, dtype):
    train = save_train(tmp_path / "train.pth", dtype)
    deploy = convert(train, tmp_path / "deploy.safetensors")
    result = cli("verify", train, deploy, *QUICK, "--json")
    assert result.exit_code == 0, result.output
    tensors = json.loads(result.stdout)["tensors"]
    assert tensors["passed"] and tensors["bit_exact"] + tensors["within_ulp"] == tensors["compared"]


def test_no_verify_and_verify_dtype_float32_give_the_default_tensors(converted, tmp_path):
    train, _, state, _ = converted
    for name, extra in (("nov", ["--no-verify"]), ("f32", ["--verify-dtype", "float32"])):
        deploy = convert(train, tmp_path / f"{name}.safetensors", *extra)
        written, _ = checkpoint.read_deploy(deploy)
        assert written.keys() == state.keys()
        assert all(torch.equal(written[k], state[k]) for k in state), name
        assert cli("verify", train, deploy, *QUICK).exit_code == 0


@pytest.mark.parametrize(
    ("stored", "held"),
    [(torch.float64, "float32"), (torch.float32, "float16"), (torch.float16, "bfloat16")],
)
def test_convert_refuses_a_verify_dtype_that_would_round_the_weights(tmp_path, stored, held):
    """Held in a dtype that cannot hold them, the weights would be fused already rounded."""
    train = save_train(tmp_path / "train.pth", stored)
    out = tmp_path / "deploy.safetensors"
    result = cli("convert", train, out, *ARCH, *QUICK, "--verify-dtype", held)
    assert result.exit_code == 2, result.output
    assert f"--verify-dtype {held} cannot hold" in result.stderr
    assert not out.exists()


def test_a_float16_checkpoint_verified_in_float32_is_the_default_conversion(tmp_path):
    train = save_train(tmp_path / "train.pth", torch.float16)
    deploy = convert(train, tmp_path / "f32.safetensors", "--verify-dtype", "float32")
    verification, _ = pipeline.verify_files(train, deploy, samples=1)
    assert verification.tensors.passed


def test_a_pt_deploy_file_without_metadata_verifies(converted, tmp_path):
    train = converted[0]
    deploy = convert(train, tmp_path / "deploy.pt")
    result = cli("verify", train, deploy, *ARCH, *QUICK)
    assert result.exit_code == 0, result.output
    assert "tensors: 16 of 16" in result.output


def test_a_trusted_pickled_model_verifies_and_a_change_fails(tmp_path):
    train = tmp_path / "whole.pth"
    torch.save(randomized(DemoNet(), dtype=torch.float32), train)
    deploy = tmp_path / "deploy.safetensors"
    result = cli("convert", train, deploy, "--trust-pickle", *QUICK)
    assert result.exit_code == 0, result.output
    result = cli("verify", train, deploy, "--trust-pickle", *QUICK)
    assert result.exit_code == 0, result.output
    state, meta = checkpoint.read_deploy(deploy)
    changed = state["repvgg.rbr_reparam.bias"].clone()
    changed[0] += 1e-3
    checkpoint.write_checkpoint(deploy, {**state, "repvgg.rbr_reparam.bias": changed}, meta)
    result = cli("verify", train, deploy, "--trust-pickle", *QUICK)
    assert result.exit_code == 1 and "repvgg.rbr_reparam.bias (" in result.output


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ulp_distance_counts_representable_values(dtype):
    info = torch.finfo(dtype)
    zero, tiny = torch.zeros(1, dtype=dtype), torch.full((1,), info.tiny, dtype=dtype)
    up = torch.nextafter(tiny, torch.full((1,), 1.0, dtype=dtype))
    assert float(V.ulp_distance(up, tiny)) == 1
    assert float(V.ulp_distance(-zero, zero)) == 0
    smallest = torch.nextafter(zero, torch.ones(1, dtype=dtype))
    assert float(V.ulp_distance(smallest, -smallest)) == 2
    huge = torch.full((1,), info.max, dtype=dtype)
    assert float(V.ulp_distance(huge, -huge)) > 1e3  # across zero: no overflow, still huge
