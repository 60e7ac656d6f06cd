"""Issue 14: `--deploy-arch` fills the user's own deploy model, whatever its names.

The `*_pair_*` tests check the train/deploy pairs of tests/deploy_layouts.py themselves (they pass
without the feature): each deploy form computes what upstream's deploy forward does, and filled by
hand from the fused train model it matches the train model. The others need repconv/deploy_map.py
(strict xfail until it lands).

YOLOv6's QARepVGGBlock and QARepVGGBlockV2 deploy forms keep their post-sum `bn` live after
`rbr_reparam` ("yolov6_live_bn", "yolov6_v2_live_bn"): the conversion keeps what the deploy model
has and its forward runs out of the fold (`repconv.deploy_constraint`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import textwrap
from pathlib import Path

import deploy_layouts as D
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import randomized, rel_error
from safetensors.torch import load_file, save_file
from torch import nn

import repconv
from repconv import arch, engine
from repconv.cli import main
from repconv.deploy_constraint import kept_by
from repconv.files import read_safetensors_metadata
from repconv.tolerances import written_limit

ARCH = str(Path(__file__).with_name("deploy_layouts.py")) + ":build"
SHAPE = (3, 8, 8)
EXACT = 1e-12
DEPLOY_MAP = importlib.util.find_spec("repconv.deploy_map") is not None
needs_deploy_map = pytest.mark.xfail(
    not DEPLOY_MAP, reason="needs --deploy-arch (issue 14, repconv/deploy_map.py)", strict=True
)


def train_net(layout: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the same conv weights every call
    return randomized(D.build(layout), seed=seed + 1, dtype=dtype)


def deploy_net(layout: str, dtype=torch.float64) -> nn.Module:
    return D.build(layout, deploy=True).to(dtype).eval()


def sample(dtype=torch.float64, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, *SHAPE, generator=generator, dtype=torch.float64).to(dtype)


def kwargs(layout: str, deploy: bool, **extra) -> str:
    return json.dumps({"layout": layout, "deploy": deploy, **extra})


# ---- the pairs themselves (pass without the feature) ---------------------------------------------


def randomize_(module: nn.Module, seed: int = 3) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return module.double().eval()


def deploy_forward_checks(x: torch.Tensor):
    """(got, want) per deploy form: want is upstream's deploy forward written out."""
    block = randomize_(D.YoloV7RepConv(4, 4, act=nn.ReLU(), deploy=True))
    yield block(x), torch.relu(block.rbr_reparam(x))
    block = randomize_(D.MobileOneBlock(4, 4, 3, 1, 1, groups=4, inference_mode=True))
    yield (
        block(x),
        torch.relu(F.conv2d(x, block.reparam_conv.weight, block.reparam_conv.bias, 1, 1, 1, 4)),
    )
    block = randomize_(D.ReparamLargeKernelConv(4, 4, 7, 1, 4, 3, small_kernel_merged=True))
    yield block(x), F.conv2d(x, block.lkb_reparam.weight, block.lkb_reparam.bias, 1, 3, 1, 4)
    block = randomize_(D.RTDETRRepVggBlock(4, 4, deploy=True))
    yield block(x), torch.relu(F.conv2d(x, block.conv.weight, block.conv.bias, 1, 1))
    block = randomize_(D.RepGhostModule(4, 4, deploy=True))
    primary = torch.relu(block.primary_conv[1](block.primary_conv[0](x)))  # its BN live
    cheap = F.conv2d(primary, block.cheap_operation.weight, block.cheap_operation.bias, 1, 1, 1, 4)
    yield block(x), torch.relu(cheap)
    block = randomize_(D.QARepVGGBlock(4, 4, deploy=True))
    yield block(x), torch.relu(block.rbr_reparam(x))
    block = randomize_(D.QARepVGGBlock(4, 4, deploy=True, keep_bn=True)).eval()
    yield block(x), torch.relu(block.bn(block.rbr_reparam(x)))
    block = randomize_(D.QARepVGGBlockV2(4, 4, deploy=True))
    yield block(x), torch.relu(block.rbr_reparam(x))
    block = randomize_(D.AlphaRepVGGBlock(4, 4, deploy=True))
    yield block(x), torch.relu(block.rbr_reparam(x))
    block = randomize_(D.DilatedReparamBlock(4, 7, deploy=True))
    yield block(x), F.conv2d(x, block.lk_origin.weight, block.lk_origin.bias, 1, 3, 1, 4)
    block = randomize_(D.RepVGGDW(4, deploy=True))
    yield block(x), F.silu(F.conv2d(x, block.conv.weight, block.conv.bias, 1, 3, 1, 4))


