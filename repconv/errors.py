"""Error types. The CLI maps them to exit codes: BadInput -> 2, VerificationFailed -> 1, and any
other exception (a bug, ours or a library's) -> 3, naming the block it happened in."""

from __future__ import annotations

import contextlib


class RepconvError(Exception):
    """Base class for every error repconv raises on purpose."""

    exit_code = 2


class BadInput(RepconvError):
    """The user's input (file, option, architecture, checkpoint contents) cannot be used."""


class CorruptCheckpoint(BadInput):
    """The checkpoint holds values no trained model can have (NaN, Inf, negative variance)."""


class NotFusable(RepconvError):
    """A block looks like a family member but cannot be folded exactly; the engine skips it."""


class VerificationFailed(RepconvError):
    """The deploy model does not reproduce the train model within the limits."""

    exit_code = 1
    result = None  # the conversion that failed (a pipeline.Result), when there is one


def note_block(exc: BaseException, path: str) -> None:
    """Record on an unexpected exception the block it was raised in (shown by the CLI)."""
    if getattr(exc, "repconv_block", None) is None:
        # exceptions with __slots__ take no attribute: the message goes without the block
        with contextlib.suppress(AttributeError):
            exc.repconv_block = path or "<root>"  # type: ignore[attr-defined]


def block_of(exc: BaseException) -> str | None:
    """The block an unexpected exception was raised in, when the engine recorded it."""
    return getattr(exc, "repconv_block", None)


# How torch and the C library word a failed allocation when it is not a MemoryError.
ALLOCATION_FAILURES = ("can't allocate memory", "not enough memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says an allocation failed."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(m in text for m in ALLOCATION_FAILURES)
