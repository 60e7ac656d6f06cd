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
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from repconv.errors import BadInput
from repconv.files import OUTPUT_SUFFIXES, output_location
from repconv.options import (
    ConvertOptions,
    check_text,
    integer_check,
    number_check,
    written_checks,
)

_OPTION_NAMES = frozenset(f.name for f in fields(ConvertOptions))
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
    options: ConvertOptions = field(default_factory=ConvertOptions)
    timeout: float | None = None
    memory_limit: int | None = None
    threads: int | None = None
    resume: bool = False

    def __getattr__(self, name: str) -> Any:
        # Called only for names a Job lacks: `job.arch`, `job.samples`... read its options.
        if name in _OPTION_NAMES:
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        data = json.loads(text)
        return cls(**{**data, "options": ConvertOptions(**data["options"])})


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


# Checks take the TOML value and return the job's value, or raise ValueError(why).


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
    **written_checks(),
    "input": check_text,
    "output": check_text,
    "name": check_text,
    "timeout": number_check(positive=True),
    "memory_limit": _bytes,
    "threads": integer_check(1),
}
# Batch's own options that say how an entry runs (the others say what it converts).
_RUN_OPTIONS = ("timeout", "memory_limit", "threads")
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
    """The output's absolute path; a symlink there is replaced when written, never followed
    (`files.output_location`), so it is not resolved here either."""
    path = Path(_fill(pattern, source)).expanduser()
    return output_location(path if path.is_absolute() else base / path)


def load_config(path: str | Path) -> BatchConfig:
    """Read, check and expand a batch config; raise ConfigError naming the line at fault."""
    path = Path(path)
    text = _read_text(path)
    source = _ConfigSource(path, _parse_toml(path, text), _locate(text))
    defaults, models = source.tables()
    common = source.checked(defaults, "defaults", None)
    if not models:
        raise source.fail(1, "no [[model]] entries")
    if "input" in common:
        raise source.fail(
            source.line_of("defaults", None, "input"), "input belongs in a [[model]] entry"
        )
    jobs: list[Job] = []
    for index, table in enumerate(models):
        jobs += _entry_jobs(source, common, table, index)
    _refuse_clashes(jobs, source.fail)
    _unique_names(jobs, source.base)
    return BatchConfig(path, jobs)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        line = where.group(1) if where else "1"
        raise ConfigError(f"{path}:{line}: not valid TOML: {str(exc).split(' (at ')[0]}") from None


@dataclass
class _ConfigSource:
    """A parsed config file, and how to name the line of any of its keys in an error."""

    path: Path
    data: dict[str, Any]
    line_of: Callable[..., int]

    @property
    def base(self) -> Path:
        """The folder relative paths in the config are relative to."""
        return self.path.parent.resolve()

    def fail(self, line: int, message: str) -> ConfigError:
        return ConfigError(f"{self.path}:{line}: {message}")

    def tables(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The [defaults] table and the [[model]] tables; anything else at the top is refused."""
        for top in self.data:
            if top not in ("defaults", "model"):
                raise self.fail(
                    self.line_of("", None, top),
                    f"unknown table or key {top!r}; a batch config has [defaults] and [[model]]",
                )
        defaults = self.data.get("defaults", {})
        models = self.data.get("model", [])
        if not isinstance(defaults, dict):
            raise self.fail(
                self.line_of("", None, "defaults"), "defaults must be a table: [defaults]"
            )
        if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
            raise self.fail(self.line_of("", None, "model"), "models are tables: [[model]]")
        return defaults, models

    def checked(self, table: Mapping[str, Any], where: str, index: int | None) -> dict[str, Any]:
        """A table's options by their underscored names, each value checked."""
        return {
            key.replace("-", "_"): self._checked_value(key, value, self.line_of(where, index, key))
            for key, value in table.items()
        }

    def _checked_value(self, key: str, value: Any, line: int) -> Any:
        name = key.replace("-", "_")
        if name in _NOT_IN_BATCH:
            raise self.fail(line, f"{key!r} is not a batch option: {_NOT_IN_BATCH[name]}")
        if name not in OPTIONS:
            close = difflib.get_close_matches(name, list(OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(line, f"unknown option {key!r}{hint}")
        try:
            return OPTIONS[name](value)
        except ValueError as exc:
            raise self.fail(line, f"{key}: {exc}, got {value!r}") from None


def _entry_jobs(
    source: _ConfigSource, common: Mapping[str, Any], table: Mapping[str, Any], index: int
) -> list[Job]:
    """The jobs of one [[model]] entry: one per file its input names."""
    settings = {**common, **source.checked(table, "model", index)}
    line = source.line_of("model", index)
    if "input" not in settings:
        raise source.fail(line, "[[model]] entry without input")
    if "output" not in settings:
        raise source.fail(line, "[[model]] entry without output (or a default output pattern)")
    inputs = _expand_input(settings.pop("input"), source.base)
    if not inputs:
        raise source.fail(source.line_of("model", index, "input"), "input matches no file")
    pattern = settings.pop("output")
    output_line = (
        source.line_of("model", index, "output")
        if "output" in table
        else source.line_of("defaults", None, "output")
    )
    if len(inputs) > 1 and not any(f"{{{p}}}" in pattern for p in PLACEHOLDERS):
        raise source.fail(
            output_line,
            f"input matches {len(inputs)} files but output {pattern!r} names one file; "
            "use a pattern such as 'deploy/{stem}.safetensors'",
        )
    name_pattern = settings.pop("name", None)
    running = {key: settings.pop(key) for key in _RUN_OPTIONS if key in settings}
    try:  # options that do not go together (--deploy-kwargs without --arch, ...)
        options = ConvertOptions.from_written(settings)
    except BadInput as exc:
        raise source.fail(line, str(exc)) from None
    jobs = []
    for path in inputs:
        output = _checked_output(source, pattern, path, output_line)
        try:
            name = _name_for(name_pattern, path)
        except ValueError as exc:
            raise source.fail(source.line_of("model", index, "name"), f"name: {exc}") from None
        jobs.append(Job(name, str(path.resolve()), str(output), line, options, **running))
    return jobs


def _checked_output(source: _ConfigSource, pattern: str, path: Path, line: int) -> Path:
    try:
        output = _output_for(pattern, path, source.base)
    except ValueError as exc:
        raise source.fail(line, f"output: {exc}") from None
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise source.fail(
            line,
            f"output {output.name}: unknown extension {output.suffix!r}; "
            f"use {', '.join(OUTPUT_SUFFIXES)}",
        )
    return output


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
