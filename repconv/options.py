"""Conversion options as plain data (no torch): one frozen dataclass names them all.

`ConvertOptions` is the single source of every option's name, type, default and bounds. The
command line's flags, the TOML configs (single commands and batch), batch jobs and the record
written into each deploy file's metadata are all derived from its fields. The record lets
`repconv batch --resume` tell whether an existing output was made from the same settings
without loading torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from repconv.errors import BadInput
from repconv.terminal import shown
from repconv.tolerances import EXACT_LIMIT, format_limit, written_limit

VERIFY_DTYPES = ("float64", "float32", "float16", "bfloat16")

# Bounds that no real input reaches; what fits in memory is checked when inputs are made.
MAX_SAMPLES = 64
MAX_BATCH_SIZE = 1024
MAX_SHAPE_DIMS = 8
MAX_SHAPE_SIDE = 1 << 20
SHAPE_EXAMPLE = "3,224,224 or 3x224x224"


def split_shape(text: str) -> list[int]:
    """An input shape written as "3,224,224" or "3x224x224".

    ValueError if any part is not an integer, including an empty part ("3,,4", "3,x,4").
    """
    parts = re.split(r"[x,]", text.strip())
    try:
        return [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"expected integers like {SHAPE_EXAMPLE}") from None


def shape_problem(shape: Sequence[int]) -> str | None:
    """Why `shape` cannot be an input shape (without batch), or None if it can."""
    if not shape or any(v <= 0 for v in shape):
        return f"expected positive integers like {SHAPE_EXAMPLE}"
    if len(shape) > MAX_SHAPE_DIMS:
        return f"expected at most {MAX_SHAPE_DIMS} sizes"
    if max(shape) > MAX_SHAPE_SIDE:
        return f"expected sizes of at most {MAX_SHAPE_SIDE}"
    return None


def parse_kwargs(text: str | None, flag: str = "--arch-kwargs") -> dict[str, Any]:
    """--arch-kwargs (or another `flag` of keyword arguments): a JSON object, empty if not given."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{flag} is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise BadInput(f"{flag} must be a JSON object, e.g. '{{\"num_classes\": 10}}'")
    return value


# Checks of values read from TOML: each returns the value to use, or raises ValueError(why).


