"""Pure answers computed once per layout: what depends only on a block's code and layout.

A plan or an apply asks the same question of many blocks (a RepVGG net has a handful of
layouts for dozens of blocks): what fx records for a block's forward, whether its data flow
agrees with a rule. Only answers that are a function of their key are kept here; what a pass
keeps between its steps is its run's own (`rules.base.PassRun`). Two lifetimes:

- `remembered`: for one scope (an `engine.apply`), then forgotten. For graphs, which become
  the code of deploy forwards (nothing a forward reads from its module's globals can go stale
  between two conversions). The scope is a context variable, one per thread.
- `kept`: for the process, a bounded number of small answers (a rule's data-flow check), so
  converting many checkpoints of one architecture checks each layout once. The key must hold
  everything the answer depends on but the module-level globals a forward reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

_ACTIVE: ContextVar[dict[tuple[str, Hashable], Any] | None] = ContextVar(
    "repconv_memo", default=None
)


@contextmanager
def scope() -> Iterator[None]:
    """Answers computed inside are shared until the outermost scope closes."""
    if _ACTIVE.get() is not None:
        yield
        return
    token = _ACTIVE.set({})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def remembered(kind: str, key: Hashable | None, compute: Callable[[], T]) -> T:
    """`compute()`, or the answer it gave for `key` earlier in the scope. A key of None (the
    caller cannot tell what the answer depends on) and calls outside a scope always compute;
    an exception is raised again on the next call, never kept."""
    table = _ACTIVE.get()
    if table is None or key is None:
        return compute()
    slot = (kind, key)
    if slot not in table:
        table[slot] = compute()
    return table[slot]


def forget(kind: str, key: Hashable) -> None:
    """Drop an answer (it turned out not to be shareable)."""
    table = _ACTIVE.get()
    if table is not None:
        table.pop((kind, key), None)


# Enough for every layout of every zoo model many times over; the oldest answers go first.
PROCESS_LIMIT = 4096
_KEPT: OrderedDict[tuple[str, Hashable], Any] = OrderedDict()
_KEPT_LOCK = threading.Lock()


def kept(kind: str, key: Hashable | None, compute: Callable[[], T]) -> T:
    """`compute()`, or the answer it gave for `key` before in this process (None: always
    computed). Two threads may compute the same answer at once; both get an equal one."""
    if key is None:
        return compute()
    slot = (kind, key)
    with _KEPT_LOCK:
        if slot in _KEPT:
            _KEPT.move_to_end(slot)
            return _KEPT[slot]
    answer = compute()
    with _KEPT_LOCK:
        _KEPT[slot] = answer
        while len(_KEPT) > PROCESS_LIMIT:
            _KEPT.popitem(last=False)
    return answer
