"""A deploy file's metadata: its keys, written in one place and read back in one place.

Torch-free, so that `repconv batch`'s parent process can read what earlier conversions recorded
(`--resume`) without importing torch. Every value is a string (safetensors metadata); the
structured ones hold JSON. The writer adds one key more, `tensors_sha256` (the sha256 of the
data section), since only it sees the bytes written.

A deploy file is data anyone may have written, so every field is read through one reader
(`Recorded`): a JSON text is bounded in size and nesting depth before it is parsed (the parser
recurses, and a deep enough text would exhaust the stack), and what it holds is checked against
the type its key promises (the plan by `PlanRecord.from_json`). Anything else is unreadable
metadata, `MetadataError`; no unchecked value goes on to a report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from repconv.files import TENSORS_DIGEST_KEY
from repconv.plan_record import PlanRecord
from repconv.version import __version__

FORMAT = "repconv.deploy/1"

FORMAT_KEY = "format"
VERSION_KEY = "version"
TORCH_KEY = "torch"
ARCH_KEY = "arch"
ARCH_KWARGS_KEY = "arch_kwargs"
SOURCE_SHA256_KEY = "source_sha256"
PLAN_KEY = "plan"
VERIFICATION_KEY = "verification"
OPTIONS_KEY = "options"
PARAMS_BEFORE_KEY = "params_before"
PARAMS_AFTER_KEY = "params_after"
# Every key a deploy file written by `convert` holds, the writer's own included.
KEYS = (
    FORMAT_KEY,
    VERSION_KEY,
    TORCH_KEY,
    ARCH_KEY,
    ARCH_KWARGS_KEY,
    SOURCE_SHA256_KEY,
    PLAN_KEY,
    VERIFICATION_KEY,
    OPTIONS_KEY,
    PARAMS_BEFORE_KEY,
    PARAMS_AFTER_KEY,
    TENSORS_DIGEST_KEY,
)


def build(
    *,
    torch_version: str,
    arch: str | None,
    arch_kwargs: Mapping[str, Any],
    source_sha256: str,
    plan: PlanRecord,
    verification: Mapping[str, Any] | None,
    options: Mapping[str, Any] | None,
    params_before: int,
    params_after: int,
) -> dict[str, str]:
    """The metadata of a deploy file, from plain values (`tensors_sha256` is the writer's).

    The JSON texts are part of the file's bytes: equal conversions must give equal text, so
    what is a mapping of names (kwargs, options) is written sorted.
    """
    return {
        FORMAT_KEY: FORMAT,
        VERSION_KEY: __version__,
        TORCH_KEY: torch_version,
        ARCH_KEY: arch or "",
        ARCH_KWARGS_KEY: json.dumps(dict(arch_kwargs), sort_keys=True),
        SOURCE_SHA256_KEY: source_sha256,
        PLAN_KEY: plan.to_text(),
        VERIFICATION_KEY: json.dumps(None if verification is None else dict(verification)),
        OPTIONS_KEY: json.dumps(dict(options or {}), sort_keys=True),
        PARAMS_BEFORE_KEY: str(params_before),
        PARAMS_AFTER_KEY: str(params_after),
    }


# What a field's JSON may be: legitimate records are a few KiB deep in a handful of levels, and
# the bounds are checked before the text is parsed.
MAX_FIELD_CHARS = 16 << 20
MAX_DEPTH = 64
# A JSON string (an unterminated one runs to the end, so the scan never backtracks), or a bracket.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
# A parameter count as `build` writes it (`int` would take " 1_0 " too).
_COUNT = re.compile(r"[0-9]{1,20}")


class MetadataError(ValueError):
    """Unreadable metadata: a field that does not hold what its key promises."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"metadata {key!r} {problem}")
        self.key = key


def nests_deeper_than(text: str, limit: int) -> bool:
    """Whether the arrays and objects of a JSON text nest deeper than `limit`, by a scan of its
    brackets outside strings (no parse: the parser recurses once per level)."""
    depth = 0
    for token in _TOKEN.finditer(text):
        mark = token.group()
        if mark in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif mark in ("]", "}"):
            depth -= 1
    return False


def parse_json(key: str, text: str) -> Any:
    """A field's JSON text parsed, once its size and depth are known to be sane."""
    if len(text) > MAX_FIELD_CHARS:
        raise MetadataError(key, f"is longer than {MAX_FIELD_CHARS >> 20} MiB")
    if nests_deeper_than(text, MAX_DEPTH):
        raise MetadataError(key, f"nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # ValueError: JSONDecodeError, an int too long
        raise MetadataError(key, "is not valid JSON") from None


@dataclass(frozen=True)
class Recorded:
    """What a deploy file records, read back from its metadata, every field checked.

    A field absent (or empty) reads as None, or {} for the kwargs. Fields are parsed and checked
    when asked for, so a damaged field matters only to whoever needs it: it raises
    `MetadataError` (a ValueError), which each reader turns into an error, a note, or "convert
    again".
    """

    fields: Mapping[str, str]

    @property
    def arch(self) -> str | None:
        return self._text(ARCH_KEY)

    @property
    def source_sha256(self) -> str | None:
        return self._text(SOURCE_SHA256_KEY)

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return self._json_object(ARCH_KWARGS_KEY) or {}

    @property
    def options(self) -> dict[str, Any] | None:
        return self._json_object(OPTIONS_KEY)

    @property
    def plan(self) -> PlanRecord | None:
        value = self._json_object(PLAN_KEY)
        if value is None:
            return None
        try:
            return PlanRecord.from_json(value)
        except ValueError as exc:
            raise MetadataError(PLAN_KEY, f"is not a recorded plan: {exc}") from None

    @property
    def verification(self) -> dict[str, Any] | None:
        """The recorded verification (null when the conversion was not verified): the keys a
        conversion records, each checked (figures are numbers or null); others are left out."""
        value = self._json_object(VERIFICATION_KEY, nullable=True)
        if value is None:
            return None
        for name, holds in _VERIFICATION_FIELDS.items():
            if name in value and not holds(value[name]):
                raise MetadataError(VERIFICATION_KEY, f"has a {name!r} that is not {holds.__doc__}")
        return {k: v for k, v in value.items() if k in _VERIFICATION_FIELDS}

    @property
    def params(self) -> tuple[int, int]:
        """(before, after) the conversion."""
        return self._integer(PARAMS_BEFORE_KEY), self._integer(PARAMS_AFTER_KEY)

    def check(self) -> Recorded:
        """The record itself, once every field it holds has been read and found readable (else
        `MetadataError` for the first that is not): for whoever trusts the file as a whole."""
        for name in ("arch", "source_sha256", "arch_kwargs", "options", "plan", "verification"):
            getattr(self, name)
        _ = self.params
        return self

    def _text(self, key: str) -> str | None:
        value = self.fields.get(key)
        if value is not None and not isinstance(value, str):
            raise MetadataError(key, "is not a string")
        return value or None

    def _json_object(self, key: str, *, nullable: bool = False) -> dict[str, Any] | None:
        text = self._text(key)
        if text is None:
            return None
        value = parse_json(key, text)
        if not isinstance(value, dict) and not (nullable and value is None):
            raise MetadataError(key, "is not a JSON object")
        return value

    def _integer(self, key: str) -> int:
        if key not in self.fields:
            raise MetadataError(key, "is missing")
        text = self.fields[key]
        if not isinstance(text, str) or not _COUNT.fullmatch(text):
            raise MetadataError(key, "is not an integer")
        return int(text)


def _is_number(value: Any) -> bool:
    """a number"""
    # JSON's true/false parse as bools, which Python counts as numbers: not figures.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _figure(value: Any) -> bool:
    """a number or null"""
    return value is None or _is_number(value)


def _figures(value: Any) -> bool:
    """null or an object of numbers or nulls"""
    return value is None or (isinstance(value, dict) and all(map(_figure, value.values())))


def _count(value: Any) -> bool:
    """an integer"""
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(value: Any) -> bool:
    """true or false"""
    return isinstance(value, bool)


def _name(value: Any) -> bool:
    """a string"""
    return isinstance(value, str)


def _shape(value: Any) -> bool:
    """a list of integers"""
    return isinstance(value, list) and all(map(_count, value))


def _suspects(value: Any) -> bool:
    """a list of blocks (path, rule, block_error)"""
    return isinstance(value, list) and all(
        isinstance(s, dict)
        and _name(s.get("path"))
        and _name(s.get("rule"))
        and _figure(s.get("block_error"))
        for s in value
    )


def _convention(value: Any) -> bool:
    """null or how the file reads in the train class (loads_into_train_class, error, blocks)"""
    return value is None or (
        isinstance(value, dict)
        and _flag(value.get("loads_into_train_class"))
        and _figure(value.get("error"))
        and _count(value.get("blocks_loading_into_their_class"))
    )


# The keys a conversion's verification records (`Verification.to_dict`), and what each holds;
# the docstring of each check says it in the error.
_VERIFICATION_FIELDS: dict[str, Callable[[Any], bool]] = {
    "passed": _flag,
    "input_shape": _shape,
    "samples": _count,
    "seed": _count,
    "dtype": _name,
    "exact_max": _figure,
    "exact_limit": _figure,
    "written_max": _figure,
    "written_rtol": _figure,
    "written_atol": _figure,
    "exact": _figures,
    "written": _figures,
    "suspects": _suspects,
    # How the file reads in the train class by the conv-BN convention (`convention.check`).
    "convention": _convention,
}


def read(fields: Mapping[str, str]) -> Recorded:
    """The record a deploy file's metadata (as read from its header) holds."""
    return Recorded(fields)


def batch_figures(
    plan: PlanRecord,
    verification: Mapping[str, Any] | None,
    params_before: int,
    params_after: int,
) -> dict[str, Any]:
    """What a batch row says of a conversion, from what the conversion records: the same for
    an entry converted now and one found up to date."""
    checked = verification or {}
    return {
        "fused_by_rule": dict(plan.fused_by_rule),
        "unfolded": len(plan.warnings),
        "params_before": params_before,
        "params_after": params_after,
        "max_error": checked.get("written_max"),
        "exact_error": checked.get("exact_max"),
    }