def test_pair_deploy_forms_compute_what_upstream_deploy_forward_does():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for got, want in deploy_forward_checks(x):
            assert rel_error(got, want) < EXACT


def test_pair_deploy_forms_build_only_their_deploy_children():
    assert not hasattr(D.YoloV7RepConv(4, 4, deploy=True), "rbr_dense")
    mobileone = D.MobileOneBlock(4, 4, 3, 1, 1, inference_mode=True)
    assert {n for n, _ in mobileone.named_children()} == {"se", "activation", "reparam_conv"}
    assert {n for n, _ in D.ReparamLargeKernelConv(4, 4, 7, 1, 4, 3, True).named_children()} == {
        "lkb_reparam"
    }
    rtdetr = D.RTDETRRepVggBlock(4, 4, deploy=True)  # keeps its dead branches, as upstream
    assert {"conv", "conv1", "conv2"} <= {n for n, _ in rtdetr.named_children()}
    assert rtdetr.conv.bias is not None and rtdetr.conv.kernel_size == (3, 3)
    assert isinstance(D.RepGhostModule(4, 4, deploy=True).cheap_operation, nn.Conv2d)
    assert isinstance(D.RepGhostModule(4, 4).cheap_operation, nn.Sequential)
    yolov6 = D.QARepVGGBlock(4, 4, deploy=True)
    assert {n for n, _ in yolov6.named_children()} == {"nonlinearity", "se", "rbr_reparam"}
    yolov6_v2 = D.QARepVGGBlockV2(4, 4, deploy=True)
    assert {n for n, _ in yolov6_v2.named_children()} == {"nonlinearity", "se", "rbr_reparam"}
    alpha = D.AlphaRepVGGBlock(4, 4, deploy=True)  # mmyolo keeps `alpha`, dead
    assert {n for n, _ in alpha.named_children()} == {"nonlinearity", "se", "rbr_reparam"}
    assert [n for n, _ in alpha.named_parameters(recurse=False)] == ["alpha"]
    unirep = D.DilatedReparamBlock(4, 7, deploy=True)
    assert {n for n, _ in unirep.named_children()} == {"lk_origin"}
    assert unirep.lk_origin.bias is not None
    repvggdw = D.RepVGGDW(4, deploy=True)  # `conv` is a bare conv, `conv1` is gone
    assert {n for n, _ in repvggdw.named_children()} == {"conv", "act"}
    assert isinstance(repvggdw.conv, nn.Conv2d) and repvggdw.conv.bias is not None


def test_pair_train_forms_are_the_layouts_copies():
    """The train forms are tests/layouts.py's upstream copies: the same keys."""
    import layouts as L

    pairs = [
        (D.YoloV7RepConv(4, 4), L.YoloV7RepConv(4, 4)),
        (
            D.MobileOneBlock(4, 4, 3, 1, 1, num_conv_branches=2),
            L.MobileOneBlock(4, 4, 3, 1, 1, num_conv_branches=2),
        ),
        (D.ReparamLargeKernelConv(4, 4, 7, 1, 4, 3), L.ReparamLargeKernelConv(4, 4, 7, 1, 4, 3)),
        (D.RTDETRRepVggBlock(4, 4), L.RTDETRRepVggBlock(4, 4)),
        (D.QARepVGGBlock(4, 4), L.QARepVGGBlock(4, 4)),
        (D.QARepVGGBlockV2(4, 4), L.QARepVGGBlockV2(4, 4)),
        (D.AlphaRepVGGBlock(4, 4), L.AlphaRepVGGBlock(4, 4)),
        (D.DilatedReparamBlock(4, 7), L.DilatedReparamBlock(4, 7)),
        (D.RepVGGDW(4), L.RepVGGDW(4)),
        (D.RepGhostModule(4, 4), L.RepGhostModule(4, 4)),
    ]
    for ours, theirs in pairs:
        assert list(ours.state_dict()) == list(theirs.state_dict())


