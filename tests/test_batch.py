"""`repconv batch`: config checking, isolation of failing entries, resume, reports, Dask."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from repconv import load_deploy
from repconv.batch import Job, load_config, summary
from repconv.batch.task import _convert_in_worker, _crash_reason, up_to_date
from repconv.checkpoint import file_sha256, read_checkpoint, read_deploy, write_checkpoint
from repconv.cli import main
from repconv.files import TENSORS_DIGEST_KEY, read_safetensors_metadata
from repconv.zoo import registry
from repconv.zoo.checkpoints import save_train_checkpoint

DEMO_SHAPE = [3, 32, 32]


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_config(folder: Path, text: str, name: str = "zoo.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    """Train checkpoints: two demo nets, one RepVGG-A0, one file that is not a checkpoint."""
    folder = tmp_path_factory.mktemp("zoo")
    (folder / "ckpts").mkdir()
    save_train_checkpoint("demo_mixed", folder / "ckpts/demo_a.pth", randomize_bn=True, seed=1)
    save_train_checkpoint("demo_mixed", folder / "ckpts/demo_b.pth", randomize_bn=True, seed=2)
    save_train_checkpoint("repvgg_a0", folder / "ckpts/a0.pth", randomize_bn=True, seed=3)
    (folder / "ckpts/corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    return folder


# Config checking: every mistake is exit 2 naming FILE:LINE, before anything runs.

A0 = '[[model]]\ninput = "ckpts/a0.pth"\n'  # lines 1-2 of most cases below
BAD_CONFIGS = {
    # case: (config text, line at fault, words of the message)
    "unknown option": (
        '[defaults]\narch = "demo_mixed"\ninput_shap = [3, 8, 8]\n',
        3,
        "did you mean 'input_shape'",
    ),
    "wrong type": (A0 + 'output = "x.pth"\nsamples = "two"\n', 4, "samples: expected an integer"),
    "TOML syntax": ('[[model]]\ninput = "ckpts/a0.pth\n', 2, "not valid TOML"),
    "glob matches nothing": (
        '[[model]]\n\ninput = "nowhere/*.pth"\noutput = "d/{stem}.safetensors"\n',
        3,
        "matches no file",
    ),
    "one output for many inputs": (
        '[[model]]\ninput = "ckpts/demo_*.pth"\noutput = "d/one.safetensors"\n',
        3,
        "names one file",
    ),
    "unknown placeholder": (
        A0 + 'output = "d/{model}.safetensors"\n',
        3,
        "unknown placeholder {model}",
    ),
    "bad extension": (A0 + 'output = "d/{stem}.onnx"\n', 3, "unknown extension"),
    "not a batch option": ("[defaults]\ndry_run = true\n" + A0, 2, "not a batch option"),
    "unknown table": ('[model_defaults]\narch = "x"\n', 1, "unknown table or key 'model_defaults'"),
    "no entries": ('[defaults]\narch = "demo_mixed"\n', 1, "no [[model]] entries"),
    "entry without input": ('[[model]]\noutput = "x.pth"\n', 1, "without input"),
    "bad memory size": (A0 + 'output = "x.pth"\nmemory_limit = "lots"\n', 4, "memory_limit"),
    "output is an input": (A0 + 'output = "ckpts/{stem}.pth"\n', 1, "is the input of line 1"),
    "shape with an empty part": (
        A0 + 'output = "x.pth"\ninput_shape = "3,x,4"\n',
        4,
        "input_shape: expected integers like 3,224,224 or 3x224x224, got '3,x,4'",
    ),
    "shape too large": (A0 + 'output = "x.pth"\ninput_shape = [3, 2000000]\n', 4, "at most"),
    "too many samples": (
        A0 + 'output = "x.pth"\nsamples = 100000\n',
        4,
        "samples: expected an integer from 1 to 64",
    ),
    "NaN atol": ("[defaults]\natol = nan\n" + A0, 2, "atol: expected a finite number"),
    "Inf rtol": (A0 + 'output = "x.pth"\nrtol = inf\n', 4, "rtol: expected a finite number"),
    "NaN exact limit": (
        A0 + 'output = "x.pth"\nexact_limit = nan\n',
        4,
        "exact_limit: expected a finite number",
    ),
    "deploy kwargs without arch": (
        A0 + 'output = "x.pth"\ndeploy_kwargs = { deploy = true }\n',
        1,
        "--deploy-kwargs needs --arch",
    ),
    "two entries, one output": (
        '[defaults]\noutput = "d/{stem}.safetensors"\n' + A0 + A0 + 'arch = "repvgg_a0"\n',
        5,
        "would both write",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_bad_config_is_exit_2_naming_its_line(case, zoo_dir, tmp_path):
    text, line, words = BAD_CONFIGS[case]
    (tmp_path / "ckpts").symlink_to(zoo_dir / "ckpts")
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run("batch", config)
    assert result.exit_code == 2, result.output
    assert f"bad.toml:{line}:" in result.output
    assert words in result.output
    assert not (tmp_path / "d").exists() and not (tmp_path / "x.pth").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_unwritable_report_fails_before_any_entry_runs(zoo_dir, tmp_path):
    (tmp_path / "ckpts").symlink_to(zoo_dir / "ckpts")
    config = write_config(
        tmp_path,
        """
        [[model]]
        input = "ckpts/demo_a.pth"
        output = "deploy/{stem}.safetensors"
        arch = "demo_mixed"
        """,
    )
    result = run("batch", config, "--report", "/proc/report.json")
    assert result.exit_code == 2, result.output
    assert "error: cannot write /proc/report.json" in result.output
    assert not (tmp_path / "deploy").exists()


def test_config_expands_globs_patterns_and_overrides(zoo_dir):
    config = write_config(
        zoo_dir,
        """
        [defaults]
        arch = "demo_mixed"
        input_shape = "3,32,32"
        output = "deploy/{stem}.safetensors"
        samples = 3

        [[model]]
        input = "ckpts/demo_*.pth"
        no_verify = true
        memory_limit = "1.5GiB"

        [[model]]
        name = "a0-{stem}"
        input = "ckpts/a0.pth"
        output = "out/{dir}/{name}.pt"
        arch = "repvgg_a0"
        arch_kwargs = { num_classes = 1000 }
        timeout = 60
        """,
        name="expand.toml",
    )
    jobs = load_config(config).jobs
    assert [j.name for j in jobs] == ["demo_a", "demo_b", "a0-a0"]
    assert jobs[0].output == str(zoo_dir / "deploy/demo_a.safetensors")
    assert jobs[2].output == str(zoo_dir / "out/ckpts/a0.pth.pt")
    assert [j.arch for j in jobs] == ["demo_mixed", "demo_mixed", "repvgg_a0"]
    assert [j.verify for j in jobs] == [False, False, True]
    assert jobs[0].memory_limit == 3 << 29 and jobs[2].memory_limit is None
    assert jobs[2].arch_kwargs == {"num_classes": 1000} and jobs[2].timeout == 60.0
    assert all(j.samples == 3 and j.input_shape == DEMO_SHAPE for j in jobs)
    assert [j.line for j in jobs] == [7, 7, 12]


def test_dry_run_lists_the_entries_and_converts_nothing(zoo_dir, tmp_path):
    (tmp_path / "ckpts").symlink_to(zoo_dir / "ckpts")
    config = write_config(
        tmp_path,
        """
        [[model]]
        input = "ckpts/demo_*.pth"
        output = "deploy/{stem}.safetensors"
        arch = "demo_mixed"
        """,
    )
    result = run("batch", config, "--dry-run", "--json")
    assert result.exit_code == 0
    entries = json.loads(result.stdout)["entries"]
    assert [(e["name"], e["output"]) for e in entries] == [
        ("demo_a", "deploy/demo_a.safetensors"),
        ("demo_b", "deploy/demo_b.safetensors"),
    ]
    assert not (tmp_path / "deploy").exists()


def test_unknown_executor_is_exit_2(zoo_dir, tmp_path):
    (tmp_path / "ckpts").symlink_to(zoo_dir / "ckpts")
    config = write_config(tmp_path, '[[model]]\ninput = "ckpts/a0.pth"\noutput = "x.pth"\n')
    result = run("batch", config, "--executor", "ray://somewhere")
    assert result.exit_code == 2
    assert "expected local or dask://HOST:PORT" in result.output


def test_worker_deaths_are_named():
    assert _crash_reason(-9, "")[0] == "out of memory"
    assert _crash_reason(-11, "")[1] == "worker killed by SIGSEGV"
    assert _crash_reason(1, "Traceback ...\nMemoryError\n")[0] == "out of memory"
    assert _crash_reason(3, "boom\nValueError: x\n") == (
        "crashed",
        "worker exited with code 3: ValueError: x",
    )


# Running: good entries convert, bad ones are reported, nothing partial is left.


def _deploy_matches_train(train: Path, deploy: Path, arch: str, shape: list[int]) -> float:
    model = registry.build(arch)
    model.load_state_dict(read_checkpoint(train).state_dict)
    fused = load_deploy(deploy)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.eval()(x), fused.eval()(x)
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.slow
def test_failing_entries_are_isolated_and_reported(zoo_dir, tmp_path):
    (tmp_path / "ckpts").symlink_to(zoo_dir / "ckpts")
    (tmp_path / "deploy").mkdir()
    # Another process's temp file for the same output (pid 1 is never a worker of ours): the
    # entry that times out removes its own worker's temp file, not this one.
    leftover = tmp_path / "deploy" / ".slow.safetensors.1.abc123.tmp"
    leftover.write_bytes(b"half a file")
    sums = {p.name: file_sha256(p) for p in (zoo_dir / "ckpts").iterdir()}
    config = write_config(
        tmp_path,
        """
        [defaults]
        arch = "demo_mixed"
        input_shape = [3, 32, 32]
        output = "deploy/{stem}.safetensors"

        [[model]]
        input = "ckpts/demo_*.pth"

        [[model]]
        input = "ckpts/a0.pth"
        arch = "repvgg_a0"

        [[model]]
        input = "ckpts/corrupt.pth"

        [[model]]
        name = "wrong-arch"
        input = "ckpts/a0.pth"
        output = "deploy/wrong.safetensors"

        [[model]]
        name = "too-strict"
        input = "ckpts/demo_a.pth"
        output = "deploy/strict.safetensors"
        rtol = 1e-12
        atol = 0

        [[model]]
        name = "slow"
        input = "ckpts/a0.pth"
        arch = "repvgg_a0"
        output = "deploy/slow.safetensors"
        input_shape = [3, 512, 512]  # eight float64 passes at 512x512: several seconds
        samples = 8
        timeout = 1

        [[model]]
        name = "hungry"
        input = "ckpts/a0.pth"
        arch = "repvgg_a0"
        output = "deploy/hungry.safetensors"
        memory_limit = 40
        """,
    )
    report = tmp_path / "report.json"
    result = run("batch", config, "--jobs", "2", "--report", report)
    assert result.exit_code == 1, result.output
    doc = json.loads(report.read_text())
    rows = {e["name"]: e for e in doc["entries"]}
    assert list(rows) == [
        "demo_a",
        "demo_b",
        "a0",
        "corrupt",
        "wrong-arch",
        "too-strict",
        "slow",
        "hungry",
    ]
    assert doc["counts"] == {"converted": 3, "up to date": 0, "failed": 5}
    assert doc["ok"] is False
    failures = {n: (r["failure"], r["reason"]) for n, r in rows.items() if r["status"] == "failed"}
    assert failures["corrupt"][0] == "bad input" and "corrupt.pth" in failures["corrupt"][1]
    assert failures["wrong-arch"][0] == "bad input"
    assert "does not fit the architecture" in failures["wrong-arch"][1]
    assert failures["too-strict"][0] == "verification failed"
    assert "rtol 1e-12" in failures["too-strict"][1]
    assert failures["slow"] == ("timed out", "timed out after 1 s")
    assert failures["hungry"][0] == "out of memory"
    # Every failure is also in the printed summary, with its reason.
    for name, (_, reason) in failures.items():
        assert f"{name}: {reason}" in result.output

    a0 = rows["a0"]
    assert a0["fused_by_rule"] == {"repvgg": 22}
    assert a0["params_before"] > a0["params_after"]
    assert a0["max_error"] < 1e-6 and a0["measured"]["peak_rss_mib"] > 0
    assert rows["too-strict"]["max_error"] > 1e-12  # why it failed, shown in the row

    written = sorted(p.name for p in (tmp_path / "deploy").iterdir())
    assert written == [leftover.name, "a0.safetensors", "demo_a.safetensors", "demo_b.safetensors"]
    assert leftover.read_bytes() == b"half a file"
    for name, arch, shape in [("demo_a", "demo_mixed", DEMO_SHAPE), ("a0", "repvgg_a0", None)]:
        shape = shape or [3, 224, 224]
        error = _deploy_matches_train(
            zoo_dir / f"ckpts/{name}.pth", tmp_path / f"deploy/{name}.safetensors", arch, shape
        )
        assert error < 1e-5
    assert sums == {p.name: file_sha256(p) for p in (zoo_dir / "ckpts").iterdir()}


@pytest.mark.slow
def test_resume_skips_what_is_up_to_date_and_redoes_what_changed(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    save_train_checkpoint("demo_mixed", ckpts / "one.pth", randomize_bn=True, seed=1)
    save_train_checkpoint("demo_mixed", ckpts / "two.pth", randomize_bn=True, seed=2)
    save_train_checkpoint("demo_mixed", ckpts / "three.pth", randomize_bn=True, seed=3)
    text = """
        [defaults]
        arch = "demo_mixed"
        input_shape = [3, 32, 32]
        output = "deploy/{stem}.safetensors"

        [[model]]
        input = "ckpts/one.pth"

        [[model]]
        input = "ckpts/two.pth"

        [[model]]
        input = "ckpts/three.pth"
        samples = SAMPLES
        """
    config = write_config(tmp_path, text.replace("SAMPLES", "2"))

    def statuses(*flags: str) -> dict[str, str]:
        result = run("batch", config, "--json", *flags)
        assert result.exit_code == 0, result.output
        return {e["name"]: e["status"] for e in json.loads(result.stdout)["entries"]}

    assert set(statuses("--resume").values()) == {"converted"}  # nothing to resume from yet
    outputs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "deploy").iterdir()}
    assert statuses("--resume") == dict.fromkeys(["one", "two", "three"], "up to date")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "deploy").iterdir()} == outputs

    save_train_checkpoint("demo_mixed", ckpts / "two.pth", randomize_bn=True, seed=22)
    write_config(tmp_path, text.replace("SAMPLES", "3"))
    report = tmp_path / "report.md"
    assert statuses("--resume", "--report", report) == {
        "one": "up to date",
        "two": "converted",
        "three": "converted",
    }
    markdown = report.read_text()
    assert "1 converted" not in markdown and "2 converted, 1 up to date, 0 failed" in markdown
    assert "| one | up to date | acb 1, conv_bn 2, dbb 2, repvgg 2 |" in markdown
    # Without --resume everything is converted again.
    assert set(statuses().values()) == {"converted"}


def _damage_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_bias(path: Path) -> None:
    """A bias +5.0, written in place: the header and its metadata stay as they were."""
    with open(path, "r+b") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        name = next(k for k in sorted(header) if k.endswith(".bias"))
        assert header[name]["dtype"] == "F32"
        f.seek(8 + header_size + header[name]["data_offsets"][0])
        value = struct.unpack("<f", f.read(4))[0]
        f.seek(-4, os.SEEK_CUR)
        f.write(struct.pack("<f", value + 5.0))


def _written_before_digests(path: Path) -> None:
    """What repconv wrote before deploy files recorded a digest of their tensors."""
    state, meta = read_deploy(path)
    meta.pop(TENSORS_DIGEST_KEY)
    write_checkpoint(path, state, meta)


@pytest.mark.parametrize("damage", [_damage_truncated, _damage_bias, _written_before_digests])
def test_resume_converts_damaged_outputs_again(zoo_dir, tmp_path, damage):
    (tmp_path / "ckpts").symlink_to(zoo_dir / "ckpts")
    config = write_config(
        tmp_path,
        """
        [[model]]
        input = "ckpts/demo_a.pth"
        output = "deploy/{stem}.safetensors"
        arch = "demo_mixed"
        input_shape = [3, 32, 32]
        samples = 1
        """,
    )
    job, output = load_config(config).jobs[0], tmp_path / "deploy/demo_a.safetensors"

    def status() -> str:
        result = run("batch", config, "--json", "--resume")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["entries"][0]["status"]

    assert status() == "converted"
    intact, mtime = output.read_bytes(), output.stat().st_mtime_ns
    assert TENSORS_DIGEST_KEY in read_safetensors_metadata(output)
    assert status() == "up to date" and up_to_date(job)["status"] == "up to date"
    assert output.stat().st_mtime_ns == mtime
    damage(output)
    assert output.read_bytes() != intact
    assert up_to_date(job) is None
    assert status() == "converted"
    assert output.read_bytes() == intact  # the same input gives the same bytes


def test_report_is_stable_apart_from_measurements(zoo_dir):
    config = load_config(
        write_config(
            zoo_dir,
            '[[model]]\ninput = "ckpts/a0.pth"\noutput = "d/{stem}.safetensors"\n',
            name="stable.toml",
        )
    )
    row = {"name": "a0", "input": config.jobs[0].input, "output": config.jobs[0].output}
    row |= {"status": "converted", "fused_by_rule": {"repvgg": 22}, "seconds": 1.5}
    first = summary.document(config, [row])
    second = summary.document(config, [{**row, "seconds": 9.0, "peak_rss_mib": 100.0}])
    for doc in (first, second):
        for entry in doc["entries"]:
            del entry["measured"]
    assert summary.as_json(first) == summary.as_json(second)
    assert first["entries"][0]["input"] == "ckpts/a0.pth"
    assert first["entries"][0]["output"] == "d/a0.safetensors"


def _loopback_port_is_free() -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 0))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_dask_executor_runs_the_same_batch(zoo_dir, tmp_path):
    distributed = pytest.importorskip(
        "distributed", reason="Dask is an optional extra: pip install 'repconv[dask]'"
    )
    if not _loopback_port_is_free():
        pytest.skip("cannot listen on the loopback interface")
    (tmp_path / "ckpts").symlink_to(zoo_dir / "ckpts")
    config = write_config(
        tmp_path,
        """
        [[model]]
        input = "ckpts/demo_*.pth"
        output = "deploy/{stem}.safetensors"
        arch = "demo_mixed"
        input_shape = [3, 32, 32]

        [[model]]
        input = "ckpts/corrupt.pth"
        output = "deploy/{stem}.safetensors"
        arch = "demo_mixed"
        """,
    )
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address=None,
    ) as cluster:
        address = cluster.scheduler_address.removeprefix("tcp://")
        result = run("batch", config, "--executor", f"dask://{address}", "--json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert [(e["name"], e["status"]) for e in doc["entries"]] == [
        ("demo_a", "converted"),
        ("demo_b", "converted"),
        ("corrupt", "failed"),
    ]
    assert sorted(os.listdir(tmp_path / "deploy")) == ["demo_a.safetensors", "demo_b.safetensors"]


def test_shipped_configs_are_valid(tmp_path):
    configs = Path(__file__).parents[1] / "configs"
    zoo = load_config(configs / "zoo.toml").jobs
    assert len(zoo) >= 8
    assert all(registry.get_entry(job.arch) is not None for job in zoo)
    assert len({job.output for job in zoo}) == len(zoo)

    # The template, next to the files it expects (load_config reads no checkpoint).
    template = tmp_path / "release.toml"
    template.write_text((configs / "release-checkpoints.toml").read_text())
    for name in ["runs/a/ema_1.pth", "runs/b/ema_1.pth", "finetune/cifar100/best.pth"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    jobs = load_config(template).jobs
    assert [Path(j.output).name for j in jobs] == [
        "a-ema_1.safetensors",
        "b-ema_1.safetensors",
        "cifar100-best.safetensors",
        "large-last.safetensors",
    ]
    assert jobs[2].arch_kwargs == {"num_classes": 100} and jobs[3].verify_dtype == "float32"


@pytest.mark.slow
def test_forked_and_spawned_workers_write_the_same_file(zoo_dir, tmp_path):
    """Daemonic processes (Dask's workers) cannot fork a worker and start a fresh one instead."""
    config = write_config(
        tmp_path,
        f"""
        [[model]]
        input = "{zoo_dir / "ckpts/demo_a.pth"}"
        output = "out/{{stem}}.safetensors"
        arch = "demo_mixed"
        input_shape = [3, 32, 32]
        """,
    )
    job = load_config(config).jobs[0]
    outputs = []
    for fork in (True, False):
        outcome = _convert_in_worker(job, fork=fork)
        assert outcome["status"] == "converted", outcome
        outputs.append(Path(job.output).read_bytes())
        Path(job.output).unlink()
    assert outputs[0] == outputs[1]


def test_orchestration_does_not_import_torch():
    """The CLI's help and batch's runner stay fast and small: torch loads only where it works."""
    code = (
        "import sys, repconv.cli, repconv.batch, repconv.batch.progress, repconv.batch.summary;"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_biggest_checkpoints_are_submitted_first_and_rows_keep_config_order(tmp_path):
    from concurrent.futures import Future

    from repconv.batch import runner

    sizes = {"small": 10, "big": 1000, "missing": None, "middle": 100}
    jobs = []
    for name, size in sizes.items():
        path = tmp_path / f"{name}.pth"
        if size is not None:
            path.write_bytes(b"x" * size)
        jobs.append(Job(name=name, input=str(path), output=str(tmp_path / f"{name}.pt"), line=1))

    class Recorder:  # an Executor that runs nothing: it records what it was given, in order
        def __init__(self):
            self.order = []

        def submit(self, _fn, job):
            self.order.append(job.name)
            future = Future()
            future.set_result({"status": "converted", "failure": None, "reason": None})
            return future

    executor = Recorder()
    rows = runner.run_jobs(jobs, executor)
    assert executor.order == ["big", "middle", "small", "missing"]
    assert [row["name"] for row in rows] == list(sizes)


def test_only_the_patterns_own_wildcards_count(tmp_path):
    folder = tmp_path / "runs[1]"  # a folder name that is itself a glob character class
    (folder / "ckpts").mkdir(parents=True)
    for name in ("a.pth", "b.pth", "notes.txt"):
        (folder / "ckpts" / name).touch()
    config = write_config(
        folder,
        """
        [[model]]
        input = "ckpts/*.pth"
        output = "../deploy/{stem}.safetensors"
        arch = "demo_mixed"

        [[model]]
        input = "ckpts/**/b.pth"
        output = "../again/{name}.pt"
        arch = "demo_mixed"
        """,
    )
    jobs = load_config(config).jobs
    assert [Path(j.input).name for j in jobs] == ["a.pth", "b.pth", "b.pth"]
    assert all(Path(j.input).parent == folder / "ckpts" for j in jobs)
    assert jobs[0].output == str(tmp_path / "deploy" / "a.safetensors")


@pytest.mark.slow
def test_forked_workers_exit_codes_survive_other_threads_polling_children(tmp_path):
    """CPython's forkserver reports exit code 255 when two threads poll one process at once
    (python/cpython#130895), and every `Process.start()` or `active_children()` in any thread
    polls all the children multiprocessing tracks: a batch entry was failed as "crashed"."""
    import multiprocessing
    import threading
    from concurrent.futures import ThreadPoolExecutor

    job = Job("missing", str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors"), 1)
    done = threading.Event()

    def poll_children() -> None:
        while not done.is_set():
            multiprocessing.active_children()

    poller = threading.Thread(target=poll_children)
    poller.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(lambda _: _convert_in_worker(job, fork=True), range(10)))
    finally:
        done.set()
        poller.join()
    assert {(o["status"], o["failure"]) for o in outcomes} == {("failed", "bad input")}, outcomes
