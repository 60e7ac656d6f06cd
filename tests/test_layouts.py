"""Issue 13: public block layouts, without their own methods, fused by the data-flow pass.

The `*_copy_*` tests check the block copies in tests/layouts.py against upstream's forward (they
pass without the fuser). The others need the "dataflow" pass (repconv/rules/dataflow.py): every
block fused into one conv child, exact in float64, through files too; non-linear look-alikes
left alone with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import layouts as L
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import by_conv_bn_convention, randomized, rel_error
from safetensors.torch import load_file
from torch import nn

import repconv
from repconv import engine
from repconv.cli import main
from repconv.tolerances import written_limit

ARCH = str(Path(__file__).with_name("layouts.py")) + ":build"
SHAPE = (3, 8, 8)
# float16 convs run on the CPU in torch 2.13, so half precision is tested as such.
DTYPES = [torch.float64, torch.float32, torch.float16]
EXACT = 1e-12


def layout_net(layout: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # the same conv weights every call
    return randomized(L.build(layout), seed=seed + 1, dtype=dtype)


def blocks_of(model: nn.Module, types=L.BLOCK_TYPES) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, types)}


def is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase)


def sample(dtype, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, *SHAPE, generator=generator, dtype=torch.float64).to(dtype)


# ---- the block copies compute what upstream's forward does (pass without the fuser) ---------


def zero_bn_(bn: nn.BatchNorm2d) -> None:
    """The BN's output becomes exactly 0, so its branch drops out of the sum."""
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()


def check_yolov7(x):
    block = randomized(L.YoloV7RepConv(4, 4, act=nn.ReLU()))
    zero_bn_(block.rbr_1x1[1])
    zero_bn_(block.rbr_identity)
    return block(x), torch.relu(block.rbr_dense[1](block.rbr_dense[0](x)))


def check_qarepvgg(x):
    block = randomized(L.QARepVGGBlock(4, 4))
    with torch.no_grad():
        block.rbr_1x1.weight.zero_()
    dense = block.rbr_dense.bn(block.rbr_dense.conv(x))
    return block(x), torch.relu(block.bn(dense + x))


def check_qarepvgg_v2(x):
    block = randomized(L.QARepVGGBlockV2(4, 4))
    with torch.no_grad():
        block.rbr_1x1.weight.zero_()
    avg = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
    dense = block.rbr_dense.bn(block.rbr_dense.conv(x))
    return block(x), torch.relu(block.bn(dense + x + avg))


def check_alpha(x):
    block = randomized(L.AlphaRepVGGBlock(4, 4))
    with torch.no_grad():
        block.alpha.fill_(2.5)
    zero_bn_(block.rbr_identity)
    dense, one = block.rbr_dense(x), block.rbr_1x1.bn(block.rbr_1x1.conv(x))
    return block(x), torch.relu(dense + 2.5 * one)


def check_rtdetr(x):
    block = randomized(L.RTDETRRepVggBlock(4, 4))
    zero_bn_(block.conv2.norm)
    return block(x), torch.relu(block.conv1.norm(block.conv1.conv(x)))


def check_mobileone(x):
    block = randomized(L.MobileOneBlock(4, 4, 3, 1, 1, groups=4, num_conv_branches=2))
    for bn in (block.rbr_conv[1].bn, block.rbr_scale.bn, block.rbr_skip):
        zero_bn_(bn)
    return block(x), torch.relu(block.rbr_conv[0].bn(block.rbr_conv[0].conv(x)))


def check_replknet(x):
    block = randomized(L.ReparamLargeKernelConv(4, 4, 7, 1, 4, 3))
    zero_bn_(block.small_conv.bn)
    return block(x), block.lkb_origin.bn(block.lkb_origin.conv(x))


def check_unireplknet(x):
    block = randomized(L.DilatedReparamBlock(4, 9))
    for k, r in zip(block.kernel_sizes, block.dilates):
        if (k, r) != (3, 4):
            zero_bn_(getattr(block, f"dil_bn_k{k}_{r}"))
    zero_bn_(block.origin_bn)
    conv = block.dil_conv_k3_4
    assert conv.dilation == (4, 4) and conv.padding == (4, 4)
    return block(x), block.dil_bn_k3_4(F.conv2d(x, conv.weight, None, 1, 4, 4, 4))