def test_pair_repghost_train_form_adds_the_fusion_bn_to_the_cheap_operation():
    block = randomized(D.RepGhostModule(4, 4))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    conv, bn, _ = block.primary_conv
    x1 = torch.relu(bn(conv(x)))
    cheap = block.cheap_operation[1](block.cheap_operation[0](x1))
    want = torch.relu(cheap + block.fusion_bn[0](x1))
    with torch.no_grad():
        assert rel_error(block(x), want) < EXACT


def renamed_for_deploy(key: str, layout: str) -> str:
    """The fused train model's key as the deploy form names it (what the mapping must find)."""
    key = re.sub(r"\.reparam\.", f".{D.DEPLOY_CONV[layout]}.", key)
    return key.replace(".cheap_operation.0.", ".cheap_operation.")


def fill_by_hand(layout: str, train: nn.Module, deploy: nn.Module) -> None:
    """The expected mapping, spelled out: renamed fused tensors, then dead branches."""
    before = {k: v.clone() for k, v in train.state_dict().items()}
    engine.apply(train, engine.plan(train, keep=D.LIVE.get(layout, ())))
    state = {renamed_for_deploy(k, layout): v for k, v in train.state_dict().items()}
    state.update({k: before[k] for k in deploy.state_dict() if k not in state and k in before})
    deploy.load_state_dict(state, strict=True)


@pytest.mark.parametrize("layout", D.PAIRS)
def test_pair_filled_by_hand_matches_the_train_model(layout):
    train, deploy = train_net(layout), deploy_net(layout)
    x = sample()
    with torch.no_grad():
        reference = train(x)
        fill_by_hand(layout, train, deploy)
        assert rel_error(deploy(x), reference) <= EXACT


@pytest.mark.parametrize("layout", sorted(D.LIVE))
def test_the_deploy_constraint_keeps_what_each_pair_keeps_live(layout):
    """What the deploy form runs of the train modules as they are (spelled out in LIVE) is
    what `deploy_constraint.kept_by` finds; dead branches are not kept."""
    train = train_net(layout)
    deploy = arch.build_empty(ARCH, {"layout": layout, "deploy": True})
    assert kept_by(deploy, train, SHAPE) == sorted(D.LIVE[layout])


def test_pair_yolov6_live_bn_filled_by_hand_does_not_match():
    """Upstream YOLOv6's deploy form keeps `bn` live: copying the train BN into it applies the
    BN twice. A conversion must refuse it (exit 1 or 2), not write it."""
    train, deploy = train_net("yolov6_live_bn"), deploy_net("yolov6_live_bn")
    x = sample()
    with torch.no_grad():
        reference = train(x)
        before = {k: v.clone() for k, v in train.state_dict().items()}
        engine.convert_model(train)
        state = {k.replace(".reparam.", ".rbr_reparam."): v for k, v in train.state_dict().items()}
        state.update({k: before[k] for k in deploy.state_dict() if k not in state})
        deploy.load_state_dict(state, strict=True)
        assert rel_error(deploy(x), reference) > 1e-3


# ---- in memory: repconv.convert(model, deploy_model=...) -----------------------------------------


