"""A block's own deploy method, called the way its library does, and never trusted blindly.

The blocks are test copies of library behaviours (tests/method_blocks.py). Each model is converted
through `repconv.convert` (or the CLI) and verified against itself before.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import repconv
from repconv.cli import main
from repconv.deploy_form import PLAIN_PAIRS_KEPT
from repconv.outputs import worst
from repconv.rules import convbn
from repconv.rules.deploy_method import METHOD_NAMES, deploy_method
from tests import method_blocks as B
from tests.helpers import randomized

BLOCKS_FILE = Path(B.__file__)
SHAPE = (3, 12, 12)


def converted(model: nn.Module):
    result = repconv.convert(randomized(model), input_shape=SHAPE)
    assert result.passed, result.verification.failure_message()
    return result


def outcomes(result) -> list[tuple[str, str, str]]:
    return [(o.path, o.rule, o.status) for o in result.plan.entries]


def norms_left(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def test_a_returned_module_takes_the_blocks_place():
    model = nn.Sequential(B.ReturnsConv(3, 4), nn.ReLU(), B.ReturnsConv(4, 4))
    result = converted(model)
    assert outcomes(result) == [("0", "deploy_method", "fused"), ("2", "deploy_method", "fused")]
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Conv2d
    assert norms_left(model) == [] and result.plan.warnings == []
    assert worst(result.verification.exact) < 1e-12


def test_a_root_that_returns_a_module_becomes_that_module():
    model = B.ReturnsConv(3, 4)
    result = converted(model)
    assert outcomes(result) == [("", "deploy_method", "fused")]
    assert type(model) is nn.Conv2d and norms_left(model) == []


def test_a_float32_model_without_verification_is_still_checked_block_by_block():
    model = randomized(B.grouped_yolov7_net(), dtype=torch.float32)
    result = repconv.convert(model, verify=False)
    assert [(o.path, o.rule, o.status) for o in result.plan.entries if o.path == "1"] == [
        ("1", "deploy_method", "skipped"),
        ("1", "dataflow", "fused"),  # the undone block goes on to the data-flow pass
    ]
    assert not hasattr(model[1], "fused")


def test_fuse_convs_switches_to_forward_fuse():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), B.FuseConvsRepConv(4), B.FuseConvsRepConv(4, False))
    result = converted(model)
    assert outcomes(result) == [("1", "deploy_method", "fused"), ("2", "deploy_method", "fused")]
    for block in (model[1], model[2]):
        assert block.forward == block.forward_fuse
        assert not hasattr(block, "conv1") and isinstance(block.conv, nn.Conv2d)
    assert norms_left(model) == []


def test_method_building_default_dtype_tensors_runs_in_the_blocks_dtype():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), B.DefaultDtypeBlock(4))
    result = converted(model)  # randomized() makes it float64
    assert outcomes(result) == [("1", "deploy_method", "fused")]
    assert model[1].merged.weight.dtype == torch.float64
    assert worst(result.verification.exact) < 1e-12
    assert torch.get_default_dtype() == torch.float32  # restored


def test_root_method_runs_and_the_plain_pairs_stay_live_as_the_librarys_form_keeps_them():
    model = B.RootMethodNet()
    result = converted(model)
    assert ("", "deploy_method", "fused") in outcomes(result)
    assert not any(o.rule == "conv_bn" for o in result.plan.entries)
    assert norms_left(model) == ["stem.1", "head.1"]
    assert {w["path"]: w["message"] for w in result.plan.warnings} == {
        path: f"norm left in place: {PLAIN_PAIRS_KEPT}" for path in ("stem.1", "head.1")
    }
    assert result.plan.record().left_out == {"conv_bn": PLAIN_PAIRS_KEPT}


def test_fold_plain_bn_folds_the_pairs_the_librarys_form_keeps():
    model = B.RootMethodNet()
    result = repconv.convert(randomized(model), input_shape=SHAPE, fold_plain_bn=True)
    assert result.passed
    assert ("", "deploy_method", "fused") in outcomes(result)
    pairs = {o.path for o in result.plan.entries if o.rule == "conv_bn" and o.status == "fused"}
    assert pairs == {"stem.0", "head.0"}
    assert norms_left(model) == [] and result.plan.warnings == []
    assert result.plan.record().left_out == {}


def test_children_methods_run_before_their_parents():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), B.NeedsFusedChildren(4))
    result = converted(model)
    assert outcomes(result) == [
        ("1.dense", "deploy_method", "fused"),
        ("1.point", "deploy_method", "fused"),
        ("1", "deploy_method", "fused"),
    ]
    assert isinstance(model[1].reparam, nn.Conv2d) and norms_left(model) == []


def test_a_method_that_raises_is_undone_and_the_block_goes_on_to_the_later_passes():
    model = B.raising_net()
    result = converted(model)
    by_step = {(o.path, o.rule): o for o in result.plan.entries}
    undone = by_step["1", "deploy_method"]
    assert undone.status == "skipped"
    assert "switch_to_deploy() failed" in undone.reason
    assert "boom from the library" in undone.reason
    # x + body(x) is one conv: the data-flow pass folds the norm and the identity into a conv of
    # its own (kept in body.0, the class's forward would add x once more: names never lie).
    assert by_step["1", "dataflow"].status == "fused"
    assert set(model[1].state_dict()) == {"reparam.weight", "reparam.bias"}
    assert any("switch_to_deploy()" in w["message"] for w in result.plan.warnings)


def test_a_method_wrong_for_grouped_convs_is_undone():
    model = B.grouped_yolov7_net()
    result = converted(model)
    by_step = {(o.path, o.rule): o for o in result.plan.entries}
    undone = by_step["1", "deploy_method"]
    assert undone.status == "skipped"
    assert "fuse_repvgg_block() changed the block's output" in undone.reason
    assert not hasattr(model[1], "fused")  # the method's form is not used ...
    assert by_step["1", "dataflow"].status == "fused"  # ... the data flow fuses the block
    assert norms_left(model) == []


def test_the_same_method_is_kept_where_it_is_right():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), B.DiagonalIdentityRepConv(4, groups=1))
    result = converted(model)
    assert outcomes(result) == [("1", "deploy_method", "fused")]
    assert norms_left(model) == []


def test_new_method_names_are_known_in_order():
    for name in (
        "fuse_repvgg_block",
        "merge_kernel",
        "merge_dilated_branches",
        "fuse_block_residual_branches",
        "full_fusion",
        "structural_reparam",
        "local_inject",
    ):
        assert name in METHOD_NAMES
    assert METHOD_NAMES.index("switch_to_deploy") < METHOD_NAMES.index("fuse")

    class Both(nn.Module):
        def fuse(self):
            pass

        def merge_kernel(self):
            pass

    assert deploy_method(Both()) == "merge_kernel"


# ---- through the CLI ----------------------------------------------------------------------------


def checkpoint_of(tmp_path: Path, name: str) -> Path:
    model = randomized(getattr(B, name)(), dtype=torch.float32)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return path


def cli_convert(tmp_path: Path, name: str, *args: str):
    source = checkpoint_of(tmp_path, name)
    out = tmp_path / "deploy.safetensors"
    spec = f"{BLOCKS_FILE}:{name}"
    command = ["convert", str(source), str(out), "--arch", spec, "--input-shape", "3,12,12"]
    return CliRunner().invoke(main, [*command, *args]), out


@pytest.mark.parametrize("name", ["raising_net", "grouped_yolov7_net", "forgetful_net"])
def test_cli_exits_0_and_writes_a_verified_file_when_a_method_is_undone(tmp_path, name):
    result, out = cli_convert(tmp_path, name)
    assert result.exit_code == 0, result.output
    assert out.exists()
    assert "not applied" in result.output


@pytest.mark.parametrize(
    "name",
    ["raising_net", "grouped_yolov7_net", "forgetful_net", "right_yolov7_net", "repvggdw_net"],
)
def test_the_file_loads_into_the_deploy_structure_rebuilt_on_meta(tmp_path, name):
    """Rebuilt on the meta device, where no method can be checked again, the deploy structure
    keeps each method's block as its conversion left it (fused, or undone), so the file loads
    strictly and computes what the train model does."""
    result, out = cli_convert(tmp_path, name)
    assert result.exit_code == 0, result.output
    model = repconv.load_deploy(out, f"{BLOCKS_FILE}:{name}")
    x = torch.randn(1, 3, 12, 12)
    train = getattr(B, name)().eval()
    train.load_state_dict(torch.load(tmp_path / f"{name}.pth", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), train(x), rtol=1e-4, atol=1e-5)


def test_cli_exit_code_3_on_an_internal_error(tmp_path, monkeypatch):
    def broken(model, step):
        raise RuntimeError("injected failure\nsecond line")

    monkeypatch.setattr(convbn.PASS, "fuse_step", broken)
    result, out = cli_convert(tmp_path, "plain_net")
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: internal error: RuntimeError: injected failure (in block 0) "
        "(re-run with -v for the traceback)"
    ]
    assert not out.exists()


def test_the_recorded_plan_rebuilds_an_undone_method_on_meta_without_a_second_build(
    tmp_path, monkeypatch
):
    """The plan recorded in the file says the method was undone; the rebuild on the meta device
    (where the method cannot be judged) replays that, so the model is built once."""
    from repconv import arch

    result, out = cli_convert(tmp_path, "forgetful_net")
    assert result.exit_code == 0, result.output
    builds = []
    construct = arch._construct
    monkeypatch.setattr(arch, "_construct", lambda *a: builds.append(a) or construct(*a))
    repconv.load_deploy(out, f"{BLOCKS_FILE}:forgetful_net")
    assert len(builds) == 1


def test_a_parent_method_that_needs_unfused_children_is_called_before_them():
    """timm's RepVggDw: children first, its fuse() finds a Conv2d child and fails; called on
    the block as it was before its child was fused (timm's order), it folds the whole block."""
    model = B.repvggdw_net()
    result = converted(model)
    assert [o for o in outcomes(result) if o[2] != "fused"] == []
    assert ("1", "deploy_method", "fused") in outcomes(result)
    assert result.plan.warnings == []
    assert type(model[1]) is nn.Conv2d and type(model[3]) is nn.Conv2d  # timm's deploy form
    assert norms_left(model) == []
    assert worst(result.verification.exact) < 1e-12


def test_a_parent_method_wrong_both_ways_leaves_the_block_to_the_data_flow():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), B.CallsChildFuse(4), nn.ReLU())
    result = converted(model)
    by_step = {(o.path, o.rule): o for o in result.plan.entries}
    assert by_step["1.conv", "deploy_method"].status == "fused"
    undone = by_step["1", "deploy_method"]
    assert undone.status == "skipped"  # its fuse() found a Conv2d child, and was wrong before
    assert "AttributeError" in undone.reason and "called before its children's too" in undone.reason
    assert by_step["1", "dataflow"].status == "fused"  # conv + conv1 + identity, post-BN
    assert norms_left(model) == [] and set(model[1].state_dict()) == {
        "reparam.weight",
        "reparam.bias",
    }
    assert worst(result.verification.exact) < 1e-12
