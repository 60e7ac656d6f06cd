"""`repconv lint`: unfused train-time patterns in ONNX graphs are found; fused forms are clean."""

from __future__ import annotations

import builtins
import json
import logging
import warnings

import pytest
import torch
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from repconv.cli import main  # noqa: E402
from repconv.engine import convert_model  # noqa: E402
from repconv.onnx_lint import lint_model  # noqa: E402
from repconv.zoo.blocks import (  # noqa: E402
    ACBlock,
    ConvBN,
    DiverseBranchBlock,
    RepVGGBlock,
    randomize_bn_,
)

C = 4


def weight(name: str, kernel: tuple[int, int], out: int = C, inp: int = C):
    return helper.make_tensor(
        name, TensorProto.FLOAT, [out, inp, *kernel], [0.1] * out * inp * kernel[0] * kernel[1]
    )


def vector(name: str):
    return helper.make_tensor(name, TensorProto.FLOAT, [C], [1.0] * C)


def conv(name: str, x: str, kernel: tuple[int, int], out: str | None = None):
    pads = [kernel[0] // 2, kernel[1] // 2] * 2
    node = helper.make_node("Conv", [x, f"{name}.w"], [out or name], name=name, pads=pads)
    return node, [weight(f"{name}.w", kernel)]


def bn(name: str, x: str):
    inputs = [x] + [f"{name}.{p}" for p in ("g", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", inputs, [name], name=name)
    return node, [vector(f"{name}.{p}") for p in ("g", "b", "m", "v")]


def model(parts, output: str):
    nodes = [n for n, _ in parts]
    inits = [t for _, ts in parts for t in ts]
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, C, 8, 8])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("x")], [value(output)], inits)
    return helper.make_model(graph)


def add(name: str, a: str, b: str):
    return helper.make_node("Add", [a, b], [name], name=name), []


def patterns(proto) -> list[tuple[str, str]]:
    return [(f.pattern, f.family) for f in lint_model(proto)]


# ---- graphs built by hand: each pattern, then its fused form --------------------------------


def test_conv_bn_through_identity_is_found_and_the_plain_conv_is_clean():
    ident = (helper.make_node("Identity", ["c"], ["ci"], name="id"), [])
    unfused = model([conv("c", "x", (3, 3)), ident, bn("bn", "ci")], "bn")
    findings = lint_model(unfused)
    assert [(f.pattern, f.family, f.nodes) for f in findings] == [
        ("bn-after-conv", "conv-BN", ("c", "bn"))
    ]
    assert lint_model(model([conv("c", "x", (3, 3))], "c")) == []


def test_bn_after_gemm_and_matmul_is_linear_bn():
    w = helper.make_tensor("w", TensorProto.FLOAT, [C, C], [0.1] * C * C)
    for op in ("Gemm", "MatMul"):
        parts = [(helper.make_node(op, ["x", "w"], ["y"], name="lin"), [w]), bn("bn", "y")]
        assert patterns(model(parts, "bn")) == [("bn-after-linear", "linear-BN")]


def test_a_bn_on_the_graph_input_is_not_a_finding():
    assert lint_model(model([bn("bn", "x")], "bn")) == []


def test_repvgg_branches_are_found_and_one_conv_is_clean():
    parts = [
        conv("k3", "x", (3, 3)),
        conv("k1", "x", (1, 1)),
        bn("idbn", "x"),
        add("s1", "k3", "k1"),
        add("s2", "s1", "idbn"),
    ]
    found = lint_model(model(parts, "s2"))
    assert [(f.pattern, f.family) for f in found] == [
        ("parallel-convs", "RepVGG"),
        ("identity-branch", "RepVGG"),
    ]
    assert found[0].nodes == ("k3", "k1", "s1", "s2")
    assert found[1].nodes == ("k3", "k1", "idbn", "s1", "s2")
    assert lint_model(model([conv("k3", "x", (3, 3))], "k3")) == []


def test_conv_plus_its_own_input_through_mul_is_an_identity_branch():
    scale = helper.make_tensor("s", TensorProto.FLOAT, [1], [0.5])
    mul = (helper.make_node("Mul", ["s", "x"], ["sx"], name="mul"), [scale])
    parts = [conv("k3", "x", (3, 3)), mul, add("sum", "k3", "sx")]
    assert patterns(model(parts, "sum")) == [("identity-branch", "RepVGG")]


