"""A pickled training checkpoint written back in its own layout (issue 23).

Detector trainers save the whole model: `{'model': model.half(), 'ema': ..., 'optimizer': ...,
'epoch': ...}`, and their loaders (`detect.py`, `val.py`, `YOLO(...)`) read it back with
`torch.load(weights_only=False)`. This module knows that layout: which entries are models (every
top-level `nn.Module`, or the file itself), which are training state (dropped unless the user
keeps them: an optimizer's state refers to the train model's parameters, which fusing removes),
and how to write the converted file so that it is never left unloadable: the pickle is written
to a temp file, loaded back and checked there before it is renamed into place.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repconv.errors import BadInput
from repconv.files import replacing
from repconv.terminal import shown

WHOLE_FILE = ""  # the key of a file that pickles one module and nothing else
# Entries holding the state of training, not of the model: dropped by default.
TRAINING_STATE_KEYS = frozenset(
    {"optimizer", "optimizers", "optimizer_states", "scheduler", "lr_scheduler", "lr_schedulers"}
    | {"scaler", "grad_scaler", "amp"}
)
KEPT, CONVERTED, DROPPED = "kept", "converted", "dropped (training state)"


def models_in(container: Any) -> dict[str, nn.Module]:
    """The models a pickled file holds: the file itself, or its top-level `nn.Module` values,
    by key. One module under two keys is listed under both (it is converted once)."""
    if isinstance(container, nn.Module):
        return {WHOLE_FILE: container}
    if not isinstance(container, Mapping):
        return {}
    return {str(k): v for k, v in container.items() if isinstance(v, nn.Module)}


def is_training_state(key: str, value: Any) -> bool:
    """An optimizer's, a scheduler's or a grad scaler's state (by its key, or an optimizer
    state dict's shape under any key)."""
    if value is None:
        return False
    if key.lower() in TRAINING_STATE_KEYS:
        return True
    return isinstance(value, Mapping) and {"state", "param_groups"} <= set(value)


@dataclass
class Rewritten:
    """The file to write and what became of each of the input's entries."""

    container: Any
    entries: dict[str, str]


def rewritten(
    container: Any, converted: Mapping[str, nn.Module], keep_training_state: bool
) -> Rewritten:
    """The input's layout with each model replaced by its converted form; training state set
    to None (as the trainers' own `strip_optimizer` leaves it) unless kept."""
    if isinstance(container, nn.Module):
        return Rewritten(converted[WHOLE_FILE], {WHOLE_FILE: CONVERTED})
    out = copy.copy(container)  # same mapping type (dict, OrderedDict); values not copied
    entries = {}
    for key, value in container.items():
        name = str(key)
        if name in converted:
            out[key], entries[name] = converted[name], CONVERTED
        elif not keep_training_state and is_training_state(name, value):
            out[key], entries[name] = None, DROPPED
        else:
            entries[name] = KEPT
    return Rewritten(out, entries)


# The forward a detector's conv-BN unit switches to once its norm is folded (ultralytics, YOLOv5,
# YOLOv6: `forward_fuse`; yolov7: `fuseforward`), deleting the norm: their loaders fuse again at
# load time wherever the unit still `hasattr(m, "bn")`.
FUSED_FORWARDS = ("forward_fuse", "fuseforward")


def settle(model: nn.Module, folded_norms: Sequence[str], probe: Tensor | None) -> list[str]:
    """The converted model put in the form its framework's loader expects to find, when that
    loader fuses again at load time (`model.fuse()` in `attempt_load`, `fuse_model`): what it
    would fuse is already fused, and fusing again changes nothing. Returns what was changed.

    - each unit whose norm (`folded_norms`, paths) repconv folded into its conv, if its class
      has a fused forward of its own (`FUSED_FORWARDS`): the norm's slot is deleted and that
      forward installed, as the library's own fuse leaves it;
    - with a `probe` input: an implicit layer (one parameter `p`, computing `x + p` or
      `x * p`, as YOLOR's and yolov7's ImplicitA/ImplicitM) that the model no longer runs
      (a deploy method folded it into a conv) is set to its neutral value (0, 1), so the
      train class's own forward, and the method run again, compute what the model computes.
    The caller verifies the result (`write_checked`'s check).
    """
    changed = [_adopt_fused_forward(model, path) for path in folded_norms]
    if probe is not None:
        changed += _neutral_dead_implicits(model, probe)
    return [c for c in changed if c]


def _adopt_fused_forward(model: nn.Module, norm_path: str) -> str | None:
    owner_path, _, name = norm_path.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError:
        return None
    if type(getattr(owner, name, None)) is not nn.Identity or "forward" in vars(owner):
        return None
    method = next((m for m in FUSED_FORWARDS if callable(getattr(type(owner), m, None))), None)
    if method is None:
        return None
    delattr(owner, name)
    owner.forward = getattr(owner, method)
    return f"{owner_path or '<root>'}: {name} deleted, forward = {method}"


