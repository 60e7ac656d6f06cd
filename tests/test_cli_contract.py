"""The CLI's contract holds whatever a file holds or user code does: one escaped line per error,
exit 2 for bad input (never 0 for a command that did not finish), one JSON document with --json.
"""

from __future__ import annotations

import errno
import io
import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import randomized
from rich.console import Console
from test_metadata_trust import rewrite_arch

from repconv import report
from repconv.cli import main, run_command
from repconv.zoo.demo import DemoNet

SPOOF = "\x1b[2K\r\x1b[1Averification passed"


@pytest.fixture()
def train(tmp_path: Path) -> Path:
    path = tmp_path / "train.pth"
    torch.save(randomized(DemoNet(), dtype=torch.float32).state_dict(), path)
    return path


def builders(tmp_path: Path) -> Path:
    path = tmp_path / "builders.py"
    path.write_text(
        textwrap.dedent(
            """
            import sys
            from repconv.zoo.demo import DemoNet

            def chatty():
                print("hello from the constructor")
                return DemoNet()

            def quitter():
                sys.exit(0)

            def broken():
                raise RuntimeError("no such width")
            """
        )
    )
    return path


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# 5. text from a file never reaches the terminal raw


def test_a_recorded_arch_with_control_characters_is_escaped(train, tmp_path):
    deploy = tmp_path / "deploy.safetensors"
    args = ["convert", str(train), str(deploy), "--arch", "demo_mixed", "--samples", "1"]
    assert CliRunner().invoke(main, args).exit_code == 0
    rewrite_arch(deploy, f"evil{SPOOF}:build", {})
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(main, ["verify", str(train), str(deploy), *extra])
        assert result.exit_code == 2, result.output
        assert "\x1b" not in result.output and "\r" not in result.output
        line = one_error_line(result.stderr)
        assert "\\x1b[2K\\r" in line
        if extra:
            assert "\x1b" not in json.loads(result.stdout)["error"]


def test_tables_and_warnings_escape_a_files_text():
    plain = Console(file=io.StringIO(), force_terminal=False)
    report.table(plain, f"title{SPOOF}", ["key"], [[f"stem{SPOOF}"]])
    boxed = Console(file=io.StringIO(), force_terminal=True, width=200)
    report.table(boxed, "t", ["key"], [["[bold]stem[/bold]"]])
    assert "\x1b[2K" not in plain.file.getvalue() and "\\x1b[2K\\r" in plain.file.getvalue()
    assert "[bold]stem[/bold]" in boxed.file.getvalue()  # a file's brackets are no markup


# 7. user code that exits or prints


def test_a_builder_calling_sys_exit_is_an_error_naming_it(train, tmp_path):
    out = tmp_path / "deploy.safetensors"
    spec = f"{builders(tmp_path)}:quitter"
    result = CliRunner().invoke(main, ["convert", str(train), str(out), "--arch", spec])
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert "quitter" in line and "sys.exit(0)" in line
    assert not out.exists()


def test_a_deploy_builder_that_fails_is_named_by_its_own_flag(train, tmp_path):
    out = tmp_path / "deploy.safetensors"
    spec = f"{builders(tmp_path)}:broken"
    args = ["convert", str(train), str(out), "--arch", "demo_mixed", "--deploy-arch", spec]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: --deploy-arch {spec}: building the model failed"), line
    assert not out.exists()


def test_a_sys_exit_escaping_the_command_body_is_never_success(capsys):
    def body() -> int:
        raise SystemExit(0)  # as a block's deploy method might

    with pytest.raises(SystemExit) as exited:
        run_command(True, False, body)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["exit_code"] == 2
    assert "called sys.exit(0)" in one_error_line(captured.err)


def test_a_printing_builder_leaves_the_json_document_alone(train, tmp_path):
    out = tmp_path / "deploy.safetensors"
    spec = f"{builders(tmp_path)}:chatty"
    args = ["convert", str(train), str(out), "--arch", spec, "--samples", "1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    assert "hello from the constructor" in result.stderr


def test_a_report_that_cannot_be_written_keeps_the_summary(train, tmp_path, monkeypatch):
    config = tmp_path / "zoo.toml"
    config.write_text(
        f'[[model]]\ninput = "{train}"\noutput = "deploy/{{stem}}.safetensors"\n'
        'arch = "demo_mixed"\nsamples = 1\n'
    )

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("repconv.files.write_text_atomically", full_disk)
    report_path = tmp_path / "report.md"
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(
            main, ["batch", str(config), "--report", str(report_path), *extra]
        )
        assert result.exit_code == 2, result.output
        line = one_error_line(result.stderr.splitlines()[-1])
        assert str(report_path) in line and "No space left" in line
        if extra:
            doc = json.loads(result.stdout)
            assert doc["counts"]["converted"] == 1 and str(report_path) in doc["report_error"]
        else:
            assert "1 converted" in result.stdout and "train" in result.stdout


# 8. click's usage errors keep the contract too


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--samples", "0", "'--samples'"),
        ("--input-shape", "3,x,4", "'--input-shape'"),
        ("--config", "missing.toml", "does not exist"),
    ],
)
def test_usage_errors_are_one_line_and_one_json_document(tmp_path, option, value, words):
    out = tmp_path / "deploy.safetensors"
    base = ["convert", str(tmp_path / "train.pth"), str(out), "--arch", "demo_mixed"]
    if option == "--config":
        value = str(tmp_path / value)
    plain = CliRunner().invoke(main, [*base, option, value])
    assert plain.exit_code == 2 and plain.stdout == ""
    assert words in one_error_line(plain.stderr)
    with_json = CliRunner().invoke(main, [*base, option, value, "--json"])
    assert with_json.exit_code == 2
    doc = json.loads(with_json.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2 and words in doc["error"]
    assert not out.exists()


def test_convert_json_says_why_each_model_was_built(train, tmp_path):
    from repconv.model_choice import OWN_DEPLOY_STRUCTURE

    out = tmp_path / "deploy.safetensors"
    base = ["convert", str(train), str(out), "--arch", "demo_mixed", "--samples", "1", "--json"]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)["source"]["models"]
    assert models == {"train": "--arch", "deploy": OWN_DEPLOY_STRUCTURE}
