"""SIGTERM loses nothing: the real CLI, run as a subprocess, is signalled while it works.

Each test waits for a condition that shows the work is under way (a temp file being written,
worker processes running) before it sends the signal, so no test depends on timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from repconv import cli
from repconv.interrupts import Terminated
from repconv.zoo.checkpoints import save_train_checkpoint

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's"
)

REPO = Path(__file__).resolve().parents[1]
GUARD_SECONDS = 120  # only against a hang: every wait ends on a condition long before

# The CLI with one change: the first fsync of a temp file creates a marker and then waits
# forever, so the test can signal the process while the output is being written.
PAUSE_IN_WRITE = textwrap.dedent(
    """
    import os, sys, time
    real_fsync = os.fsync
    def pausing_fsync(fd):
        real_fsync(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            open(os.environ["PAUSED_MARKER"], "w").close()
            while True:
                time.sleep(0.01)
    os.fsync = pausing_fsync
    from repconv.cli import main
    main(sys.argv[1:], prog_name="repconv")
    """
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpts")
    save_train_checkpoint("demo_mixed", folder / "demo.pth", randomize_bn=True, seed=1)
    save_train_checkpoint("repvgg_a0", folder / "a0.pth", randomize_bn=True, seed=2)
    return folder


def start(args: list[object], folder: Path, **popen: object) -> subprocess.Popen:
    """Start `python ARGS` with this checkout importable; output goes to files in `folder`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **popen.pop("env", {})}
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        process = subprocess.Popen(
            [sys.executable, *map(str, args)], env=env, stdout=out, stderr=err, **popen
        )
    process.args_folder = folder  # where `wait_for` finds its stderr
    return process


def finish(process: subprocess.Popen, folder: Path) -> tuple[int, str]:
    code = process.wait(GUARD_SECONDS)
    return code, (folder / "stderr").read_text()


def wait_for(condition: Callable[[], object], process: subprocess.Popen, what: str) -> None:
    """Poll until `condition` holds; fail if the process ends first."""
    deadline = time.monotonic() + GUARD_SECONDS
    while not condition():
        if process.poll() is not None:
            stderr = Path(process.args_folder, "stderr").read_text()
            pytest.fail(f"the command ended (code {process.returncode}) before {what}: {stderr}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def session_processes(session: int) -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process in `session`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended while we looked
        # pid (comm) state ppid pgrp session ...: comm may hold spaces, so split after it
        state, ppid, _pgrp, sid = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(sid) == session and state not in "ZX":
            found[int(entry.name)] = int(ppid)
    return found


def has_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def wait_until_session_is_gone(session: int) -> dict[int, int]:
    """The processes of `session` still alive once they had a few seconds to go."""
    deadline = time.monotonic() + 10
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def assert_terminated(code: int, stderr: str) -> None:
    assert code == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated"


# convert


@pytest.mark.slow
def test_sigterm_while_writing_removes_the_temp_file(ckpts, tmp_path):
    out, paused = tmp_path / "out", tmp_path / "paused"
    out.mkdir()
    args = ["-c", PAUSE_IN_WRITE, "convert", ckpts / "demo.pth", out / "deploy.safetensors"]
    args += ["--arch", "demo_mixed", "--input-shape", "3,32,32"]
    process = start(args, tmp_path, env={"PAUSED_MARKER": str(paused)})
    wait_for(paused.exists, process, "the output was being written")
    assert [p.suffix for p in out.iterdir()] == [".tmp"]  # written, not yet renamed
    process.send_signal(signal.SIGTERM)
    assert_terminated(*finish(process, tmp_path))
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_sigterm_while_converting(ckpts, tmp_path):
    """The genuine `python -m repconv`, signalled while torch computes (a long verification)."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["-m", "repconv", "convert", ckpts / "a0.pth", out / "deploy.safetensors"]
    args += ["--arch", "repvgg_a0", "--input-shape", "3,512,512", "--samples", "8"]
    process = start(args, tmp_path)

    wait_for(lambda: has_torch(process.pid), process, "torch was loaded")
    process.send_signal(signal.SIGTERM)
    assert_terminated(*finish(process, tmp_path))
    assert list(out.iterdir()) == []


def test_the_cli_restores_the_sigterm_handler_and_maps_terminated(capsys):
    """Handlers are the CLI's business: around a command only, and put back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    during = []

    def body() -> int:
        during.append(signal.getsignal(signal.SIGTERM))
        raise Terminated()

    with pytest.raises(SystemExit) as exited:
        cli.run_command(False, False, body)
    assert exited.value.code == 143
    assert capsys.readouterr().err.strip() == "error: terminated"
    assert during[0] not in (before, signal.SIG_DFL)
    assert signal.getsignal(signal.SIGTERM) == before


# batch


def slow_batch(folder: Path, ckpts: Path) -> Path:
    """Two entries whose verification (eight float64 passes at 512x512) takes seconds."""
    config = folder / "slow.toml"
    entries = "".join(
        f'[[model]]\nname = "{name}"\ninput = "{ckpts / "a0.pth"}"\n'
        f'output = "out/{name}.safetensors"\n\n'
        for name in ("one", "two")
    )
    config.write_text(
        f'[defaults]\narch = "repvgg_a0"\ninput_shape = [3, 512, 512]\nsamples = 8\n\n{entries}'
    )
    (folder / "out").mkdir()
    return config


def start_batch_with_workers(folder: Path, ckpts: Path) -> subprocess.Popen:
    """A batch in a session of its own, returned once a worker process runs."""
    args = ["-m", "repconv", "batch", slow_batch(folder, ckpts), "--jobs", "2"]
    batch = start(args, folder, start_new_session=True)

    def a_worker_runs() -> bool:
        # The batch's children are the fork server and multiprocessing's resource tracker;
        # a worker is a child of the server.
        found = session_processes(batch.pid).items()
        return any(parent != batch.pid for pid, parent in found if pid != batch.pid)

    wait_for(a_worker_runs, batch, "a worker started")
    return batch


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "out").iterdir())


