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
