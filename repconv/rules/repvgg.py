"""RepVGG: kxk conv-BN + 1x1 conv-BN (+ identity BN), summed, then SE and the nonlinearity.

Published convention (RepVGG release and its many copies, e.g. YOLOv6): children `rbr_dense` and
`rbr_1x1` are conv-BN units, `rbr_identity` is a BatchNorm (or None / absent when the shapes or the
stride rule it out). Deploy form: one conv `rbr_reparam` with bias; `se` and `nonlinearity` stay.
"""

from __future__ import annotations

from torch import nn

from repconv import kernels as K
from repconv.errors import NotFusable
from repconv.fused_conv import conv_bn_branch, install_fused, lined_up_conv_bn_branch, norm_stats
from repconv.geometry import Geometry, require_lined_up
from repconv.modules import conv_bn_unit, is_norm_like
from repconv.rules.base import Fused, Rule

_TRAIN_CHILDREN = ["rbr_dense", "rbr_1x1", "rbr_identity"]


def match(block: nn.Module) -> str | None:
    if hasattr(block, "rbr_reparam") or conv_bn_unit(getattr(block, "rbr_dense", None)) is None:
        return None
    parts = ["kxk"]
    one = getattr(block, "rbr_1x1", None)
    if one is not None:
        if conv_bn_unit(one) is None:
            return None
        parts.append("1x1")
    identity = getattr(block, "rbr_identity", None)
    if identity is not None:
        if not (is_norm_like(identity) or isinstance(identity, nn.Identity)):
            return None
        parts.append("identity")
    return " + ".join(parts)


def identity_branch(conv: nn.Module, norm: nn.Module | None, target: Geometry) -> K.Branch:
    """The identity (optionally followed by a norm) as a branch lined up with `target`."""
    if conv.in_channels != conv.out_channels or any(s != 1 for s in target.stride):
        raise NotFusable("an identity branch needs stride 1 and equal in/out channels")
    ones = tuple(1 for _ in target.kernel_size)
    branch = K.identity(conv.in_channels, conv.groups, ones, device=conv.weight.device)
    if norm is not None:
        branch = K.fold_bn(branch, norm_stats(norm))
    unit = Geometry(ones, target.stride, tuple(0 for _ in ones), ones, target.padding_mode)
    require_lined_up(unit, target)
    return branch


def branches(block: nn.Module) -> list[tuple[str, K.Branch]]:
    """The branches `fuse` sums, named by their train child, lined up with the kxk conv."""
    dense = conv_bn_unit(block.rbr_dense)
    return _lined_up(block, dense[0], *conv_bn_branch(dense))


def _lined_up(
    block: nn.Module, conv: nn.Module, main: K.Branch, target: Geometry
) -> list[tuple[str, K.Branch]]:
    found = [("rbr_dense", main)]
    if getattr(block, "rbr_1x1", None) is not None:
        found.append(("rbr_1x1", lined_up_conv_bn_branch(conv_bn_unit(block.rbr_1x1), target)))
    identity = getattr(block, "rbr_identity", None)
    if identity is not None:
        norm = identity if is_norm_like(identity) else None
        found.append(("rbr_identity", identity_branch(conv, norm, target)))
    return found


def fuse(block: nn.Module) -> Fused:
    dense = conv_bn_unit(block.rbr_dense)
    main, target = conv_bn_branch(dense)
    summed = [branch for _, branch in _lined_up(block, dense[0], main, target)]
    # `id_tensor` is a cache some copies keep on the block; it has no place in the deploy form.
    fused = install_fused(block, "rbr_reparam", dense[0], summed, target, _TRAIN_CHILDREN)
    if hasattr(block, "id_tensor"):
        delattr(block, "id_tensor")
    return fused


def folds(block: nn.Module) -> list[str]:
    return [name for name in _TRAIN_CHILDREN if getattr(block, name, None) is not None]


RULE = Rule(
    name="repvgg",
    family="RepVGG",
    summary="rbr_dense {conv,bn} + rbr_1x1 {conv,bn} + rbr_identity (BN, Identity or None)",
    deploy_form="rbr_reparam (weight, bias); se and nonlinearity stay",
    match=match,
    fuse=fuse,
    folds=folds,
    branches=branches,
)
