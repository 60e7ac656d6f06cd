"""The unit of work an executor runs: one entry, in a worker process of its own.

`run_entry` is a plain function of plain data, so any `concurrent.futures.Executor` can run
it: a local thread pool (each thread only waits on its worker process) or a Dask cluster's
executor. It never raises for the entry's own failures; it returns the outcome as a dict.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from repconv.batch.config import Job
from repconv.checkpoint import file_sha256, read_safetensors_metadata
from repconv.pipeline import recorded_options

_STDERR_TAIL = 4000


def up_to_date(job: Job) -> dict[str, Any] | None:
    """If the output exists and records the same input (sha256) and options: its outcome."""
    output = Path(job.output)
    if output.suffix.lower() != ".safetensors" or not output.is_file():
        return None
    try:
        meta = read_safetensors_metadata(output)
        recorded = json.loads(meta.get("options") or "null")
    except (ValueError, OSError):
        return None
    wanted = recorded_options(
        job.arch,
        job.arch_kwargs,
        key=job.key,
        strict=job.strict,
        force=job.force,
        **job.convert_options(),
    )
    if recorded != json.loads(json.dumps(wanted)):
        return None
    try:
        if meta.get("source_sha256") != file_sha256(job.input):
            return None
    except OSError:
        return None
    return {"status": "up to date", "failure": None, "reason": None, **_recorded_results(meta)}


def _recorded_results(meta: dict[str, str]) -> dict[str, Any]:
    """What the earlier conversion recorded, so an up-to-date row still says what it holds."""
    try:
        plan = json.loads(meta.get("plan") or "{}")
        checked = json.loads(meta.get("verification") or "null") or {}
        return {
            "fused_by_rule": plan.get("fused_by_rule"),
            "unfolded": len(plan.get("warnings", [])),
            "params_before": int(meta["params_before"]),
            "params_after": int(meta["params_after"]),
            "max_error": checked.get("written_max"),
            "exact_error": checked.get("exact_max"),
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def default_threads() -> int:
    """torch threads for a worker when the job sets none: the cores this worker may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:  # on a Dask worker, share the cores among the tasks it runs at once
        from distributed import get_worker

        return max(1, (cores or 1) // max(1, get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def _remove_partial_outputs(output: Path) -> None:
    # A worker killed while writing leaves the temp file checkpoint.write_checkpoint made.
    for leftover in output.parent.glob(f".{output.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


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
    outcome = (up_to_date(job) if job.resume else None) or _run_worker(job)
    outcome["seconds"] = round(time.perf_counter() - start, 3)
    return outcome


def _run_worker(job: Job) -> dict[str, Any]:
    output = Path(job.output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = f"cannot create {output.parent}: {exc.strerror}"
        return {"status": "failed", "failure": "bad input", "reason": reason}
    threads = job.threads or default_threads()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    job_text = json.dumps({**json.loads(job.to_json()), "threads": threads})
    with tempfile.TemporaryDirectory(prefix="repconv-batch-") as scratch:
        result_file = Path(scratch) / "result.json"
        with open(Path(scratch) / "stderr", "w+") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "repconv.batch.worker", str(result_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                text=True,
            )
            timed_out = False
            try:
                process.communicate(job_text, timeout=job.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                process.kill()
                process.wait()
            except BaseException:  # interrupted: take the worker down with us
                process.kill()
                process.wait()
                _remove_partial_outputs(output)
                raise
            stderr.seek(0)
            stderr_text = stderr.read()[-_STDERR_TAIL:]
        if timed_out:
            _remove_partial_outputs(output)
            return {
                "status": "failed",
                "failure": "timed out",
                "reason": f"timed out after {job.timeout:g} s",
            }
        if process.returncode == 0 and result_file.is_file():
            return json.loads(result_file.read_text())
    _remove_partial_outputs(output)
    failure, reason = _crash_reason(process.returncode, stderr_text)
    return {"status": "failed", "failure": failure, "reason": reason}