def check_yolov10(x):
    block = randomized(L.RepVGGDW(4))
    zero_bn_(block.conv1.bn)
    return block(x), F.silu(block.conv.bn(block.conv.conv(x)))


def check_ultralytics(x):
    block = randomized(L.UltralyticsRepConv(4, 4, bn=True))
    dense = block.conv1.bn(F.conv2d(x, block.conv1.conv.weight, None, 1, 1))
    one = block.conv2.bn(F.conv2d(x, block.conv2.conv.weight))
    return block(x), F.silu(dense + one + block.bn(x))


def check_sg_qarepvgg(x):
    block = randomized(L.SGQARepVGGBlock(4, 4, use_alpha=True))
    with torch.no_grad():
        block.alpha.fill_(2.5)
    one = F.conv2d(x, block.branch_1x1.weight, block.branch_1x1.bias)
    dense = block.branch_3x3.bn(F.conv2d(x, block.branch_3x3.conv.weight, None, 1, 1))
    return block(x), torch.relu(block.post_bn(dense + 2.5 * one + x))


def check_repghost(x):
    block = randomized(L.RepGhostModule(4, 4, reparam_identity=True))
    primary, cheap = block.primary_conv, block.cheap_operation
    x1 = torch.relu(primary[1](F.conv2d(x, primary[0].weight)))
    x2 = cheap[1](F.conv2d(x1, cheap[0].weight, None, 1, 1, 1, 4))
    return block(x), torch.relu(x2 + block.fusion_bn[0](x1) + x1)


