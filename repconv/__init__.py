"""repconv: fold structurally re-parameterized CNN blocks into plain convolutions, verified.

Public API:
    convert(model, ...)            convert a model in place and verify it; returns a Result
    convert_file(input, output)    the same for checkpoint files, writing a deploy checkpoint
    verify(train, deploy, ...)     compare a deploy checkpoint against its train checkpoint
    load_deploy(path, arch)        rebuild the deploy structure and load a deploy checkpoint
    register_rule(rule)            add a block rule (see repconv.rules.Rule)
"""

__version__ = "0.1.0"

from repconv.errors import BadInput, RepconvError, VerificationFailed
from repconv.pipeline import convert, convert_file, load_deploy, verify_files
from repconv.rules import Fused, Rule, register_rule

verify = verify_files

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
