"""Diverse Branch Block: kxk, 1x1, 1x1 -> avg-pool and 1x1 -> kxk branches, each with BN, summed.

Published convention (DBB release): `dbb_origin` {conv, bn}; `dbb_1x1` {conv, bn} (absent when
groups >= out channels); `dbb_avg` {conv?, bn?, avg, avgbn}; `dbb_1x1_kxk` {idconv1 | conv1, bn1,
conv2, bn2}. The `bn` and `bn1` in the sequential branches are BN-and-pad layers: a BN child plus
`pad_pixels`, padding with the value the BN gives a zero input, which is what makes the 1x1 -> kxk
composition exact at the borders. Deploy form: `dbb_reparam` with bias.
"""

from __future__ import annotations

from torch import nn

from repconv import kernels as K
from repconv.errors import NotFusable
from repconv.fused_conv import conv_bn_branch, install_fused, lined_up_conv_bn_branch, norm_stats
from repconv.geometry import Geometry, require_lined_up
from repconv.modules import conv_bn_unit, is_norm_like, is_plain_conv
from repconv.rules.base import Fused, Rule

_TRAIN_CHILDREN = ["dbb_origin", "dbb_1x1", "dbb_avg", "dbb_1x1_kxk"]


def _norm_and_pad(module: nn.Module | None) -> tuple[nn.Module, int] | None:
    """A plain norm (no padding) or a BN-and-pad layer: (norm, pixels padded with its bias)."""
    if module is None:
        return None
    if is_norm_like(module):
        return module, 0
    inner, pad = getattr(module, "bn", None), getattr(module, "pad_pixels", None)
    if (
        is_norm_like(inner)
        and isinstance(pad, int)
        and set(dict(module.named_children())) == {"bn"}
    ):
        return inner, pad
    return None


def _is_pointwise(conv: nn.Module | None) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
    )


def _is_identity_based(conv: nn.Module | None) -> bool:
    """DBB's identity-based 1x1: a 1x1 conv whose effective kernel is weight + identity."""
    return _is_pointwise(conv) and conv.in_channels == conv.out_channels


def _avg_pool_ok(avg: nn.Module | None) -> bool:
    return (
        isinstance(avg, nn.AvgPool2d)
        and avg.count_include_pad
        and not avg.ceil_mode
        and avg.divisor_override is None
    )


def _children(module: nn.Module | None) -> dict[str, nn.Module]:
    return dict(module.named_children()) if isinstance(module, nn.Module) else {}


def _avg_matches(avg_seq: nn.Module | None) -> bool:
    parts = _children(avg_seq)
    if not _avg_pool_ok(parts.get("avg")) or not is_norm_like(parts.get("avgbn")):
        return False
    if set(parts) - {"conv", "bn", "avg", "avgbn"}:
        return False
    if "conv" in parts and not is_plain_conv(parts["conv"]):
        return False
    return "bn" not in parts or _norm_and_pad(parts["bn"]) is not None


def _kxk_matches(seq: nn.Module | None) -> bool:
    parts = _children(seq)
    first = parts.get("idconv1", parts.get("conv1"))
    return (
        set(parts) in ({"idconv1", "bn1", "conv2", "bn2"}, {"conv1", "bn1", "conv2", "bn2"})
        and (_is_identity_based(first) if "idconv1" in parts else is_plain_conv(first))
        and _norm_and_pad(parts["bn1"]) is not None
        and is_plain_conv(parts["conv2"])
        and is_norm_like(parts["bn2"])
    )


def match(block: nn.Module) -> str | None:
    if hasattr(block, "dbb_reparam") or conv_bn_unit(getattr(block, "dbb_origin", None)) is None:
        return None
    if not (_avg_matches(block.dbb_avg) and _kxk_matches(getattr(block, "dbb_1x1_kxk", None))):
        return None
    one = getattr(block, "dbb_1x1", None)
    if one is not None and conv_bn_unit(one) is None:
        return None
    parts = ["kxk", "1x1"] if one is not None else ["kxk"]
    return " + ".join([*parts, "avg", "1x1-kxk"])


def _padded_by_first(geometry: Geometry, pad_between: int, first_biased: bool) -> Geometry:
    """The geometry of 1x1 -> (pad with its bias) -> op: the op's padding plus the pad between."""
    if first_biased and any(p > 0 for p in geometry.padding):
        # Decided by structure, not values, so the deploy structure can be rebuilt without them.
        raise NotFusable("zero padding after a biased 1x1 conv is not a convolution")
    return geometry.with_padding(tuple(p + pad_between for p in geometry.padding))


