"""The `repconv` command line: parse, call the pipeline, render. No logic of its own."""

from __future__ import annotations

import json
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from repconv import __version__, files, interrupts, report
from repconv.errors import BadInput, RepconvError, block_of
from repconv.interrupts import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, sigterm_raises
from repconv.options import (
    MAX_BATCH_SIZE,
    ConvertOptions,
    Group,
    option_fields,
    parse_kwargs,
    setting_of,
    shape_problem,
    split_shape,
    written_checks,
    written_name,
)
from repconv.terminal import shown
from repconv.tolerances import format_limit, onnx_limit

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

CONVERT_EXAMPLES = """
\b
Examples:
  repconv convert train.pth deploy.safetensors --arch demo_mixed
  repconv convert ckpt.pth out.safetensors --arch mypkg.models:build_net \\
      --arch-kwargs '{"num_classes": 100}' --input-shape 3,256,256
  repconv convert last.ckpt out.safetensors --arch ./models.py:Net --key state_dict_ema
  repconv convert train.pth deploy.pt --config configs/demo.toml --json
  repconv convert train.pth deploy.safetensors --arch ./repvgg.py:create_RepVGG_A0 \\
      --deploy-kwargs '{"deploy": true}'     # loads strictly into your deploy model
"""


def _shape(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    if value is None or isinstance(value, (list, tuple)):
        return tuple(value) if value else None
    try:
        shape = tuple(split_shape(value))
    except ValueError as exc:
        raise click.BadParameter(f"{exc}, got {value!r}") from None
    problem = shape_problem(shape)
    if problem:
        raise click.BadParameter(f"{problem}, got {value!r}")
    return shape


def _finite(_ctx, _param, value: float | None) -> float | None:
    """click's FloatRange lets NaN through (every comparison with NaN is false), and Inf."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"expected a finite number, got {value!r}")
    return value


def _load_config(ctx: click.Context, _param, value: str | None) -> str | None:
    """Options from a TOML file become defaults; flags on the command line still win.

    Conversion options are checked as a batch config's are; other commands' own options are
    left to click.
    """
    if not value:
        return value
    path = Path(value)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"{value} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from None
    mine = {p.name for p in ctx.command.params}
    group = ctx.find_root().command
    anywhere = {p.name for cmd in getattr(group, "commands", {}).values() for p in cmd.params}
    defaults = {}
    for key, val in data.items():
        name = key.replace("-", "_")
        if name not in anywhere | mine or name == "config":
            raise click.BadParameter(f"{value}: unknown option {key!r}")
        val = _checked_config_value(value, key, val)
        if name in mine:  # else an option of another command; one config can serve them all
            defaults[name] = val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _checked_config_value(config: str, key: str, value: Any) -> Any:
    """A conversion option's value from a --config file, checked and written as on the
    command line (click converts defaults from there)."""
    check = written_checks().get(key.replace("-", "_"))
    if check is None:
        return value
    try:
        value = check(value)
    except ValueError as exc:
        raise click.BadParameter(f"{config}: {key}: {exc}, got {value!r}") from None
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def _converted_option(f) -> Callable:
    """The click option of one `ConvertOptions` field, from its setting."""
    setting, default = setting_of(f), f.default
    flag = "--" + written_name(f).replace("_", "-")
    if setting.kind == "flag":
        return click.option(flag, is_flag=True, help=setting.help)
    how: dict[str, Any] = {"metavar": setting.metavar, "help": setting.help}
    if default is not None:
        how.update(default=default, show_default=True)
    if setting.kind == "integer":
        bounded = setting.minimum is not None or setting.maximum is not None
        how["type"] = click.IntRange(setting.minimum, setting.maximum) if bounded else int
    elif setting.kind == "number":
        how.update(type=click.FloatRange(min=setting.minimum), callback=_finite)
    elif setting.kind == "choice":
        how["type"] = click.Choice(list(setting.choices))
    elif setting.kind == "shape":
        how["callback"] = _shape
    return click.option(flag, **how)


def _stack(fn: Callable, options: list[Callable]) -> Callable:
    """Apply click options so that --help lists them in the given order."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def _json_option(help: str = "Print a JSON document (for CI).") -> Callable:
    return click.option("--json", "as_json", is_flag=True, help=help)


_verbose_option = click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
_input_shape_option = _converted_option(
    next(f for f in option_fields("check") if f.name == "input_shape")
)


def _conversion_options(*groups: Group) -> Callable[[Callable], Callable]:
    """The options of `ConvertOptions` in `groups`, in declared order."""
    return lambda fn: _stack(fn, [_converted_option(f) for f in option_fields(*groups)])


def _common_model_options(fn: Callable) -> Callable:
    """What every command reading a train checkpoint takes: the model's options, --config,
    --json and -v."""
    config = click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="TOML file holding any of these options.",
    )
    fn = _stack(fn, [config, _json_option(), _verbose_option])
    return _conversion_options("model")(fn)


