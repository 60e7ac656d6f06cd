"""Live progress of a batch: a rich display on a terminal, one line per finished entry otherwise."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from repconv.batch.config import Job
from repconv.batch.summary import status_text
from repconv.terminal import shown


class LiveProgress:
    """An overall bar and one line per running entry (rich, for terminals)."""

    def __init__(self, console: Console, total: int, where: str) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._overall = self._progress.add_task(f"converting on {where}", total=total)
        self._lines: dict[str, Any] = {}

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def running(self, jobs: Sequence[Job]) -> None:
        names = {job.name for job in jobs}
        for name in list(self._lines):
            if name not in names:
                self._progress.remove_task(self._lines.pop(name))
        for job in jobs:
            if job.name not in self._lines:
                self._lines[job.name] = self._progress.add_task(
                    f"  {escape(shown(job.name))}", total=None
                )

    def finished(self, job: Job, row: dict[str, Any]) -> None:
        if job.name in self._lines:
            self._progress.remove_task(self._lines.pop(job.name))
        self._progress.advance(self._overall)
        self._progress.console.print(shown(f"{job.name}: {status_text(row)}"), markup=False)


class LineProgress:
    """One plain line per finished entry, for logs (CI, pipes)."""

    def __init__(self, console: Console, total: int) -> None:
        self._console, self._total, self._done = console, total, 0
        self._start = time.perf_counter()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def running(self, jobs: Sequence[Job]) -> None:
        pass

    def finished(self, job: Job, row: dict[str, Any]) -> None:
        self._done += 1
        elapsed = time.perf_counter() - self._start
        self._console.print(
            shown(
                f"[{self._done}/{self._total}] {job.name}: {status_text(row)} "
                f"({elapsed:.0f} s elapsed)"
            ),
            markup=False,
        )
