"""Every built-in architecture converts exactly and loads strictly into its own deploy form."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import by_conv_bn_convention
from safetensors.torch import load_file

from repconv.cli import main
from repconv.zoo import registry as zoo

# Deploy-form parameter counts of the RepVGG release, in millions (train-form A0 9.11, B3 123.09).
RELEASED_DEPLOY_PARAMS = {
    "repvgg_a0": 8.31,
    "repvgg_a1": 12.79,
    "repvgg_a2": 25.50,
    "repvgg_b0": 14.34,
    "repvgg_b1": 51.83,
    "repvgg_b1g2": 41.36,
    "repvgg_b1g4": 36.13,
    "repvgg_b2": 80.32,
    "repvgg_b2g2": 63.96,
    "repvgg_b2g4": 55.78,
    "repvgg_b3": 110.96,
    "repvgg_b3g2": 87.40,
    "repvgg_b3g4": 75.63,
    "repvgg_d2se": 120.39,
}
# `make test-fast` runs one small net of each family; the others are marked slow.
FAST = {"repvgg_a0", "acb_resnet18", "dbb_mobilenet", "convbn_resnet18"}
MODELS = [name for name in zoo.list_models() if name != "demo_mixed"]


def millions(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def test_every_listed_family_member_is_there():
    assert set(RELEASED_DEPLOY_PARAMS) <= set(MODELS)
    for kind in ("dbb", "acb", "convbn"):
        for net in ("resnet18", "resnet50", "mobilenet"):
            assert f"{kind}_{net}" in MODELS


@pytest.mark.parametrize("name", sorted(RELEASED_DEPLOY_PARAMS))
def test_repvgg_parameter_counts_match_the_release(name):
    with torch.device("meta"):
        assert millions(zoo.build(name, deploy=True)) == RELEASED_DEPLOY_PARAMS[name]
    if name in ("repvgg_a0", "repvgg_b3"):
        with torch.device("meta"):
            train = zoo.build(name)
        assert millions(train) == {"repvgg_a0": 9.11, "repvgg_b3": 123.09}[name]


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]
)
def test_zoo_save_convert_verify_and_load(name, tmp_path):
    """The user's path: `zoo save`, `convert`, `verify`; the file loads into the deploy form."""
    train, deploy_path = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    runner = CliRunner()
    saved = runner.invoke(main, ["zoo", "save", name, str(train), "--randomize-bn", "--seed", "1"])
    assert saved.exit_code == 0, saved.output
    check = ["--input-shape", "3,64,64", "--samples", "1"]
    args = ["convert", str(train), str(deploy_path), "--arch", name, *check, "--json"]
    converted = runner.invoke(main, args)
    assert converted.exit_code == 0, converted.output
    doc = json.loads(converted.output)
    assert doc["verification"]["exact_max"] < 1e-12
    assert doc["plan"]["warnings"] == []
    verified = runner.invoke(main, ["verify", str(train), str(deploy_path), *check])
    assert verified.exit_code == 0, verified.output
    deploy = zoo.build(name, deploy=True)
    deploy.load_state_dict(load_file(deploy_path), strict=True)
    # Names never lie: into the train class by the conv-BN convention, the file computes the
    # train output, or that strict load fails.
    by_convention = by_conv_bn_convention(zoo.build(name), load_file(deploy_path))
    if by_convention is not None:
        trained = zoo.build(name).eval()
        trained.load_state_dict(torch.load(train, weights_only=True))
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert (by_convention(x) - trained(x)).abs().max() <= 1e-4 * trained(x).abs().max()
    assert sum(p.numel() for p in deploy.parameters()) == doc["params_after"]
    if name in RELEASED_DEPLOY_PARAMS:
        assert millions(deploy) == RELEASED_DEPLOY_PARAMS[name]


def test_zoo_list_shows_every_entry():
    doc = json.loads(CliRunner().invoke(main, ["zoo", "list", "--json"]).output)
    rows = {r["name"]: r for r in doc["models"]}
    assert set(rows) == set(zoo.list_models())
    assert round(rows["repvgg_a0"]["deploy_params"] / 1e6, 2) == 8.31
    assert round(rows["repvgg_a0"]["train_params"] / 1e6, 2) == 9.11


def test_zoo_save_is_seeded_and_randomized(tmp_path):
    runner = CliRunner()
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path, extra in zip(paths, (["--randomize-bn"], ["--randomize-bn"], [])):
        assert runner.invoke(main, ["zoo", "save", "repvgg_a0", str(path), *extra]).exit_code == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    plain, randomized_bn = load_file(paths[2]), load_file(paths[0])
    assert torch.equal(plain["stage0.rbr_dense.bn.running_var"], torch.ones(48))
    assert not torch.equal(randomized_bn["stage0.rbr_dense.bn.running_var"], torch.ones(48))