def _taken_options(opts: dict[str, Any]) -> ConvertOptions:
    """The `ConvertOptions` a command's parameters set, removed from `opts`.

    --arch-kwargs is parsed here, so its BadInput is reported as the command's error.
    """
    values = {}
    for f in option_fields():
        name = written_name(f)
        if name in opts:
            value = opts.pop(name)
            values[f.name] = (not value) if setting_of(f).negated_as else value
    for f in option_fields():
        text = values.get(f.name)
        if setting_of(f).kind == "kwargs" and isinstance(text, str):
            values[f.name] = parse_kwargs(text, "--" + f.name.replace("_", "-")) if text else None
    return ConvertOptions(**values)


def run_command(as_json: bool, verbose: bool, body: Callable[[], int]) -> None:
    """Run a command body; map errors to exit codes and one-line messages.

    SIGTERM raises `Terminated` while the body runs, so it unwinds as Ctrl-C does: temp files
    are removed and a batch takes its workers down. With --json the one JSON document owns
    stdout: anything else printed meanwhile (user code's prints included) goes to stderr.
    """
    err = report.console(stderr=True)
    document = report.JsonDocument(sys.stdout)
    mark = files.writes_so_far()
    try:
        with sigterm_raises(), _json_owns_stdout(as_json, document):
            code = body()
    except RepconvError as exc:
        code, message, trace = exc.exit_code, str(exc), traceback.format_exc()
    except KeyboardInterrupt:
        code, message, trace = (
            EXIT_INTERRUPTED,
            _stopped("interrupted", mark),
            traceback.format_exc(),
        )
    except Terminated:
        code, message, trace = EXIT_TERMINATED, _stopped("terminated", mark), traceback.format_exc()
    except SystemExit as exc:  # user code (a builder, a deploy method): never read as success
        code, message, trace = EXIT_BAD_INPUT, _exit_message(exc), traceback.format_exc()
    except Exception as exc:  # a bug of ours or of a library: one line, traceback on -v
        code, message, trace = EXIT_INTERNAL, _internal_error(exc), traceback.format_exc()
        if not verbose:
            message += " (re-run with -v for the traceback)"
    else:
        sys.exit(code)
    if verbose:
        sys.stderr.write(trace)
    # the message may quote a file's words: escaped whole, so it stays one line on a terminal
    message = shown(message)
    if as_json and not document.emitted:
        document.emit({"ok": False, "exit_code": code, "error": message})
    err.print(f"error: {message}", markup=False)
    sys.exit(code)


def _code_of(exc: SystemExit) -> int:
    """The exit code `sys.exit` gives for `exc.code` (None is 0, anything else not an int 1)."""
    if exc.code is None:
        return EXIT_OK
    return exc.code if isinstance(exc.code, int) else 1


def _stopped(how: str, mark: int) -> str:
    """`terminated`, or `terminated after writing OUTPUT` when files were put in place (whole)
    before the signal: never silence about an output that is there."""
    written = files.completed_since(mark)
    if not written:
        return how
    return f"{how} after writing {', '.join(map(str, written))} (complete)"


def _json_owns_stdout(as_json: bool, document: report.JsonDocument):
    return report.json_owns_stdout(document) if as_json else nullcontext()


def _exit_message(exc: SystemExit) -> str:
    return (
        f"code run for this command (a builder or a block's deploy method) called "
        f"sys.exit({exc.code!r}); nothing was reported as done"
    )


def _internal_error(exc: Exception) -> str:
    """`internal error: <type>: <first line> (in block <path>)` for an unexpected exception."""
    lines = str(exc).strip().splitlines()
    message = f"internal error: {type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    block = block_of(exc)
    return f"{message} (in block {block})" if block else message


def _status(message: str, as_json: bool):
    err = report.console(stderr=True)
    if err.is_terminal and not as_json:
        return err.status(message)
    return nullcontext()


