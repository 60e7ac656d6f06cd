"""What the RepVGG release's `convert.py` does, as a route to measure repconv against.

Our own code for the release's steps (facts from its repository, no code of it): build the train
model, `torch.load` the checkpoint, load it, deep-copy the model, let every block fold itself in
float32 (each branch's BN folded into its kernel, the 1x1 padded to 3x3, the identity as a
kernel, summed into `rbr_reparam`), then `torch.save` the state dict. No check of any kind.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from repconv.zoo import registry
from repconv.zoo.blocks import RepVGGBlock


def _folded(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    return kernel * (bn.weight / std).reshape(
        -1, 1, 1, 1
    ), bn.bias - bn.running_mean * bn.weight / std


def _switch_to_deploy(block: RepVGGBlock) -> None:
    dense = block.rbr_dense
    kernel, bias = _folded(dense.conv.weight, dense.bn)
    k1, b1 = _folded(block.rbr_1x1.conv.weight, block.rbr_1x1.bn)
    kernel, bias = kernel + F.pad(k1, [1, 1, 1, 1]), bias + b1
    if block.rbr_identity is not None:
        per_group = block.in_channels // block.groups
        ident = torch.zeros(block.in_channels, per_group, 3, 3)
        for i in range(block.in_channels):
            ident[i, i % per_group, 1, 1] = 1
        ki, bi = _folded(ident, block.rbr_identity)
        kernel, bias = kernel + ki, bias + bi
    conv = dense.conv
    block.rbr_reparam = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True,
    )  # fmt: skip
    block.rbr_reparam.weight.data, block.rbr_reparam.bias.data = kernel, bias
    for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
        delattr(block, name)


def convert(name: str, source: Path, output: Path) -> None:
    model = registry.get_entry(name).factory()
    model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RepVGGBlock):
                _switch_to_deploy(module)
    torch.save(model.state_dict(), output)
