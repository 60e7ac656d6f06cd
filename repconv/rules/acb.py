"""ACNet's asymmetric convolution block: kxk conv-BN + kx1 conv-BN + 1xk conv-BN, summed.

Published convention (ACNet release): children square_conv/square_bn, ver_conv/ver_bn (kx1),
hor_conv/hor_bn (1xk); BNs may be affine=False. When the block's padding is smaller than k//2 the
release crops the input of the thin branches by `crop` pixels instead of padding negatively; a
crop is the same as a negative padding, which the geometry check handles. Deploy form: `fused_conv`
with bias, and `deploy = True`.
"""

from __future__ import annotations

from torch import nn

from repconv import kernels as K
from repconv.fused_conv import install_fused, norm_stats
from repconv.geometry import Geometry, require_lined_up
from repconv.modules import is_norm_like, is_plain_conv
from repconv.rules.base import Fused, Rule

_PAIRS = (("square_conv", "square_bn"), ("ver_conv", "ver_bn"), ("hor_conv", "hor_bn"))
# The release crops the width of the vertical branch's input and the height of the horizontal's.
_CROPPED_AXIS = {"ver_conv": 1, "hor_conv": 0}


def match(block: nn.Module) -> str | None:
    if hasattr(block, "fused_conv"):
        return None
    for conv_name, bn_name in _PAIRS:
        conv = getattr(block, conv_name, None)
        if not (is_plain_conv(conv) and len(conv.kernel_size) == 2):
            return None
        if not is_norm_like(getattr(block, bn_name, None)):
            return None
    crop = int(getattr(block, "crop", 0) or 0)
    crop += int(getattr(getattr(block, "ver_conv_crop_layer", None), "cols_to_crop", 0))
    return f"kxk + kx1 + 1xk, crop {crop}" if crop else "kxk + kx1 + 1xk"


def _branch_geometry(block: nn.Module, conv_name: str) -> Geometry:
    """A thin branch's geometry, with any crop of its input counted as negative padding.

    ACNet's release keeps one `crop` for both thin branches; the DBB release's copy uses
    `<conv>_crop_layer` modules with `rows_to_crop` / `cols_to_crop`.
    """
    geometry = Geometry.of(getattr(block, conv_name))
    crops = [0, 0]
    shared = int(getattr(block, "crop", 0) or 0)
    if shared and conv_name in _CROPPED_AXIS:
        crops[_CROPPED_AXIS[conv_name]] = shared
    layer = getattr(block, f"{conv_name}_crop_layer", None)
    if layer is not None:
        crops[0] += int(getattr(layer, "rows_to_crop", 0))
        crops[1] += int(getattr(layer, "cols_to_crop", 0))
    if not any(crops):
        return geometry
    return geometry.with_padding(tuple(p - c for p, c in zip(geometry.padding, crops)))


def branches(block: nn.Module) -> list[tuple[str, K.Branch]]:
    """The branches `fuse` sums, named by their conv, each checked to line up."""
    target = Geometry.of(block.square_conv)
    found = []
    for conv_name, bn_name in _PAIRS:
        conv = getattr(block, conv_name)
        branch = K.fold_bn(K.as_branch(conv.weight, conv.bias), norm_stats(getattr(block, bn_name)))
        require_lined_up(_branch_geometry(block, conv_name), target)
        found.append((conv_name, branch))
    return found


def fuse(block: nn.Module) -> Fused:
    target = Geometry.of(block.square_conv)
    summed = [branch for _, branch in branches(block)]
    children = [name for pair in _PAIRS for name in pair]
    children += ["ver_conv_crop_layer", "hor_conv_crop_layer"]
    return install_fused(block, "fused_conv", block.square_conv, summed, target, children)


RULE = Rule(
    name="acb",
    family="ACB",
    summary="square_conv/bn + ver_conv/bn (kx1) + hor_conv/bn (1xk), optional crop",
    deploy_form="fused_conv (weight, bias); deploy = True",
    match=match,
    fuse=fuse,
    branches=branches,
)