def test_acb_branches_through_bn_and_sum_node():
    parts = [conv("sq", "x", (3, 3)), conv("ver", "x", (3, 1)), conv("hor", "x", (1, 3))]
    parts += [bn("b1", "sq"), bn("b2", "ver"), bn("b3", "hor")]
    parts.append((helper.make_node("Sum", ["b1", "b2", "b3"], ["y"], name="sum"), []))
    found = patterns(model(parts, "y"))
    assert found.count(("parallel-convs", "ACB")) == 1
    assert found.count(("bn-after-conv", "conv-BN")) == 3


def test_dbb_avgpool_branch_is_found():
    pool = (helper.make_node("AveragePool", ["p1"], ["pool"], name="pool", kernel_shape=[1, 1]), [])
    parts = [conv("k3", "x", (3, 3)), conv("p1", "x", (1, 1)), pool, add("sum", "k3", "pool")]
    assert patterns(model(parts, "sum")) == [("avgpool-branch", "DBB")]


def test_convs_on_different_tensors_summed_are_a_residual_not_a_finding():
    relu = (helper.make_node("Relu", ["a"], ["r"], name="relu"), [])
    parts = [conv("a", "x", (3, 3)), relu, conv("b", "r", (3, 3)), conv("d", "x", (1, 1))]
    parts.append(add("sum", "b", "d"))
    assert lint_model(model(parts, "sum")) == []


# ---- exports of the zoo blocks: train form (BNs kept) against the deploy form ----------------


def export(module: torch.nn.Module, path) -> object:
    """The legacy exporter without constant folding keeps the BatchNormalization nodes that
    an eval-mode export would fold into the convs."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(
                module,
                (torch.randn(1, C, 8, 8),),
                str(path),
                dynamo=False,
                opset_version=17,
                do_constant_folding=False,
            )
        finally:
            logging.disable(logging.NOTSET)
    return onnx.load(str(path))


BLOCKS = {
    "RepVGG": lambda: RepVGGBlock(C, C),
    "ACB": lambda: ACBlock(C, C, 3, padding=1),
    # internal width != C: the identity-based 1x1 conv uses aten::diag, which the
    # TorchScript exporter cannot write
    "DBB": lambda: DiverseBranchBlock(C, C, 3, padding=1, internal_channels_1x1_3x3=2 * C),
    "conv-BN": lambda: ConvBN(C, C, 3, padding=1),
}


@pytest.mark.parametrize("family", list(BLOCKS))
def test_train_export_has_findings_and_deploy_export_none(family, tmp_path):
    block = randomize_bn_(BLOCKS[family]())
    train = lint_model(export(block, tmp_path / "train.onnx"))
    assert train, family
    assert family in {f.family for f in train}
    convert_model(block)
    assert lint_model(export(block, tmp_path / "deploy.onnx")) == []


# ---- the command ------------------------------------------------------------------------------


@pytest.fixture()
def train_onnx(tmp_path):
    path = tmp_path / "train.onnx"
    export(RepVGGBlock(C, C), path)
    return path


def test_cli_exit_codes_and_json(train_onnx, tmp_path):
    result = CliRunner().invoke(main, ["lint", str(train_onnx)])
    assert result.exit_code == 1, result.output
    assert "identity-branch" in result.output and "4 finding(s)" in result.output
    result = CliRunner().invoke(main, ["lint", str(train_onnx), "--json"])
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["ok"] is False and doc["exit_code"] == 1
    assert {f["pattern"] for f in doc["findings"]} == {
        "bn-after-conv",
        "parallel-convs",
        "identity-branch",
    }
    deploy = tmp_path / "deploy.onnx"
    block = RepVGGBlock(C, C)
    convert_model(block)
    export(block, deploy)
    result = CliRunner().invoke(main, ["lint", str(deploy), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["findings"] == []


def expect_lint_bad_input(path, needle: str) -> None:
    before = path.read_bytes() if path.is_file() else None
    result = CliRunner().invoke(main, ["lint", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    if before is not None:
        assert path.read_bytes() == before


def test_corrupt_empty_and_missing_files_are_bad_input(train_onnx, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(train_onnx.read_bytes()[:100])
    expect_lint_bad_input(truncated, "not a valid ONNX model")
    text = tmp_path / "notes.onnx"
    text.write_text("these are not weights\n" * 20)
    expect_lint_bad_input(text, "not a valid ONNX model")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    expect_lint_bad_input(empty, "is empty")
    expect_lint_bad_input(tmp_path / "nope.onnx", "no such file")
    expect_lint_bad_input(tmp_path, "is a directory")


def test_missing_onnx_is_bad_input_with_the_install_hint(train_onnx, monkeypatch):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    expect_lint_bad_input(train_onnx, "pip install 'repconv[onnx]'")
