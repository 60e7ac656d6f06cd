"""Where batch entries run: a local pool of worker processes, or a Dask cluster.

Both are `concurrent.futures.Executor`s, so the runner is the same code for either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager

from repconv.errors import BadInput

DASK_SCHEME = "dask://"


def local_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(jobs: int) -> int:
    """torch threads for each of `jobs` local workers: together they fill the cores, no more."""
    return max(1, local_cores() // max(1, jobs))


def is_local(spec: str | None) -> bool:
    return spec is None or spec == "local"


@contextmanager
def open_executor(spec: str | None, jobs: int) -> Iterator[Executor]:
    """An executor for `--executor SPEC` (None: this machine, `jobs` entries at a time)."""
    if is_local(spec):
        # Threads suffice: each one only starts a worker process and waits for it. Leaving on
        # an exception still waits for them: the runner has killed their workers by then, and
        # each thread removes its worker's temp file before it ends.
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="repconv-batch") as pool:
            yield pool
        return
    if not spec.startswith(DASK_SCHEME):
        raise BadInput(f"--executor {spec!r}: expected local or {DASK_SCHEME}HOST:PORT")
    address = spec.removeprefix(DASK_SCHEME)
    if not address:
        raise BadInput(f"--executor {spec!r}: expected {DASK_SCHEME}HOST:PORT")
    try:
        from distributed import Client
    except ImportError:
        raise BadInput(
            "--executor dask:// needs Dask distributed: pip install 'repconv[dask]'"
        ) from None
    try:
        client = Client(f"tcp://{address}", timeout="10s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise BadInput(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    try:
        executor = client.get_executor(pure=False)
        try:
            yield executor
        except BaseException:
            # Interrupted: cancel the tasks instead of waiting for them (what leaving the
            # executor's `with` would do). A task already running on a Dask worker finishes
            # there; this process cannot reach into the cluster's machines.
            executor.shutdown(wait=False)
            raise
        executor.shutdown(wait=True)
    finally:
        client.close()