def check_text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def check_flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def integer_check(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if maximum is not None and not minimum <= value <= maximum:
            raise ValueError(f"expected an integer from {minimum} to {maximum}")
        if minimum is not None and value < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return value

    return check


def number_check(minimum: float = 0, positive: bool = False) -> Callable[[Any], float]:
    """A finite number >= `minimum` (> 0 if `positive`)."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        if positive and value <= 0:
            raise ValueError("expected a positive number")
        if value < minimum:
            raise ValueError(f"expected >= {minimum:g}")
        return float(value)

    return check


def check_kwargs(value: Any) -> dict[str, Any]:
    """A TOML table, or a string holding a JSON object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError("expected a table, e.g. { num_classes = 10 }")
    if any(not isinstance(name, str) for name in value):
        raise ValueError("expected argument names as keys")  # they become **kwargs
    return value


def check_shape(value: Any) -> list[int]:
    """A list of sizes, or a string such as "3,224,224"."""
    if isinstance(value, str):
        value = split_shape(value)  # its ValueError says what is expected
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise ValueError("expected positive integers like [3, 224, 224]")
    problem = shape_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def choice_check(choices: Sequence[str]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return check


Kind = Literal["text", "flag", "integer", "number", "shape", "kwargs", "choice"]
# Which commands take an option: every one that loads a checkpoint ("model"), the ones that
# compare outputs ("check"), the ones that write or read a deploy file ("deploy": convert and
# verify), and `convert` alone ("convert").
Group = Literal["model", "check", "deploy", "convert"]


@dataclass(frozen=True)
class Setting:
    """How one option is written (command line, TOML) and which values it takes."""

    kind: Kind
    help: str
    group: Group
    minimum: float | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    negated_as: str | None = None  # written as its opposite: `verify` is `--no-verify`
    recorded: bool = True  # part of the `options` record in a deploy file's metadata

    def check(self, value: Any) -> Any:
        """A value read from TOML, checked: the value to use, or ValueError(why)."""
        if self.kind == "integer":
            return integer_check(self.minimum, self.maximum)(value)
        if self.kind == "number":
            return number_check(self.minimum or 0)(value)
        if self.kind == "choice":
            return choice_check(self.choices)(value)
        simple = {"text": check_text, "flag": check_flag, "shape": check_shape}
        return simple.get(self.kind, check_kwargs)(value)


def _option(default: Any, kind: Kind, group: Group, help: str, **how: Any) -> Any:
    return field(
        default=default,
        hash=kind not in ("kwargs", "shape"),  # a dict or a list has no hash
        metadata={"setting": Setting(kind, help, group, **how)},
    )


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of a conversion: the one place naming them, with types, defaults, bounds.

    `arch_kwargs=None` means "not given" (`verify` then uses the ones a deploy file records).
    `verify_dtype` is kept as a name ("float64"; a torch dtype is accepted and named).
    Every value is checked when the object is made (as a TOML value is), and so are the deploy
    options that do not go together: BadInput names the option as the command line spells it.
    """

    arch: str | None = _option(
        None,
        "text",
        "model",
        "Model builder: a built-in name, package.module:callable or file.py:callable.",
        metavar="SPEC",
    )
    arch_kwargs: Mapping[str, Any] | None = _option(
        None, "kwargs", "model", "Keyword arguments for the builder.", metavar="JSON"
    )
    key: str | None = _option(
        None, "text", "model", "Nested key of the state dict (auto-detected).", metavar="KEY"
    )
    trust_pickle: bool = _option(
        False,
        "flag",
        "model",
        "Allow a checkpoint that pickles a whole model (runs code from the file).",
        recorded=False,  # how the file may be read, not what it becomes
    )
    deploy_arch: str | None = _option(
        None,
        "text",
        "deploy",
        "Your deploy model's builder (same forms as --arch): the output is its state_dict.",
        metavar="SPEC",
    )
    deploy_arch_kwargs: Mapping[str, Any] | None = _option(
        None, "kwargs", "deploy", "Keyword arguments for the deploy builder.", metavar="JSON"
    )
    deploy_kwargs: Mapping[str, Any] | None = _option(
        None,
        "kwargs",
        "deploy",
        "Deploy model = --arch with these on top of --arch-kwargs, e.g. '{\"deploy\": true}'.",
        metavar="JSON",
    )
    fold_plain_bn: bool = _option(
        False,
        "flag",
        "convert",  # verify and export replay the form the file records
        "Fold plain conv + BN pairs also in models with their own deploy methods, whose deploy "
        "form keeps them live (the file then no longer loads into that deploy form).",
    )
    input_shape: Sequence[int] | None = _option(
        None,
        "shape",
        "check",
        "Input shape, C,H,W or N,C,H,W (N is not used; default: the model's own, else C,224,224).",
        metavar="[N,]C,H,W",
    )
    samples: int = _option(
        2, "integer", "check", "Number of random inputs compared.", minimum=1, maximum=MAX_SAMPLES
    )
    seed: int = _option(0, "integer", "check", "Seed of the random inputs.")
    atol: float | None = _option(None, "number", "check", "Absolute limit (written).", minimum=0)
    rtol: float | None = _option(
        None,
        "number",
        "check",
        f"Relative limit (written); default {format_limit(written_limit('float32'))} float32, "
        f"{format_limit(written_limit('float16'))} float16.",
        minimum=0,
    )
    verify: bool = _option(
        True, "flag", "convert", "Skip verification (not recommended).", negated_as="no_verify"
    )
    verify_dtype: str = _option(
        "float64",
        "choice",
        "convert",
        "Dtype of the verification passes; the model's own dtype saves memory.",
        choices=VERIFY_DTYPES,
    )
    exact_limit: float = _option(
        EXACT_LIMIT, "number", "convert", "Limit for the exact (float64 math) error.", minimum=0
    )
    strict: bool = _option(False, "flag", "convert", "Exit 2 if any norm is left unfolded.")
    force: bool = _option(False, "flag", "convert", "Write the output even if verification fails.")
    state_dict_only: bool = _option(
        False,
        "flag",
        "convert",
        "With a pickled model (--trust-pickle) and a .pt/.pth OUTPUT, write its state dict "
        "alone instead of the input's own layout.",
        recorded=False,  # .pt/.pth outputs carry no record
    )
    keep_training_state: bool = _option(
        False,
        "flag",
        "convert",
        "Keep the optimizer/scheduler entries of a pickled checkpoint (default: set to None).",
        recorded=False,
    )
    allow_noop: bool = _option(
        False,
        "flag",
        "convert",
        "Exit 0 (writing nothing) when INPUT is already in deploy form, instead of 2.",
        recorded=False,  # whether a run fails, not what the file holds
    )

    def __post_init__(self) -> None:
        # Frozen: the one normalization goes through object.__setattr__, at construction.
        object.__setattr__(self, "verify_dtype", str(self.verify_dtype).removeprefix("torch."))
        # Checked here, so that no options object (from the API, a batch job, `merged`) holds
        # what the command line would refuse: the workflows need not check again.
        for f in dataclasses.fields(self):
            _check_given(f, getattr(self, f.name))
        _check_deploy_options(self)

    @classmethod
    def merged(cls, options: ConvertOptions | None, keywords: Mapping[str, Any]) -> ConvertOptions:
        """`options` (or the defaults) with keyword arguments on top; `arch_spec` is `arch`.

        TypeError names a keyword that is not an option, as a function's signature would.
        """
        changes = dict(keywords)
        if "arch_spec" in changes:
            changes["arch"] = changes.pop("arch_spec")
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown conversion option(s): {', '.join(unknown)}")
        return dataclasses.replace(options or cls(), **changes)

    @classmethod
    def from_written(cls, values: Mapping[str, Any]) -> ConvertOptions:
        """Options from values keyed by their written names (`no_verify`), already checked."""
        changes = {}
        for f in dataclasses.fields(cls):
            name = written_name(f)
            if name in values:
                value = values[name]
                changes[f.name] = (not value) if setting_of(f).negated_as else value
        return cls(**changes)


def setting_of(f: dataclasses.Field) -> Setting:
    return f.metadata["setting"]


def flag_of(f: dataclasses.Field) -> str:
    """The option as the command line spells it (`--no-verify` for `verify`)."""
    return "--" + written_name(f).replace("_", "-")


SHOWN_VALUE_LENGTH = 60  # of a refused value quoted in a message


def _check_given(f: dataclasses.Field, value: Any) -> None:
    """One field's value as the options object was given it; None is "not given" for the
    options whose default is None."""
    if value is None and f.default is None:
        return
    setting = setting_of(f)
    try:
        setting.check(_as_written(setting.kind, value))
    except ValueError as exc:
        quoted = repr(value)
        if len(quoted) > SHOWN_VALUE_LENGTH:
            quoted = quoted[: SHOWN_VALUE_LENGTH - 3] + "..."
        raise BadInput(f"{flag_of(f)}: {exc}, got {shown(quoted)}") from None


def _as_written(kind: Kind, value: Any) -> Any:
    """What the TOML check of `kind` takes, from a value an options object holds: any mapping
    of keyword arguments, any sequence of sizes. Not their text forms (a JSON string,
    "3,224,224"): the object keeps values as given, and the workflows use them as they are."""
    if kind == "kwargs":
        if not isinstance(value, Mapping):
            raise ValueError("expected a mapping of keyword arguments, e.g. {'num_classes': 10}")
        return dict(value)
    if kind == "shape":
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError("expected a sequence of sizes like (3, 224, 224)")
        return list(value)
    return value


def _check_deploy_options(options: ConvertOptions) -> None:
    """The deploy options that do not go together."""
    if options.deploy_arch is not None and options.deploy_kwargs is not None:
        raise BadInput(
            "--deploy-kwargs builds the deploy model with --arch; with --deploy-arch give "
            "its keyword arguments as --deploy-arch-kwargs"
        )
    if options.deploy_arch is None and options.deploy_arch_kwargs is not None:
        raise BadInput("--deploy-arch-kwargs needs --deploy-arch")
    deploy_model_given = options.deploy_arch is not None or options.deploy_kwargs is not None
    if options.fold_plain_bn and deploy_model_given:
        raise BadInput("--fold-plain-bn: with a deploy model, that model decides what is fused")
    if options.deploy_kwargs is not None and options.arch is None:
        raise BadInput("--deploy-kwargs needs --arch (the builder it adds arguments to)")


def written_name(f: dataclasses.Field) -> str:
    """The option's name in TOML (and, with dashes, on the command line)."""
    return setting_of(f).negated_as or f.name


def option_fields(*groups: Group) -> list[dataclasses.Field]:
    """The fields of `ConvertOptions` in `groups` (all when none given), in declared order."""
    found = dataclasses.fields(ConvertOptions)
    return [f for f in found if not groups or setting_of(f).group in groups]


def written_checks() -> dict[str, Callable[[Any], Any]]:
    """Each option's check of a TOML value, by written name."""
    return {written_name(f): setting_of(f).check for f in option_fields()}


def recorded_options(options: ConvertOptions) -> dict[str, Any]:
    """Every option that shapes a deploy file, as JSON-ready values.

    `batch --resume` compares this with the record in files written earlier, so the same
    settings must always give the same record.
    """
    record = {f.name: getattr(options, f.name) for f in option_fields() if setting_of(f).recorded}
    shape = record["input_shape"]
    record["input_shape"] = list(shape) if shape else None
    record["arch_kwargs"] = dict(record["arch_kwargs"] or {})
    # Recorded only when set, so files written before these options existed (or without them)
    # keep the same record, and `batch --resume` still finds them up to date.
    for name in ("deploy_arch", "deploy_arch_kwargs", "deploy_kwargs"):
        value = record.pop(name)
        if value is not None:
            record[name] = value if isinstance(value, str) else dict(value)
    if record.pop("fold_plain_bn"):  # likewise: recorded only when asked for
        record["fold_plain_bn"] = True
    return json.loads(json.dumps(record))  # what reading it back from metadata gives


def takes_options(*groups: Group, omit: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    """Show a function's `**keywords` as the `ConvertOptions` fields it takes, with defaults.

    The function still receives them as `**keywords` (and passes them to
    `ConvertOptions.merged`); only its `__signature__` changes, so `help()`, `inspect` and IDEs
    show real names and defaults read from the dataclass instead of a second hand-written list.
    """

    def decorate(function: Callable) -> Callable:
        own = inspect.signature(function).parameters.values()
        kept = [p for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in kept}
        extra = [
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
            )
            for f in option_fields(*groups)
            if f.name not in taken and f.name not in omit
        ]
        function.__signature__ = inspect.Signature(
            [*kept, *extra], return_annotation=inspect.signature(function).return_annotation
        )
        return function

    return decorate
