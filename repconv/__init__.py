"""repconv: fold structurally re-parameterized CNN blocks into plain convolutions, verified.

Public API:
    convert(model, ...)            convert a model in place and verify it; returns a Result
    convert_file(input, output)    the same for checkpoint files, writing a deploy checkpoint
    verify(train, deploy, ...)     compare a deploy checkpoint against its train checkpoint
    load_deploy(path, arch)        rebuild the deploy structure and load a deploy checkpoint
    register_rule(rule)            add a block rule (see repconv.rules.Rule)
"""

__version__ = "0.1.0"

from typing import Any

from repconv.errors import BadInput, RepconvError, VerificationFailed

# torch is imported on first use of the API, so orchestration (the CLI's help, batch's runner)
# starts fast and small.
_LAZY = {
    "convert": ("repconv.pipeline", "convert"),
    "convert_file": ("repconv.pipeline", "convert_file"),
    "load_deploy": ("repconv.pipeline", "load_deploy"),
    "verify_files": ("repconv.pipeline", "verify_files"),
    "verify": ("repconv.pipeline", "verify_files"),
    "Fused": ("repconv.rules", "Fused"),
    "Rule": ("repconv.rules", "Rule"),
    "register_rule": ("repconv.rules", "register_rule"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'repconv' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


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
