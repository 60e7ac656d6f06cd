"""Which deploy form a conversion writes, when no deploy model is given: the library's own.

A model whose blocks carry their own deploy methods (timm's `reparameterize`, yolov7's
`fuse_repvgg_block`, RepGhost's `switch_to_deploy`, ...) comes from a library that defines its
deploy form: those blocks re-parameterized, every plain conv + BN pair outside them left live
(timm's reparameterized FastViT keeps ConvMlp's norm, yolov7's `deploy=True` model its `Conv`
norms, RT-DETR its `ConvNormLayer`, UniRepLKNet its stem). Writing that form by default means the
file loads strictly into the library's own deploy model. `--fold-plain-bn` folds those pairs too,
by the conv-BN convention; a model without deploy methods has them folded always, the fold being
its whole deploy form.
"""

from __future__ import annotations

from torch import nn

from repconv.rules import convbn
from repconv.rules.deploy_method import deploy_method, holds_norm

PLAIN_PAIRS_KEPT = (
    "the model's own deploy form keeps plain conv + BN pairs live (--fold-plain-bn folds them)"
)


def carries_own_deploy_form(model: nn.Module) -> bool:
    """Whether any block of the model has a deploy method of its own (with a norm to fold)."""
    return any(deploy_method(m) is not None and holds_norm(m) for m in model.modules())


def passes_left_out(
    model: nn.Module, fold_plain_bn: bool, deploy_model_given: bool
) -> dict[str, str]:
    """The passes a plan for `model` is made without, each with why (`engine.plan`)."""
    if fold_plain_bn or deploy_model_given or not carries_own_deploy_form(model):
        return {}
    return {convbn.NAME: PLAIN_PAIRS_KEPT}