class OneLineErrors(click.Group):
    """click's usage errors as the contract's one line (`error: ...`, exit 2); with --json also
    the `{"ok": false, ...}` document CI parses, as for any other error."""

    def main(self, args: Sequence[str] | None = None, *rest: Any, **extra: Any) -> Any:
        words = list(sys.argv[1:] if args is None else args)
        extra["standalone_mode"] = False
        try:
            code = super().main(words, *rest, **extra)
        except SystemExit as exc:  # a command's result, decided and reported
            if args is None:  # the process's own command line: it ends with this code
                interrupts.exit_with_on_signal(_code_of(exc))
            raise
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C while click prompts
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as exc:
            message = shown(exc.format_message())
            if "--json" in words[: words.index("--") if "--" in words else None]:
                report.emit_json({"ok": False, "exit_code": exc.exit_code, "error": message})
            report.console(stderr=True).print(f"error: {message}", markup=False)
            sys.exit(exc.exit_code)
        code = code if isinstance(code, int) else EXIT_OK
        if args is None:
            interrupts.exit_with_on_signal(code)
        sys.exit(code)


@click.group(
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="repconv")
def main() -> None:
    """Fold re-parameterized CNN blocks (ACB, RepVGG, DBB, conv-BN) into plain convs.

    \b
    Examples:
      repconv demo
      repconv convert train.pth deploy.safetensors --arch demo_mixed
      repconv verify train.pth deploy.safetensors --json
      repconv inspect train.pth --arch path/to/models.py:build_model
      repconv lint deploy.onnx
      repconv rules

    \b
    Exit codes: 0 ok, 1 verification failed, 2 bad usage or bad input.
    """


@main.command(epilog=CONVERT_EXAMPLES)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(path_type=Path))
@_common_model_options
@_conversion_options("deploy", "check", "convert")
@click.option("--dry-run", is_flag=True, help="Convert and verify, write nothing.")
@click.option(
    "--onnx",
    "onnx_path",
    type=click.Path(path_type=Path),
    help="Also export the deploy model to this .onnx file, checked with onnxruntime "
    "(needs repconv[onnx]; defaults of `repconv export`).",
)
@click.option(
    "--int8-report",
    "int8_path",
    type=click.Path(path_type=Path),
    help="Also write the INT8 readiness report (JSON) here and show its table: weight ranges "
    "and SNR per fused conv, which branch makes the outliers, a simulated W8A8 pass.",
)
@click.option(
    "--calib",
    "calib_path",
    type=click.Path(path_type=Path),
    help="Calibration inputs of the INT8 report: a .pt/.npy file or a folder of them (images "
    "with Pillow); default: the verification's seeded random inputs, only a proxy.",
)
def convert(input_path: Path, output_path: Path, **opts: Any) -> None:
    """Convert a train checkpoint INPUT into a verified deploy checkpoint OUTPUT.

    OUTPUT is .safetensors (with metadata) or .pth/.pt. It is written atomically and only when
    verification passes. A pickled checkpoint read with --trust-pickle into a .pt/.pth OUTPUT is
    written back in its own layout (every model converted, training state set to None), loaded
    back and checked before it is renamed into place. An INPUT already in deploy form is
    refused (exit 2; --allow-noop: exit 0), and nothing is written.
    """
    as_json, verbose = opts.pop("as_json"), opts.pop("verbose")

    def body() -> int:
        from repconv import pipeline

        options = _taken_options(opts)
        int8_path, calibration = _int8_request(opts.pop("int8_path"), opts.pop("calib_path"))
        onnx_path = opts["onnx_path"]
        if onnx_path is not None:
            from repconv import onnx_export

            onnx_export.require_onnx()
            files.check_report_path(onnx_path)
        checks = []
        with _status("converting...", as_json) as status:

            def export_first(result) -> None:  # a failed ONNX check: no checkpoint written
                if onnx_path is not None and result.passed:
                    if status is not None:
                        status.update("exporting to ONNX...")
                    checks.append(onnx_export.export_conversion(result, onnx_path))

            result = pipeline.convert_file(
                input_path,
                output_path,
                options,
                dry_run=opts["dry_run"],
                before_writing=export_first,
                int8=calibration,
            )
        int8_doc = _write_int8(result, int8_path, opts["dry_run"])
        code = EXIT_OK if result.passed else EXIT_FAILED
        written = str(output_path) if result.written else None
        onnx_check = checks[0] if checks else None
        if as_json:
            onnx_dict = None if onnx_check is None else onnx_check.to_dict()
            report.emit_json(
                {"ok": code == 0, "exit_code": code, "output": written, **result.to_dict()}
                | {"onnx": onnx_dict, "noop": result.noop, "int8": int8_doc}
            )
            return code
        _show_conversion(input_path, result, written, opts["dry_run"], onnx_check)
        if int8_doc is not None:
            out = report.console()
            report.int8_table(out, int8_doc)
            if not opts["dry_run"]:
                out.print(f"wrote {int8_path} and {_chart_path(int8_path)}", markup=False)
        return code

    run_command(as_json, verbose, body)