@needs_deploy_map
@pytest.mark.parametrize("layout", D.PAIRS)
def test_convert_fills_the_deploy_model_exactly(layout):
    train, deploy = train_net(layout), deploy_net(layout)
    x = sample()
    with torch.no_grad():
        reference = copy.deepcopy(train)(x)
    result = repconv.convert(train, deploy_model=deploy, input_shape=SHAPE)
    assert result.model is deploy
    assert result.passed
    fresh = deploy_net(layout)
    fresh.load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        assert rel_error(fresh(x), reference) <= EXACT
        assert rel_error(deploy(x), reference) <= EXACT


# ---- through the CLI -----------------------------------------------------------------------------


def train_checkpoint(tmp_path: Path, layout: str, dtype=torch.float32) -> Path:
    path = tmp_path / f"{layout}-{str(dtype)[6:]}.pth"
    torch.save(train_net(layout, dtype).state_dict(), path)
    return path


def convert_args(source: Path, out: Path, layout: str, deploy_layout: str | None = None) -> list:
    deploy_layout = deploy_layout or layout
    return [
        "convert", str(source), str(out), "--arch", ARCH,
        "--arch-kwargs", kwargs(layout, False), "--input-shape", "3,8,8",
        "--deploy-arch", ARCH, "--deploy-arch-kwargs", kwargs(deploy_layout, True),
    ]  # fmt: skip


def invoke(args: list):
    return CliRunner().invoke(main, [str(a) for a in args])


def train_model_from(source: Path, layout: str) -> nn.Module:
    model = D.build(layout).eval()
    model.load_state_dict(torch.load(source, weights_only=True))
    return model


def assert_loads_strictly_and_matches(out: Path, source: Path, layout: str, dtype) -> None:
    state = load_file(out)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {dtype}
    deploy = deploy_net(layout, torch.float64)
    deploy.load_state_dict(
        {k: v.double() if v.is_floating_point() else v for k, v in state.items()}, strict=True
    )
    train = train_model_from(source, layout).double()
    x = sample()
    with torch.no_grad():
        assert rel_error(deploy(x), train(x)) <= written_limit(dtype)


