"""Issue 15, export half: `repconv export` and `convert --onnx` write an ONNX file that
onnxruntime runs to the train (or deploy) model's outputs, atomically, with repconv's metadata."""

from __future__ import annotations

import builtins
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized
from torch import nn

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import layouts as L  # noqa: E402

import repconv  # noqa: E402
from repconv import onnx_export as O  # noqa: E402
from repconv.cli import main  # noqa: E402
from repconv.tolerances import LIMITS, onnx_limit  # noqa: E402
from repconv.tracing import GraphForward  # noqa: E402
from repconv.zoo.blocks import ACBlock, DiverseBranchBlock, RepVGGBlock  # noqa: E402
from repconv.zoo.demo import DemoNet  # noqa: E402

# Ops a fused deploy graph of these nets may hold; a BatchNormalization or an Add would be an
# unfused branch the exporter found (the class forward instead of the fused one).
DEPLOY_OPS = {"Conv", "Relu", "Identity", "Flatten", "Gemm", "GlobalAveragePool", "ReduceMean"}


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def metadata_props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture()
def demo_files(tmp_path) -> tuple[Path, Path]:
    """A demo train checkpoint and its deploy checkpoint."""
    train = tmp_path / "train.pth"
    torch.save(randomized(DemoNet(), dtype=torch.float32).state_dict(), train)
    deploy = tmp_path / "deploy.safetensors"
    repconv.convert_file(train, deploy, arch="demo_mixed")
    return train, deploy


def test_convert_onnx_matches_the_train_model_and_records_metadata(tmp_path, demo_files):
    train, _ = demo_files
    out = tmp_path / "model.onnx"
    args = ["convert", str(train), str(tmp_path / "d.safetensors"), "--arch", "demo_mixed"]
    result = CliRunner().invoke(main, [*args, "--onnx", str(out), "--json"])
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["onnx"]
    assert check["passed"] and check["reference"] == "train model"
    assert check["max_relative_error"] < onnx_limit(torch.float32)
    props = metadata_props(out)
    assert props["repconv_version"] == repconv.__version__
    assert props["source_sha256"] == repconv.files.file_sha256(train)
    assert json.loads(props["verification"])["passed"]
    assert json.loads(props["onnx_check"])["passed"]
    assert op_types(out) <= DEPLOY_OPS, op_types(out)


def small_net(block: nn.Module) -> nn.Module:
    return randomized(nn.Sequential(block, nn.ReLU(), nn.Conv2d(8, 4, 1)), dtype=torch.float32)


ZOO_BLOCKS = {
    "repvgg": lambda: RepVGGBlock(8, 8, 3, padding=1),
    "acb": lambda: ACBlock(8, 8, 3, padding=1),
    "dbb": lambda: DiverseBranchBlock(8, 8, 3, padding=1),
}


@pytest.mark.parametrize("family", sorted(ZOO_BLOCKS))
def test_zoo_blocks_export_fused_and_match_the_train_model(tmp_path, family):
    result = repconv.convert(small_net(ZOO_BLOCKS[family]()), input_shape=(8, 12, 12))
    check = O.export_conversion(result, tmp_path / "m.onnx")
    assert check.passed and check.reference == "train model", check.summary()
    assert op_types(tmp_path / "m.onnx") <= DEPLOY_OPS


def test_a_data_flow_fused_layout_exports_its_fused_forward(tmp_path):
    model = randomized(L.build("yolov6_qarepvgg", width=4), dtype=torch.float32)
    result = repconv.convert(model, input_shape=(3, 8, 8))
    assert any(isinstance(vars(m).get("forward"), GraphForward) for m in result.model.modules())
    check = O.export_conversion(result, tmp_path / "m.onnx")
    assert check.passed, check.summary()
    # The class forward would have added three branches per block.
    assert op_types(tmp_path / "m.onnx") <= DEPLOY_OPS


