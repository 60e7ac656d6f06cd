"""Detector checkpoints in, detector checkpoints out (issue 23).

Each layout is pickled the way its trainer saves it; `repconv convert --trust-pickle` writes it
back in that layout, and a fresh process that imports only the layout's module loads it with
plain `torch.load(weights_only=False)`, runs it (also through the framework's own loader, which
fuses again) and compares it with the train model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import ultralytics_layout
import yolov6_layout
import yolov7_layout
from click.testing import CliRunner
from helpers import randomized
from hypothesis import given, settings
from hypothesis import strategies as st
from layouts import build

from repconv import layout
from repconv.cli import main
from repconv.errors import BadInput
from repconv.tolerances import written_limit

TESTS = Path(__file__).parent
QUICK = ("--input-shape", "3,32,32", "--samples", "1")

# How each framework's loader reads a checkpoint for detect.py / val.py (yolov7 attempt_load,
# ultralytics attempt_load_one_weight with fuse, YOLOv6 load_checkpoint with fuse_model).
LOADERS = {
    "yolov7_layout": "(ckpt['ema'] if ckpt.get('ema') else ckpt['model']).float().fuse().eval()",
    "ultralytics_layout": "(ckpt.get('ema') or ckpt['model']).float().fuse().eval()",
    "yolov6_layout": "mod.fuse_model((ckpt['ema'] if ckpt.get('ema') else ckpt['model']).float())"
    ".eval()",
}

FRESH_PROCESS = """
import importlib, json, sys, torch
name, train_path, deploy_path = sys.argv[1:4]
mod = importlib.import_module(name)
def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)
def first(y):
    return y[0] if isinstance(y, (tuple, list)) else y
def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())
x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
deploy, train = load(deploy_path), load(train_path)
models = {k: v for k, v in deploy.items() if isinstance(v, torch.nn.Module)}
doc = {
    "entries": {k: None if v is None else type(v).__name__ for k, v in deploy.items()},
    "epoch": deploy.get("epoch"),
    "dtypes": {k: sorted({str(t.dtype) for t in m.state_dict().values() if t.is_floating_point()})
               for k, m in models.items()},
    "errors": {},
}
with torch.no_grad():
    for k, m in models.items():
        doc["errors"][k] = rel(first(m.float().eval()(x)), first(train[k].float().eval()(x)))
    loader = "LOADER"
    ours = eval(loader, {"mod": mod, "ckpt": load(deploy_path)})
    theirs = eval(loader, {"mod": mod, "ckpt": load(train_path)})
    doc["loader_error"] = rel(first(ours(x)), first(theirs(x)))
