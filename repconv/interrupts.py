"""SIGTERM as an exception, so that a terminated command cleans up as an interrupted one does.

Python turns SIGINT into KeyboardInterrupt; SIGTERM (what `kill`, systemd, Docker and CI
runners send) kills the process outright by default, before `finally` blocks run, so temp files
and child processes stay behind. `sigterm_raises` makes SIGTERM raise `Terminated` in the main
thread instead. Only the command line installs it: used as a library, repconv leaves the
process's signal handling alone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

# What a shell reports for a process ended by the signal: 128 + its number.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt: `except Exception` (an entry's
    own failure, say) must not swallow it."""


def _ignore_repeats(_signum, _frame) -> None:
    """Later SIGTERMs (a supervisor insisting) must not cut short the clean-up of the first.

    A Python function rather than SIG_IGN: children started during the clean-up get the
    default disposition back on exec instead of inheriting "ignored".
    """


def _raise_terminated(_signum, _frame) -> None:
    signal.signal(signal.SIGTERM, _ignore_repeats)
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread; the previous handler
    comes back afterwards. A no-op outside the main thread (signal handlers live there) and
    when SIGTERM is ignored (whoever started us asked for that)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        # None: a handler installed by C code, which Python cannot put back; the default it is.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def exit_with_on_signal(code: int) -> None:
    """Once a command has finished (its output written, its result printed), a SIGTERM or
    Ctrl-C while the interpreter shuts down ends the process at once with the command's own
    `code`: the work is done, so it is reported as done, not as a silent 143. For the process's
    entry point only (it changes the handlers for good); a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return

    def finish(_signum, _frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)

    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, finish)