def _avg_branch(block: nn.Module, target: Geometry, groups: int) -> K.Branch:
    parts = _children(block.dbb_avg)
    avg = parts["avg"]
    size = _pair(avg.kernel_size)
    geometry = Geometry(
        size, _pair(avg.stride or avg.kernel_size), _pair(avg.padding), (1, 1), "zeros"
    )
    out_channels = parts["avgbn"].running_mean.numel()
    device = parts["avgbn"].running_mean.device
    if "conv" in parts:
        conv = parts["conv"]
        if not _is_pointwise(conv):
            raise NotFusable("the conv before the average pool must be 1x1, stride 1, no padding")
        first = K.as_branch(conv.weight, conv.bias)
        pad_between = 0
        if "bn" in parts:
            norm, pad_between = _norm_and_pad(parts["bn"])
            first = K.fold_bn(first, norm_stats(norm))
        biased = conv.bias is not None or "bn" in parts
        geometry = _padded_by_first(geometry, pad_between, biased)
        branch = K.pool_after(first, size)
    else:
        branch = K.avg_pool(out_channels, groups, size, device=device)
    branch = K.fold_bn(branch, norm_stats(parts["avgbn"]))
    require_lined_up(geometry, target)
    return branch


def _kxk_branch(block: nn.Module, target: Geometry) -> K.Branch:
    parts = _children(block.dbb_1x1_kxk)
    if "idconv1" in parts:
        idconv = parts["idconv1"]
        learned = K.as_branch(idconv.weight, idconv.bias)
        ident = K.identity(idconv.out_channels, idconv.groups, (1, 1), device=idconv.weight.device)
        first, first_groups = K.add([learned, ident]), idconv.groups
    else:
        conv1 = parts["conv1"]
        if not _is_pointwise(conv1):
            raise NotFusable("conv1 of dbb_1x1_kxk must be 1x1, stride 1, no padding")
        first, first_groups = K.as_branch(conv1.weight, conv1.bias), conv1.groups
    norm, pad_between = _norm_and_pad(parts["bn1"])
    first = K.fold_bn(first, norm_stats(norm))
    conv2 = parts["conv2"]
    if conv2.groups != first_groups:
        raise NotFusable("the 1x1 and kxk convs of dbb_1x1_kxk use different groups")
    second = K.as_branch(conv2.weight, conv2.bias)
    geometry = _padded_by_first(Geometry.of(conv2), pad_between, first_biased=True)
    try:
        branch = K.compose(first, second, conv2.groups)
    except ValueError as exc:
        raise NotFusable(str(exc)) from None
    branch = K.fold_bn(branch, norm_stats(parts["bn2"]))
    require_lined_up(geometry, target)
    return branch


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def branches(block: nn.Module) -> list[tuple[str, K.Branch]]:
    """The branches `fuse` sums, named by their train child, lined up with dbb_origin."""
    origin = conv_bn_unit(block.dbb_origin)
    return _named_branches(block, origin, *conv_bn_branch(origin))


def _named_branches(
    block: nn.Module, origin: tuple[nn.Module, nn.Module], main: K.Branch, target: Geometry
) -> list[tuple[str, K.Branch]]:
    found = [("dbb_origin", main)]
    if getattr(block, "dbb_1x1", None) is not None:
        found.append(("dbb_1x1", lined_up_conv_bn_branch(conv_bn_unit(block.dbb_1x1), target)))
    found.append(("dbb_avg", _avg_branch(block, target, origin[0].groups)))
    found.append(("dbb_1x1_kxk", _kxk_branch(block, target)))
    return found


def fuse(block: nn.Module) -> Fused:
    origin = conv_bn_unit(block.dbb_origin)
    main, target = conv_bn_branch(origin)
    summed = [branch for _, branch in _named_branches(block, origin, main, target)]
    return install_fused(block, "dbb_reparam", origin[0], summed, target, _TRAIN_CHILDREN)


RULE = Rule(
    name="dbb",
    family="DBB",
    summary="dbb_origin + dbb_1x1 + dbb_avg {conv?, bn?, avg, avgbn} + dbb_1x1_kxk",
    deploy_form="dbb_reparam (weight, bias); nonlinear stays",
    match=match,
    fuse=fuse,
    branches=branches,
)