def test_export_fp16_with_a_dynamic_batch(tmp_path, demo_files):
    _, deploy = demo_files
    out = tmp_path / "half.onnx"
    args = ["export", str(deploy), str(out), "--arch", "demo_mixed", "--fp16", "--dynamic-batch"]
    result = CliRunner().invoke(main, [*args, "--opset", "13", "--json"])
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["onnx"]
    assert check["dtype"] == "float16" and check["limit"] == onnx_limit(torch.float16)
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 13
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    (got,) = session.run(None, {"input": x.half().numpy()})
    deploy_model = repconv.load_deploy(deploy, "demo_mixed").double()
    want = deploy_model(x.double()).detach()
    assert got.shape == (3, 10)
    assert (torch.from_numpy(got).double() - want).abs().max() <= 1e-2 * want.abs().max()


def test_export_records_the_deploy_file(tmp_path, demo_files):
    _, deploy = demo_files
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(deploy), str(out), "--arch", "demo_mixed"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs deploy model" in result.stdout
    props = metadata_props(out)
    assert props["deploy_sha256"] == repconv.files.file_sha256(deploy)
    assert json.loads(props["verification"])["passed"]
    assert json.loads(props["onnx_check"])["opset"] == O.DEFAULT_OPSET


def expect_exit(args: list[str], code: int, needle: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_extra_is_bad_input_with_the_install_hint(
    tmp_path, demo_files, monkeypatch, missing
):
    train, deploy = demo_files
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    out = tmp_path / "m.onnx"
    expect_exit(["export", str(deploy), str(out), "--arch", "demo_mixed"], 2, "repconv[onnx]")
    converted = tmp_path / "d.safetensors"
    args = ["convert", str(train), str(converted), "--arch", "demo_mixed", "--onnx", str(out)]
    expect_exit(args, 2, "repconv[onnx]")
    assert not out.exists() and not converted.exists()


def test_a_failed_check_leaves_nothing_half_written(tmp_path, demo_files, monkeypatch):
    _, deploy = demo_files
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "m.onnx"
    out.write_bytes(b"the previous file")
    monkeypatch.setitem(
        LIMITS, "float32", replace(LIMITS["float32"], onnx=0.0)
    )  # no rounding passes
    expect_exit(["export", str(deploy), str(out), "--arch", "demo_mixed"], 1, "not written")
    assert out.read_bytes() == b"the previous file"
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]


def test_convert_onnx_over_its_limit_writes_nothing(tmp_path, demo_files, monkeypatch):
    """The ONNX file is checked before the checkpoint is written: exit 1, neither file."""
    train, _ = demo_files
    monkeypatch.setitem(
        LIMITS, "float32", replace(LIMITS["float32"], onnx=0.0)
    )  # no rounding passes
    out, converted = tmp_path / "m.onnx", tmp_path / "d.safetensors"
    args = ["convert", str(train), str(converted), "--arch", "demo_mixed", "--onnx", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    names = sorted(p.name for p in tmp_path.iterdir())  # no checkpoint, no ONNX or temp file
    assert names == ["deploy.safetensors", "train.pth"]


def test_an_exporter_error_leaves_no_temp_file(tmp_path, demo_files, monkeypatch):
    _, deploy = demo_files

    def broken(*_args, **_kwargs):
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(torch.onnx, "export", broken)
    result = CliRunner().invoke(main, ["export", str(deploy), str(tmp_path / "m.onnx")])
    assert result.exit_code == 3, result.output
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".onnx", ".tmp")]


def test_output_must_be_onnx_and_opset_in_range(tmp_path, demo_files):
    _, deploy = demo_files
    expect_exit(["export", str(deploy), str(tmp_path / "m.pt")], 2, "must end in .onnx")
    result = CliRunner().invoke(
        main, ["export", str(deploy), str(tmp_path / "m.onnx"), "--opset", "99"]
    )
    assert result.exit_code == 2


class TwoHeads(nn.Module):
    """A net whose output is a dict of two tensors (ONNX flattens it to two outputs)."""

    def __init__(self):
        super().__init__()
        self.body = RepVGGBlock(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.body(x)
        return {"features": y, "logits": self.head(y)}


def test_a_dict_output_is_compared_output_by_output(tmp_path):
    result = repconv.convert(randomized(TwoHeads(), dtype=torch.float32), input_shape=(4, 8, 8))
    check = O.export_conversion(result, tmp_path / "m.onnx", O.ExportSettings(dynamic_batch=True))
    assert check.passed, check.summary()
    assert len(check.figures) == 2


def test_export_runs_lint_on_what_it_writes(tmp_path):
    """A deploy export holds no train-time structure: the check records lint's verdict (clean);
    the train form exported the same way would be flagged (tests/test_onnx_lint.py)."""
    onnx = pytest.importorskip("onnx")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    inputs = [x.double()]
    with torch.no_grad():
        references = [model.double()(inputs[0])]
    out = tmp_path / "m.onnx"
    check = O.export_checked(model.float(), out, inputs, references, reference="test")
    assert check.lint == [] and "lint: clean" in check.summary()
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["onnx_check"])["lint_findings"] == []


