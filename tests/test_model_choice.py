"""One place decides what to build (`model_choice.choose`), and why; the workflows ask it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized

import repconv
from repconv import checkpoint, metadata, model_choice
from repconv.cli import main
from repconv.errors import BadInput
from repconv.model_choice import GIVEN, PICKLED, choose
from repconv.options import ConvertOptions
from repconv.zoo.demo import DemoNet

HOSTILE = "subprocess:run"
ZOO = "demo_mixed"


def record(arch: str | None = None, kwargs: dict | None = None, **options) -> metadata.Recorded:
    """A deploy file's record as `metadata.read` gives it."""
    fields = {"arch": arch or "", "arch_kwargs": json.dumps(kwargs or {})}
    if options:
        fields["options"] = json.dumps(options)
    return metadata.read(fields)


# What to build, and why.


def test_arch_is_built_with_its_own_kwargs_or_none():
    choice = choose(ConvertOptions(arch=ZOO, arch_kwargs={"num_classes": 3}), source="t.pth")
    assert (choice.train.spec, choice.train.kwargs, choice.train.why) == (
        ZOO,
        {"num_classes": 3},
        "--arch",
    )
    assert choice.deploy is None
    assert choice.reasons() == {"train": "--arch", "deploy": model_choice.OWN_DEPLOY_STRUCTURE}
    assert choose(ConvertOptions(arch=ZOO), source="t.pth").train.kwargs == {}


def test_a_module_at_hand_is_the_train_model_unless_arch_is_given():
    pickled = choose(ConvertOptions(), source="t.pth", at_hand=PICKLED).train
    assert pickled.at_hand and pickled.why == PICKLED
    built = choose(ConvertOptions(arch=ZOO), source="t.pth", at_hand=PICKLED).train
    assert not built.at_hand and built.spec == ZOO


def test_nothing_naming_a_model_is_bad_input_saying_what_to_pass():
    with pytest.raises(BadInput, match=r"t\.pth holds a state dict; say which model .* --arch"):
        choose(ConvertOptions(), source="t.pth")
    with pytest.raises(BadInput, match=r"d\.safetensors records no architecture; pass one"):
        choose(ConvertOptions(), record(), what="d.safetensors")


def test_a_recorded_zoo_name_is_taken_with_its_recorded_kwargs():
    choice = choose(ConvertOptions(), record(ZOO, {"num_classes": 3}), source="t.pth")
    assert (choice.train.spec, choice.train.kwargs) == (ZOO, {"num_classes": 3})
    assert choice.train.why == "recorded in the file (a built-in zoo name)"
    mine = choose(ConvertOptions(arch_kwargs={"num_classes": 5}), record(ZOO, {"num_classes": 3}))
    assert mine.train.kwargs == {"num_classes": 5} and "--arch-kwargs" in mine.train.why


def test_recorded_kwargs_go_only_with_the_recorded_architecture():
    same = choose(ConvertOptions(arch=ZOO), record(ZOO, {"num_classes": 3})).train
    assert same.kwargs == {"num_classes": 3} and "arch_kwargs the file records" in same.why
    other = choose(ConvertOptions(arch="repvgg_a0"), record(ZOO, {"num_classes": 3})).train
    assert (other.kwargs, other.why) == ({}, "--arch")


def test_a_recorded_spec_that_runs_code_is_refused_without_a_command_to_paste():
    hostile = record(f"{HOSTILE}\x1b[2K\r", {"args": "touch /tmp/x", "shell": True})
    with pytest.raises(BadInput) as refused:
        choose(ConvertOptions(), hostile, what="d.safetensors", source="t.pth")
    text = str(refused.value)
    assert text.startswith("d.safetensors names the architecture 'subprocess:run\\x1b[2K\\r'")
    assert "repconv does not run code a file names" in text
    assert "pass it yourself as --arch or add --trust-metadata" in text
    assert "\x1b" not in text and "\r" not in text and "touch" not in text
    trusted = choose(ConvertOptions(), hostile, trust_metadata=True).train
    assert trusted.spec == f"{HOSTILE}\x1b[2K\r" and trusted.kwargs["shell"] is True
    assert trusted.why == "recorded in the file (--trust-metadata)"
    # the user's own --arch, or a module at hand, needs no trust in the file
    assert choose(ConvertOptions(arch=ZOO), hostile).train.spec == ZOO
    assert choose(ConvertOptions(), hostile, at_hand=GIVEN).train.at_hand


def test_deploy_kwargs_go_on_top_of_the_arch_builder():
    options = ConvertOptions(arch=ZOO, arch_kwargs={"num_classes": 3}, deploy_kwargs={"deploy": 1})
    deploy = choose(options, source="t.pth").deploy
    assert (deploy.spec, deploy.kwargs) == (ZOO, {"num_classes": 3, "deploy": 1})
    assert deploy.why == "--deploy-kwargs on top of --arch"
    given = choose(ConvertOptions(deploy_arch="x:y", deploy_arch_kwargs={"a": 1}), at_hand=GIVEN)
    assert (given.deploy.spec, given.deploy.kwargs, given.deploy.why) == (
        "x:y",
        {"a": 1},
        "--deploy-arch",
    )


def test_a_deploy_model_given_needs_no_train_model_when_loading():
    """Loading a file into the deploy model the user names: the file's recorded train arch is
    neither needed nor judged."""
    hostile = record(HOSTILE, {"shell": True})
    choice = choose(ConvertOptions(deploy_arch=ZOO), hostile, train_needed=False)
    assert choice.train is None and choice.deploy.spec == ZOO
    assert choice.reasons() == {"deploy": "--deploy-arch"}
    with pytest.raises(BadInput, match="names the architecture"):
        choose(ConvertOptions(deploy_arch=ZOO), hostile)  # verify needs the train model


