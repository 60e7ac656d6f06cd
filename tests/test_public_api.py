"""The public API is visible to dir(), help() and IDEs, though importing repconv loads no torch."""

import subprocess
import sys

import repconv

API = [
    "BadInput",
    "Fused",
    "Rule",
    "VerificationFailed",
    "convert",
    "convert_file",
    "load_deploy",
    "register_rule",
    "verify",
    "verify_files",
]


def _fresh(code: str) -> str:
    """Run `code` in a new interpreter: this one may have loaded the lazy names already."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_dir_lists_the_api_without_importing_torch():
    out = _fresh(
        "import sys, repconv; print(' '.join(dir(repconv))); print('torch' in sys.modules)"
    )
    names, torch_loaded = out.splitlines()
    assert set(API) <= set(names.split())
    assert torch_loaded == "False"


def test_help_shows_signatures_and_the_rule_contract():
    text = _fresh(
        "import pydoc, repconv; print(pydoc.render_doc(repconv, renderer=pydoc.plaintext))"
    )
    for shown in (
        "convert(model",
        "convert_file(input_path",
        "load_deploy(path",
        "register_rule(rule",
        "verify = verify_files(train_path",
        "class Rule",
        "class Fused",
        "class VerificationFailed",
    ):
        assert shown in text, shown
    assert "fuse runs in float64" in text


def test_the_api_names_are_the_implementations():
    from repconv import pipeline, rules

    assert repconv.convert is pipeline.convert
    assert repconv.verify is repconv.verify_files is pipeline.verify_files
    assert repconv.Rule is rules.Rule and repconv.Fused is rules.Fused
    assert set(API) <= set(repconv.__all__)