@pytest.mark.slow
def test_sigterm_stops_the_batch_and_its_workers(ckpts, tmp_path):
    batch = start_batch_with_workers(tmp_path, ckpts)
    batch.send_signal(signal.SIGTERM)
    assert_terminated(*finish(batch, tmp_path))
    assert wait_until_session_is_gone(batch.pid) == {}
    assert leftovers(tmp_path) == []
    time.sleep(2)  # a worker left running would write its output about now
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_killed_batch_takes_its_workers_down(ckpts, tmp_path):
    batch = start_batch_with_workers(tmp_path, ckpts)
    batch.kill()
    assert batch.wait(GUARD_SECONDS) == -signal.SIGKILL
    assert wait_until_session_is_gone(batch.pid) == {}
    assert not [name for name in leftovers(tmp_path) if not name.endswith(".tmp")]


@pytest.mark.slow
def test_a_spawned_worker_dies_with_its_parent(ckpts, tmp_path):
    """Where workers cannot be forked (a Dask worker's) they are spawned; SIGKILL still ends
    them with their parent, through PR_SET_PDEATHSIG."""
    config = slow_batch(tmp_path, ckpts)
    driver = (
        "import sys; from repconv.batch import load_config; "
        "from repconv.batch.task import _convert_in_worker; "
        "_convert_in_worker(load_config(sys.argv[1]).jobs[0], fork=False)"
    )
    parent = start(["-c", driver, config], tmp_path, start_new_session=True)

    def worker_is_working() -> bool:  # so it has long asked to die with its parent
        workers = set(session_processes(parent.pid)) - {parent.pid}
        return any(has_torch(pid) for pid in workers)

    wait_for(worker_is_working, parent, "the worker loaded torch")
    parent.kill()
    parent.wait(GUARD_SECONDS)
    assert wait_until_session_is_gone(parent.pid) == {}
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_an_interrupted_batch_leaves_the_next_one_working(ckpts, tmp_path):
    """Library use: Ctrl-C stops the workers and the fork server; a later batch starts anew."""
    from repconv.batch import run_batch

    def config_for(name: str, arch: str) -> Path:
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'[[model]]\ninput = "{ckpts / name}.pth"\noutput = "out/{name}.safetensors"\n'
            f'arch = "{arch}"\n' + ("input_shape = [3, 224, 224]\n" if arch == "repvgg_a0" else "")
        )
        return config

    # RepVGG-A0 verified at 224x224 (set: the default shape is checked at 56x56) runs for
    # seconds: still running at the runner's first poll.
    stopped, next_one = config_for("a0", "repvgg_a0"), config_for("demo", "demo_mixed")

    class InterruptOnceRunning:
        def running(self, jobs) -> None:
            if jobs:
                raise KeyboardInterrupt

        def finished(self, job, row) -> None:
            pytest.fail("the entry should have been stopped")

    with pytest.raises(KeyboardInterrupt):
        run_batch(stopped, jobs=1, watcher=InterruptOnceRunning())
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    _, rows = run_batch(next_one, jobs=1)
    assert rows[0]["status"] == "converted", rows[0]
