"""`make demo`: the main job end to end on a built-in example with one block of each family."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from repconv import pipeline, report
from repconv.zoo import registry as zoo
from repconv.zoo.blocks import randomize_bn_

DEMO_ARCH = "demo_mixed"


def save_demo_checkpoint(path: Path, seed: int = 0) -> None:
    """A train checkpoint of the demo net with random BN statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    model = zoo.build(DEMO_ARCH)
    randomize_bn_(model, generator)
    with torch.no_grad():
        # DBB's identity-based 1x1 starts at zero; give it weights so that branch matters too.
        for name, param in model.named_parameters():
            if "idconv1" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    torch.save(model.state_dict(), path)


def run_demo(out_dir: Path, out: Console) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    train = out_dir / "demo-train.pth"
    deploy = out_dir / "demo-deploy.safetensors"
    save_demo_checkpoint(train)
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
    return 0 if result.passed and verification.passed else 1