def _neutral_dead_implicits(model: nn.Module, probe: Tensor) -> list[str]:
    """Implicit layers the model's forward no longer calls, set to their neutral value. Only a
    model holding implicit layers is run (once, a float copy on the probe, to see which)."""
    implicit = {}
    for path, module in model.named_modules():
        neutral = implicit_neutral(module)
        if neutral is not None:
            implicit[path] = neutral
    if not implicit:
        return []
    twin = copy.deepcopy(model)
    for tensor in (*twin.parameters(), *twin.buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(probe.dtype)
    called: set[str] = set()
    hooks = [
        module.register_forward_hook(lambda *_, path=path: called.add(path))
        for path, module in twin.named_modules()
    ]
    try:
        with torch.no_grad():
            twin.eval()(probe)
    finally:
        for hook in hooks:
            hook.remove()
    changed = []
    for path, neutral in implicit.items():
        if path not in called:
            (param,) = model.get_submodule(path).parameters()
            with torch.no_grad():
                param.fill_(neutral)
            changed.append(f"{path}: not run any more, set to {neutral:g}")
    return changed


def implicit_neutral(module: nn.Module) -> float | None:
    """0 for a module computing `x + p`, 1 for `x * p` (its one parameter `p`), else None."""
    params = list(module.parameters())
    if list(module.children()) or len(params) != 1 or params[0].dim() == 0:
        return None
    p = params[0].detach().double()
    x = torch.randn((2, *p.shape[1:]), dtype=p.dtype, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = copy.deepcopy(module).double()(x)
    except Exception:
        return None
    if not isinstance(y, Tensor) or y.shape != torch.broadcast_shapes(x.shape, p.shape):
        return None
    if torch.allclose(y, x + p):
        return 0.0
    if torch.allclose(y, x * p):
        return 1.0
    return None


def refusal(output: Path, exc: BaseException) -> BadInput:
    """Why the converted models cannot be pickled, with what to write instead."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BadInput(
        f"cannot write {output.name} in the input's layout: the converted model cannot be "
        f"pickled ({shown(reason)}); write a .safetensors file, or the state dict alone "
        "with --state-dict-only"
    )


def write_checked(output: Path, container: Any, check: Callable[[Any], None]) -> None:
    """Pickle `container` into a temp file beside `output`, load it back (`weights_only=False`:
    the classes are the ones the input named, already imported) and `check` what was loaded;
    only then rename it into place. A pickle that fails to load is never left behind."""
    with replacing(output) as tmp:
        try:
            torch.save(container, tmp)
        except (TypeError, AttributeError, pickle.PicklingError) as exc:
            raise refusal(output, exc) from None
        try:
            loaded = torch.load(tmp, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise refusal(output, exc) from None
        check(loaded)


def check_same_tensors(what: str, written: nn.Module, loaded: Any) -> None:
    """The model loaded back is of the written class and holds exactly its tensors."""
    if type(loaded) is not type(written):
        raise RuntimeError(f"{what} loads back as {type(loaded).__name__}")
    ours, theirs = written.state_dict(), loaded.state_dict()
    if list(ours) != list(theirs):
        raise RuntimeError(f"{what} loads back with other keys")
    for key, tensor in ours.items():
        other = theirs[key]
        if other.dtype != tensor.dtype or not torch.equal(other, tensor):
            raise RuntimeError(f"{what}: {key} loads back changed")


def _forward_kind(module: nn.Module, graph_forward: type) -> str | None:
    """What an instance's own `forward` is: none, a method (named), or a rewritten graph's."""
    forward = vars(module).get("forward")
    if forward is None:
        return None
    owner = getattr(forward, "__self__", None)
    if isinstance(forward, graph_forward) or isinstance(owner, torch.fx.GraphModule):
        return "graph"
    return f"method {getattr(forward, '__name__', type(forward).__name__)}"


def check_same_forwards(what: str, written: nn.Module, loaded: nn.Module) -> bool:
    """Each module loaded back runs the forward it was written with (an instance's own
    `forward` survives pickling); whether any is a rewritten graph's (re-traced by torch when it
    loads), which only running it proves right."""
    from repconv.tracing import GraphForward

    theirs = dict(loaded.named_modules())
    graphs = False
    for path, module in written.named_modules():
        kind = _forward_kind(module, GraphForward)
        other = theirs.get(path)
        if other is None or _forward_kind(other, GraphForward) != kind:
            raise BadInput(f"{what}: {path or '<root>'} loads back with another forward")
        graphs = graphs or kind == "graph"
    return graphs


__all__ = [
    "CONVERTED",
    "DROPPED",
    "KEPT",
    "WHOLE_FILE",
    "Rewritten",
    "check_same_forwards",
    "check_same_tensors",
    "implicit_neutral",
    "is_training_state",
    "models_in",
    "rewritten",
    "settle",
    "write_checked",
]
