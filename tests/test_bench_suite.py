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