def _print_source(out, source: dict[str, Any]) -> None:
    """Where in the train file the weights were read, when not the file itself."""
    from repconv import pipeline

    read_from = pipeline.source_note(
        Path(source["path"]).name, source["key"], source["stripped_prefixes"]
    )
    if read_from:
        out.print(read_from, markup=False)


def _show_conversion(
    input_path: Path, result: Any, written: str | None, dry_run: bool, onnx_check: Any
) -> None:
    """`convert`'s text report: the plan, the figures, the layout kept, what was written."""
    out = report.console()
    if result.noop and not written:  # --allow-noop
        out.print(
            f"{shown(str(input_path))} is already in deploy form: nothing to fold; nothing written",
            markup=False,
        )
        return
    _print_source(out, result.source)
    report.plan_table(out, result.plan)
    report.warnings_block(report.console(stderr=True), result.plan)
    report.summary_line(out, result.plan, result.params_before, result.params_after)
    if result.verification is not None:
        report.verification_lines(out, result.verification)
        if not result.passed:
            out.print(result.verification.failure_message(), markup=False)
    report.convention_line(out, result.convention and result.convention.to_dict())
    if result.layout is not None:
        report.layout_lines(out, result.layout, result.others)
    if written:
        out.print(shown(f"wrote {written}"), markup=False)
    else:
        out.print("dry run: nothing written" if dry_run else "nothing written", markup=False)
    if onnx_check is not None:
        out.print(onnx_check.summary(), markup=False)
        out.print(f"wrote {onnx_check.path}", markup=False)


def _write_int8(result: Any, path: Path | None, dry_run: bool) -> dict[str, Any] | None:
    """The INT8 report as JSON, written to `path` (atomically) with its SVG chart beside it
    (same name, .svg), unless a dry run."""
    if result.int8 is None:
        return None
    from repconv import int8_plot

    doc = result.int8.to_dict()
    if path is not None and not dry_run:
        files.write_text_atomically(path, json.dumps(doc, indent=2) + "\n")
        files.write_text_atomically(_chart_path(path), int8_plot.svg(doc))
    return doc


def _chart_path(report_path: Path) -> Path:
    chart = report_path.with_suffix(".svg")
    return chart if chart != report_path else report_path.with_name(report_path.name + ".svg")


def _int8_request(report_path: Path | None, calib_path: Path | None):
    """(the report's path, checked writable; the calibration) for --int8-report / --calib,
    or (None, None) without a report; --calib alone is a usage error."""
    if report_path is None:
        if calib_path is not None:
            raise BadInput("--calib needs --int8-report")
        return None, None
    from repconv.calibration import Calibration

    calibration = Calibration(calib_path)
    calibration.check()
    return files.check_report_path(report_path), calibration


EXPORT_EXAMPLES = """
\b
Examples:
  repconv export deploy.safetensors model.onnx --arch demo_mixed
  repconv export deploy.safetensors model.onnx --arch repvgg_a0 --dynamic-batch --fp16
  repconv convert train.pth deploy.safetensors --arch demo_mixed --onnx model.onnx
"""


# The limits are the tolerance table's, so the help cannot drift from what the check uses.
EXPORT_HELP = f"""Export the deploy checkpoint DEPLOY to ONNX, checked with onnxruntime.

\b
The deploy model is rebuilt (as load_deploy does), exported with torch's TorchScript
exporter and the file run with onnxruntime (CPU) on the verification inputs; it is
written atomically, and only if its outputs match the deploy model's in float64 within
{format_limit(onnx_limit("float32"))} relative (float32) or \
{format_limit(onnx_limit("float16"))} (--fp16): exit 1 if not. Needs repconv[onnx].
"""


