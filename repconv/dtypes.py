"""The dtype policy: which dtype a model is held in while it is checked, and written in after.

One rule throughout: a deploy key keeps the dtype it had in the train checkpoint, and a key the
fusion creates takes the dtype of the block it came from. While verifying, every floating tensor
is held in the verification dtype (float64 by default), which must hold the checkpoint's weights
exactly since they are fused while held in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from repconv import pages
from repconv.errors import BadInput

if TYPE_CHECKING:
    from repconv.engine import Plan

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

DtypeFor = Callable[[str], torch.dtype]


def named(dtype: torch.dtype | str) -> torch.dtype:
    """A dtype given by name ("float64") or as itself."""
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def of_keys(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every state-dict key, as the model holds it now."""
    return {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}


def output_dtypes(original: Mapping[str, torch.dtype], plan: Plan) -> DtypeFor:
    """Which dtype each deploy key is written in: its own, or that of the block it came from."""
    floating = [d for d in original.values() if d.is_floating_point]
    fallback = max(set(floating), key=floating.count) if floating else torch.float32
    by_block: dict[str, torch.dtype] = {}
    for entry in plan.entries:
        prefix = f"{entry.path}." if entry.path else ""
        for key, dtype in original.items():
            if key.startswith(prefix) and dtype.is_floating_point:
                by_block[entry.path] = dtype
                break

    def dtype_for(key: str) -> torch.dtype:
        if key in original:
            return original[key]
        owners = [p for p in by_block if not p or key.startswith(f"{p}.")]
        return by_block[max(owners, key=len)] if owners else fallback

    return dtype_for


def written_dtypes(model: nn.Module, dtype_for: DtypeFor) -> set[torch.dtype]:
    """The floating dtypes the deploy file will hold."""
    return {dtype_for(k) for k, v in model.state_dict().items() if v.is_floating_point()}


def holds_exactly(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Every `narrow` value is a `wide` value (finer steps, a range at least as large)."""
    w, n = torch.finfo(wide), torch.finfo(narrow)
    return w.eps <= n.eps and w.max >= n.max and w.smallest_normal <= n.smallest_normal


def check_holds_weights(verify_dtype: torch.dtype, dtypes: Iterable[torch.dtype]) -> None:
    """The weights are held in the verification dtype while they are fused: never round them."""
    held = {name_of(d) for d in DTYPES.values() if holds_exactly(verify_dtype, d)}
    lost = sorted({name_of(d) for d in dtypes if d.is_floating_point} - held)
    if lost:
        raise BadInput(
            f"--verify-dtype {name_of(verify_dtype)} cannot hold the checkpoint's "
            f"{', '.join(lost)} weights exactly, and they are fused while held in it; use "
            "float64 (the default) or the checkpoint's own dtype"
        )


def cast_in_place(model: nn.Module, dtype_for: DtypeFor, hold: torch.dtype | None = None) -> None:
    """Round every floating tensor to the dtype it is written in; hold it in `hold` if given.

    With `hold=float64` the model computes with exactly the values the file will contain. Each
    replaced tensor's pages go back as soon as its copy exists, so a memory-mapped model is never
    resident in both dtypes at once.
    """
    with pages.PageReleaser() as releaser:
        for module_path, module in model.named_modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is None or not tensor.is_floating_point():
                        continue
                    key = f"{module_path}.{name}" if module_path else name
                    value = tensor.detach().to(dtype_for(key))
                    if hold is not None:
                        value = value.to(hold)
                    if value is tensor or value.data_ptr() == tensor.data_ptr():
                        continue  # already in that dtype
                    replaced = tensor.detach()
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = value
                    else:
                        store[name] = value
                    releaser.release([replaced])


def hold_all_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold every floating tensor in `dtype` (the verification dtype)."""
    cast_in_place(model, lambda _key: dtype)
