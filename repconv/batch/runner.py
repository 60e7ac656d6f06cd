"""Run a batch: submit every job to an executor, follow them, collect one row per entry."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Any, Protocol

from repconv.batch.config import Job
from repconv.batch.task import accept_workers, run_entry, stop_workers

POLL_SECONDS = 0.25


class Watcher(Protocol):
    """Whoever shows progress: told which entries run and which have ended."""

    def running(self, jobs: Sequence[Job]) -> None: ...

    def finished(self, job: Job, row: dict[str, Any]) -> None: ...


class _Silent:
    def running(self, jobs: Sequence[Job]) -> None:
        pass

    def finished(self, job: Job, row: dict[str, Any]) -> None:
        pass


def row_for(job: Job, outcome: dict[str, Any]) -> dict[str, Any]:
    """One report row: the entry's identity, then its outcome."""
    return {"name": job.name, "input": job.input, "output": job.output, **outcome}


def _outcome(future: Future) -> dict[str, Any]:
    try:
        return future.result()
    except Exception as exc:  # the executor lost the task (a Dask worker died, say)
        return {"status": "failed", "failure": "crashed", "reason": f"{type(exc).__name__}: {exc}"}


def _largest_first(jobs: Sequence[Job]) -> list[int]:
    """Submission order: the biggest checkpoints first, so the last to finish is a small one."""

    def size(index: int) -> int:
        try:
            return os.path.getsize(jobs[index].input)
        except OSError:
            return 0

    return sorted(range(len(jobs)), key=lambda i: (-size(i), i))


def run_jobs(jobs: Sequence[Job], executor: Executor, watcher: Watcher | None = None) -> list[dict]:
    """Every job's row, in the order of `jobs`, however the executor ordered the work.

    Interrupted (Ctrl-C, or SIGTERM turned into an exception by the CLI), it cancels the
    entries not started, kills the local workers running and re-raises.
    """
    watcher = watcher or _Silent()
    accept_workers()
    futures: dict[Future, int] = {}
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    try:
        for index in _largest_first(jobs):
            futures[executor.submit(run_entry, jobs[index])] = index
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=futures.__getitem__):
                job = jobs[futures[future]]
                rows[futures[future]] = row_for(job, _outcome(future))
                watcher.finished(job, rows[futures[future]])
            in_order = sorted(pending, key=futures.__getitem__)
            watcher.running([jobs[futures[f]] for f in in_order if f.running()])
    except BaseException:
        for future in futures:
            future.cancel()
        stop_workers()
        raise
    return rows