@needs_deploy_map
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", D.PAIRS)
def test_cli_deploy_arch_writes_a_file_the_deploy_model_loads(tmp_path, layout, dtype):
    source, out = train_checkpoint(tmp_path, layout, dtype), tmp_path / "deploy.safetensors"
    result = invoke([*convert_args(source, out, layout), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["verification"]["exact_max"] <= EXACT
    assert_loads_strictly_and_matches(out, source, layout, dtype)
    assert "deploy_arch" in json.dumps(read_safetensors_metadata(out))


@needs_deploy_map
@pytest.mark.parametrize("layout", ["mobileone", "rtdetr_repvgg", "repghost"])
def test_cli_deploy_kwargs_alone_reuses_the_arch_builder(tmp_path, layout):
    source, out = train_checkpoint(tmp_path, layout), tmp_path / "deploy.safetensors"
    args = ["convert", source, out, "--arch", ARCH, "--arch-kwargs", kwargs(layout, False)]
    result = invoke([*args, "--input-shape", "3,8,8", "--deploy-kwargs", '{"deploy": true}'])
    assert result.exit_code == 0, result.output
    assert_loads_strictly_and_matches(out, source, layout, torch.float32)


@needs_deploy_map
@pytest.mark.parametrize("layout", ["yolov6_qarepvgg", "rtdetr_repvgg"])
def test_convert_file_and_load_deploy_with_a_deploy_arch(tmp_path, layout):
    source, out = train_checkpoint(tmp_path, layout), tmp_path / "deploy.safetensors"
    repconv.convert_file(
        source, out, arch=ARCH, arch_kwargs={"layout": layout, "deploy": False},
        deploy_arch=ARCH, deploy_arch_kwargs={"layout": layout, "deploy": True},
        input_shape=SHAPE,
    )  # fmt: skip
    model = repconv.load_deploy(
        out, ARCH, {"layout": layout, "deploy": False},
        deploy_arch=ARCH, deploy_arch_kwargs={"layout": layout, "deploy": True},
    )  # fmt: skip
    # By name: the builder loads tests/deploy_layouts.py from its path, a module of its own.
    assert type(model.blocks[0]).__name__ in {cls.__name__ for cls in D.BLOCK_TYPES}
    assert hasattr(model.blocks[0], D.DEPLOY_CONV[layout])
    train = train_model_from(source, layout)
    x = sample(torch.float32)
    with torch.no_grad():
        assert rel_error(model(x), train(x)) <= written_limit(torch.float32)


@needs_deploy_map
def test_convert_file_with_deploy_kwargs(tmp_path):
    source, out = train_checkpoint(tmp_path, "mobileone"), tmp_path / "deploy.safetensors"
    repconv.convert_file(
        source, out, arch=ARCH, arch_kwargs={"layout": "mobileone"},
        deploy_kwargs={"deploy": True}, input_shape=SHAPE,
    )  # fmt: skip
    deploy = deploy_net("mobileone", torch.float32)
    deploy.load_state_dict(load_file(out), strict=True)


def verify_args(source: Path, out: Path, layout: str) -> list:
    return [
        "verify", source, out, "--arch", ARCH, "--arch-kwargs", kwargs(layout, False),
        "--deploy-arch", ARCH, "--deploy-arch-kwargs", kwargs(layout, True),
        "--input-shape", "3,8,8",
    ]  # fmt: skip


@needs_deploy_map
@pytest.mark.parametrize("layout", ["replknet", "rtdetr_repvgg"])
def test_verify_with_a_deploy_arch_passes_then_catches_tampering(tmp_path, layout):
    source, out = train_checkpoint(tmp_path, layout), tmp_path / "deploy.safetensors"
    assert invoke(convert_args(source, out, layout)).exit_code == 0
    result = invoke(verify_args(source, out, layout))
    assert result.exit_code == 0, result.output
    meta = read_safetensors_metadata(out)
    state = load_file(out)
    key = next(k for k in state if k.endswith(f"{D.DEPLOY_CONV[layout]}.bias"))
    state[key] = state[key] + 0.5
    save_file(state, out, metadata=meta)
    assert invoke(verify_args(source, out, layout)).exit_code == 1


@needs_deploy_map
@pytest.mark.slow
@pytest.mark.parametrize("where", ["entry", "defaults"])
def test_batch_with_a_deploy_arch(tmp_path, where):
    source = train_checkpoint(tmp_path, "mobileone")
    common = f"""
        arch = "{ARCH}"
        arch_kwargs = {{ layout = "mobileone", deploy = false }}
        input_shape = [3, 8, 8]
    """
    deploy = {
        "entry": f'deploy_arch = "{ARCH}"\n'
        + 'deploy_arch_kwargs = { layout = "mobileone", deploy = true }\n',
        "defaults": "deploy_kwargs = { deploy = true }\n",
    }[where]
    if where == "defaults":
        head, entry = "[defaults]\n" + textwrap.dedent(common) + deploy, ""
    else:
        head, entry = "", textwrap.dedent(common) + deploy
    config = tmp_path / "zoo.toml"
    text = head + f'[[model]]\ninput = "{source.name}"\noutput = "out/{{stem}}.safetensors"\n'
    config.write_text(text + entry)
    result = CliRunner().invoke(main, ["batch", str(config), "--jobs", "1"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / f"{source.stem}.safetensors"
    assert_loads_strictly_and_matches(out, source, "mobileone", torch.float32)


# ---- error paths: exit 2, one line naming paths, no output ---------------------------------------


def expect_mapping_error(tmp_path: Path, args: list, *paths: str) -> str:
    out = Path(args[2])
    result = invoke(args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for path in paths:
        assert path in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    return lines[0]


@needs_deploy_map
def test_an_unmatched_deploy_tensor_is_exit_2_naming_it(tmp_path):
    source, out = train_checkpoint(tmp_path, "repvgg_extra"), tmp_path / "o" / "d.safetensors"
    out.parent.mkdir()
    expect_mapping_error(
        tmp_path, convert_args(source, out, "repvgg_extra"), "blocks.0.extra_scale"
    )


@needs_deploy_map
def test_an_unmatched_train_tensor_is_exit_2_naming_it(tmp_path):
    """A deploy width too small for the checkpoint: nothing fits, paths named on both sides."""
    source, out = train_checkpoint(tmp_path, "mobileone"), tmp_path / "o" / "d.safetensors"
    out.parent.mkdir()
    args = convert_args(source, out, "mobileone")
    args[-1] = kwargs("mobileone", True, width=2)
    expect_mapping_error(tmp_path, args, "reparam_conv")


@needs_deploy_map
def test_two_same_shape_candidates_are_ambiguous_exit_2(tmp_path):
    source, out = train_checkpoint(tmp_path, "two_candidates"), tmp_path / "o" / "d.safetensors"
    out.parent.mkdir()
    line = expect_mapping_error(
        tmp_path,
        convert_args(source, out, "two_candidates"),
        "blocks.0.fused_a",
        "blocks.0.fused_b",
    )
    assert "ambiguous" in line.lower()


@needs_deploy_map
@pytest.mark.parametrize(
    ("layout", "deploy_layout"), [("repvgg", "mobileone"), ("mobileone", "replknet")]
)
def test_a_wrong_deploy_arch_for_the_checkpoint_is_exit_2(tmp_path, layout, deploy_layout):
    source, out = train_checkpoint(tmp_path, layout), tmp_path / "o" / "d.safetensors"
    out.parent.mkdir()
    line = expect_mapping_error(tmp_path, convert_args(source, out, layout, deploy_layout))
    assert "blocks." in line


def test_a_recorded_deploy_builder_is_not_run_without_being_asked(tmp_path):
    """The deploy spec a file records is data: load_deploy and verify build it only when the
    user passes it (or trusts the metadata), as for the recorded --arch."""
    source, out = train_checkpoint(tmp_path, "repvgg"), tmp_path / "d.safetensors"
    repconv.convert_file(
        source, out, arch=ARCH, arch_kwargs={"layout": "repvgg", "deploy": False},
        deploy_arch=ARCH, deploy_arch_kwargs={"layout": "repvgg", "deploy": True},
        input_shape=SHAPE,
    )  # fmt: skip
    with pytest.raises(repconv.BadInput, match="--deploy-arch"):
        repconv.load_deploy(out, ARCH, {"layout": "repvgg", "deploy": False})
    trusted = repconv.load_deploy(
        out, ARCH, {"layout": "repvgg", "deploy": False}, trust_metadata=True
    )
    assert hasattr(trusted.blocks[0], "rbr_reparam")
    train_kwargs = json.dumps({"layout": "repvgg", "deploy": False})
    args = ["verify", str(source), str(out), "--arch", ARCH, "--arch-kwargs", train_kwargs]
    result = invoke([*args, "--input-shape", "3,8,8"])
    assert result.exit_code == 2 and "--deploy-arch" in result.stderr


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--deploy-arch-kwargs", "{}"], "--deploy-arch-kwargs needs --deploy-arch"),
        (["--deploy-arch", ARCH, "--deploy-kwargs", "{}"], "--deploy-arch-kwargs"),
        (["--deploy-kwargs", "{oops"], "--deploy-kwargs is not valid JSON"),
        (["--deploy-kwargs", "[1]"], "--deploy-kwargs must be a JSON object"),
    ],
)
def test_deploy_options_that_do_not_go_together_are_one_line_exit_2(tmp_path, extra, named):
    source, out = train_checkpoint(tmp_path, "repvgg"), tmp_path / "d.safetensors"
    train_kwargs = json.dumps({"layout": "repvgg", "deploy": False})
    args = ["convert", str(source), str(out), "--arch", ARCH, "--arch-kwargs", train_kwargs]
    result = invoke([*args, "--input-shape", "3,8,8", *extra])
    assert result.exit_code == 2, result.output
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