@main.command(epilog=EXPORT_EXAMPLES, help=EXPORT_HELP)
@click.argument("deploy_path", metavar="DEPLOY", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@_common_model_options
@_conversion_options("deploy")
@_input_shape_option
@click.option(
    "--opset",
    type=click.IntRange(9, 20),
    default=17,
    show_default=True,
    help="ONNX opset to write.",
)
@click.option("--dynamic-batch", is_flag=True, help="Let the batch size vary (axis 0).")
@click.option("--fp16", is_flag=True, help="Write float16 weights and activations.")
@click.option(
    "--trust-metadata",
    is_flag=True,
    help="Build any architecture DEPLOY's metadata names (runs the code it names).",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Write a QDQ INT8 model (onnxruntime static quantization), checked with onnxruntime "
    "against the float deploy model.",
)
@click.option(
    "--int8-keep-float",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="With --int8: keep in float the N conv/linear nodes the simulated W8A8 ranks worst.",
)
@click.option(
    "--calib",
    "calib_path",
    type=click.Path(path_type=Path),
    help="Calibration inputs for --int8: a .pt/.npy file or a folder of them (images with "
    "Pillow); default: seeded random inputs, only a proxy.",
)
def export(deploy_path: Path, output_path: Path, **opts: Any) -> None:
    as_json, verbose = opts.pop("as_json"), opts.pop("verbose")

    def body() -> int:
        from repconv import onnx_export

        int8, keep, calib_path = (
            opts.pop("int8"),
            opts.pop("int8_keep_float"),
            opts.pop("calib_path"),
        )
        if int8:
            return _export_int8(deploy_path, output_path, opts, keep, calib_path, as_json)
        if keep or calib_path is not None:
            raise BadInput("--int8-keep-float and --calib need --int8")
        settings = onnx_export.ExportSettings(
            opset=opts.pop("opset"), dynamic_batch=opts.pop("dynamic_batch"), fp16=opts.pop("fp16")
        )
        trust = opts.pop("trust_metadata")
        with _status("exporting...", as_json):
            check = onnx_export.export_deploy_file(
                deploy_path, output_path, _taken_options(opts), settings, trust_metadata=trust
            )
        if as_json:
            report.emit_json({"ok": True, "exit_code": EXIT_OK, "onnx": check.to_dict()})
        else:
            out = report.console()
            out.print(check.summary(), markup=False)
            out.print(f"wrote {check.path}", markup=False)
        return EXIT_OK

    run_command(as_json, verbose, body)


def _export_int8(
    deploy_path: Path,
    output_path: Path,
    opts: dict[str, Any],
    keep: int,
    calib_path: Path | None,
    as_json: bool,
) -> int:
    """`export --int8`: the QDQ file, its check's summary or JSON."""
    from repconv import onnx_int8
    from repconv.calibration import Calibration

    if opts.pop("fp16") or opts.pop("dynamic_batch"):
        raise BadInput("--int8 takes neither --fp16 nor --dynamic-batch")
    opset, trust = opts.pop("opset"), opts.pop("trust_metadata")
    with _status("exporting INT8...", as_json):
        check = onnx_int8.export_int8_deploy_file(
            deploy_path, output_path, _taken_options(opts), calibration=Calibration(calib_path),
            opset=opset, keep_float=keep, trust_metadata=trust,
        )  # fmt: skip
    if as_json:
        report.emit_json({"ok": True, "exit_code": EXIT_OK, "onnx_int8": check.to_dict()})
        return EXIT_OK
    out = report.console()
    out.print(check.summary(), markup=False)
    for kept in check.kept_float:
        out.print(
            f"kept in float: {shown(kept['layer'])} (node {shown(str(kept['node']))})", markup=False
        )
    out.print(f"wrote {check.path}", markup=False)
    return EXIT_OK


@main.command()
@click.argument("train_path", metavar="TRAIN", type=click.Path(path_type=Path))
@click.argument("deploy_path", metavar="DEPLOY", type=click.Path(path_type=Path))
@_common_model_options
@_conversion_options("deploy", "check")
@click.option(
    "--trust-metadata",
    is_flag=True,
    help="Build any architecture DEPLOY's metadata names (runs the code it names).",
)
def verify(train_path: Path, deploy_path: Path, **opts: Any) -> None:
    """Check that DEPLOY is what TRAIN converts to: exit 0 if so, 1 if not.

    \b
    Two checks: DEPLOY's tensors must equal the ones recomputed from TRAIN (within one
    unit in the last place), and DEPLOY must compute what TRAIN computes on random inputs.
    Without --arch, the architecture recorded in DEPLOY's metadata is used when it is a
    built-in zoo name; any other recorded spec (a module or file to import) is only
    built with --trust-metadata, since it would run code the file names.
    Example:  repconv verify train.pth deploy.safetensors --json
    """
    as_json, verbose = opts.pop("as_json"), opts.pop("verbose")

    def body() -> int:
        from repconv import pipeline

        options = _taken_options(opts)
        with _status("verifying...", as_json):
            verification, notes = pipeline.verify_files(
                train_path, deploy_path, options, trust_metadata=opts["trust_metadata"]
            )
        code = EXIT_OK if verification.passed else EXIT_FAILED
        if as_json:
            report.emit_json(
                {"ok": code == 0, "exit_code": code, "notes": notes, **verification.to_dict()}
            )
            return code
        out = report.console()
        for note in notes.values():
            report.console(stderr=True).print(f"note: {note}", markup=False)
        report.verification_lines(out, verification)
        if not verification.passed:
            out.print(verification.failure_message(), markup=False)
        return code

    run_command(as_json, verbose, body)


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@_common_model_options
@_input_shape_option
@click.option(
    "--int8",
    is_flag=True,
    help="Also the INT8 readiness report: weight ranges and SNR per fused conv, which branch "
    "makes the outliers, a simulated W8A8 pass (on seeded random inputs unless --calib).",
)
@click.option(
    "--calib",
    "calib_path",
    type=click.Path(path_type=Path),
    help="Calibration inputs for --int8: a .pt/.npy file or a folder of them (images with Pillow).",
)
def inspect(input_path: Path, **opts: Any) -> None:
    """List the blocks INPUT holds, the rule for each and parameters before/after, and
    whether INPUT is in train form (blocks to fold) or already in deploy form.

    INPUT a deploy file repconv wrote: what it records of its conversion (its plan, and
    whether it loads into the train class by the conv-BN convention); nothing is built.
    Nothing is written. Example:  repconv inspect train.pth --arch repvgg_a0 --int8
    """
    as_json, verbose = opts.pop("as_json"), opts.pop("verbose")

    def body() -> int:
        from repconv import pipeline
        from repconv.calibration import Calibration

        wanted, calib_path = opts.pop("int8"), opts.pop("calib_path")
        if calib_path is not None and not wanted:
            raise BadInput("--calib needs --int8")
        calibration = Calibration(calib_path) if wanted else None
        if calibration is not None:
            calibration.check()
        options = _taken_options(opts)
        recorded = None if wanted else pipeline.recorded_conversion(input_path)
        if recorded is not None:
            return _show_recorded(recorded, as_json)
        plan, before, after, int8 = pipeline.inspect_int8(input_path, options, int8=calibration)
        int8_doc = None if int8 is None else int8.to_dict()
        if as_json:
            document = {"ok": True, "params_before": before, "params_after": after}
            document |= plan.to_dict() | plan.record().form()
            report.emit_json(document | {"int8": int8_doc})
            return EXIT_OK
        out = report.console()
        report.plan_table(out, plan)
        report.warnings_block(out, plan)
        report.summary_line(out, plan, before, after)
        report.form_line(out, plan)
        if int8_doc is not None:
            report.int8_table(out, int8_doc)
        return EXIT_OK

    run_command(as_json, verbose, body)


def _show_recorded(recorded: Any, as_json: bool) -> int:
    """`inspect` of a deploy file: the conversion it records."""
    # What repconv wrote is the deploy form: its recorded blocks were folded on the way there.
    form = {"form": "deploy", "train_blocks": 0, "families": {}}
    form["unfolded"] = recorded.plan.form()["unfolded"]
    if as_json:
        report.emit_json({"ok": True, "recorded": True, **recorded.to_dict()} | form)
        return EXIT_OK
    out = report.console()
    report.plan_table(out, recorded.plan, title="Blocks (as recorded)")
    report.warnings_block(out, recorded.plan)
    report.summary_line(out, recorded.plan, recorded.params_before, recorded.params_after)
    report.convention_line(out, recorded.convention)
    out.print("form: deploy (written by repconv convert: its recorded blocks are folded)")
    return EXIT_OK


@main.command()
@_json_option("Print a JSON document.")
def rules(as_json: bool) -> None:
    """List the fusion rules in the order they are applied."""
    from repconv.rules import describe

    rows = describe()
    if as_json:
        report.emit_json({"rules": rows})
        return
    report.rules_table(report.console(), rows)


def _int_list(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected integers like 1,8, got {value!r}") from None
    if not values or any(not 1 <= v <= MAX_BATCH_SIZE for v in values):
        raise click.BadParameter(
            f"expected integers from 1 to {MAX_BATCH_SIZE} like 1,8, got {value!r}"
        )
    return values


@main.command()
@click.argument("input_path", metavar="CKPT", type=click.Path(path_type=Path))
@_common_model_options
@click.option(
    "--deploy",
    "deploy_path",
    type=click.Path(path_type=Path),
    help="Deploy checkpoint to time (default: CKPT converted in memory).",
)
@_input_shape_option
@click.option(
    "--batch-sizes",
    default="1,8",
    show_default=True,
    callback=_int_list,
    help="Comma-separated batch sizes.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=3),
    default=10,
    show_default=True,
    help="Timed runs per measurement (median and spread are reported).",
)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="torch threads (default: torch's).")
def bench(input_path: Path, **opts: Any) -> None:
    """Latency of the train model (eval) against the deploy model on this machine.

    \b
    Also parameters and multiply-accumulates of both, and the speed-up.
    Example:  repconv bench train.pth --arch repvgg_a0 --threads 1 --json
    """
    as_json, verbose = opts.pop("as_json"), opts.pop("verbose")

    def body() -> int:
        import torch

        from repconv import pipeline

        if opts["threads"]:
            torch.set_num_threads(opts["threads"])
        with _status("benchmarking...", as_json):
            result = pipeline.bench_file(
                input_path,
                _taken_options(opts),
                deploy_path=opts["deploy_path"],
                batch_sizes=opts["batch_sizes"],
                runs=opts["runs"],
                warmup=opts["warmup"],
            )
        if as_json:
            report.emit_json({"ok": True, **result.to_dict()})
        else:
            report.bench_report(report.console(), result)
        return EXIT_OK

    run_command(as_json, verbose, body)


@main.command()
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@_json_option()
@_verbose_option
def lint(model_path: Path, as_json: bool, verbose: bool) -> None:
    """Find unfused train-time branches and BatchNorms left in an ONNX model.

    \b
    Reports BatchNormalization after Conv/Gemm/MatMul, convs reading one tensor whose outputs
    are summed, a conv's input added back to its output, and average-pool + conv branches
    summed, each with its nodes and the family it looks like (RepVGG, ACB, DBB, conv-BN).
    Exit 0 if none, 1 if any, 2 if MODEL is not a readable ONNX file. Needs repconv[onnx].
    Example:  repconv lint deploy.onnx --json
    """

    def body() -> int:
        from repconv.onnx_lint import lint_file

        findings = lint_file(model_path)
        code = EXIT_FAILED if findings else EXIT_OK
        if as_json:
            report.emit_json(
                {
                    "ok": not findings,
                    "exit_code": code,
                    "model": str(model_path),
                    "findings": [f.to_dict() for f in findings],
                }
            )
            return code
        out = report.console()
        if findings:
            rows = [(f.pattern, f.family, f.message) for f in findings]
            report.table(out, "unfused patterns", ("pattern", "looks like", "where"), rows)
        out.print(f"{len(findings)} finding(s) in {model_path}", markup=False)
        return code

    run_command(as_json, verbose, body)


BATCH_EXAMPLES = """
\b
Examples:
  repconv batch configs/zoo.toml
  repconv batch zoo.toml --jobs 4 --resume --report report.md
  repconv batch zoo.toml --executor dask://scheduler:8786 --report report.json
  repconv batch zoo.toml --dry-run
"""


@main.command(epilog=BATCH_EXAMPLES)
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    help="Entries converted at once on this machine (default: the number of cores; "
    "a Dask cluster runs as many as its workers have threads).",
)
@click.option(
    "--executor",
    metavar="SPEC",
    help="local (default) or dask://HOST:PORT, a Dask scheduler (needs repconv[dask]).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Skip entries whose output records the same input sha256 and options.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the summary to FILE: Markdown for .md, else JSON.",
)
@click.option("--dry-run", is_flag=True, help="List the entries the config expands to; run none.")
@_json_option("Print the report as JSON (for CI).")
@_verbose_option
def batch(config_path: Path, **opts: Any) -> None:
    """Convert every checkpoint a CONFIG file lists, each in its own worker process.

    \b
    CONFIG is TOML: a [defaults] table and [[model]] entries holding convert options
    (underscored: input_shape, arch_kwargs, verify_dtype, ...) plus input (a path or glob),
    output (a pattern: {stem}, {name}, {dir}), name, timeout (s), memory_limit, threads.
    A failing entry (bad checkpoint, failed verification, out of memory, timeout) is
    reported and the others go on. Exit 0 if all entries succeed, 1 if any failed,
    2 if CONFIG is bad (with the line at fault), 130/143 on Ctrl-C/SIGTERM (running
    workers are killed, nothing is half-written).
    """
    from repconv import batch as batch_api
    from repconv.batch import progress, summary

    as_json, verbose = opts.pop("as_json"), opts.pop("verbose")

    def body() -> int:
        config = batch_api.load_config(config_path)
        if opts["report_path"] is not None:
            files.check_report_path(opts["report_path"])
        if opts["dry_run"]:
            return _show_entries(config, as_json)
        err = report.console(stderr=True)
        where = opts["executor"] or "this machine"
        if err.is_terminal and not as_json:
            watcher = progress.LiveProgress(err, len(config.jobs), where)
        else:
            watcher = progress.LineProgress(err, len(config.jobs))
        with watcher:
            _, rows = batch_api.run_batch(
                config,
                jobs=opts["jobs"],
                executor=opts["executor"],
                resume=opts["resume"],
                watcher=watcher,
            )
        doc = summary.document(config, rows)
        unwritten = _write_report(opts["report_path"], doc)
        if as_json:
            report.emit_json(doc if unwritten is None else doc | {"report_error": unwritten})
        else:
            summary.print_summary(report.console(), config, rows)
        if unwritten is not None:  # the summary is out already: the run's results are kept
            raise BadInput(unwritten)
        return EXIT_OK if doc["ok"] else EXIT_FAILED

    run_command(as_json, verbose, body)


