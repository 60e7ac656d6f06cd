"""The INT8 readiness report: its numbers against independent computations, planted outliers
ranked first and blamed on the right branch, and the CLI's --int8-report / --int8 / --calib."""

from __future__ import annotations

import json
import math
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from repconv import int8 as Q
from repconv import pipeline
from repconv.calibration import Calibration
from repconv.cli import main
from repconv.kernels import Branch
from tests.int8_blocks import CHANNELS, planted_net, qa_net, repvgg_net

SHAPE = (3, 16, 16)


# ---- the numbers ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-3, 1.0))
def test_snr_is_the_energy_ratio_in_db(seed, noise):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(5, 7, generator=g, dtype=torch.float64)
    err = noise * torch.randn(5, 7, generator=g, dtype=torch.float64)
    expected = 10 * np.log10((ref.numpy() ** 2).sum() / (err.numpy() ** 2).sum())
    assert Q.snr_db(ref, ref + err) == pytest.approx(expected, rel=1e-12)


def test_snr_of_equal_tensors_is_infinite():
    x = torch.ones(3)
    assert Q.snr_db(x, x) == math.inf


def test_balanced_snr_averages_the_channels_noise_to_signal():
    ref = torch.tensor([[10.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    approx = ref + torch.tensor([[1.0, 0.0], [0.0, 0.2]], dtype=torch.float64)
    # channel 0: 1 / 100 (20 dB); channel 1: 0.04 / 2 (17 dB): the mean of the two in dB
    expected = (-10 * math.log10(0.01) - 10 * math.log10(0.02)) / 2
    assert Q.balanced_snr_db(ref, approx) == pytest.approx(expected)
    assert Q.snr_db(ref, approx) == pytest.approx(10 * math.log10(102 / 1.04))


def test_channel_ranges_and_ratio():
    w = torch.zeros(4, 2, 3, 3)
    w[0, 0, 0, 0], w[1, 1, 2, 2], w[2, 0, 1, 1], w[3, 1, 0, 2] = -2.0, 1.0, 0.5, 8.0
    assert Q.channel_ranges(w).tolist() == [2.0, 1.0, 0.5, 8.0]
    # torch's median of an even count is the lower middle value: 1.0
    assert Q.range_ratio(Q.channel_ranges(w)) == 8.0
    assert Q.outlier_channels(Q.channel_ranges(w), factor=4.0) == [3]


def test_per_channel_scales_and_rounding_are_torchs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, 3, 3, generator=g)
    w[2] *= 30
    scale, zero = Q.weight_qparams(w, per_channel=True)
    amax = w.abs().amax(dim=(1, 2, 3))
    assert torch.allclose(scale, amax / 127.5)  # max |w| over half the int8 span
    assert not zero.any()
    by_hand = torch.clamp(torch.round(w / scale.view(-1, 1, 1, 1)), -128, 127)
    by_hand = by_hand * scale.view(-1, 1, 1, 1)
    assert torch.equal(Q.fake_quant_weight(w), by_hand)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)
    assert torch.equal(Q.fake_quant_weight(w), expected)
    tensor_scale, _ = Q.weight_qparams(w, per_channel=False)
    assert float(tensor_scale) == pytest.approx(float(w.abs().max()) / 127.5)
    facts = Q.weight_facts(w)
    assert facts.snr_per_channel > facts.snr_per_tensor + 20  # the wide channel costs the rest
    assert facts.widest_channel == 2


def test_branch_shares_at_the_largest_fused_weight():
    kernel = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    kernel[:, 0, 1, 1] = torch.tensor([1.0, 2.0])  # a 3x3 branch, centre taps
    one = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    one[:, 0, 0, 0] = torch.tensor([3.0, 1.0])  # a 1x1 branch, scaled by a norm
    scale = torch.tensor([2.0, 1.0], dtype=torch.float64)
    parts = [
        ("dense", Branch(kernel, torch.zeros(2, dtype=torch.float64))),
        ("identity", Branch(one, torch.zeros(2, dtype=torch.float64), scale)),
    ]
    shares = Q.branch_shares(parts, [0])
    # channel 0: dense 1, identity 3 * 2 = 6 at the centre tap
    assert [s.name for s in shares] == ["identity", "dense"]
    assert shares[0].share == pytest.approx(6 / 7)
    assert shares[0].scale == 2.0 and shares[1].scale is None
    assert shares[0].label() == "identity (BN gamma/sigma 2)"


# ---- planted outliers -------------------------------------------------------------------


def _report(model):
    result = pipeline.convert(model, input_shape=SHAPE, samples=4, int8=Calibration())
    return result.int8


def test_a_planted_identity_outlier_is_ranked_first_and_blamed_on_the_identity():
    report = _report(planted_net())
    worst = report.blocks[0]
    assert worst.path == "2"  # the second RepVGG block (the stem is "0")
    assert worst.attribution.dominant.name == "rbr_identity"
    assert worst.attribution.dominant.scale > 40
    assert set(worst.attribution.channels) >= {1, 5}
    assert worst.advice == "quantization-friendly block"
    assert [b.path for b in report.flagged] == ["2"]
    doc = report.to_dict()
    assert doc["blocks"][0]["outliers"]["dominant"].startswith("rbr_identity (BN gamma/sigma")
    assert "proxy" in doc["note"]
    json.dumps(doc, allow_nan=False)  # valid JSON: no inf or NaN


def test_without_the_outlier_nothing_is_flagged():
    report = _report(repvgg_net())
    assert report.flagged == []
    assert report.blocks[0].attribution.dominant.scale < 5


def test_a_qarepvgg_block_scores_better_than_a_planted_repvgg_one():
    planted, qa = _report(planted_net()), _report(qa_net())
    assert qa.flagged == []
    assert qa.worst_block_db > planted.worst_block_db + 6
    assert qa.model_snr_db > planted.model_snr_db


def test_the_report_leaves_the_deploy_model_as_it_was():
    model = planted_net()
    result = pipeline.convert(model, input_shape=SHAPE, int8=Calibration())
    again = pipeline.convert(planted_net(), input_shape=SHAPE)
    live = result.model.state_dict()
    for key, value in result.state_dict.items():
        assert torch.equal(value, again.state_dict[key]), key
        assert torch.equal(live[key], value), key
    assert result.int8 is not None and again.int8 is None


# ---- the command line -------------------------------------------------------------------

ARCH = "tests/int8_blocks.py:planted_net"


@pytest.fixture
def train(tmp_path):
    path = tmp_path / "train.pth"
    torch.save(planted_net().state_dict(), path)
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _convert(train, tmp_path, *extra):
    out, report = tmp_path / "deploy.safetensors", tmp_path / "r.json"
    base = ["convert", train, out, "--arch", ARCH, "--input-shape", "3,16,16"]
    return _run(*base, "--int8-report", report, *extra), out, report


def test_convert_writes_the_report_and_shows_the_table(train, tmp_path):
    result, out, report = _convert(train, tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["blocks"][0]["path"] == "2" and doc["blocks"][0]["flagged"]
    assert out.exists()
    chart = report.with_suffix(".svg").read_text()
    root = ElementTree.fromstring(chart)  # well-formed SVG
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect")]
    assert len(bars) == len(doc["blocks"]) and bars[1].get("fill") == "#c0392b"  # block "2"
    assert "INT8 readiness" in result.output and "rbr_identity (BN gamma/sigma" in result.output


def test_inspect_int8_json(train):
    result = _run("inspect", train, "--arch", ARCH, "--input-shape", "3,16,16", "--int8", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["int8"]["blocks"][0]["outliers"]["branches"][0]["branch"] == "rbr_identity"


def test_calibration_tensors_are_used(train, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    g = torch.Generator().manual_seed(3)
    torch.save(torch.randn(3, *SHAPE, generator=g), calib / "a.pt")
    np.save(calib / "b.npy", torch.randn(*SHAPE, generator=g).numpy())
    result, _, report = _convert(train, tmp_path, "--calib", calib)
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["samples"] == 4 and doc["calibration"] == str(calib)
    assert "proxy" not in doc["note"]


@pytest.mark.parametrize(
    "content, words",
    [
        (torch.randn(4, 8, 8), "expected [3, 16, 16]"),
        (torch.full((1, *SHAPE), float("nan")), "NaN"),
        (b"not a tensor file", "cannot be read"),
    ],
)
def test_bad_calibration_is_exit_2_one_line_nothing_written(train, tmp_path, content, words):
    calib = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        calib.write_bytes(content)
    else:
        torch.save(content, calib)
    result, out, report = _convert(train, tmp_path, "--calib", calib)
    assert result.exit_code == 2
    assert words in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not report.exists()


def test_calib_without_a_report_is_a_usage_error(train, tmp_path):
    result = _run("convert", train, tmp_path / "d.safetensors", "--arch", ARCH, "--calib", train)
    assert result.exit_code == 2 and "--calib needs --int8-report" in result.output


def test_channels_constant_matches_the_nets():
    assert planted_net()[1].rbr_dense.conv.out_channels == CHANNELS


# ---- the checked INT8 ONNX file ---------------------------------------------------------


@pytest.fixture
def deploy(train, tmp_path):
    out = tmp_path / "deploy.safetensors"
    result = _run("convert", train, out, "--arch", ARCH, "--input-shape", "3,16,16")
    assert result.exit_code == 0, result.output
    return out


def _export(deploy, path, *extra):
    base = ["export", deploy, path, "--arch", ARCH, "--input-shape", "3,16,16", "--int8"]
    return _run(*base, *extra, "--json")


def test_int8_onnx_is_checked_recorded_and_keeping_the_worst_nodes_helps(deploy, tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    import onnx

    runs = {}
    for keep in (0, 1, 3):
        path = tmp_path / f"m{keep}.onnx"
        result = _export(deploy, path, "--int8-keep-float", keep)
        assert result.exit_code == 0, result.output
        runs[keep] = json.loads(result.output)["onnx_int8"]
        model = onnx.load(path)
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["int8_check"])["snr_db"] == pytest.approx(runs[keep]["snr_db"])
    plain = runs[0]
    # the file is judged as written (Q/DQ node by node); onnxruntime's fused integer kernels,
    # which saturate on x86 CPUs without VNNI, are run too and reported beside it
    assert "node by node" in plain["runtime"]
    assert isinstance(plain["ort_integer_kernels_snr_db"], float)
    # onnxruntime's INT8 and the simulated W8A8 agree in order of magnitude (within 6 dB)
    assert abs(plain["snr_db"] - plain["simulated_w8a8_snr_db"]) < 6
    # the node after the planted block reads its outlier channels: it is ranked worst
    assert runs[1]["kept_float"][0]["layer"] == "3.rbr_reparam"
    # each node kept in float lowers the INT8 error
    assert plain["snr_db"] < runs[1]["snr_db"] < runs[3]["snr_db"] - 3


def test_int8_onnx_under_the_floor_is_not_written(deploy, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime.quantization")
    from repconv import onnx_int8

    monkeypatch.setattr(onnx_int8, "INT8_ONNX_MIN_DB", 200.0)
    path = tmp_path / "m.onnx"
    result = _export(deploy, path)
    assert result.exit_code == 1
    assert "not written" in json.loads(result.stdout)["error"]
    assert not path.exists()


def test_int8_onnx_with_bad_calibration_is_exit_2(deploy, tmp_path):
    calib = tmp_path / "c.npy"
    np.save(calib, np.zeros((2, 3, 8, 8), dtype=np.float32))
    path = tmp_path / "m.onnx"
    result = _export(deploy, path, "--calib", calib)
    assert result.exit_code == 2 and "expected [3, 16, 16]" in json.loads(result.stdout)["error"]
    assert not path.exists()


def test_a_dead_channel_has_no_ratio():
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    approx = ref + torch.tensor([[0.5, 0.0], [0.1, 0.0]], dtype=torch.float64)
    assert Q.balanced_snr_db(ref, approx) == pytest.approx(-10 * math.log10(0.01 / 2))
    assert Q.balanced_snr_db(ref, ref) == pytest.approx(120.0)  # exact: the ratio floor


def _has_pillow() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_pillow(), reason="Pillow is installed")
def test_images_without_pillow_are_exit_2_naming_the_extra(train, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    result, out, report = _convert(train, tmp_path, "--calib", image)
    assert result.exit_code == 2 and "repconv[images]" in result.output
    assert not out.exists() and not report.exists()


def test_images_are_resized_and_normalised(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    from repconv import calibration

    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    image_module.fromarray(pixels).save(tmp_path / "red.png")
    (got,) = calibration.load(tmp_path, SHAPE)
    assert got.shape == (1, *SHAPE)
    mean, std = calibration.IMAGENET_MEAN, calibration.IMAGENET_STD
    assert float(got[0, 0].mean()) == pytest.approx((1 - mean[0]) / std[0], rel=1e-4)
    assert float(got[0, 1].mean()) == pytest.approx(-mean[1] / std[1], rel=1e-4)
