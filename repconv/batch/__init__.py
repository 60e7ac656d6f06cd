"""`repconv batch`: convert many checkpoints from one config, in parallel, isolated per entry.

config (TOML -> jobs) -> executors (where work runs) -> runner (submit, follow) -> task (one
entry in its own worker process) -> summary (table, JSON/Markdown report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repconv.batch.config import BatchConfig, ConfigError, Job, load_config
from repconv.batch.executors import is_local, local_cores, open_executor, threads_per_worker
from repconv.batch.runner import Watcher, run_jobs

__all__ = ["BatchConfig", "ConfigError", "Job", "load_config", "run_batch"]


def run_batch(
    config: BatchConfig | str | Path,
    *,
    jobs: int | None = None,
    executor: str | None = None,
    resume: bool = False,
    watcher: Watcher | None = None,
) -> tuple[BatchConfig, list[dict[str, Any]]]:
    """Convert every entry of `config`; the config and one row per entry, in config order."""
    if not isinstance(config, BatchConfig):
        config = load_config(config)
    jobs = jobs or local_cores()
    for job in config.jobs:
        job.resume = resume
        if is_local(executor) and job.threads is None:
            job.threads = threads_per_worker(jobs)
    with open_executor(executor, jobs) as pool:
        rows = run_jobs(config.jobs, pool, watcher)
    return config, rows
