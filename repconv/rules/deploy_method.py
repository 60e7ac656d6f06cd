"""Fallback: a block none of the structural rules knows, but which carries its own deploy method.

Many libraries ship re-parameterizable blocks with a method that folds them in place (MobileOne's
`reparameterize`, YOLO's `fuse_convs`, ...). Calling it leaves exactly the deploy form that library
expects; verification then judges the result like any other rule's.

It is a pass of the walk, tried after the block rules: it takes a module only when no pass before
it matches the module or anything inside it, and when it still holds a batch norm (so a block
already in deploy form is left alone).
"""

from __future__ import annotations

import inspect

from torch import nn

from repconv.errors import NotFusable
from repconv.rules.base import Pass, Scope, Step, is_norm_like

NAME = "deploy_method"
SUMMARY = "a block's own deploy method, for blocks no structural rule matches"
DEPLOY_FORM = "whatever the block's method leaves behind"

# Order of preference when a block has several of these.
METHOD_NAMES = (
    "switch_to_deploy",
    "reparameterize",
    "convert_to_deploy",
    "reparameterize_model",
    "fuse_convs",
    "fuse_reparam",
    "fuse",
)


def deploy_method(module: nn.Module) -> str | None:
    """The first method in METHOD_NAMES that the module defines and that needs no arguments."""
    for name in METHOD_NAMES:
        method = getattr(type(module), name, None)
        if not callable(method) or getattr(nn.Module, name, None) is not None:
            continue
        try:
            signature = inspect.signature(getattr(module, name))
        except (TypeError, ValueError):
            continue
        required = [
            p
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if not required:
            return name
    return None


def call_deploy_method(module: nn.Module, name: str) -> None:
    getattr(module, name)()


def holds_norm(module: nn.Module) -> bool:
    return any(is_norm_like(m) for m in module.modules())


class DeployMethodPass(Pass):
    """The fallback: a block's own deploy method, called in place."""

    name = NAME
    family = "any"
    summary = SUMMARY
    deploy_form = DEPLOY_FORM
    kind = "fallback"

    def match_module(self, module: nn.Module, scope: Scope) -> str | None:
        if scope.matched_inside(module) or not holds_norm(module):
            return None
        method = deploy_method(module)
        return f"{method}()" if method else None

    def family_of(self, module: nn.Module) -> str:
        return type(module).__name__

    def fuse_step(self, model: nn.Module, step: Step) -> None:
        module = model.get_submodule(step.path)
        method = deploy_method(module)
        if method is None:
            raise NotFusable(f"{type(module).__name__} has no deploy method any more")
        call_deploy_method(module, method)


PASS = DeployMethodPass()
