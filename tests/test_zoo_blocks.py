"""The reference blocks: exact state-dict keys, the BN-and-pad and identity-1x1 semantics, and
the demo network's shapes and traceability."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from repconv.zoo.blocks import (
    ACBlock,
    BNAndPadLayer,
    ConvBN,
    DiverseBranchBlock,
    IdentityBasedConv1x1,
    RepVGGBlock,
    conv_bn,
    randomize_bn_,
)
from repconv.zoo.demo import DemoNet

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
BN_NO_AFFINE = ("running_mean", "running_var", "num_batches_tracked")


def bn_keys(prefix: str, affine: bool = True) -> set[str]:
    return {f"{prefix}.{name}" for name in (BN if affine else BN_NO_AFFINE)}


def conv_bn_keys(prefix: str) -> set[str]:
    return {f"{prefix}.conv.weight"} | bn_keys(f"{prefix}.bn")


def keys(module: nn.Module) -> set[str]:
    return set(module.state_dict())


# ---- state-dict keys ------------------------------------------------------------------------


def test_convbn_keys():
    assert keys(ConvBN(4, 8, 3, padding=1)) == {"conv.weight"} | bn_keys("bn")
    assert keys(ConvBN(4, 8, 3, padding=1, deploy=True)) == {"conv.weight", "conv.bias"}
    seq = conv_bn(4, 8, 3, padding=1)
    assert keys(seq) == {"conv.weight"} | bn_keys("bn")
    assert [name for name, _ in seq.named_children()] == ["conv", "bn"]
    assert seq.conv.bias is None


def test_convbn_forward_after_bn_removed():
    torch.manual_seed(0)
    block = ConvBN(4, 8, 3, padding=1, nonlinear=nn.ReLU()).eval()
    x = torch.randn(2, 4, 6, 6)
    assert (block(x) >= 0).all()
    block.bn = nn.Identity()  # a converted block keeps `bn` as an Identity: still works
    torch.testing.assert_close(block(x), F.relu(block.conv(x)))
    del block.bn
    torch.testing.assert_close(block(x), F.relu(block.conv(x)))


def test_repvgg_keys():
    dense, one = conv_bn_keys("rbr_dense"), conv_bn_keys("rbr_1x1")
    assert keys(RepVGGBlock(8, 8)) == dense | one | bn_keys("rbr_identity")
    assert keys(RepVGGBlock(8, 16, stride=2)) == dense | one
    assert keys(RepVGGBlock(8, 8, stride=2)) == dense | one
    assert RepVGGBlock(8, 8, stride=2).rbr_identity is None
    deploy = {"rbr_reparam.weight", "rbr_reparam.bias"}
    assert keys(RepVGGBlock(8, 8, deploy=True)) == deploy
    se = {"se.down.weight", "se.down.bias", "se.up.weight", "se.up.bias"}
    assert keys(RepVGGBlock(32, 32, deploy=True, use_se=True)) == deploy | se
    assert RepVGGBlock(32, 32, use_se=True).se.down.out_channels == 2


def test_repvgg_geometry():
    block = RepVGGBlock(8, 16, 3, stride=2, padding=1, groups=2)
    assert block.rbr_dense.conv.padding == (1, 1) and block.rbr_dense.conv.groups == 2
    assert block.rbr_1x1.conv.kernel_size == (1, 1) and block.rbr_1x1.conv.padding == (0, 0)
    assert block.rbr_1x1.conv.stride == (2, 2)
    deploy = RepVGGBlock(8, 16, 3, stride=2, padding=1, padding_mode="reflect", deploy=True)
    assert deploy.rbr_reparam.padding_mode == "reflect"


def test_acb_keys_and_padding():
    pairs = ("square", "ver", "hor")
    train = set().union(*({f"{p}_conv.weight"} | bn_keys(f"{p}_bn") for p in pairs))
    block = ACBlock(4, 8, 3, padding=1)
    assert keys(block) == train
    assert block.crop == 0 and block.deploy is False
    assert block.ver_conv.kernel_size == (3, 1) and block.ver_conv.padding == (1, 0)
    assert block.hor_conv.kernel_size == (1, 3) and block.hor_conv.padding == (0, 1)
    no_affine = set().union(*({f"{p}_conv.weight"} | bn_keys(f"{p}_bn", False) for p in pairs))
    assert keys(ACBlock(4, 8, 3, padding=1, use_affine=False)) == no_affine
    deploy = ACBlock(4, 8, 3, padding=1, padding_mode="circular", deploy=True)
    assert keys(deploy) == {"fused_conv.weight", "fused_conv.bias"}
    assert deploy.deploy is True and deploy.fused_conv.padding_mode == "circular"


def test_acb_crop_case():
    block = ACBlock(4, 8, 5, padding=1).eval()
    assert block.crop == 1
    assert block.ver_conv.padding == (1, 0) and block.hor_conv.padding == (0, 1)
    x = torch.randn(2, 4, 9, 9)
    out = block(x)
    assert out.shape == (2, 8, 7, 7)
    ver = block.ver_bn(block.ver_conv(x[:, :, :, 1:-1]))
    hor = block.hor_bn(block.hor_conv(x[:, :, 1:-1, :]))
    torch.testing.assert_close(out, block.square_bn(block.square_conv(x)) + ver + hor)
    wide = ACBlock(4, 8, 5, padding=3)
    assert wide.crop == 0
    assert wide.ver_conv.padding == (3, 1) and wide.hor_conv.padding == (1, 3)


def dbb_keys(prefix, *, one_by_one, avg_conv, first, internal_bn=True):
    out = conv_bn_keys(f"{prefix}dbb_origin") | bn_keys(f"{prefix}dbb_avg.avgbn")
    if one_by_one:
        out |= conv_bn_keys(f"{prefix}dbb_1x1")
    if avg_conv:
        out |= {f"{prefix}dbb_avg.conv.weight"} | bn_keys(f"{prefix}dbb_avg.bn.bn")
    kxk = f"{prefix}dbb_1x1_kxk"
    out |= {f"{kxk}.{first}.weight", f"{kxk}.conv2.weight"}
    out |= bn_keys(f"{kxk}.bn1.bn") | bn_keys(f"{kxk}.bn2")
    return out


def test_dbb_keys():
    dense = DiverseBranchBlock(8, 16, 3, padding=1)
    assert keys(dense) == dbb_keys("", one_by_one=True, avg_conv=True, first="idconv1")
    assert [n for n, _ in dense.dbb_avg.named_children()] == ["conv", "bn", "avg", "avgbn"]
    assert dense.dbb_avg.bn.pad_pixels == 1 and dense.dbb_avg.avg.padding == 0
    assert isinstance(dense.dbb_1x1_kxk.idconv1, IdentityBasedConv1x1)
    assert dense.dbb_1x1_kxk.conv2.padding == (0, 0)

    wide = DiverseBranchBlock(8, 16, 3, padding=1, internal_channels_1x1_3x3=12)
    assert keys(wide) == dbb_keys("", one_by_one=True, avg_conv=True, first="conv1")
    assert wide.dbb_1x1_kxk.conv1.out_channels == 12

    depthwise = DiverseBranchBlock(8, 8, 3, padding=1, groups=8)
    assert keys(depthwise) == dbb_keys("", one_by_one=False, avg_conv=False, first="conv1")
    assert [n for n, _ in depthwise.dbb_avg.named_children()] == ["avg", "avgbn"]
    assert depthwise.dbb_avg.avg.padding == 1
    assert depthwise.dbb_1x1_kxk.conv1.out_channels == 16  # 2x internal channels
    assert not hasattr(depthwise, "dbb_1x1")

    depthwise_id = DiverseBranchBlock(8, 8, 3, padding=1, groups=8, internal_channels_1x1_3x3=8)
    assert "dbb_1x1_kxk.idconv1.weight" in keys(depthwise_id)

    deploy = DiverseBranchBlock(8, 16, 3, padding=1, deploy=True, nonlinear=nn.ReLU())
    assert keys(deploy) == {"dbb_reparam.weight", "dbb_reparam.bias"}
    with pytest.raises(AssertionError):
        DiverseBranchBlock(8, 16, 3, padding=0)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_dbb_forward_sums_branches(groups):
    torch.manual_seed(0)
    block = randomize_bn_(DiverseBranchBlock(8, 8, 3, stride=2, padding=1, groups=groups)).eval()
    x = torch.randn(2, 8, 9, 9)
    expect = block.dbb_origin(x) + block.dbb_avg(x) + block.dbb_1x1_kxk(x)
    if hasattr(block, "dbb_1x1"):
        expect = expect + block.dbb_1x1(x)
    out = block(x)
    assert out.shape == (2, 8, 5, 5)
    torch.testing.assert_close(out, expect)


# ---- BN-and-pad, identity 1x1 ---------------------------------------------------------------


def naive_bn_and_pad(layer: BNAndPadLayer, x: torch.Tensor) -> torch.Tensor:
    bn, p = layer.bn, layer.pad_pixels
    y = bn(x)
    if p == 0:
        return y
    zero = bn.training
    bn.eval()
    values = bn(torch.zeros(1, x.shape[1], 1, 1)).view(-1)
    bn.train(zero)
    out = torch.empty(y.shape[0], y.shape[1], y.shape[2] + 2 * p, y.shape[3] + 2 * p)
    for c in range(y.shape[1]):
        out[:, c] = values[c]
    out[:, :, p:-p, p:-p] = y
    return out


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("pad", [0, 1, 2])
def test_bn_and_pad_matches_naive(affine, pad):
    torch.manual_seed(pad)
    layer = randomize_bn_(BNAndPadLayer(pad, 5, affine=affine)).eval()
    x = torch.randn(3, 5, 4, 6)
    out = layer(x)
    assert out.shape == (3, 5, 4 + 2 * pad, 6 + 2 * pad)
    with torch.no_grad():
        torch.testing.assert_close(out, naive_bn_and_pad(layer, x))


def test_bn_and_pad_train_mode_pads_with_running_stats():
    torch.manual_seed(1)
    layer = randomize_bn_(BNAndPadLayer(1, 3))
    x = torch.randn(4, 3, 5, 5)
    out = layer(x)
    # As in the release, the values come from the running stats *after* this batch updated them.
    values = layer.pad_values().detach()
    torch.testing.assert_close(out[:, :, 0, 0], values.expand(4, 3))
    torch.testing.assert_close(out[:, :, -1, 2], values.expand(4, 3))
    out.sum().backward()  # differentiable without in-place writes


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_conv1x1_is_identity(groups):
    conv = IdentityBasedConv1x1(6, groups)
    assert keys(conv) == {"weight"}
    assert conv.bias is None and bool((conv.weight == 0).all())
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(conv(x), x)
    kernel = conv.get_actual_kernel()
    per_group = 6 // groups
    assert kernel.shape == (6, per_group, 1, 1)
    for c in range(6):
        assert kernel[c, c % per_group, 0, 0] == 1
        assert kernel[c].sum() == 1


def test_identity_conv1x1_adds_weight_and_builds_on_meta():
    torch.manual_seed(0)
    conv = IdentityBasedConv1x1(4, 2)
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.get_actual_kernel(), groups=2))
    meta = IdentityBasedConv1x1(4, 2).to("meta")
    assert meta.get_actual_kernel().device.type == "meta"


# ---- randomize_bn_ --------------------------------------------------------------------------


def test_randomize_bn_ranges_and_generator():
    model = nn.Sequential(nn.BatchNorm2d(64), nn.BatchNorm2d(64, affine=False), nn.BatchNorm1d(8))
    randomize_bn_(model, torch.Generator().manual_seed(3))
    bn = model[0]
    assert bool(((bn.running_var >= 0.5) & (bn.running_var <= 2)).all())
    assert bool(((bn.weight >= 0.5) & (bn.weight <= 1.5)).all())
    assert bn.running_mean.abs().max() > 0 and bn.bias.abs().max() > 0
    assert model[1].weight is None and model[1].running_mean.abs().max() > 0
    assert bn.weight.requires_grad
    again = randomize_bn_(nn.Sequential(nn.BatchNorm2d(64)), torch.Generator().manual_seed(3))
    torch.testing.assert_close(again[0].running_mean, bn.running_mean)


# ---- the demo network -----------------------------------------------------------------------


@pytest.mark.parametrize("deploy", [False, True])
def test_demonet_forward_shapes(deploy):
    model = DemoNet(deploy=deploy).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert DemoNet(deploy=deploy, num_classes=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert DemoNet.default_cfg == {"input_size": (3, 32, 32)}


def test_demonet_keys():
    train, deploy = keys(DemoNet()), keys(DemoNet(deploy=True))
    assert {"head_conv.0.weight", "head_conv.0.bias", "fc.weight", "fc.bias"} <= deploy
    assert "head_conv.1.running_mean" in train and "head_conv.0.bias" not in train
    assert "repvgg.rbr_identity.weight" in train
    assert not any(k.startswith("repvgg_down.rbr_identity") for k in train)
    assert "dbb.dbb_1x1.conv.weight" in train and "dbb_dw.dbb_avg.avgbn.weight" in train
    assert not any(k.startswith(("dbb_dw.dbb_1x1.", "dbb_dw.dbb_avg.conv")) for k in train)
    fused = {
        "stem.conv",
        "acb.fused_conv",
        "repvgg_down.rbr_reparam",
        "repvgg.rbr_reparam",
        "dbb.dbb_reparam",
        "dbb_dw.dbb_reparam",
        "head_conv.0",
        "fc",
    }
    assert deploy == {f"{m}.{p}" for m in fused for p in ("weight", "bias")}


def test_demonet_traces_with_fx():
    torch.manual_seed(0)
    model = randomize_bn_(DemoNet()).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))
    deploy = DemoNet(deploy=True).eval()
    torch.testing.assert_close(torch.fx.symbolic_trace(deploy)(x), deploy(x))


def test_blocks_trace_with_fx():
    x = torch.randn(2, 8, 10, 10)
    blocks = [
        RepVGGBlock(8, 16, use_se=True),
        ACBlock(8, 8, 5, padding=1),
        DiverseBranchBlock(8, 8, 3, padding=1, groups=8, internal_channels_1x1_3x3=8),
        BNAndPadLayer(2, 8),
    ]
    for block in blocks:
        block = randomize_bn_(block).eval()
        torch.testing.assert_close(torch.fx.symbolic_trace(block)(x), block(x))


def test_demonet_builds_on_meta():
    with torch.device("meta"):
        model = DemoNet()
    out = model(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, 10) and out.device.type == "meta"


def test_the_zoo_registry_loads_once_for_threads_that_ask_at_the_same_time(tmp_path, monkeypatch):
    """A thread asking while another imports the model modules waits for them (a Dask worker
    converts two entries at once; one used to find the registry marked loaded but empty)."""
    import sys
    import textwrap
    import threading

    from repconv.zoo import registry

    (tmp_path / "slow_zoo.py").write_text(
        textwrap.dedent(
            """
            import time
            from torch import nn
            from repconv.zoo.registry import register_model

            time.sleep(0.3)

            @register_model(family="test")
            def slow_net(deploy=False):
                return nn.Identity()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_zoo", raising=False)
    monkeypatch.setattr(registry, "_MODEL_MODULES", ("slow_zoo",))
    monkeypatch.setattr(registry, "_entries", {})
    monkeypatch.setattr(registry, "_loaded", False)
    found = []
    threads = [
        threading.Thread(target=lambda: found.append(registry.get_entry("slow_net")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [entry.name for entry in found if entry is not None] == ["slow_net", "slow_net"]
