"""What the user's deploy model keeps of the train model, so the plan leaves it as it is.

A deploy class often keeps some train modules live: a plain conv + BN pair (yolov7's `Conv` in a
`deploy=True` model, RT-DETR's `ConvNormLayer`), a post-sum BN after the fused conv (YOLOv6's
QARepVGGBlock), a layer scale. Folding those would leave the deploy model with tensors nothing
fills. A module is kept when the deploy model has it at the train path with tensors of the same
names and shapes (`deploy_map.kept_modules`) and its forward runs it. Dead branches a deploy
class still builds (RT-DETR keeps `conv1` and `conv2` beside the fused `conv`) are not run: they
constrain nothing, and are filled with their train values when the deploy model is filled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from repconv import deploy_map


def kept_by(deploy_model: nn.Module, train_model: nn.Module, shape: Sequence[int]) -> list[str]:
    """The train modules the plan must keep for `deploy_model` (fed inputs of `shape`)."""
    candidates = deploy_map.kept_modules(_shapes(train_model), _shapes(deploy_model))
    if not candidates:
        return []
    run = _run_by_forward(deploy_model, candidates, shape)
    return [path for path in candidates if path in run]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _run_by_forward(model: nn.Module, paths: Sequence[str], shape: Sequence[int]) -> set[str]:
    """The modules among `paths` that the model's forward runs, found on an input of no values
    (the meta device). A module counts as run when it or any module under it is called: a
    ModuleList or ModuleDict is indexed, never called itself (RepLKNet's `stem`, `stages`).
    A forward that cannot run so (it reads values) tells nothing: every module is taken as
    run, the safe side (kept, filled from the train checkpoint)."""
    seen: set[str] = set()
    wanted = set(paths)
    handles = []
    for name, module in model.named_modules():
        found = tuple(path for path in _scopes(name) if path in wanted)
        if found:
            hook = module.register_forward_pre_hook(lambda *_a, found=found: seen.update(found))
            handles.append(hook)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    try:
        with torch.no_grad():
            model(
                torch.empty(
                    (1, *shape), device="meta" if device.type == "meta" else device, dtype=dtype
                )
            )
    except Exception:  # the forward needs values: no answer, keep them all
        return set(paths)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _scopes(path: str) -> list[str]:
    """The module paths `path` is inside, itself included ("a.b" -> "", "a", "a.b")."""
    parts = path.split(".") if path else []
    return [".".join(parts[:n]) for n in range(len(parts) + 1)]
