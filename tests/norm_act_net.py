"""Our own copy of a timm-style norm-plus-activation module and a small net that uses it.

Like timm's BatchNormAct2d: a BatchNorm2d subclass holding `drop` and `act` children, whose
forward applies the batch norm (re-implemented, not `super().forward`), then drop, then act.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormAct2d(nn.BatchNorm2d):
    def __init__(self, channels: int, act: nn.Module | None = None):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or self.running_mean is None
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            use_batch,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class ScaledNormAct2d(NormAct2d):
    """Same children, but its forward changes the math: it must not be folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.5 * super().forward(x)


def build(norm_act: type[NormAct2d] = NormAct2d) -> nn.Module:
    """conv -> NormAct(ReLU) -> conv -> NormAct(Identity)."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        norm_act(6, nn.ReLU(inplace=True)),
        nn.Conv2d(6, 4, 3, padding=1, bias=False),
        norm_act(4),
    )


class FrozenBatchNormAct2dCopy(nn.Module):
    """Like timm's FrozenBatchNormAct2d: not a BatchNorm subclass; buffers only, an `eps`, and
    `drop` + `act` children applied after the frozen norm's scale and shift."""

    def __init__(self, channels: int, act: nn.Module | None = None, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.weight * (self.running_var + self.eps).rsqrt()).reshape(1, -1, 1, 1)
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return self.act(self.drop(x * scale + shift))


class ShiftedFrozenBatchNormAct2dCopy(FrozenBatchNormAct2dCopy):
    """Same tensors and children, other math: must not be folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.25


def build_frozen(kind: str = "plain") -> nn.Module:
    """conv -> FrozenNormAct(ReLU) -> conv -> FrozenNormAct(Identity)."""
    norm_act = {"plain": FrozenBatchNormAct2dCopy, "shifted": ShiftedFrozenBatchNormAct2dCopy}[kind]
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        norm_act(6, nn.ReLU(inplace=True)),
        nn.Conv2d(6, 4, 3, padding=1, bias=False),
        norm_act(4),
    )
