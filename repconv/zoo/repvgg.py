"""The RepVGG family, with the release's names, depths, widths, group maps and key layout.

Keys: `stage0` (one block), `stage1`..`stage4` (sequences of blocks), `gap`, `linear`; blocks
are RepVGGBlock (`rbr_dense`, `rbr_1x1`, `rbr_identity`, `se`; deploy `rbr_reparam`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from repconv.zoo.blocks import RepVGGBlock
from repconv.zoo.registry import register_model


class RepVGG(nn.Module):
    default_cfg: ClassVar[dict[str, Any]] = {"input_size": (3, 224, 224)}

    def __init__(
        self,
        num_blocks: Sequence[int],
        width_multiplier: Sequence[float],
        num_classes: int = 1000,
        groups_map: Mapping[int, int] | None = None,
        deploy: bool = False,
        use_se: bool = False,
    ):
        super().__init__()
        groups_map = dict(groups_map or {})
        self.deploy = deploy
        # The first stage never grows past 64 channels, whatever the multiplier.
        in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(
            3, in_planes, 3, stride=2, padding=1, deploy=deploy, use_se=use_se
        )
        layer = 1  # the release numbers blocks after stage0 from 1; groups_map keys use it
        stages = []
        for base, depth, multiplier in zip((64, 128, 256, 512), num_blocks, width_multiplier):
            planes = int(base * multiplier)
            blocks = []
            for i in range(depth):
                blocks.append(
                    RepVGGBlock(
                        in_planes,
                        planes,
                        3,
                        stride=2 if i == 0 else 1,
                        padding=1,
                        groups=groups_map.get(layer, 1),
                        deploy=deploy,
                        use_se=use_se,
                    )
                )
                in_planes = planes
                layer += 1
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stage0(x)))))
        return self.linear(self.gap(x).flatten(1))


_GROUPWISE_LAYERS = range(2, 27, 2)
_G2 = dict.fromkeys(_GROUPWISE_LAYERS, 2)
_G4 = dict.fromkeys(_GROUPWISE_LAYERS, 4)
_A, _B, _D = (2, 4, 14, 1), (4, 6, 16, 1), (8, 14, 24, 1)

# name: (depths, width multipliers, groups map, SE)
_VARIANTS: dict[str, tuple] = {
    "a0": (_A, (0.75, 0.75, 0.75, 2.5), None, False),
    "a1": (_A, (1, 1, 1, 2.5), None, False),
    "a2": (_A, (1.5, 1.5, 1.5, 2.75), None, False),
    "b0": (_B, (1, 1, 1, 2.5), None, False),
    "b1": (_B, (2, 2, 2, 4), None, False),
    "b1g2": (_B, (2, 2, 2, 4), _G2, False),
    "b1g4": (_B, (2, 2, 2, 4), _G4, False),
    "b2": (_B, (2.5, 2.5, 2.5, 5), None, False),
    "b2g2": (_B, (2.5, 2.5, 2.5, 5), _G2, False),
    "b2g4": (_B, (2.5, 2.5, 2.5, 5), _G4, False),
    "b3": (_B, (3, 3, 3, 5), None, False),
    "b3g2": (_B, (3, 3, 3, 5), _G2, False),
    "b3g4": (_B, (3, 3, 3, 5), _G4, False),
    "d2se": (_D, (2.5, 2.5, 2.5, 5), None, True),
}


def _register(variant: str, spec: tuple) -> None:
    depths, widths, groups, se = spec

    def factory(deploy: bool = False, num_classes: int = 1000) -> RepVGG:
        return RepVGG(depths, widths, num_classes, groups, deploy=deploy, use_se=se)

    factory.__name__ = f"repvgg_{variant}"
    factory.__doc__ = f"RepVGG-{variant.upper().replace('SE', 'se')} (RepVGG release)."
    register_model(family="RepVGG")(factory)


for _variant, _spec in _VARIANTS.items():
    _register(_variant, _spec)
