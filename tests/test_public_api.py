"""The public API is visible to dir(), help() and IDEs, though importing repconv loads no torch."""

import dataclasses
import inspect
import subprocess
import sys

import pytest
import torch

import repconv
from repconv.options import ConvertOptions

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


def _keyword_defaults(function) -> dict:
    params = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_signatures_show_the_option_keywords_with_their_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(ConvertOptions)}
    expected = {
        repconv.convert: set(defaults)
        - {"arch", "arch_kwargs", "key", "trust_pickle"}
        - {"strict", "force"}
        - {"state_dict_only", "keep_training_state", "allow_noop"},  # about files, not models
        repconv.convert_file: set(defaults),
        repconv.verify_files: {
            f.name
            for f in dataclasses.fields(ConvertOptions)
            if f.metadata["setting"].group in ("model", "deploy", "check")
        },
    }
    for function, names in expected.items():
        shown = _keyword_defaults(function)
        params = inspect.signature(function).parameters.values()
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), function
        assert names <= set(shown), (function, names - set(shown))
        assert {name: shown[name] for name in names} == {name: defaults[name] for name in names}
    assert "strict" not in _keyword_defaults(repconv.convert)


def test_shown_keywords_are_accepted_and_unknown_ones_refused():
    signature = inspect.signature(repconv.convert_file)
    bound = signature.bind("a.pth", "b.safetensors", samples=3, verify_dtype="float32")
    assert bound.kwargs == {"samples": 3, "verify_dtype": "float32"}
    with pytest.raises(TypeError, match="unknown conversion option"):
        repconv.convert(torch.nn.Conv2d(1, 1, 1), sample=3)


def test_help_of_convert_shows_keywords_not_a_catch_all():
    text = _fresh(
        "import pydoc, repconv; print(pydoc.render_doc(repconv.convert, renderer=pydoc.plaintext))"
    )
    assert "**keywords" not in text
    assert "samples: 'int' = 2" in text or "samples: int = 2" in text
    assert "verify_dtype" in text and "exact_limit" in text
