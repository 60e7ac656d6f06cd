"""The deploy metadata schema, written and read back in one torch-free module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from repconv import metadata
from repconv.files import TENSORS_DIGEST_KEY
from repconv.plan_record import BlockRecord, PlanRecord


def written(**overrides):
    values = dict(
        torch_version="9.9",
        arch="demo_mixed",
        arch_kwargs={"width": 2, "depth": 1},
        source_sha256="ab" * 32,
        plan=PlanRecord(
            blocks=(BlockRecord("a", "acb", "ACB", "3x3+1x3+3x1", 10, 7, (4, 4, 3, 3), "fused"),),
            fused_by_rule={"acb": 1},
        ),
        verification={"passed": True, "written_max": 1e-9, "exact_max": 2e-16},
        options={"seed": 0, "arch": "demo_mixed"},
        params_before=10,
        params_after=7,
    )
    return metadata.build(**{**values, **overrides})


def test_what_is_built_reads_back():
    fields = written()
    assert set(fields) | {TENSORS_DIGEST_KEY} == set(metadata.KEYS)
    assert all(isinstance(v, str) for v in fields.values())
    # names sorted, so equal conversions write equal bytes
    assert fields["arch_kwargs"] == '{"depth": 1, "width": 2}'
    record = metadata.read(fields)
    assert record.arch == "demo_mixed" and record.arch_kwargs == {"width": 2, "depth": 1}
    assert record.source_sha256 == "ab" * 32 and record.params == (10, 7)
    assert record.options == {"seed": 0, "arch": "demo_mixed"}
    assert record.plan.fused_by_rule == {"acb": 1}
    assert record.verification["passed"] is True


def test_an_unverified_conversion_and_absent_fields():
    record = metadata.read(written(verification=None, arch=None, arch_kwargs={}))
    assert record.verification is None and record.arch is None and record.arch_kwargs == {}
    empty = metadata.read({})
    assert (empty.arch, empty.options, empty.plan, empty.arch_kwargs) == (None, None, None, {})
    with pytest.raises(metadata.MetadataError, match="'params_before' is missing"):
        _ = empty.params


def test_a_damaged_field_fails_only_whoever_reads_it():
    fields = {**written(), "arch_kwargs": "{not json", "plan": "[1]", "params_after": "x"}
    record = metadata.read(fields)
    assert record.arch == "demo_mixed" and record.options == {"seed": 0, "arch": "demo_mixed"}
    with pytest.raises(metadata.MetadataError, match="'arch_kwargs' is not valid JSON"):
        _ = record.arch_kwargs
    with pytest.raises(ValueError, match="'plan' is not a JSON object"):
        _ = record.plan
    with pytest.raises(ValueError, match="'params_after' is not an integer"):
        _ = record.params


def test_batch_figures_come_from_the_record():
    record = metadata.read(written())
    figures = metadata.batch_figures(record.plan, record.verification, *record.params)
    assert figures == {
        "fused_by_rule": {"acb": 1},
        "unfolded": 0,
        "params_before": 10,
        "params_after": 7,
        "max_error": 1e-9,
        "exact_error": 2e-16,
    }
    unverified = metadata.batch_figures(record.plan, None, 1, 1)
    assert unverified["max_error"] is None and unverified["exact_error"] is None


def test_reading_metadata_imports_no_torch():
    code = (
        "import sys, repconv.metadata, repconv.batch.task; "
        "print(json.dumps('torch' in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) is False
