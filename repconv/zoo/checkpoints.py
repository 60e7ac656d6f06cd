"""Train checkpoints of zoo models, for demos, tests and trying repconv without a release file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from repconv import checkpoint
from repconv.errors import BadInput
from repconv.zoo import registry
from repconv.zoo.blocks import randomize_bn_


def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random BN statistics/affine and DBB identity-1x1 weights, so conversion is not trivial."""
    randomize_bn_(model, generator)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "idconv1" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def parameter_counts(name: str) -> tuple[int, int]:
    """(train, deploy) parameter counts, computed on the meta device (no memory, no init)."""
    with torch.device("meta"):
        train, deploy = registry.build(name), registry.build(name, deploy=True)
    return sum(p.numel() for p in train.parameters()), sum(p.numel() for p in deploy.parameters())


def save_train_checkpoint(
    name: str, path: str | Path, *, randomize_bn: bool = False, seed: int = 0
) -> Path:
    """Build `name` in train form (seeded) and write its state dict atomically."""
    if registry.get_entry(name) is None:
        raise BadInput(f"no zoo model {name!r}; see `repconv zoo list`")
    path = checkpoint.check_output_path(path)
    torch.manual_seed(seed)
    model = registry.build(name)
    if randomize_bn:
        randomize_(model, torch.Generator().manual_seed(seed))
    checkpoint.write_checkpoint(path, model.state_dict(), {})
    return path