def test_the_recorded_deploy_model_follows_the_trust_rule():
    written = record(ZOO, deploy_arch=HOSTILE, deploy_arch_kwargs={"shell": True})
    with pytest.raises(BadInput) as refused:
        choose(ConvertOptions(), written, what="d.safetensors", train_needed=False)
    assert str(refused.value).startswith(
        "d.safetensors was written for the deploy model 'subprocess:run'; repconv does not run "
        "code a file names"
    )
    assert "pass it yourself as --deploy-arch" in str(refused.value)
    trusted = choose(ConvertOptions(), written, trust_metadata=True, train_needed=False)
    assert trusted.train is None and trusted.deploy.kwargs == {"shell": True}
    zoo = choose(ConvertOptions(), record(ZOO, deploy_arch=ZOO), train_needed=False).deploy
    assert zoo.spec == ZOO and zoo.why == "recorded in the file (a built-in zoo name)"


def test_recorded_deploy_kwargs_go_on_top_of_the_train_builder():
    written = record(HOSTILE, {"a": 1}, deploy_kwargs={"deploy": True})
    mine = choose(ConvertOptions(arch=ZOO, arch_kwargs={"num_classes": 3}), written).deploy
    assert (mine.spec, mine.kwargs) == (ZOO, {"num_classes": 3, "deploy": True})
    assert mine.why == "the file's deploy_kwargs on top of the train builder (--arch)"
    # with a module at hand the recorded architecture is built, so it needs trust
    with pytest.raises(BadInput, match="written for the deploy model 'subprocess:run'"):
        choose(ConvertOptions(), written, at_hand=GIVEN)
    trusted = choose(ConvertOptions(), written, at_hand=GIVEN, trust_metadata=True).deploy
    assert (trusted.spec, trusted.kwargs) == (HOSTILE, {"a": 1, "deploy": True})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arch": ZOO, "options": "{not json"}, "d.safetensors: metadata 'options' is not valid"),
        ({"arch": ZOO, "options": '{"deploy_kwargs": [1]}'}, "deploy_kwargs is not a JSON object"),
        ({"arch": ZOO, "options": '{"deploy_arch": 5}'}, "deploy_arch is not a string"),
        ({"arch": ZOO, "arch_kwargs": "[1]"}, "metadata 'arch_kwargs' is not a JSON object"),
    ],
)
def test_a_damaged_record_is_bad_input_naming_the_file(fields, message):
    with pytest.raises(BadInput, match=message):
        choose(ConvertOptions(), metadata.read(fields), what="d.safetensors")


def test_the_resolver_imports_no_workflow_and_no_builder():
    """model_choice sits below the workflows: importing it loads neither the pipeline nor the
    code that imports builders or reads checkpoints."""
    code = "import sys, repconv.model_choice; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    for heavy in ("repconv.pipeline", "repconv.arch", "repconv.checkpoint", "repconv.engine"):
        assert heavy not in loaded


# The workflows ask it.


@pytest.fixture()
def converted(tmp_path: Path) -> tuple[Path, Path]:
    train = tmp_path / "train.pth"
    torch.save(randomized(DemoNet(), dtype=torch.float32).state_dict(), train)
    deploy = tmp_path / "deploy.safetensors"
    repconv.convert_file(train, deploy, arch_spec=ZOO, samples=1)
    return train, deploy


def rewrite_arch(deploy: Path, spec: str) -> None:
    state, meta = checkpoint.read_deploy(deploy)
    meta.update(arch=spec, arch_kwargs=json.dumps({"args": "touch x", "shell": True}))
    checkpoint.write_checkpoint(deploy, state, meta)


def test_load_deploy_takes_its_arguments_as_checked_options(tmp_path):
    with pytest.raises(BadInput, match="--deploy-arch-kwargs needs --deploy-arch"):
        repconv.load_deploy(tmp_path / "missing.safetensors", deploy_arch_kwargs={"a": 1})
    with pytest.raises(BadInput, match="--arch-kwargs: expected a mapping"):
        repconv.load_deploy(tmp_path / "missing.safetensors", ZOO, ["not", "kwargs"])


def test_a_file_naming_a_hostile_arch_loads_into_the_deploy_model_given(converted):
    _, deploy = converted
    rewrite_arch(deploy, HOSTILE)
    with pytest.raises(BadInput, match="--trust-metadata"):
        repconv.load_deploy(deploy)
    model = repconv.load_deploy(deploy, deploy_arch=ZOO, deploy_arch_kwargs={"deploy": True})
    assert isinstance(model, DemoNet) and model.deploy


def test_export_refuses_a_hostile_arch_escaped_on_one_line(converted, tmp_path):
    pytest.importorskip("onnxruntime")
    _, deploy = converted
    rewrite_arch(deploy, f"{HOSTILE}\x1b[2K")
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(deploy), str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "\x1b" not in lines[0] and "\\x1b[2K" in lines[0]
    assert "--arch '" not in lines[0] and not out.exists()


def test_verify_with_a_trusted_pickle_ignores_the_recorded_arch(converted, tmp_path):
    train, deploy = converted
    pickled = tmp_path / "whole.pth"
    module = DemoNet()
    module.load_state_dict(torch.load(train, weights_only=True))
    torch.save(module, pickled)
    rewrite_arch(deploy, HOSTILE)
    verification, _ = repconv.verify(pickled, deploy, trust_pickle=True, samples=1)
    assert verification.passed