doc["repconv_imported"] = any(n == "repconv" or n.startswith("repconv.") for n in sys.modules)
print(json.dumps(doc))
"""


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def fresh_process(module: str, train: Path, deploy: Path) -> dict:
    """Load and run `deploy` in a new interpreter that can import only the tests' modules."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    script = FRESH_PROCESS.replace("LOADER", LOADERS[module])
    done = subprocess.run(
        [sys.executable, "-c", script, module, str(train), str(deploy)],
        capture_output=True, text=True, env=env, cwd=TESTS, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def saved(tmp_path: Path, module, name: str = "best.pt") -> Path:
    path = tmp_path / name
    torch.save(module.trainer_checkpoint(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "converted"),
    [
        (yolov7_layout, {"model", "ema"}),
        (ultralytics_layout, {"ema"}),
        (yolov6_layout, {"model", "ema"}),
    ],
)
def test_the_output_loads_in_its_framework_and_matches_the_train_model(tmp_path, module, converted):
    train = saved(tmp_path, module)
    deploy = tmp_path / "best-deploy.pt"
    result = cli("convert", train, deploy, "--trust-pickle", *QUICK, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {k for k, fate in doc["layout"].items() if fate == layout.CONVERTED} == converted
    assert doc["layout"]["optimizer"] == layout.DROPPED
    seen = fresh_process(module.__name__, train, deploy)
    assert not seen["repconv_imported"]
    assert seen["entries"]["optimizer"] is None and seen["epoch"] is not None
    assert set(seen["dtypes"]) == converted
    assert all(found == ["torch.float16"] for found in seen["dtypes"].values())
    limit = written_limit(torch.float16)
    assert all(error < limit for error in seen["errors"].values()), seen["errors"]
    # The framework's loader fuses again at load time: that changes nothing.
    assert seen["loader_error"] < limit, seen
    # The output is in deploy form: inspect says so, convert refuses it and writes nothing.
    inspected = json.loads(cli("inspect", deploy, "--trust-pickle", "--json").stdout)
    assert inspected["form"] == "deploy" and inspected["train_blocks"] == 0
    again = tmp_path / "again.pt"
    result = cli("convert", deploy, again, "--trust-pickle", *QUICK)
    assert result.exit_code == 2 and "already in deploy form" in result.stderr
    assert not again.exists()


@pytest.mark.slow
def test_a_deploy_form_file_is_recognised_and_refused(tmp_path):
    train = saved(tmp_path, yolov7_layout)
    deploy = tmp_path / "deploy.pt"
    assert cli("convert", train, deploy, "--trust-pickle", *QUICK).exit_code == 0
    inspected = json.loads(cli("inspect", train, "--trust-pickle", "--json").stdout)
    assert inspected["form"] == "train" and inspected["families"]["RepVGG"] == 3
    inspected = cli("inspect", deploy, "--trust-pickle")
    assert "form: deploy" in inspected.stdout
    again = tmp_path / "again.pt"
    result = cli("convert", deploy, again, "--trust-pickle", *QUICK)
    assert result.exit_code == 2 and "already in deploy form" in result.stderr
    assert not again.exists()
    result = cli("convert", deploy, again, "--trust-pickle", "--allow-noop", *QUICK)
    assert result.exit_code == 0 and "nothing written" in result.stdout and not again.exists()


@pytest.mark.slow
def test_verify_takes_the_pickled_output_and_says_what_else_it_was_given(tmp_path):
    train = saved(tmp_path, yolov7_layout)
    deploy = tmp_path / "deploy.pt"
    assert cli("convert", train, deploy, "--trust-pickle", *QUICK).exit_code == 0
    result = cli("verify", train, deploy, "--trust-pickle", *QUICK)
    assert result.exit_code == 0, result.output
    result = cli("verify", train, train, "--trust-pickle", *QUICK)
    assert result.exit_code == 2 and "the same file" in result.stderr
    twin = saved(tmp_path, yolov7_layout, "twin.pt")
    result = cli("verify", train, twin, "--trust-pickle", *QUICK)
    assert result.exit_code == 2 and "train-form checkpoint" in result.stderr


def test_training_state_is_dropped_unless_kept_and_a_state_dict_still_on_request(tmp_path):
    train = saved(tmp_path, yolov7_layout)
    kept = tmp_path / "kept.pt"
    result = cli("convert", train, kept, "--trust-pickle", "--keep-training-state", *QUICK)
    assert result.exit_code == 0, result.output
    back = torch.load(kept, weights_only=False)
    assert back["optimizer"] == torch.load(train, weights_only=False)["optimizer"]
    assert isinstance(back["model"], yolov7_layout.Model)
    plain = tmp_path / "plain.pt"
    result = cli("convert", train, plain, "--trust-pickle", "--state-dict-only", *QUICK)
    assert result.exit_code == 0, result.output
    state = torch.load(plain, weights_only=True)
    assert "model.1.rbr_reparam.weight" in state and state["model.1.rbr_reparam.weight"].dtype == (
        torch.float16
    )


def test_a_block_fused_by_the_data_flow_pass_pickles_and_loads_without_repconv(tmp_path):
    net = randomized(build("orepa"), dtype=torch.float32)
    train = tmp_path / "whole.pt"
    torch.save(net, train)
    deploy = tmp_path / "deploy.pt"
    result = cli("convert", train, deploy, "--trust-pickle", "--input-shape", "3,16,16")
    assert result.exit_code == 0, result.output
    script = (
        "import sys, torch\n"
        "m = torch.load(sys.argv[1], weights_only=False)\n"
        "t = torch.load(sys.argv[2], weights_only=False)\n"
        "x = torch.randn(2, 3, 16, 16)\n"
        "e = float((m(x) - t(x)).abs().max() / t(x).abs().max())\n"
        "assert not any(n.startswith('repconv') for n in sys.modules)\n"
        "assert 'reparam' in dict(m.named_modules())['blocks.0']._modules\n"
        "print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(deploy), str(train)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < written_limit(torch.float32)


def test_a_layout_that_cannot_be_pickled_is_refused_and_nothing_is_left(tmp_path):
    out = tmp_path / "deploy.pt"
    unpicklable = {"model": torch.nn.Linear(2, 2), "hook": lambda x: x}
    with pytest.raises(BadInput, match="cannot be pickled"):
        layout.write_checked(out, unpicklable, lambda _loaded: None)
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_that_loads_back_wrong_is_refused_before_the_rename(tmp_path):
    out = tmp_path / "deploy.pt"
    container = {"model": torch.nn.Linear(2, 2)}

    def check(loaded):
        raise BadInput("computes something else")

    with pytest.raises(BadInput, match="something else"):
        layout.write_checked(out, container, check)
    assert list(tmp_path.iterdir()) == []


def test_implicit_layers_no_longer_run_are_set_to_their_neutral_values():
    model = yolov7_layout.randomize(yolov7_layout.Model()).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse()
    changed = layout.settle(model, [], x)
    head = model.model[-1]
    assert len(changed) == 4
    assert all(bool((a.implicit == 0).all()) for a in head.ia)
    assert all(bool((m.implicit == 1).all()) for m in head.im)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], before)
        head.forward = type(head).forward.__get__(head)  # the train class's own forward
        torch.testing.assert_close(model(x)[0], before)
        head.fuse()  # the framework's loader fusing again
        torch.testing.assert_close(model(x)[0], before)


def test_a_model_loading_back_with_another_forward_is_refused():
    written = ultralytics_layout.Conv(2, 2)
    written.forward = written.forward_fuse
    with pytest.raises(BadInput, match="another forward"):
        layout.check_same_forwards("ema", written, ultralytics_layout.Conv(2, 2))
    assert not layout.check_same_forwards("ema", written, written)


class _Affine(torch.nn.Module):
    def __init__(self, channels: int, kind: str):
        super().__init__()
        self.kind = kind
        self.p = torch.nn.Parameter(torch.randn(1, channels, 1, 1))

    def forward(self, x):
        if self.kind == "add":
            return x + self.p
        if self.kind == "mul":
            return self.p * x
        return x * self.p + 1  # an affine map with no neutral value of its one parameter


@settings(max_examples=25, deadline=None)
@given(channels=st.integers(1, 16), kind=st.sampled_from(["add", "mul", "affine"]))
def test_an_implicit_layer_is_told_by_what_it_computes(channels, kind):
    module = _Affine(channels, kind)
    expected = {"add": 0.0, "mul": 1.0, "affine": None}[kind]
    assert layout.implicit_neutral(module) == expected
    if expected is not None:  # its neutral value makes it the identity
        with torch.no_grad():
            module.p.fill_(expected)
        x = torch.randn(2, channels, 3, 3)
        torch.testing.assert_close(module(x), x)
