"""deploy_map: which converted tensor fills each tensor of a user's deploy model (names only)."""

from __future__ import annotations

import pytest

from repconv.deploy_map import Source, kept_modules, plan_mapping, require_complete
from repconv.errors import BadInput

CONV = {"weight": (8, 8, 3, 3), "bias": (8,)}


def conv_at(path: str, shapes=CONV) -> dict[str, tuple[int, ...]]:
    return {f"{path}.{leaf}": shape for leaf, shape in shapes.items()}


def test_same_paths_are_taken_as_they_are():
    shapes = {**conv_at("stem"), "head.weight": (10, 8)}
    placed = plan_mapping(shapes, shapes, {})
    require_complete(placed, "x")
    assert placed.sources == {k: Source("fused", k) for k in shapes}


def test_a_renamed_fused_conv_is_found_inside_its_block():
    deploy = {**conv_at("blocks.0.rbr_reparam"), **conv_at("blocks.1.rbr_reparam")}
    fused = {**conv_at("blocks.0.reparam"), **conv_at("blocks.1.reparam")}
    placed = plan_mapping(deploy, fused, {})
    require_complete(placed, "x")
    assert placed.sources["blocks.1.rbr_reparam.weight"] == Source(
        "fused", "blocks.1.reparam.weight"
    )
    assert placed.sources["blocks.0.rbr_reparam.bias"] == Source("fused", "blocks.0.reparam.bias")


def test_a_sequential_collapsed_to_its_conv():
    placed = plan_mapping(conv_at("ghost.cheap_operation"), conv_at("ghost.cheap_operation.0"), {})
    require_complete(placed, "x")
    assert placed.sources["ghost.cheap_operation.weight"].key == "ghost.cheap_operation.0.weight"


def test_dead_branches_the_deploy_class_keeps_get_the_train_values():
    deploy = {**conv_at("block.conv"), **conv_at("block.conv1")}
    placed = plan_mapping(deploy, conv_at("block.reparam"), {**conv_at("block.conv1")})
    require_complete(placed, "x")
    assert placed.sources["block.conv1.weight"] == Source("train", "block.conv1.weight")
    assert placed.sources["block.conv.weight"] == Source("fused", "block.reparam.weight")


def test_a_match_never_leaves_the_deploy_modules_parent():
    placed = plan_mapping(conv_at("a.fused"), conv_at("b.reparam"), {})
    with pytest.raises(BadInput, match=r"a\.fused\.bias, a\.fused\.weight, which nothing fills"):
        require_complete(placed, "x")


@pytest.mark.parametrize(
    ("deploy", "fused", "named"),
    [
        (
            {**conv_at("b.a"), **conv_at("b.b")},
            conv_at("b.reparam"),
            "`b.reparam` matches b.a, b.b",
        ),
        (
            conv_at("b.conv"),
            {**conv_at("b.reparam"), **conv_at("b.reparam_1")},
            "b.reparam, b.reparam_1",
        ),
    ],
)
def test_two_candidates_alike_are_an_error_not_a_guess(deploy, fused, named):
    with pytest.raises(BadInput, match="alike") as info:
        require_complete(plan_mapping(deploy, fused, {}), "the deploy model")
    assert named in str(info.value)


def test_shapes_that_differ_are_named_with_both_shapes():
    deploy, fused = {"fc.weight": (5, 8)}, {"fc.weight": (4, 8)}
    with pytest.raises(BadInput, match=r"fc\.weight \[5, 8\] \(converted: \[4, 8\]\)"):
        require_complete(plan_mapping(deploy, fused, {}), "x", deploy, fused)


def test_at_most_five_paths_are_named_on_each_side():
    deploy = {f"d{i}.weight": (i + 1,) for i in range(8)}
    fused = {f"f{i}.weight": (i + 100,) for i in range(7)}
    with pytest.raises(BadInput) as info:
        require_complete(plan_mapping(deploy, fused, {}), "x")
    message = str(info.value)
    assert "(and 3 more)" in message and "(and 2 more)" in message
    assert "\n" not in message


def test_a_fused_conv_keeping_a_train_name_is_matched_whole_not_taken_as_dead():
    # UniRepLKNet: deploy `lk_origin` (weight + bias) is the fused conv; the train checkpoint
    # has `lk_origin.weight` (no bias), which must not be taken for a dead branch.
    deploy = conv_at("block.lk_origin")
    train = {"block.lk_origin.weight": CONV["weight"]}
    placed = plan_mapping(deploy, conv_at("block.reparam"), train)
    require_complete(placed, "x")
    assert placed.sources["block.lk_origin.weight"] == Source("fused", "block.reparam.weight")


def test_kept_modules_are_the_outermost_with_the_same_tensors():
    train = {
        "stem.conv.weight": (4, 3, 3, 3),
        "stem.bn.weight": (4,),
        "stem.bn.running_var": (4,),
        "block.rbr_dense.conv.weight": (4, 4, 3, 3),
        "block.rbr_dense.bn.weight": (4,),
        "block.bn.weight": (4,),
        "head.weight": (2, 4),
    }
    deploy = {
        "stem.conv.weight": (4, 3, 3, 3),  # a live conv + BN pair
        "stem.bn.weight": (4,),
        "stem.bn.running_var": (4,),
        "block.rbr_reparam.weight": (4, 4, 3, 3),
        "block.rbr_reparam.bias": (4,),
        "block.bn.weight": (4,),  # a post-sum BN
        "head.weight": (2, 5),  # same path, another shape: not kept
    }
    assert kept_modules(train, deploy) == ["block.bn", "stem"]
    assert kept_modules(train, train) == [""]  # the deploy model is the train model
    assert kept_modules(train, {}) == []


def test_a_second_head_of_the_same_shape_is_decided_by_the_first_heads_path():
    """`heads.0` is nearest its own `heads.0.0`; that leaves `extra` (as near to both) one
    candidate: the paths decide, no ambiguity."""
    deploy = {**conv_at("heads.0"), **conv_at("extra")}
    fused = {**conv_at("heads.0.0"), **conv_at("reparam")}
    placed = plan_mapping(deploy, fused, {})
    require_complete(placed, "x")
    assert placed.sources["heads.0.weight"] == Source("fused", "heads.0.0.weight")
    assert placed.sources["extra.bias"] == Source("fused", "reparam.bias")


def test_a_module_whose_only_fit_went_to_a_nearer_one_is_named_unfilled():
    deploy = {**conv_at("heads.0"), **conv_at("extra")}
    with pytest.raises(BadInput, match=r"extra\.bias, extra\.weight, which nothing fills"):
        require_complete(plan_mapping(deploy, conv_at("heads.0.0"), {}), "x")
