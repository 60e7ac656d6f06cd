"""A deploy file's metadata: its keys, written in one place and read back in one place.

Torch-free, so that `repconv batch`'s parent process can read what earlier conversions recorded
(`--resume`) without importing torch. Every value is a string (safetensors metadata); the
structured ones hold JSON. The writer adds one key more, `tensors_sha256` (the sha256 of the
data section), since only it sees the bytes written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from repconv.files import TENSORS_DIGEST_KEY
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
    plan: Mapping[str, Any],
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
        PLAN_KEY: json.dumps(dict(plan)),
        VERIFICATION_KEY: json.dumps(None if verification is None else dict(verification)),
        OPTIONS_KEY: json.dumps(dict(options or {}), sort_keys=True),
        PARAMS_BEFORE_KEY: str(params_before),
        PARAMS_AFTER_KEY: str(params_after),
    }


class MetadataError(ValueError):
    """A metadata field that does not hold what its key promises."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"metadata {key!r} {problem}")
        self.key = key


@dataclass(frozen=True)
class Recorded:
    """What a deploy file records, read back from its metadata.

    A field absent (or empty) reads as None, or {} for the kwargs. JSON fields are parsed when
    asked for, so a damaged field matters only to whoever needs it: it raises `MetadataError`
    (a ValueError), which each reader turns into an error, a note, or "convert again".
    """

    fields: Mapping[str, str]

    @property
    def arch(self) -> str | None:
        return self.fields.get(ARCH_KEY) or None

    @property
    def source_sha256(self) -> str | None:
        return self.fields.get(SOURCE_SHA256_KEY) or None

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return self._json_object(ARCH_KWARGS_KEY) or {}

    @property
    def options(self) -> dict[str, Any] | None:
        return self._json_object(OPTIONS_KEY)

    @property
    def plan(self) -> dict[str, Any] | None:
        return self._json_object(PLAN_KEY)

    @property
    def verification(self) -> dict[str, Any] | None:
        # null when the conversion was not verified
        return self._json_object(VERIFICATION_KEY, nullable=True)

    @property
    def params(self) -> tuple[int, int]:
        """(before, after) the conversion."""
        return self._integer(PARAMS_BEFORE_KEY), self._integer(PARAMS_AFTER_KEY)

    def _json_object(self, key: str, *, nullable: bool = False) -> dict[str, Any] | None:
        text = self.fields.get(key)
        if not text:
            return None
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            raise MetadataError(key, "is not valid JSON") from None
        if not isinstance(value, dict) and not (nullable and value is None):
            raise MetadataError(key, "is not a JSON object")
        return value

    def _integer(self, key: str) -> int:
        try:
            return int(self.fields[key])
        except KeyError:
            raise MetadataError(key, "is missing") from None
        except (TypeError, ValueError):
            raise MetadataError(key, "is not an integer") from None


def read(fields: Mapping[str, str]) -> Recorded:
    """The record a deploy file's metadata (as read from its header) holds."""
    return Recorded(fields)


def batch_figures(
    plan: Mapping[str, Any],
    verification: Mapping[str, Any] | None,
    params_before: int,
    params_after: int,
) -> dict[str, Any]:
    """What a batch row says of a conversion, from what the conversion records: the same for
    an entry converted now and one found up to date."""
    checked = verification or {}
    return {
        "fused_by_rule": plan.get("fused_by_rule"),
        "unfolded": len(plan.get("warnings", [])),
        "params_before": params_before,
        "params_after": params_after,
        "max_error": checked.get("written_max"),
        "exact_error": checked.get("exact_max"),
    }
