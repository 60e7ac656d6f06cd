"""One batch entry, converted in a process of its own.

The process is forked from a server that has already imported torch (`convert_job_forked`), or,
where that is not possible, started as `python -m repconv.batch.worker RESULT [PARENT_PID]` with the
job as JSON on stdin. Either way the outcome is written as JSON to RESULT. A process per entry is
the isolation unit: whatever happens here (an exception, memory exhaustion, a kill on timeout)
ends this process only, and the batch goes on. The batch ending, however, ends this process
too, even when the batch was SIGKILLed (`die_with_parent`, `_die_with_batch`).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import resource
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from repconv import metadata
from repconv.errors import BadInput, VerificationFailed, is_out_of_memory
from repconv.files import write_text_atomically

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# The process that imported this module. The fork server preloads it, so in a forked worker
# this is the server: the parent to die with.
_IMPORTED_BY = os.getpid()


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux; elsewhere a no-op).

    A batch killed outright (SIGKILL, the OOM killer) runs no clean-up, so without this its
    workers would go on and write their outputs after it died. A spawned worker's parent is
    the batch (strictly, the batch's thread that started it, which waits for it); a forked
    worker's is the fork server, which `_die_with_batch` covers as well.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    # The parent may have ended before the request was made: then nobody would send it.
    if os.getppid() != parent:
        os._exit(1)


def status_mib(field: str) -> float | None:
    """A VmRSS/VmHWM figure of this process in MiB (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _die_with_batch() -> None:
    """In a forked worker, SIGKILL this process as soon as the batch process ends.

    The fork server, this worker's parent, does not end with the batch while workers run:
    each worker holds a copy of the server's control pipe, which keeps it open. So the worker
    watches the batch itself (multiprocessing's handle on the process that started it).
    """
    batch = multiprocessing.parent_process()
    if batch is None:
        return

    def watch() -> None:
        batch.join()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="repconv-watch-batch", daemon=True).start()


def _limit_memory(limit: int | None) -> None:
    # RLIMIT_DATA covers heap and private anonymous mappings (where tensors live) but not the
    # shared libraries torch maps, so the limit means "tensor memory" and not "address space".
    # Only the soft limit is set, so it can be lifted again to report the failure.
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = hard if limit is None else limit
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _failure(exc: Exception, memory_limit: int | None) -> dict[str, str]:
    # Memory exhaustion first: the pipeline may have wrapped it as "the model cannot run".
    if is_out_of_memory(exc):
        limit = f" (memory_limit {memory_limit >> 20} MiB)" if memory_limit else ""
        return {"failure": "out of memory", "reason": f"out of memory{limit}"}
    if isinstance(exc, VerificationFailed):
        return {"failure": "verification failed", "reason": str(exc)}
    if isinstance(exc, BadInput):
        return {"failure": "bad input", "reason": str(exc)}
    text = str(exc).strip().splitlines()
    return {"failure": "error", "reason": f"{type(exc).__name__}: {text[0] if text else ''}"}


def convert_job(job) -> dict[str, Any]:
    """Convert one job in this process; the outcome as a plain dict (never raises)."""
    import torch

    from repconv import pipeline

    if job.threads:
        torch.set_num_threads(job.threads)
    outcome: dict[str, Any] = {"status": "failed", "failure": None, "reason": None}
    outcome["base_rss_mib"] = status_mib("VmRSS")
    try:
        outcome["input_bytes"] = Path(job.input).stat().st_size
    except OSError:
        outcome["input_bytes"] = None
    _limit_memory(job.memory_limit)
    result = None
    try:
        result = pipeline.convert_file(job.input, job.output, job.options)
        outcome["status"] = "converted"
        if result.noop and not result.written:  # allow_noop: nothing to do, nothing written
            outcome.update(status="up to date", reason="already in deploy form: nothing written")
    except Exception as exc:  # every failure is this entry's, not the batch's
        if isinstance(exc, VerificationFailed):
            result = exc.result
        outcome.update(_failure(exc, job.memory_limit))
    finally:
        if job.memory_limit:
            _limit_memory(None)
    if result is not None:
        verification = None if result.verification is None else result.verification.to_dict()
        figures = metadata.batch_figures(
            result.plan.record(), verification, result.params_before, result.params_after
        )
        outcome.update(figures)
    outcome["peak_rss_mib"] = status_mib("VmHWM")
    return outcome


def convert_job_to_file(job_text: str, result_path: str) -> None:
    """Convert the job given as JSON; write its outcome as JSON to `result_path`, atomically."""
    from repconv.batch.config import Job

    write_text_atomically(result_path, json.dumps(convert_job(Job.from_json(job_text))))


def convert_job_forked(job_text: str, result_path: str, stderr_path: str) -> None:
    """Entry point of a worker forked from the preloaded server: its own stderr, then
    `convert_job_to_file`."""
    # If the preload failed this module was imported here; the parent is then read at once.
    die_with_parent(_IMPORTED_BY if os.getpid() != _IMPORTED_BY else os.getppid())
    _die_with_batch()
    with open(stderr_path, "w") as stderr, open(os.devnull, "w") as devnull:
        os.dup2(stderr.fileno(), 2)
        os.dup2(devnull.fileno(), 1)
    convert_job_to_file(job_text, result_path)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or not all(a.isdigit() for a in argv[1:]):
        sys.stderr.write("usage: python -m repconv.batch.worker RESULT_JSON [PARENT_PID] < job\n")
        return 2
    if len(argv) == 2:
        die_with_parent(int(argv[1]))
    convert_job_to_file(sys.stdin.read(), argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