# ---- issue 15 "Done when": every built-in zoo model -------------------------------------------

# The small members take ~21 s together; the ResNet-50s, RepVGG B1-B3 and D2se took ~92 s more
# (3-13 s each; they passed when last enabled) for the same blocks at a larger width, so they are
# kept out of the sweep.
BIG_ZOO_MODELS = {"acb_resnet50", "convbn_resnet50", "dbb_resnet50", "repvgg_d2se"}
BIG_ZOO_MODELS |= {n for n in repconv.zoo.registry.list_models() if n.startswith("repvgg_b")}
BIG_ZOO_MODELS -= {"repvgg_b0"}
ZOO_MODELS = [
    pytest.param(
        name, marks=pytest.mark.skip(reason="big: same blocks as a smaller member, 3-13 s each")
    )
    if name in BIG_ZOO_MODELS
    else name
    for name in repconv.zoo.registry.list_models()
    if name != "demo_mixed"
]


def export_train_form(model: nn.Module, path: Path, shape: tuple[int, ...]) -> None:
    """The legacy exporter without constant folding keeps the BNs an eval export would fold."""
    import logging
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(
                model.eval(),
                (torch.randn(1, *shape),),
                str(path),
                dynamo=False,
                opset_version=O.DEFAULT_OPSET,
                do_constant_folding=False,
            )
        finally:
            logging.disable(logging.NOTSET)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_model_convert_onnx_is_exact_and_lint_clean_and_its_train_form_is_not(
    name, tmp_path, monkeypatch
):
    from repconv.onnx_lint import lint_file
    from repconv.zoo.blocks import IdentityBasedConv1x1

    # The TorchScript exporter cannot write aten::diag (DBB's identity 1x1 kernel); torch.eye
    # builds the same matrix, so the train-form export keeps its structure.
    def identity(self: IdentityBasedConv1x1) -> torch.Tensor:
        channels, per_group = self.weight.shape[0], self.weight.shape[1]
        eye = torch.eye(per_group, dtype=self.weight.dtype)
        return eye.repeat(self.groups, 1).view(channels, per_group, 1, 1)

    monkeypatch.setattr(IdentityBasedConv1x1, "_identity", identity)

    runner = CliRunner()
    train = tmp_path / "train.pth"
    saved = runner.invoke(main, ["zoo", "save", name, str(train), "--randomize-bn", "--seed", "1"])
    assert saved.exit_code == 0, saved.output
    out = tmp_path / "deploy.onnx"
    args = ["convert", str(train), str(tmp_path / "deploy.safetensors"), "--arch", name]
    args += ["--input-shape", "3,32,32", "--samples", "1", "--onnx", str(out), "--json"]
    converted = runner.invoke(main, args)
    assert converted.exit_code == 0, converted.output
    recorded = json.loads(metadata_props(out)["onnx_check"])
    assert recorded["passed"] and recorded["reference"] == "train model"
    assert recorded["max_relative_error"] < onnx_limit(torch.float32)
    assert recorded["lint_findings"] == []
    assert lint_file(out) == []

    blocks = json.loads(converted.stdout)["plan"]["blocks"]
    fused = [b for b in blocks if b["status"] == "fused"]
    assert fused
    train_onnx = tmp_path / "train.onnx"
    model = repconv.zoo.registry.build(name)
    model.load_state_dict(torch.load(train, weights_only=True))
    export_train_form(model, train_onnx, (3, 32, 32))
    findings = lint_file(train_onnx)
    # Every family held at least one finding per fused block (no exporter-folded conv-BN pairs:
    # do_constant_folding=False keeps them), so no family needs a weaker bound.
    assert len(findings) >= len(fused), (len(findings), len(fused))
