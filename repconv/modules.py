"""Facts about modules, the ground floor every pass and the engine stand on.

Which children are plain convs, which norms fold exactly (and why not), which are a norm plus
an activation; module paths, parameter counts, a module's dtype, a norm's corrupt statistics.
Recognised by structure (types, stock forwards, tensors), never by class name alone, so copies
of a block in any codebase are recognised too. Nothing here imports a pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from repconv.paths import join_path as join_path  # re-exported: the passes' path helper

_PLAIN_CONV_FORWARDS = {cls.forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
_PLAIN_NORM_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
CONV_BY_DIMS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def is_plain_conv(module: Any) -> bool:
    """A torch conv whose forward is the stock one (not transposed, no dynamic padding)."""
    return (
        isinstance(module, _ConvNd)
        and not module.transposed
        and type(module).forward in _PLAIN_CONV_FORWARDS
        and type(module)._conv_forward is CONV_BY_DIMS[len(module.kernel_size)]._conv_forward
    )


def _has_frozen_norm_tensors(module: Any) -> bool:
    """Named like a frozen batch norm, with its four buffers and a float `eps`."""
    if isinstance(module, _BatchNorm) or not isinstance(module, nn.Module):
        return False
    names = set(module._buffers)
    return (
        "FrozenBatchNorm" in type(module).__name__
        and {"weight", "bias", "running_mean", "running_var"} <= names
        and isinstance(getattr(module, "eps", None), float)
    )


def is_frozen_norm(module: Any) -> bool:
    """Frozen batch norms (torchvision, detectron2): buffers only, the same eval formula.

    One with children (timm's FrozenBatchNormAct2d: `drop`, `act`) is not: it does more than
    normalise, and only `is_norm_act` may accept it.
    """
    return _has_frozen_norm_tensors(module) and not module._modules


def norm_problem(module: Any, *, with_act: bool = False) -> str | None:
    """Why this batch-norm-like module cannot be folded, or None if it can.

    `with_act`: a norm-plus-activation module (`is_norm_act`) counts as foldable; only the
    conv -> BN pass may say so, as it alone keeps the `drop` and `act` that follow the norm.
    """
    if is_frozen_norm(module):
        return None
    if _has_frozen_norm_tensors(module):
        if with_act and is_norm_act(module):
            return None
        return f"{type(module).__name__} applies more than the norm (it has children)"
    if not isinstance(module, _BatchNorm):
        return "not a batch norm"
    plain = type(module).forward in _PLAIN_NORM_FORWARDS
    if not plain and not (with_act and is_norm_act(module)):
        return f"{type(module).__name__} overrides forward (adds behaviour to batch norm)"
    if not module.track_running_stats or module.running_var is None:
        return "uses batch statistics even in eval (track_running_stats=False)"
    return None


def is_foldable_norm(module: Any, *, with_act: bool = False) -> bool:
    return norm_problem(module, with_act=with_act) is None


_NORM_ACT_CHILDREN = {"drop", "act"}
_BN_PARAMETERS = {"weight", "bias"}
_BN_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}
_PROBE_SHAPES = {nn.BatchNorm1d: (2, -1, 3), nn.BatchNorm3d: (2, -1, 2, 2, 2)}


def is_norm_act(module: Any) -> bool:
    """A norm-plus-activation module (timm's BatchNormAct2d and kin, and FrozenBatchNormAct2d):
    a batch norm subclass or a frozen batch norm whose only children are `drop` and `act`, with
    no tensor of its own beyond the norm's, and whose forward computes exactly
    `act(drop(batch_norm(x)))` in eval mode.

    Any other override of forward is refused. The forward is judged on a surrogate (a copy
    holding synthetic statistics), never on the module's own tensors, so the answer is the same
    for a model on the meta device (load_deploy's rebuild) as for the trained one.
    """
    if set(getattr(module, "_modules", ())) != _NORM_ACT_CHILDREN:
        return False
    if None in module._modules.values() or not _norm_act_tensors(module):
        return False
    try:
        with torch.device("cpu"):  # the probe's tensors are real even inside a meta build
            return _computes_norm_then_act(module)
    except Exception:  # a forward that cannot run on the surrogate is not the norm-act shape
        return False


def _norm_act_tensors(module: nn.Module) -> bool:
    """A batch norm subclass holding only batch norm's tensors (with running statistics), or a
    frozen norm (timm's FrozenBatchNormAct2d) holding only its four buffers."""
    if _has_frozen_norm_tensors(module):
        return not module._parameters and set(module._buffers) <= _BN_BUFFERS | _BN_PARAMETERS
    if not isinstance(module, _BatchNorm) or type(module).forward in _PLAIN_NORM_FORWARDS:
        return False
    if not (set(module._parameters) <= _BN_PARAMETERS and set(module._buffers) <= _BN_BUFFERS):
        return False
    return module.track_running_stats and module.running_var is not None


def _computes_norm_then_act(module: nn.Module) -> bool:
    surrogate = copy.deepcopy(module).to_empty(device="cpu").to(torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*surrogate.named_parameters(), *surrogate.named_buffers()]:
            if tensor.is_floating_point():
                low = -1.0 if name.endswith(("running_mean", "bias")) else 0.5
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + low)
        shape = next((s for c, s in _PROBE_SHAPES.items() if isinstance(module, c)), (2, -1, 3, 3))
        width = surrogate.running_mean.numel()
        x = torch.randn(tuple(width if n == -1 else n for n in shape), generator=generator)
        x = x.to(torch.float64)
        expected = surrogate.act(surrogate.drop(_plain_batch_norm(surrogate, x.clone())))
        got = surrogate(x.clone())
    scale = float(expected.abs().max()) or 1.0
    return got.shape == expected.shape and float((got - expected).abs().max()) <= 1e-12 * scale


def _plain_batch_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    affine = getattr(norm, "affine", True)  # a frozen norm has no flag: always affine
    weight = norm.weight if affine else None
    bias = norm.bias if affine else None
    return nn.functional.batch_norm(
        x, norm.running_mean, norm.running_var, weight, bias, False, 0.0, norm.eps
    )


class NormActTail(nn.Module):
    """What a norm-plus-activation module becomes once its norm is folded into the conv before
    it: its own `drop` and `act`, applied in that order (their keys keep their names)."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def is_norm_like(module: Any) -> bool:
    """Anything that normalises with batch statistics: candidates for warnings when left behind."""
    return isinstance(module, _BatchNorm) or _has_frozen_norm_tensors(module)


def conv_bn_unit(module: Any) -> tuple[nn.Module, nn.Module] | None:
    """The (conv, norm) of a conv-then-norm unit: children conv/bn, or a 2-element Sequential."""
    if not isinstance(module, nn.Module):
        return None
    children = dict(module.named_children())
    if set(children) == {"conv", "bn"}:
        conv, norm = children["conv"], children["bn"]
    elif isinstance(module, nn.Sequential) and len(children) == 2:
        conv, norm = list(children.values())
    else:
        return None
    if is_plain_conv(conv) and is_norm_like(norm):
        return conv, norm
    return None


def put_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Install `module` at `path`; at the root, the model itself takes the module's state."""
    if not path:
        if module is not model:
            model.__class__ = module.__class__
            object.__setattr__(model, "__dict__", module.__dict__)
        return
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def holds_unclaimed(
    module: nn.Module, claimed: AbstractSet[int], wanted: Callable[[nn.Module], bool]
) -> bool:
    """Whether a `wanted` module sits in `module` outside every claimed one (ids): a find pass
    with nothing left to look at need not trace the model (a RepVGG net after the rules)."""
    if id(module) in claimed:
        return False
    return wanted(module) or any(holds_unclaimed(c, claimed, wanted) for c in module.children())


def floating_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating tensor (parameters, then buffers), if any."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return None


@contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """torch's default dtype set to `dtype` while active (float32 for the half dtypes, the only
    other default torch allows; None leaves it as it is), restored after. Code that builds
    tensors without a dtype (`torch.zeros(...)` in a forward or a deploy method) then builds
    them in the dtype of the tensors it meets. The one place repconv sets torch's default."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def corrupt_statistics(norm: nn.Module) -> tuple[int, int] | None:
    """(bad, channels) when a norm's running statistics hold values no trained model has (NaN,
    Inf, a negative variance); None when they are sound or not there (no statistics, meta)."""
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if mean is None or var is None or var.device.type == "meta":
        return None
    bad = ~torch.isfinite(var) | (var < 0) | ~torch.isfinite(mean)
    count = int(bad.sum())
    return (count, var.numel()) if count else None


def kernel_extent(module: nn.Module) -> tuple[int, ...] | None:
    """The widest window any conv in `module` reads, per spatial dim: (k - 1) * dilation + 1
    (None: no conv). A fold is seen whole only where a block's input is at least about half
    that wide: narrower, its outer taps read only padding."""
    extents = [
        tuple((k - 1) * d + 1 for k, d in zip(m.kernel_size, m.dilation))
        for m in module.modules()
        if isinstance(m, _ConvNd)
    ]
    if len({len(e) for e in extents}) != 1:  # none, or convs of different dims
        return None
    return tuple(map(max, zip(*extents)))
