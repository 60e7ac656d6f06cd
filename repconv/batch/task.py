"""The unit of work an executor runs: one entry, in a worker process of its own.

`run_entry` is a plain function of plain data, so any `concurrent.futures.Executor` can run
it: a local thread pool (each thread only waits on its worker process) or a Dask cluster's
executor. It never raises for the entry's own failures; it returns the outcome as a dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from repconv import metadata
from repconv.batch.config import Job
from repconv.batch.executors import local_cores
from repconv.files import (
    check_tensors_digest,
    file_sha256,
    read_safetensors_metadata,
    remove_temp_files_of,
)
from repconv.options import recorded_options

_STDERR_TAIL = 4000
# What every worker needs, imported once by the server the workers fork from.
_PRELOAD = [
    "torch",
    "repconv.pipeline",
    "repconv.batch.worker",
    "repconv.zoo.demo",
    "repconv.zoo.repvgg",
    "repconv.zoo.dbb_nets",
]


def up_to_date(job: Job) -> dict[str, Any] | None:
    """If the output exists, records the same input (sha256) and options, and is intact: its
    outcome. Anything else, a damaged or unreadable output included (a record whose figures
    cannot be read among them), means convert again."""
    output = Path(job.output)
    # A symlink is replaced by the conversion, never followed: what it points to is not ours.
    if output.suffix.lower() != ".safetensors" or output.is_symlink() or not output.is_file():
        return None
    try:
        record = metadata.read(read_safetensors_metadata(output)).check()
        if record.options != recorded_options(job.options):
            return None
        if record.source_sha256 != file_sha256(job.input):
            return None
        # The header can be intact while the tensors are not (a cut-off copy, a changed byte).
        check_tensors_digest(output)
        results = _recorded_results(record)
    except (ValueError, OSError):
        return None
    return {"status": "up to date", "failure": None, "reason": None, **results}


def _recorded_results(record: metadata.Recorded) -> dict[str, Any]:
    """What the earlier conversion recorded, so an up-to-date row still says what it holds;
    `MetadataError` when a field it needs cannot be read."""
    plan = record.plan
    if plan is None:
        raise metadata.MetadataError(metadata.PLAN_KEY, "is missing")
    return metadata.batch_figures(plan, record.verification, *record.params)


def default_threads() -> int:
    """torch threads for a worker when the job sets none: the cores this worker may use."""
    try:  # on a Dask worker, share the cores among the tasks it runs at once
        from distributed import get_worker

        return max(1, local_cores() // max(1, get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def _remove_partial_outputs(worker: _Worker, output: Path) -> None:
    # A worker killed while writing leaves the temp file checkpoint.write_checkpoint made; only
    # its own goes (another process may be writing the same output).
    remove_temp_files_of(worker.pid, output)


def _crash_reason(returncode: int, stderr: str) -> tuple[str, str]:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == signal.SIGKILL:
            return "out of memory", f"worker killed by {name} (most likely out of memory)"
        return "crashed", f"worker killed by {name}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "no message"
    if last.startswith("MemoryError"):
        return "out of memory", f"out of memory (worker exited with code {returncode})"
    return "crashed", f"worker exited with code {returncode}: {last}"


def run_entry(job: Job) -> dict[str, Any]:
    """Convert one entry in a fresh worker process; its outcome, whatever happened."""
    start = time.perf_counter()
    outcome = (up_to_date(job) if job.resume else None) or _convert_in_worker(job)
    outcome["seconds"] = round(time.perf_counter() - start, 3)
    return outcome


class _Worker(Protocol):
    pid: int  # of the process that converts (and names its temp files after itself)

    def finish(self, timeout: float | None) -> int | None:
        """Wait for the exit code; on timeout kill the worker and return None."""

    def kill(self) -> None:
        """Kill the worker and wait until it has ended."""


class _LiveWorkers:
    """The worker processes running now (in this process: one batch at a time), so that the
    main thread can kill them.

    A batch interrupted by Ctrl-C or SIGTERM gets the exception in its main thread, while the
    threads that started the workers sit in `finish`, which nothing interrupts. Workers start
    under the lock and none starts once `stop` has run, so no worker outlives an interrupted
    batch, and none writes its output after it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[_Worker, Path] = {}
        self._stopping = False

    def start(self, start: Callable[[], _Worker], output: Path) -> _Worker | None:
        """The worker `start` started, tracked until `discard`; None if the batch is stopping."""
        with self._lock:
            if self._stopping:
                return None
            worker = start()
            self._workers[worker] = output
            return worker

    def discard(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.pop(worker, None)

    def stop(self) -> None:
        """Kill every worker and wait for each to end; then remove what it was writing."""
        with self._lock:
            self._stopping = True
            workers = list(self._workers.items())
        for worker, output in workers:
            worker.kill()
            _remove_partial_outputs(worker, output)

    def reopen(self) -> None:
        with self._lock:
            self._stopping = False


_live_workers = _LiveWorkers()


def accept_workers() -> None:
    """Let entries start workers (again, after an interrupted batch in the same process)."""
    _live_workers.reopen()


def stop_workers() -> None:
    """Kill every worker this process started, wait for them, remove their temp files, refuse
    new ones and stop the fork server. For the main thread of an interrupted batch; the
    workers of a Dask cluster are not here."""
    _live_workers.stop()
    _ForkedWorker.stop_server()


class _ForkedWorker:
    """Forked from a server process that imported torch once, so an entry skips that import.

    The server itself never runs torch code (no thread pools exist yet when it forks).
    """

    _context = None
    _lock = threading.Lock()

    def __init__(self, job_text: str, result_file: Path, stderr_file: Path) -> None:
        from repconv.batch import worker

        self._process = self.context().Process(
            target=worker.convert_job_forked,
            args=(job_text, str(result_file), str(stderr_file)),
            name="repconv-batch-worker",
        )
        self._process.start()
        self.pid = self._process.pid
        # Only `finish` may poll this process. CPython's forkserver reports exit code 255 to
        # the loser when two threads poll one process at once (python/cpython#130895), and
        # every Process.start() and active_children(), in any thread (another entry's, Dask's),
        # polls each child multiprocessing tracks. Private, hence guarded.
        children = getattr(multiprocessing.process, "_children", None)
        if isinstance(children, set):
            children.discard(self._process)

    @classmethod
    def context(cls):
        with cls._lock:
            if cls._context is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(_PRELOAD)
                cls._context = context
            return cls._context

    @staticmethod
    def usable() -> bool:
        # Daemonic processes (a Dask worker's, say) may not have children of their own.
        return (
            "forkserver" in multiprocessing.get_all_start_methods()
            and not multiprocessing.current_process().daemon
        )

    def finish(self, timeout: float | None) -> int | None:
        self._process.join(timeout)
        if self._process.exitcode is None:
            self.kill()
            return None
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()
        self._process.join()

    @classmethod
    def stop_server(cls) -> None:
        """Stop the fork server, if this process started one (it would also exit on its own
        once this process ends and its control pipe closes)."""
        with cls._lock:
            if cls._context is None:
                return
        from multiprocessing import forkserver

        # Private, hence guarded: without them the server still exits when this process ends.
        server = getattr(forkserver, "_forkserver", None)
        pid, stop = getattr(server, "_forkserver_pid", None), getattr(server, "_stop", None)
        if pid is None or stop is None:
            return
        # Killed first: `_stop` only closes the server's control pipe and waits, and a worker
        # we never heard of (forked as its start failed) would hold that pipe open for ever.
        # Such a worker dies with the server (PR_SET_PDEATHSIG).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        stop()


class _SpawnedWorker:
    """A fresh interpreter running `python -m repconv.batch.worker` (pays the torch import)."""

    def __init__(self, job_text: str, result_file: Path, stderr_file: Path) -> None:
        with open(stderr_file, "w") as stderr:
            self._process = subprocess.Popen(
                # Our pid: the worker checks it is still its parent once it asked to die with it.
                [sys.executable, "-m", "repconv.batch.worker", str(result_file), str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                text=True,
            )
        self.pid = self._process.pid
        self._job_text = job_text

    def finish(self, timeout: float | None) -> int | None:
        try:
            self._process.communicate(self._job_text, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        return self._process.returncode

    def kill(self) -> None:
        self._process.kill()
        self._process.wait()


def _convert_in_worker(job: Job, *, fork: bool | None = None) -> dict[str, Any]:
    output = Path(job.output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = f"cannot create {output.parent}: {exc.strerror}"
        return {"status": "failed", "failure": "bad input", "reason": reason}
    threads = job.threads or default_threads()
    job_text = dataclasses.replace(job, threads=threads).to_json()
    fork = _ForkedWorker.usable() if fork is None else fork
    with tempfile.TemporaryDirectory(prefix="repconv-batch-") as scratch:
        result_file, stderr_file = Path(scratch) / "result.json", Path(scratch) / "stderr"
        kind = _ForkedWorker if fork else _SpawnedWorker
        worker = _live_workers.start(lambda: kind(job_text, result_file, stderr_file), output)
        if worker is None:
            return {"status": "failed", "failure": "stopped", "reason": "the batch was stopped"}
        try:
            code = worker.finish(job.timeout)
        except BaseException:  # interrupted: take the worker down with us
            worker.kill()
            _remove_partial_outputs(worker, output)
            raise
        finally:
            _live_workers.discard(worker)
        if code is None:
            _remove_partial_outputs(worker, output)
            return {
                "status": "failed",
                "failure": "timed out",
                "reason": f"timed out after {job.timeout:g} s",
            }
        if code == 0 and result_file.is_file():
            return json.loads(result_file.read_text())
        stderr_text = stderr_file.read_text(errors="replace")[-_STDERR_TAIL:]
    _remove_partial_outputs(worker, output)
    failure, reason = _crash_reason(code, stderr_text)
    return {"status": "failed", "failure": failure, "reason": reason}
