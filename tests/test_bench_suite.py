"""benchmarks/run.py (the suite behind `make bench`): its generic-vs-rule figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from repconv.zoo.checkpoints import save_train_checkpoint

RUN_PY = Path(__file__).parent.parent / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_generic_vs_rule_fuses_every_block_both_ways_and_exactly(suite, tmp_path):
    ckpt = tmp_path / "a0.pth"
    save_train_checkpoint("repvgg_a0", ckpt, randomize_bn=True)
    figure = suite.generic_vs_rule(ckpt, "repvgg_a0", runs=1)
    assert figure["blocks"] == 22
    assert sum(figure["structures"].values()) == 22
    assert figure["generic_vs_rule"] <= suite.EXACT and figure["generic_vs_train"] <= suite.EXACT
    assert (
        figure["ratio"] > 0
        and figure["cpu_ratio"] > 0
        and figure["rule_s"] > 0
        and figure["generic_s"] > 0
    )


def test_generic_only_replaces_its_section_and_keeps_the_rest(suite):
    row = {
        "model": "m",
        "generic": {
            "blocks": 3,
            "ratio": 1.25,
            "cpu_ratio": 1.1,
            "generic_s": 0.5,
            "rule_s": 0.4,
            "generic_vs_rule": 0.0,
            "generic_vs_train": 1e-15,
            "structures": {"3x3 + 1x1": 3},
        },
    }
    first = suite.render_generic([row], runs=3)
    text = "# results\n\ntable\n\n" + first + "\n## Hand-measured\n\nkept\n"
    row["generic"]["ratio"] = 1.75
    updated = suite.replace_section(text, suite.render_generic([row], runs=3))
    assert "| 1.75 |" in updated and "| 1.25 |" not in updated
    assert updated.startswith("# results\n\ntable\n\n")
    assert updated.endswith("## Hand-measured\n\nkept\n")
    assert updated.count(suite.GENERIC_HEADING) == 1
    # A file without the section gets it appended.
    assert suite.replace_section("# results\n", first).endswith(first)


def test_a_full_run_keeps_the_sections_measured_by_hand(suite):
    hand = "## Measured by hand\n\nkept\n"
    text = "# results\n\ntable\n\n" + hand + "\n" + suite.GENERIC_HEADING + "\nold\n"
    assert suite.hand_written_sections(text) == [hand]
    assert suite.hand_written_sections("# results\n\ntable\n") == []


def speedup_row(**runtimes) -> dict:
    """A table row whose figures are placeholders, the speed-up carrying `runtimes`."""
    step = {"ratio": 1.0, "step_s": 0.1, "floor_s": 0.1}
    process = {"ratio_verify": 1.0, "ratio_no_verify": 1.0, "rss_after_imports_mib": 100.0}
    process |= {"peak_verify_mib": 200.0, "peak_no_verify_mib": 150.0, "peak_floor_mib": 120.0}
    speed = {"b1": 1.5, "b8": 1.4, "release_b1": 1.0, "release_b8": 1.0, **runtimes}
    return {
        "model": "m",
        "ckpt_mib": 10.0,
        "step": step,
        "process": process,
        "fidelity": {"float32": 1e-7, "float64": 1e-15},
        "speedup": speed,
    }


def test_the_table_has_an_onnxruntime_column_beside_torch(suite):
    table = suite.render([speedup_row(torch_b1_ms=2.4, onnxruntime_b1_ms=1.7)], runs=3)
    header, rule, row = [line for line in table.splitlines() if line.startswith("|")]
    assert header.rstrip(" |").endswith("deploy b1 ms: torch, onnxruntime")
    assert header.count("|") == rule.count("|") == row.count("|")
    assert row.endswith("| 2.4, 1.7 |"), row
    without = suite.render([speedup_row()], runs=3)
    assert "| n/a (no onnxruntime) |" in without


def test_onnxruntime_latency_of_a_tiny_deploy_model(suite):
    pytest.importorskip("onnxruntime")
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    figures = suite.onnxruntime_latency(model, (3, 8, 8), runs=2)
    assert set(figures) == {"torch_b1_ms", "onnxruntime_b1_ms"}
    assert all(ms > 0 for ms in figures.values())


def test_onnxruntime_latency_is_skipped_without_onnxruntime(suite, monkeypatch):
    import builtins

    import torch

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    model = torch.nn.Conv2d(3, 4, 1)
    assert suite.onnxruntime_latency(model, (3, 8, 8), runs=1) is None


@pytest.mark.slow
def test_the_release_route_writes_what_repconv_writes(tmp_path):
    """benchmarks/release_route.py is a RepVGG release conversion: same keys as repconv's file,
    same outputs, so the timing it gives is of the same job."""
    import sys

    import torch

    from repconv import pipeline
    from repconv.zoo import registry

    sys.path.insert(0, str(RUN_PY.parent))
    try:
        import release_route
    finally:
        sys.path.remove(str(RUN_PY.parent))
    ckpt, out, ours = tmp_path / "a0.pth", tmp_path / "release.pth", tmp_path / "a0.safetensors"
    save_train_checkpoint("repvgg_a0", ckpt, randomize_bn=True)
    release_route.convert("repvgg_a0", ckpt, out)
    pipeline.convert_file(ckpt, ours, arch_spec="repvgg_a0", verify=False)
    deploy = pipeline.load_deploy(ours, "repvgg_a0")
    written = torch.load(out, weights_only=True)
    assert set(written) == set(deploy.state_dict())
    train = registry.get_entry("repvgg_a0").factory().eval()
    train.load_state_dict(torch.load(ckpt, weights_only=True))
    deploy.load_state_dict(written)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = train(x)
        assert ((deploy(x) - want).abs().max() / want.abs().max()) < 1e-5
