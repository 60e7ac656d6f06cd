"""`repconv bench`: parameters, multiply-accumulates and the latency table."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from torch import nn

from repconv import latency
from repconv.bench import count_macs
from repconv.cli import main
from repconv.zoo.checkpoints import save_train_checkpoint


def test_count_macs_of_convs_and_linears():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 8*8 outputs * 4 channels * 3*3*3
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # 8*8*4 * 2*3*3
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),  # 5 * 256
    )
    assert count_macs(model, (3, 8, 8)) == 64 * 4 * 27 + 64 * 4 * 18 + 5 * 256


def test_bench_command(tmp_path):
    threads = torch.get_num_threads()
    ckpt = tmp_path / "train.pth"
    save_train_checkpoint("demo_mixed", ckpt, randomize_bn=True)
    args = [
        "bench",
        str(ckpt),
        "--arch",
        "demo_mixed",
        "--runs",
        "3",
        "--warmup",
        "0",
        "--batch-sizes",
        "1,2",
        "--threads",
        "1",
        "--json",
    ]
    try:
        result = CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide; leave the session's alone
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [r["batch"] for r in doc["rows"]] == [1, 2]
    assert all(r["train_ms"] > 0 and r["deploy_ms"] > 0 for r in doc["rows"])
    assert doc["deploy_params"] < doc["train_params"]
    assert doc["deploy_macs"] < doc["train_macs"]
    assert doc["threads"] == 1 and doc["input_shape"] == [3, 32, 32]


def test_bench_against_a_written_deploy_file(tmp_path):
    ckpt, deploy = tmp_path / "train.pth", tmp_path / "deploy.safetensors"
    save_train_checkpoint("demo_mixed", ckpt, randomize_bn=True)
    assert (
        CliRunner()
        .invoke(main, ["convert", str(ckpt), str(deploy), "--arch", "demo_mixed"])
        .exit_code
        == 0
    )
    args = [
        "bench",
        str(ckpt),
        "--arch",
        "demo_mixed",
        "--deploy",
        str(deploy),
        "--runs",
        "3",
        "--batch-sizes",
        "1",
        "--json",
    ]
    doc = json.loads(CliRunner().invoke(main, args).output)
    assert doc["deploy_params"] == 28986


class Recorder(nn.Module):
    """Logs its name on every call, so the order of timed runs can be checked."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return x


def test_models_take_turns_run_by_run():
    log: list[str] = []
    train, deploy = Recorder("t", log), Recorder("d", log)
    before, after = latency.measure_alternating([train, deploy], (1, 2, 2), runs=4, warmup=1)
    # One pair per run, the order reversed every run: a slow spell hits both models.
    assert "".join(log) == "td" + "dt" + "td" + "dt" + "td"
    assert before.runs == after.runs == 4
    assert before.median_ms >= 0 and after.median_ms >= 0
