"""Fallback: a block none of the structural rules knows, but which carries its own deploy method.

Many libraries ship re-parameterizable blocks with a method that folds them in place (MobileOne's
`reparameterize`, YOLO's `fuse_convs`, ...). Calling it leaves exactly the deploy form that library
expects; verification then judges the result like any other rule's.

The engine offers a module to this rule only when no structural rule matched it or anything inside
it, and when it still holds a batch norm (so a block already in deploy form is left alone).
"""

from __future__ import annotations

import inspect

from torch import nn

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
