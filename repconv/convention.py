"""Names never lie: a deploy file read the way people read fused checkpoints means what it says.

People load a fused checkpoint into their own train class by a convention: every norm the file
has no tensors for becomes `Identity` (a timm norm-act module: its `drop` and `act`), and a conv
(or linear) without a bias gains the file's bias. A tensor may keep its train name only if the
train class's own forward, so loaded, computes with it what the train model computed. Whatever
needs repconv's rewritten forward must carry a name of its own, so that such a load fails
loudly (missing or unexpected keys) instead of computing something else in silence.

This is checked on every file before it is written: the deploy tensors are loaded into a copy of
the train architecture by the convention, for the whole model and block by block (each block's
tensors into that block's own class, so that a renamed block elsewhere, which makes the whole
load fail, cannot hide a lying one). A strict load that computes something else is a bug of
repconv's (`NamesLie`), never written.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from repconv.modules import (
    NormActTail,
    default_dtype,
    is_norm_act,
    is_norm_like,
    is_plain_conv,
    join_path,
)
from repconv.outputs import compare_outputs
from repconv.tolerances import EXACT_LIMIT


class NamesLie(RuntimeError):
    """Tensors that load into the train class by the convention and compute something else: an
    internal error (exit 3), nothing is written."""


@dataclass
class ConventionCheck:
    """How the file reads in the train class by the conv-BN convention."""

    loads: bool  # the whole file loads strictly into the train class
    error: float | None = None  # that model's relative error against the train model
    # the fused blocks whose own tensors load into their own class (and compute the same)
    blocks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "loads_into_train_class": self.loads,
            "error": self.error,
            "blocks_loading_into_their_class": len(self.blocks),
        }


def structure_of(model: nn.Module) -> nn.Module | None:
    """A copy of the model's structure with every parameter and buffer on the meta device
    (no values copied), taken before the conversion changes it; None if it cannot be copied."""
    memo: dict[int, Any] = {}
    for tensor in model.parameters():
        memo[id(tensor)] = nn.Parameter(
            torch.empty_like(tensor, device="meta"), requires_grad=tensor.requires_grad
        )
    for tensor in model.buffers():
        memo[id(tensor)] = torch.empty_like(tensor, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # a module deepcopy cannot copy: the check is not made
        return None


def loaded_by_convention(module: nn.Module, state: Mapping[str, Tensor]) -> nn.Module | None:
    """`module` (a structure copy) with `state` loaded strictly by the convention, or None
    when the names do not fit (the load would fail loudly)."""
    _apply_convention(module, state)
    try:
        module.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError:
        return None
    return module.eval()


def _apply_convention(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    prefixes = {key.rpartition(".")[0] for key in state}
    for path, child in list(module.named_modules()):
        if not path:
            continue
        if is_norm_like(child) and path not in prefixes:
            parent, _, name = path.rpartition(".")
            rest = NormActTail(child.drop, child.act) if is_norm_act(child) else nn.Identity()
            setattr(module.get_submodule(parent), name, rest)
        elif _biasless(child) and join_path(path, "bias") in state:
            width = child.weight.shape[0]
            child.bias = nn.Parameter(torch.empty(width, device="meta"))


def _biasless(module: nn.Module) -> bool:
    return (is_plain_conv(module) or type(module) is nn.Linear) and module.bias is None


# A block is probed at most this large in space: a lie shows at any size above the kernel.
PROBE_SIDE = 32


def check(
    structure: nn.Module | None,
    deploy: nn.Module,
    inputs: Sequence[Tensor],
    references: Sequence[Any],
    blocks: Mapping[str, Sequence[int]],
    written_limit: float,
) -> ConventionCheck | None:
    """Load the deploy model's tensors (held in the verification dtype, as the file will hold
    them) into `structure` by the convention, per block and whole; NamesLie when a strict load
    computes something else. It runs with torch's default dtype that of the inputs, as the
    verification does. `inputs` and `references` are the verification's (the first sample
    is used); `blocks` maps each fused block's path to the input shape it saw."""
    if structure is None:
        return None
    with default_dtype(inputs[0].dtype):
        return _check(structure, deploy, inputs, references, blocks, written_limit)


def _check(
    structure: nn.Module,
    deploy: nn.Module,
    inputs: Sequence[Tensor],
    references: Sequence[Any],
    blocks: Mapping[str, Sequence[int]],
    written_limit: float,
) -> ConventionCheck:
    state = deploy.state_dict()
    result = ConventionCheck(loads=False)
    for path, shape in blocks.items():
        if _block_matches(structure, deploy, state, path, shape, inputs[0].dtype):
            result.blocks.append(path)
    whole = loaded_by_convention(structure, state)
    if whole is not None:
        result.loads = True
        with torch.no_grad():
            result.error = max(compare_outputs(whole(inputs[0]), references[0]).values())
        if not result.error <= written_limit:
            raise NamesLie(
                "the deploy tensors load strictly into the train class by the conv-BN "
                f"convention and then compute something else (error {result.error:.3g}): "
                "their names lie"
            )
    return result


def _block_matches(
    structure: nn.Module,
    deploy: nn.Module,
    state: Mapping[str, Tensor],
    path: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> bool:
    """Whether the block's own tensors load into its own class; if they do, it must compute
    what the converted block computes with the same tensors (else NamesLie)."""
    prefix = f"{path}." if path else ""
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        block = copy.deepcopy(structure.get_submodule(path))
        converted = deploy.get_submodule(path)
    except (AttributeError, RuntimeError):
        return False
    block = loaded_by_convention(block, own)
    if block is None:
        return False
    probe = [1, *shape[1:2], *(min(side, PROBE_SIDE) for side in shape[2:])]
    x = torch.randn(probe, generator=torch.Generator().manual_seed(0), dtype=dtype)
    with torch.no_grad():
        error = max(compare_outputs(block(x), converted(x)).values(), default=0.0)
    if not error <= EXACT_LIMIT:
        raise NamesLie(
            f"block {path or '<root>'}'s tensors load strictly into its own class by the "
            f"conv-BN convention and then compute something else (error {error:.3g}): their "
            "names lie"
        )
    return True