def _write_report(path: Path | None, doc: dict[str, Any]) -> str | None:
    """Write the batch report; the one-line reason it could not be written, if so."""
    if path is None:
        return None
    from repconv.batch import summary

    text = summary.as_markdown(doc) if path.suffix.lower() == ".md" else summary.as_json(doc)
    try:
        files.write_text_atomically(path, text)
    except (OSError, RepconvError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"the report {path} could not be written: {reason}"
    return None


def _show_entries(config, as_json: bool) -> int:
    from repconv.batch import summary

    rows = summary.entry_rows(config)
    if as_json:
        report.emit_json({"ok": True, "entries": rows})
    else:
        summary.print_entries(report.console(), config, rows)
    return EXIT_OK


@main.group()
def zoo() -> None:
    """Built-in architectures (usable as --arch NAME).

    \b
    Examples:
      repconv zoo list
      repconv zoo save repvgg_a0 train.pth --randomize-bn
      repconv convert train.pth deploy.safetensors --arch repvgg_a0
    """


@zoo.command("list")
@_json_option("Print a JSON document.")
def zoo_list(as_json: bool) -> None:
    """Name, family and train/deploy parameter counts of every built-in model."""
    from repconv.zoo import registry
    from repconv.zoo.checkpoints import parameter_counts

    rows = []
    for name in registry.list_models():
        train, deploy = parameter_counts(name)
        entry = registry.get_entry(name)
        rows.append(
            {
                "name": name,
                "family": entry.family,
                "train_params": train,
                "deploy_params": deploy,
                "description": entry.description,
            }
        )
    if as_json:
        report.emit_json({"models": rows})
        return
    report.zoo_table(report.console(), rows)


@zoo.command("save")
@click.argument("name")
@click.argument("output_path", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--randomize-bn", is_flag=True, help="Random BN statistics and affine parameters.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights and BN.")
@_verbose_option
def zoo_save(name: str, output_path: Path, randomize_bn: bool, seed: int, verbose: bool) -> None:
    """Write a train checkpoint (state dict, .pth or .safetensors) of zoo model NAME."""
    from repconv.zoo.checkpoints import save_train_checkpoint

    def body() -> int:
        save_train_checkpoint(name, output_path, randomize_bn=randomize_bn, seed=seed)
        report.console().print(f"wrote {output_path}", markup=False)
        return EXIT_OK

    run_command(False, verbose, body)


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Folder for the demo's checkpoints.",
)
@_verbose_option
def demo(out_dir: Path, verbose: bool) -> None:
    """Build a small net with one block of each family, save, convert, verify, report."""
    from repconv.showcase import run_demo

    run_command(False, verbose, lambda: run_demo(out_dir, report.console()))


if __name__ == "__main__":  # pragma: no cover
    main()
