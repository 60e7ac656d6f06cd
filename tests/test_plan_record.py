"""The recorded plan as a typed record: its JSON is what conversions have always written, and
it reads back exactly what it wrote."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repconv import metadata, pipeline
from repconv.plan_record import BlockRecord, PlanRecord, PlanRecordError, WarningRecord

_TEXT = st.text(max_size=12)
_MAYBE_TEXT = st.none() | _TEXT
_COUNT = st.integers(min_value=0, max_value=10**12)

blocks = st.builds(
    BlockRecord,
    path=_TEXT,
    rule=_TEXT,
    family=_TEXT,
    structure=_TEXT,
    params_before=_COUNT,
    params_after=st.none() | _COUNT,
    kernel_shape=st.none() | st.tuples(*[st.integers(1, 64)] * 4),
    status=st.sampled_from(["planned", "fused", "skipped"]),
    reason=_MAYBE_TEXT,
    block_error=st.none() | st.floats(allow_nan=False),
    norm_path=_MAYBE_TEXT,
)
plans = st.builds(
    PlanRecord,
    blocks=st.lists(blocks, max_size=5).map(tuple),
    fused_by_rule=st.dictionaries(_TEXT, _COUNT, max_size=4),
    warnings=st.lists(st.builds(WarningRecord, _TEXT, _TEXT), max_size=3).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(plans)
def test_a_record_reads_back_what_it_wrote(plan):
    document = plan.to_json()
    assert PlanRecord.from_json(document) == plan
    # and through the text the metadata holds
    assert PlanRecord.from_json(json.loads(plan.to_text())) == plan
    assert plan.to_text() == json.dumps(document)


def test_the_plan_a_conversion_writes_is_the_one_it_always_wrote():
    """What main wrote for this model before the record existed, spelled out by hand: the
    same keys in the same order, so earlier files read and equal conversions give equal bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)
    ).eval()
    result = pipeline.convert(model, verify=False)
    expected = {
        "blocks": [
            {
                "path": "0",
                "rule": "conv_bn",
                "family": "conv-BN",
                "structure": "Conv2d -> BatchNorm2d (trace)",
                "params_before": 116,
                "params_after": 112,
                "kernel_shape": [4, 3, 3, 3],
                "status": "fused",
                "reason": None,
                "block_error": None,
                "norm_path": "1",
            }
        ],
        "fused_by_rule": {"conv_bn": 1},
        "warnings": [
            {
                "path": "3",
                "message": "norm left in place: its input is not a conv output used only by it",
            }
        ],
    }
    fields = pipeline.metadata_for(result, "x", {}, "ab" * 32)
    assert fields["plan"] == json.dumps(expected)
    assert result.to_dict()["plan"] == expected
    assert metadata.read(fields).plan == result.plan.record()
    planned = dict(expected, fused_by_rule={}, warnings=[])
    planned["blocks"] = [
        dict(expected["blocks"][0], status="planned", params_after=None, kernel_shape=None)
    ]
    assert result.plan.plan.to_dict() == planned


BLOCK = PlanRecord((BlockRecord("a", "acb", "ACB", "3x3", 10, 7, (4, 4, 3, 3), "fused"),))


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: d.pop("warnings"), "plan has no 'warnings'"),
        (lambda d: d["blocks"][0].update(status="done"), "status is 'done'"),
        (lambda d: d["blocks"][0].update(params_before=True), "params_before is not an integer"),
        (lambda d: d["blocks"][0].update(kernel_shape=[4, "3"]), "kernel_shape is not an integer"),
        (lambda d: d["blocks"][0].update(block_error="small"), "block_error is not a number"),
        (lambda d: d["blocks"][0].pop("norm_path"), "has no 'norm_path'"),
        (lambda d: d["fused_by_rule"].update(acb=1.5), "fused_by_rule.acb is not an integer"),
        (lambda d: d.update(blocks={}), "plan.blocks is not a JSON list"),
    ],
)
def test_a_plan_of_the_wrong_shape_is_refused_naming_the_field(damage, needle):
    document = BLOCK.to_json()
    damage(document)
    with pytest.raises(PlanRecordError, match=needle):
        PlanRecord.from_json(document)
    fields = {"plan": json.dumps(document)}
    with pytest.raises(metadata.MetadataError, match="'plan' is not a recorded plan"):
        _ = metadata.read(fields).plan


def test_names_from_the_file_are_escaped_in_messages_and_notes():
    from repconv.engine import Plan

    block = BlockRecord("\x1b[2Kfake", "acb", "ACB", "s", 1)
    fields = {"plan": PlanRecord((block,)).to_text()}
    note = pipeline._recorded_plan_note(metadata.read(fields), Plan([]), "d.safetensors")
    assert "\x1b" not in note and "1 only in the file: \\x1b[2Kfake (acb)" in note
    document = dict(BLOCK.to_json(), fused_by_rule={"\x1b[2K": "x"})
    with pytest.raises(PlanRecordError) as raised:
        PlanRecord.from_json(document)
    assert "\x1b" not in str(raised.value) and "\\x1b[2K is not an integer" in str(raised.value)
