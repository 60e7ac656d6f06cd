"""Shared test helpers: seeded models with non-trivial BN statistics, output comparison."""

from __future__ import annotations

import torch
from torch import nn

from repconv.zoo.blocks import randomize_bn_


def randomized(model: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """`model` in eval mode with random BN statistics/affine and random DBB identity-1x1 weights."""
    generator = torch.Generator().manual_seed(seed)
    randomize_bn_(model, generator)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "idconv1" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def by_conv_bn_convention(model: nn.Module, state: dict) -> nn.Module | None:
    """`model` (a train-form instance) with `state` loaded the way people load fused files:
    every batch norm the file has no tensors for becomes Identity, every conv or linear without
    a bias gains the file's; None when that strict load fails (the names say they mean
    something else). Written apart from repconv's own check, to test it."""
    prefixes = {k.rpartition(".")[0] for k in state}
    for path, module in list(model.named_modules()):
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and path not in prefixes:
            setattr(owner, name, nn.Identity())
        elif _biasless(module) and f"{path}.bias" in state:
            module.bias = nn.Parameter(torch.empty(module.weight.shape[0]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        return None
    return model.eval()


def _biasless(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is None


def demo_state() -> dict[str, torch.Tensor]:
    """A float32 state dict of the demo net with trained-looking norms (seeded)."""
    from repconv.zoo.demo import DemoNet

    torch.manual_seed(0)
    return randomized(DemoNet(), dtype=torch.float32).state_dict()


def one_line(result) -> str:
    """The one error line of a CLI run that exited 2 (anything else fails the test)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
