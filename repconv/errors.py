"""Error types. The CLI maps them to exit codes: BadInput -> 2, VerificationFailed -> 1."""

from __future__ import annotations


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
