"""Every built-in architecture converts exactly and loads strictly into its own deploy form."""

from __future__ import annotations

import pytest
import torch
from helpers import randomized

import repconv
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
LARGE = {"repvgg_b2", "repvgg_b3", "repvgg_d2se", "repvgg_b3g2", "repvgg_b2g2", "repvgg_b1"}
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
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in MODELS]
)
def test_converts_exactly_and_loads_into_the_deploy_form(name):
    torch.manual_seed(0)
    model = randomized(zoo.build(name), seed=1, dtype=torch.float32)
    result = repconv.convert(model, input_shape=(3, 64, 64), samples=1)
    assert result.passed, result.verification.failure_message()
    assert result.verification.to_dict()["exact_max"] < 1e-12
    assert result.plan.warnings == []
    deploy = zoo.build(name, deploy=True)
    deploy.load_state_dict(result.state_dict, strict=True)
    assert millions(deploy) == millions(result.model)
    if name in RELEASED_DEPLOY_PARAMS:
        assert millions(deploy) == RELEASED_DEPLOY_PARAMS[name]