def orepa_kernel(block) -> torch.Tensor:
    """OREPA's six branches for groups=1, written out apart from the copy's einsums."""
    v, k = block.vector, block.kernel_size
    # the prior is built in float32 (then cast), so a float64 1/k^2 would differ by 1e-9
    assert torch.allclose(block.weight_orepa_avg_avg, torch.full((k, k), 1.0 / k**2).double())
    avg = block.weight_orepa_avg_conv * block.weight_orepa_avg_avg
    pfir = block.weight_orepa_pfir_conv * block.weight_orepa_prior[:, None]
    first = (block.weight_orepa_1x1_kxk_idconv1 + block.id_tensor).flatten(1)  # [t, i]
    one_kxk = (first.T[None, :, :, None, None] * block.weight_orepa_1x1_kxk_conv2[:, None]).sum(2)
    one = torch.zeros_like(block.weight_orepa_origin)
    one[:, :, k // 2, k // 2] = block.weight_orepa_1x1[:, :, 0, 0]
    dw = block.weight_orepa_gconv_dw.reshape(block.in_channels, 8, k, k)  # [i, t, h, w]
    pw = block.weight_orepa_gconv_pw.reshape(-1, block.in_channels, 8)  # [o, i, t]
    gconv = (pw[..., None, None] * dw[None]).sum(2)
    parts = (block.weight_orepa_origin, avg, pfir, one_kxk, one, gconv)
    return sum(v[n][:, None, None, None] * part for n, part in enumerate(parts))


def check_orepa(x):
    block = L._scaled_branches(randomized(L.OREPA(4, 4, 3, 1, 1, nonlinear=nn.ReLU())))
    want = torch.relu(block.bn(F.conv2d(x, orepa_kernel(block), None, 1, 1)))
    return block(x), want


COPY_CHECKS = {
    "yolov7_repconv": check_yolov7,
    "yolov6_qarepvgg": check_qarepvgg,
    "yolov6_qarepvgg_v2": check_qarepvgg_v2,
    "alpha_repvgg": check_alpha,
    "rtdetr_repvgg": check_rtdetr,
    "mobileone": check_mobileone,
    "replknet": check_replknet,
    "unireplknet": check_unireplknet,
    "yolov10_repvggdw": check_yolov10,
    "ultralytics_repconv": check_ultralytics,
    "sg_qarepvgg": check_sg_qarepvgg,
    "repghost": check_repghost,
    "orepa": check_orepa,
}


@pytest.mark.parametrize("layout", L.LAYOUTS)
def test_copy_sums_its_branches_as_upstream_does(layout):
    """All branches but one zeroed: the block is that branch (then its post-sum ops)."""
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        got, want = COPY_CHECKS[layout](x)
    assert rel_error(got, want) < EXACT


@pytest.mark.parametrize(
    ("layout", "shape"),
    [
        ("yolov7_repconv", (2, 8, 4, 4)),
        ("yolov6_qarepvgg", (2, 8, 4, 4)),
        ("yolov6_qarepvgg_v2", (2, 8, 4, 4)),
        ("alpha_repvgg", (2, 8, 4, 4)),
        ("rtdetr_repvgg", (2, 8, 8, 8)),
        ("mobileone", (2, 8, 4, 4)),
        ("replknet", (2, 8, 4, 4)),
        ("unireplknet", (2, 4, 8, 8)),
        ("yolov10_repvggdw", (2, 4, 8, 8)),
        ("ultralytics_repconv", (2, 8, 4, 4)),
        ("sg_qarepvgg", (2, 8, 4, 4)),
        ("repghost", (2, 8, 4, 4)),
        ("orepa", (2, 8, 4, 4)),
    ],
)
def test_copy_net_shapes_and_branch_children(layout, shape):
    model = layout_net(layout)
    with torch.no_grad():
        assert tuple(model(sample(torch.float64)).shape) == shape
    for block in blocks_of(model).values():
        convs = [m for m in block.modules() if is_conv(m)]
        branches = [p for p in block.state_dict() if "weight" in p and "bn" not in p]
        assert len(convs) >= 2 or len(branches) >= 2, "every layout block has two branches"


def test_copy_branch_presence_follows_upstream_conditions():
    assert L.YoloV7RepConv(4, 8, 3, 2).rbr_identity is None
    assert isinstance(L.YoloV7RepConv(4, 4).rbr_identity, nn.BatchNorm2d)
    v2 = L.QARepVGGBlockV2(4, 4)
    assert isinstance(v2.rbr_identity, nn.Identity) and v2.rbr_avg.count_include_pad
    assert L.QARepVGGBlockV2(4, 4, stride=2).rbr_avg is None
    assert L.MobileOneBlock(4, 4, 1, 1, 0).rbr_scale is None
    assert L.MobileOneBlock(4, 4, 3, 2, 1).rbr_skip is None
    uni = L.DilatedReparamBlock(4, 13)
    names = {n for n, _ in uni.named_children()}
    assert {"dil_conv_k7_2", "dil_bn_k3_5", "lk_origin", "origin_bn"} <= names
    assert max(uni.dilates) == 5


# ---- fused in memory (need the dataflow pass) ---------------------------------------------------


def assert_fused(model: nn.Module, applied, layout: str = "") -> None:
    rule, attribute = L.fused_by(layout)
    fused = {(o.path, o.rule) for o in applied.entries if o.status == "fused"}
    kept = L.KEPT_CONVS.get(layout, ())
    for path, block in blocks_of(model).items():
        assert (path, rule) in fused, f"{path} ({type(block).__name__}) not fused by {rule}"
        assert not [m for m in block.modules() if is_norm(m)], f"norm left in {path}"
        convs = [n for n, m in block.named_modules() if is_conv(m) and n not in kept]
        assert len(convs) == 1, f"{path} holds convs {convs}"
        assert isinstance(block.get_submodule(attribute), nn.modules.conv._ConvNd)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", L.LAYOUTS)
def test_every_block_is_fused_into_one_conv(layout, dtype):
    model = layout_net(layout, dtype)
    x = sample(dtype)
    with torch.no_grad():
        reference = model(x)
        applied = engine.convert_model(model)
        got = model(x)
    assert_fused(model, applied, layout)
    limit = EXACT if dtype == torch.float64 else written_limit(dtype)
    assert rel_error(got, reference) <= limit


@pytest.mark.parametrize("kernel", sorted(L.DILATED_BRANCHES))
def test_every_unireplknet_kernel_size_is_fused(kernel):
    model = randomized(nn.Sequential(L.DilatedReparamBlock(4, kernel), nn.ReLU()))
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        applied = engine.convert_model(model)
        got = model(x)
    assert_fused(model, applied)
    assert model[0].reparam.kernel_size == (kernel, kernel)
    assert rel_error(got, reference) <= EXACT


def test_the_fused_block_keeps_its_path_and_non_linear_parts():
    model = layout_net("yolov6_qarepvgg")
    engine.convert_model(model)
    block = model.blocks[0]
    assert isinstance(block, L.QARepVGGBlock)
    assert isinstance(block.nonlinearity, nn.ReLU) and isinstance(block.se, nn.Identity)
    assert {"rbr_dense", "rbr_1x1", "rbr_identity", "bn"}.isdisjoint(block._modules)
    keys = {k for k in model.state_dict() if k.startswith("blocks.0.")}
    assert keys == {"blocks.0.reparam.weight", "blocks.0.reparam.bias"}


# ---- through files (need the dataflow pass) ----------------------------------------------------


def train_checkpoint(tmp_path: Path, layout: str) -> Path:
    path = tmp_path / f"{layout}.pth"
    torch.save(layout_net(layout, torch.float32).state_dict(), path)
    return path


def cli_convert(tmp_path: Path, layout: str):
    source, out = train_checkpoint(tmp_path, layout), tmp_path / f"{layout}.safetensors"
    args = ["convert", str(source), str(out), "--arch", ARCH, "--json"]
    args += ["--arch-kwargs", json.dumps({"layout": layout}), "--input-shape", "3,8,8"]
    return CliRunner().invoke(main, args), source, out


@pytest.mark.parametrize("layout", L.LAYOUTS)
def test_cli_converts_and_load_deploy_matches_the_train_model(tmp_path, layout):
    result, source, out = cli_convert(tmp_path, layout)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    blocks = {b["path"]: b for b in doc["plan"]["blocks"]}
    for path in blocks_of(L.build(layout)):
        step = blocks.get(path, {})
        assert (step.get("rule"), step.get("status")) == (L.fused_by(layout)[0], "fused"), path
    assert doc["verification"]["exact_max"] <= EXACT

    deploy = repconv.load_deploy(out, ARCH, {"layout": layout})  # strict
    assert not [k for k in deploy.state_dict() if "running_var" in k]
    train = L.build(layout).eval()
    train.load_state_dict(torch.load(source, weights_only=True))
    x = sample(torch.float32)
    with torch.no_grad():
        assert rel_error(deploy(x), train(x)) <= written_limit(torch.float32)
        # Names never lie: read into the train class by the conv-BN convention, the file
        # computes the train output, or fails that strict load.
        by_convention = by_conv_bn_convention(L.build(layout).eval(), load_file(out))
        if by_convention is not None:
            assert rel_error(by_convention(x), train(x)) <= written_limit(torch.float32)


# ---- not linear: left alone with a warning (need the dataflow pass for the warning) ------------


@pytest.mark.parametrize("layout", L.NEGATIVE_LAYOUTS)
def test_non_linear_look_alikes_are_left_alone_with_a_warning(layout):
    model = layout_net(layout)
    x = sample(torch.float64)
    with torch.no_grad():
        reference = model(x)
        applied = engine.convert_model(model)
        got = model(x)
    assert rel_error(got, reference) <= EXACT
    (path,) = blocks_of(model, L.NEGATIVE_TYPES)
    inside = [o for o in applied.entries if o.path == path or o.path.startswith(path + ".")]
    assert not [o for o in inside if o.rule == "dataflow" and o.status == "fused"]
    # The two branches each still hold a conv: nothing merged them.
    assert len([m for m in model.get_submodule(path).modules() if is_conv(m)]) == 2
    warned = [w for w in applied.warnings if w["path"] == path]
    assert warned, f"no warning names {path}: {applied.warnings}"


@pytest.mark.parametrize("layout", L.NEGATIVE_LAYOUTS)
def test_non_linear_look_alikes_never_change_the_output(layout):
    """Whatever is folded, the output stays exact. Fails before issue 13: the repvgg rule claims
    mean_scaled, input_gated and reflect_padded by their `rbr_dense` / `rbr_1x1` names."""
    model = layout_net(layout)
    x = sample(torch.float64)
    with torch.no_grad():
        reference = model(x)
        engine.convert_model(model)
        assert rel_error(model(x), reference) <= EXACT


@pytest.mark.parametrize("layout", ["act_between", "reflect_padded"])
def test_cli_exits_0_on_a_non_linear_look_alike(tmp_path, layout):
    result, source, out = cli_convert(tmp_path, layout)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert "blocks.0" in {w["path"] for w in doc["plan"]["warnings"]}
    deploy = repconv.load_deploy(out, ARCH, {"layout": layout})
    train = L.build(layout).eval()
    train.load_state_dict(torch.load(source, weights_only=True))
    x = sample(torch.float32)
    with torch.no_grad():
        assert rel_error(deploy(x), train(x)) <= written_limit(torch.float32)
