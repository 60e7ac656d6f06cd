"""repconv: fold structurally re-parameterized CNN blocks into plain convolutions, verified.

Public API:
    convert(model, ...)            convert a model in place and verify it; returns a Result
    convert_file(input, output)    the same for checkpoint files, writing a deploy checkpoint
    verify(train, deploy, ...)     compare a deploy checkpoint against its train checkpoint
                                   (`verify_files` is the same function)
    load_deploy(path, arch)        rebuild the deploy structure and load a deploy checkpoint
    register_rule(rule)            add a block rule (a `Rule`; its `fuse` returns a `Fused`)
    BadInput, VerificationFailed   the errors raised on purpose (exit codes 2 and 1 in the CLI)

Importing repconv does not import torch: the API loads on first use, so the CLI's help and batch's
runner start fast and small. `dir(repconv)` and `help(repconv)` list it all (help imports torch
to show the signatures).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from repconv.errors import BadInput, RepconvError, VerificationFailed
from repconv.version import __version__

if TYPE_CHECKING:
    # For type checkers and IDEs; at run time these load lazily through __getattr__.
    from repconv.pipeline import convert, convert_file, load_deploy, verify_files
    from repconv.pipeline import verify_files as verify
    from repconv.rules import Fused, Rule

_LAZY = {
    "convert": ("repconv.pipeline", "convert"),
    "convert_file": ("repconv.pipeline", "convert_file"),
    "load_deploy": ("repconv.pipeline", "load_deploy"),
    "verify_files": ("repconv.pipeline", "verify_files"),
    "verify": ("repconv.pipeline", "verify_files"),
    "Fused": ("repconv.rules", "Fused"),
    "Rule": ("repconv.rules", "Rule"),
}


def register_rule(rule: Rule, *, before: str | None = None) -> Rule:
    """Add a block rule; it is tried after the built-in ones unless `before` names a rule.

    Returns `rule`. Raises TypeError for anything but a `repconv.Rule`, ValueError if a rule of
    that name is registered already or `before` names no rule. Rules are also found through the
    `repconv.rules` entry-point group (a Rule, or a callable returning one or a list).

    The contract of a `Rule(name, family, summary, match, fuse, deploy_form="")`:

    - `match(module)` is called on every module, top-down; the first rule that matches a module
      wins it and its subtree is not searched further. It must be cheap and change nothing.
      It returns None (not this rule's block) or a short description of the structure it found
      (shown by `repconv inspect`). Recognise blocks by structure (child names, types, shapes),
      not by class, so copies of a block in other codebases convert too.
    - `fuse(module)` rewrites that block in place into its deploy form, which the block's own
      forward must then run with the same outputs (when verifying, repconv runs each block on a
      random input before and after it is fused, and the whole model against its reference).
    - fuse runs in float64: compute the fused kernel and bias in float64 whatever the block's
      dtype (`repconv.kernels`: fold_bn, pad_to, add ... do) and round each weight once, to the
      block's dtype or left in float64; the engine then rounds the block back to the dtype it
      had before. Never round an intermediate.
    - What a rule must leave behind: a stock conv with a bias at `block.<attribute>` holding
      the fused kernel, the train-time children deleted, and a boolean `deploy` flag set to
      True if the block has one (`repconv.fused_conv.install_fused` does all three). It returns
      `Fused(attribute, kernel_shape, removed)`: the new conv's attribute, its kernel shape and
      the names of the children it removed.
    - When the structure is right but the block cannot be folded exactly (e.g. an identity
      branch with stride 2), raise `repconv.errors.NotFusable` with the reason before changing
      anything: the block is then left as it is and reported as skipped.
    """
    from repconv.rules import register_rule as register

    return register(rule, before=before)


def __getattr__(name: str) -> Any:
    """Load a name of the API (and torch with it) on its first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'repconv' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API, loaded or not."""
    # The lazy names are not in the namespace until first used: list the public API (and the
    # module's own dunders) rather than what happens to be loaded.
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


__all__ = [
    "BadInput",
    "Fused",
    "RepconvError",
    "Rule",
    "VerificationFailed",
    "__version__",
    "convert",
    "convert_file",
    "load_deploy",
    "register_rule",
    "verify",
    "verify_files",
]
