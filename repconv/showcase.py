"""`repconv demo` (`make demo`): the main job end to end on built-in examples (the network
itself is `zoo/demo.py`): one block of each family, then RepVGG-A0 and its latency."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from repconv import arch, latency, pipeline, report
from repconv.zoo import registry as zoo
from repconv.zoo.checkpoints import save_train_checkpoint

DEMO_ARCH = "demo_mixed"


def run_demo(out_dir: Path, out: Console) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    train = out_dir / "demo-train.pth"
    deploy = out_dir / "demo-deploy.safetensors"
    save_train_checkpoint(DEMO_ARCH, train, randomize_bn=True)
    out.print(f"saved a train checkpoint of {DEMO_ARCH!r} to {train}", markup=False)
    out.print(f"$ repconv convert {train} {deploy} --arch {DEMO_ARCH}", markup=False)
    result = pipeline.convert_file(train, deploy, arch_spec=DEMO_ARCH)
    report.plan_table(out, result.plan, title=f"Blocks of {DEMO_ARCH}")
    report.summary_line(out, result.plan, result.params_before, result.params_after)
    report.verification_lines(out, result.verification)
    out.print(f"wrote {deploy}", markup=False)
    out.print(f"$ repconv verify {train} {deploy}", markup=False)
    verification, _ = pipeline.verify_files(train, deploy)
    report.verification_lines(out, verification)
    deployed = zoo.build(DEMO_ARCH, deploy=True)
    state, _ = pipeline.checkpoint.read_deploy(deploy)
    deployed.load_state_dict(state, strict=True)
    out.print(
        "the deploy checkpoint loads with strict=True into the demo net built with deploy=True",
        markup=False,
    )
    ok = result.passed and verification.passed
    return 0 if ok and _zoo_demo(out_dir, out) else 1


def _zoo_demo(out_dir: Path, out: Console, name: str = "repvgg_a0") -> bool:
    """A real architecture from the zoo: convert it and compare train and deploy latency."""
    train = out_dir / f"{name}-train.pth"
    deploy = out_dir / f"{name}-deploy.safetensors"
    save_train_checkpoint(name, train, randomize_bn=True)
    out.print(f"\n$ repconv zoo save {name} {train} --randomize-bn", markup=False)
    out.print(f"$ repconv convert {train} {deploy} --arch {name}", markup=False)
    result = pipeline.convert_file(train, deploy, arch_spec=name)
    report.summary_line(out, result.plan, result.params_before, result.params_after)
    report.verification_lines(out, result.verification)
    shape = (3, 224, 224)
    state = pipeline.checkpoint.read_checkpoint(train).state_dict
    train_model = arch.build_loaded(name, {}, state)
    deploy_model = pipeline.load_deploy(deploy)
    before, after = latency.measure_alternating([train_model, deploy_model], shape)
    report.table(
        out,
        f"Latency of {name}, batch 1, {'x'.join(map(str, shape))}, "
        f"{torch.get_num_threads()} thread(s), median of {before.runs} runs",
        ["model", "median ms", "spread ms"],
        [
            ["train (eval)", before.median_ms, before.spread_ms],
            ["deploy", after.median_ms, after.spread_ms],
        ],
    )
    out.print(f"speed-up: {before.median_ms / after.median_ms:.2f}x", markup=False)
    return result.passed
