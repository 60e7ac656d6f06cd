"""Batch configuration: a TOML file of `[defaults]` and `[[model]]` tables, expanded into jobs.

Keys are the `repconv convert` option names with underscores. Relative paths are relative to
the config file's folder, an `input` may be a glob, and `output` is a pattern over each input
(`{stem}`, `{name}`, `{dir}`). Every problem is reported as `FILE:LINE: message` before
anything runs.
"""

from __future__ import annotations

import difflib
import glob
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from repconv.errors import BadInput
from repconv.files import OUTPUT_SUFFIXES
from repconv.options import (
    CONVERT_DEFAULTS,
    MAX_SAMPLES,
    VERIFY_DTYPES,
    shape_problem,
    split_shape,
)

PLACEHOLDERS = ("stem", "name", "dir")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


class ConfigError(BadInput):
    """The batch config cannot be used; the message starts with FILE:LINE."""


@dataclass
class Job:
    """One checkpoint to convert: paths, conversion options, and how to run it.

    Plain data only, so it travels to worker processes and Dask workers as is.
    """

    name: str
    input: str
    output: str
    line: int
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    trust_pickle: bool = False
    strict: bool = False
    force: bool = False
    input_shape: list[int] | None = None
    samples: int = 2
    seed: int = 0
    verify: bool = True
    verify_dtype: str = "float64"
    exact_limit: float = 1e-6
    atol: float | None = None
    rtol: float | None = None
    timeout: float | None = None
    memory_limit: int | None = None
    threads: int | None = None
    resume: bool = False

    def convert_options(self) -> dict[str, Any]:
        """The keyword arguments of `pipeline.convert` this job sets."""
        return {name: getattr(self, name) for name in CONVERT_DEFAULTS}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


@dataclass
class BatchConfig:
    path: Path
    jobs: list[Job]

    def display_path(self, path: str | Path) -> str:
        """A path as the report shows it: relative to the config's folder when inside it."""
        path = Path(path)
        try:
            return str(path.relative_to(self.path.parent.resolve()))
        except ValueError:
            return str(path)


# Validators take the TOML value and return the job's value, or raise ValueError(why).


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if maximum is not None and not minimum <= value <= maximum:
            raise ValueError(f"expected an integer from {minimum} to {maximum}")
        if minimum is not None and value < minimum:
            raise ValueError(f"expected an integer >= {minimum}")
        return value

    return check


