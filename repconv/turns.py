"""repconv's calls on models take turns, one at a time per process.

While torch.fx traces a module it patches `torch.nn.Module.__call__` for every thread: a model
another thread runs meanwhile goes through the tracer and fails ("module is not installed as a
submodule"). So the API's entry points (plan, apply, convert, verify, load, export) wait for each
other. Reentrant, as they call each other.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Turns:
    """A reentrant lock that functions can be wrapped in."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def one_at_a_time(self, function: F) -> F:
        """`function`, waiting for any other thread's call in these turns to end first."""

        @functools.wraps(function)
        def exclusive(*args: Any, **kwargs: Any) -> Any:
            with self:
                return function(*args, **kwargs)

        return exclusive  # type: ignore[return-value]


API_TURNS = Turns()
"""The turns every public entry point takes."""

one_at_a_time = API_TURNS.one_at_a_time