def _number(positive: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        if value < 0 or (positive and value == 0):
            raise ValueError("expected a positive number" if positive else "expected >= 0")
        return float(value)

    return check


def _kwargs(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError("expected a table, e.g. { num_classes = 10 }")
    return value


def _shape(value: Any) -> list[int]:
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


def _verify_dtype(value: Any) -> str:
    if value not in VERIFY_DTYPES:
        raise ValueError(f"expected one of {', '.join(VERIFY_DTYPES)}")
    return value


def _bytes(value: Any) -> int:
    """Memory sizes: an integer number of MiB, or a string such as "1.5GiB" or "800MB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value << 20
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ValueError('expected MiB as an integer or a size such as "2GiB"')
    scale = 1024 ** "KMGT".find(match.group(2).upper()) * 1024 if match.group(2) else 1
    return int(float(match.group(1)) * scale)


# The convert options (as `repconv convert` names them, with underscores), then batch's own.
OPTIONS: dict[str, Callable[[Any], Any]] = {
    "arch": _text,
    "arch_kwargs": _kwargs,
    "key": _text,
    "trust_pickle": _flag,
    "strict": _flag,
    "force": _flag,
    "input_shape": _shape,
    "samples": _integer(1, MAX_SAMPLES),
    "seed": _integer(),
    "no_verify": _flag,
    "verify_dtype": _verify_dtype,
    "exact_limit": _number(),
    "atol": _number(),
    "rtol": _number(),
    "input": _text,
    "output": _text,
    "name": _text,
    "timeout": _number(positive=True),
    "memory_limit": _bytes,
    "threads": _integer(1),
}
_NOT_IN_BATCH = {
    "dry_run": "run `repconv batch --dry-run` instead",
    "json": "use `repconv batch --json` or --report",
    "verbose": "use `repconv batch -v`",
    "config": "a batch config cannot include another",
}


def _locate(text: str) -> Callable[[str, int | None, str | None], int]:
    """A function giving the line of (table, model index, key) in the TOML source."""
    spots: dict[tuple[str, int | None, str | None], int] = {}
    table, index, models = "", None, -1
    header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?")
    assignment = re.compile(r"^\s*[\"']?([A-Za-z0-9_\-]+)[\"']?\s*(?:\.|=)")
    for number, line in enumerate(text.splitlines(), start=1):
        if m := header.match(line):
            parts = m.group(2).replace('"', "").replace("'", "").split(".")
            table = parts[0].strip()
            if m.group(1) == "[[" and table == "model":
                models += 1
            index = models if table == "model" else None
            sub = parts[1].strip() if len(parts) > 1 else None
            spots.setdefault((table, index, sub), number)
            spots.setdefault((table, index, None), number)
            continue
        if m := assignment.match(line):
            spots.setdefault((table, index, m.group(1)), number)
            if not table:
                spots.setdefault(("", None, m.group(1)), number)

    def line_of(table: str, index: int | None = None, key: str | None = None) -> int:
        found = spots.get((table, index, key)) or spots.get((table, index, None))
        if found is None and not table and key is not None:
            found = spots.get((key, None, None))  # a top-level [table] rather than a key
        return found or 1

    return line_of


def _expand_input(pattern: str, base: Path) -> list[Path]:
    """The files an input names; only the pattern's own `*?[` are wildcards, not the base's."""
    path = Path(pattern).expanduser()
    if not glob.has_magic(pattern):
        return [path if path.is_absolute() else base / path]
    if path.is_absolute():
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
    else:
        matches = [base / p for p in glob.glob(str(path), root_dir=base, recursive=True)]
    return sorted(p for p in matches if p.is_file())


def _fill(pattern: str, source: Path) -> str:
    fields = {"stem": source.stem, "name": source.name, "dir": source.parent.name}
    try:
        return pattern.format(**fields)
    except KeyError as exc:
        known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
        raise ValueError(f"unknown placeholder {{{exc.args[0]}}} (use {known})") from None
    except (ValueError, IndexError) as exc:
        raise ValueError(f"bad pattern: {exc}") from None


def _name_for(pattern: str | None, source: Path) -> str:
    return _fill(pattern, source) if pattern else source.stem


def _output_for(pattern: str, source: Path, base: Path) -> Path:
    path = Path(_fill(pattern, source)).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def load_config(path: str | Path) -> BatchConfig:
    """Read, check and expand a batch config; raise ConfigError naming the line at fault."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = where.group(1) if where else "1"
        raise ConfigError(f"{path}:{line}: not valid TOML: {str(exc).split(' (at ')[0]}") from None
    line_of = _locate(text)

    def fail(line: int, message: str) -> ConfigError:
        return ConfigError(f"{path}:{line}: {message}")

    for top in data:
        if top not in ("defaults", "model"):
            raise fail(
                line_of("", None, top),
                f"unknown table or key {top!r}; a batch config has [defaults] and [[model]]",
            )
    defaults = data.get("defaults", {})
    models = data.get("model", [])
    if not isinstance(defaults, dict):
        raise fail(line_of("", None, "defaults"), "defaults must be a table: [defaults]")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise fail(line_of("", None, "model"), "models are tables: [[model]]")

    def checked(table: Mapping[str, Any], where: str, index: int | None) -> dict[str, Any]:
        values = {}
        for key, value in table.items():
            name = key.replace("-", "_")
            line = line_of(where, index, key)
            if name in _NOT_IN_BATCH:
                raise fail(line, f"{key!r} is not a batch option: {_NOT_IN_BATCH[name]}")
            if name not in OPTIONS:
                close = difflib.get_close_matches(name, list(OPTIONS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise fail(line, f"unknown option {key!r}{hint}")
            try:
                values[name] = OPTIONS[name](value)
            except ValueError as exc:
                raise fail(line, f"{key}: {exc}, got {value!r}") from None
        return values

    base = path.parent.resolve()
    common = checked(defaults, "defaults", None)
    if not models:
        raise fail(1, "no [[model]] entries")
    if "input" in common:
        raise fail(line_of("defaults", None, "input"), "input belongs in a [[model]] entry")
    jobs: list[Job] = []
    for index, table in enumerate(models):
        options = {**common, **checked(table, "model", index)}
        line = line_of("model", index)
        if "input" not in options:
            raise fail(line, "[[model]] entry without input")
        if "output" not in options:
            raise fail(line, "[[model]] entry without output (or a default output pattern)")
        sources = _expand_input(options.pop("input"), base)
        if not sources:
            raise fail(line_of("model", index, "input"), "input matches no file")
        pattern = options.pop("output")
        output_line = (
            line_of("model", index, "output")
            if "output" in table
            else line_of("defaults", None, "output")
        )
        if len(sources) > 1 and not any(f"{{{p}}}" in pattern for p in PLACEHOLDERS):
            raise fail(
                output_line,
                f"input matches {len(sources)} files but output {pattern!r} names one file; "
                "use a pattern such as 'deploy/{stem}.safetensors'",
            )
        verify = not options.pop("no_verify", False)
        name_pattern = options.pop("name", None)
        for source in sources:
            try:
                output = _output_for(pattern, source, base)
            except ValueError as exc:
                raise fail(output_line, f"output: {exc}") from None
            if output.suffix.lower() not in OUTPUT_SUFFIXES:
                raise fail(
                    output_line,
                    f"output {output.name}: unknown extension {output.suffix!r}; "
                    f"use {', '.join(OUTPUT_SUFFIXES)}",
                )
            try:
                name = _name_for(name_pattern, source)
            except ValueError as exc:
                raise fail(line_of("model", index, "name"), f"name: {exc}") from None
            jobs.append(
                Job(
                    name=name,
                    input=str(source.resolve()),
                    output=str(output),
                    line=line,
                    verify=verify,
                    **options,
                )
            )
    _refuse_clashes(jobs, fail)
    _unique_names(jobs, base)
    return BatchConfig(path, jobs)


def _refuse_clashes(jobs: list[Job], fail: Callable[[int, str], ConfigError]) -> None:
    """Two entries writing one file, or an entry writing over any input, stop the batch."""
    writers: dict[str, Job] = {}
    inputs = {job.input: job for job in jobs}
    for job in jobs:
        if job.output in inputs:
            reader = inputs[job.output]
            raise fail(job.line, f"output {job.output} is the input of line {reader.line}")
        if job.output in writers:
            first = writers[job.output]
            raise fail(
                job.line,
                f"{job.name} and {first.name} (line {first.line}) would both write {job.output}",
            )
        writers[job.output] = job


def _unique_names(jobs: list[Job], base: Path) -> None:
    """Names label report rows; where stems repeat, the input path tells them apart."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.name] = counts.get(job.name, 0) + 1
    for job in jobs:
        if counts[job.name] > 1:
            try:
                job.name = str(Path(job.input).relative_to(base))
            except ValueError:
                job.name = job.input
