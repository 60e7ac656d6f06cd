"""Resolving `--arch` and building a model around a loaded state dict.

A spec is `package.module:callable`, `path/to/file.py:callable`, or a built-in zoo name. Models
are built on the meta device and the loaded tensors are assigned, so no time goes into random
initialisation of weights that are about to be overwritten; a model that cannot be built that way
(or keeps meta tensors outside its state dict) is rebuilt normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repconv.errors import BadInput
from repconv.options import parse_kwargs  # noqa: F401  (re-exported)
from repconv.zoo import registry as zoo

MAX_KEYS_SHOWN = 5


def _import_file(path: Path, flag: str) -> Any:
    if not path.is_file():
        raise BadInput(f"{flag}: file {path} does not exist")
    name = f"repconv_arch_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Research repos import their sibling files; make them importable while this one loads.
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise BadInput(f"{flag}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def resolve(spec: str, flag: str = "--arch") -> Callable[..., nn.Module]:
    """The callable that builds the model named by `spec` (given as `flag`, for messages)."""
    entry = zoo.get_entry(spec)
    if entry is not None:
        return entry.factory
    if ":" not in spec:
        known = ", ".join(zoo.list_models())
        raise BadInput(
            f"{flag} {spec!r} is not a built-in model ({known}) nor of the form "
            "'package.module:callable' or 'path/to/file.py:callable'"
        )
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(Path(where), flag)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise BadInput(f"{flag}: cannot import {where!r}: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise BadInput(f"{flag}: {where!r} has no attribute {attr!r}")
    if not callable(target):
        raise BadInput(f"{flag}: {spec!r} is not callable")
    return target


def _construct(
    factory: Callable[..., nn.Module], kwargs: Mapping[str, Any], spec: str, flag: str = "--arch"
) -> nn.Module:
    try:
        model = factory(**kwargs)
    except SystemExit as exc:  # a builder that exits must never read as a finished command
        raise BadInput(f"{flag} {spec}: the builder called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise BadInput(
            f"{flag} {spec}: building the model failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise BadInput(f"{flag} {spec}: the callable returned {type(model).__name__}, not a Module")
    return model


def _has_meta_tensors(model: nn.Module) -> bool:
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values()]
        tensors += [v for v in vars(module).values() if isinstance(v, Tensor)]
        if any(t is not None and t.is_meta for t in tensors):
            return True
    return False


CONVERTIBLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _filled_in_by_torch(model: nn.Module) -> set[str]:
    """Keys load_state_dict accepts missing: the batch counters of norms tracking statistics.

    torch's norms add `num_batches_tracked` themselves when a state dict has none (state dicts
    from before it existed), so a checkpoint without them loads strictly all the same.
    """
    return {
        f"{path}.num_batches_tracked" if path else "num_batches_tracked"
        for path, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
    }


def check_fit(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str,
    others: Mapping[str, Collection[str]] | None = None,
) -> None:
    """Raise BadInput naming up to five missing and unexpected keys, and shape mismatches (with
    a hint when every unexpected key shares one prefix, or when one of `others`, the keys of
    the file's other nested entries, fits); then any tensor in a dtype repconv does not convert
    where the model holds floats."""
    expected = model.state_dict()
    optional = _filled_in_by_torch(model)
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if wrong:
        problems.append(f"{len(wrong)} with another shape ({_few(wrong)})")
    if problems:
        hint = _fit_hint(set(expected), optional, unexpected, others or {})
        raise BadInput(f"{what} does not fit the architecture: keys " + "; ".join(problems) + hint)
    _check_dtypes(expected, state_dict, what)


def _fit_hint(
    expected: set[str],
    optional: Collection[str],
    unexpected: list[str],
    others: Mapping[str, Collection[str]],
) -> str:
    """What would fit instead: another nested entry of the file, or the keys without the one
    prefix every unexpected key carries (Lightning saves its module's attribute, `model.`)."""
    needed = expected - set(optional)
    for name, keys in others.items():
        if needed <= set(keys) <= expected:
            return f"; the file's entry {name!r} fits: pass --key {shlex.quote(name)}"
    heads = {k.partition(".")[0] for k in unexpected if "." in k}
    if len(heads) == 1 and all("." in k for k in unexpected):
        prefix = f"{heads.pop()}."
        fitting = sum(k.removeprefix(prefix) in expected for k in unexpected)
        if fitting:
            return (
                f"; every unexpected key starts with {prefix!r}, and {fitting} of them fit "
                f"without it (a wrapper's attribute, as Lightning's `model.`): save the state "
                f"dict without it, {{k.removeprefix({prefix!r}): v for k, v in sd.items()}}"
            )
    return ""


def _check_dtypes(
    expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], what: str
) -> None:
    """Integer (quantized) or float8 tensors where the model holds floats cannot be folded."""
    wrong = [
        k
        for k, v in expected.items()
        if k in state_dict
        and v.is_floating_point()
        and state_dict[k].dtype not in CONVERTIBLE_DTYPES
    ]
    if not wrong:
        return
    dtypes = sorted({str(state_dict[k].dtype).removeprefix("torch.") for k in wrong})
    tensors = "tensor" if len(wrong) == 1 else f"{len(wrong)} tensors"
    allowed = "/".join(str(d).removeprefix("torch.") for d in CONVERTIBLE_DTYPES)
    raise BadInput(
        f"{what}: {tensors} {_few(wrong)} {'is' if len(wrong) == 1 else 'are'} "
        f"{'/'.join(dtypes)}; repconv converts floating checkpoints ({allowed})"
    )


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_KEYS_SHOWN])
    return shown + (", ..." if len(items) > MAX_KEYS_SHOWN else "")


def build_loaded(
    spec: str,
    kwargs: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    *,
    what: str = "the checkpoint",
    prepare: Callable[[nn.Module], Any] | None = None,
    others: Mapping[str, Collection[str]] | None = None,
) -> nn.Module:
    """Build the model named by `spec` and load `state_dict` into it strictly, in eval mode.

    `prepare`, if given, runs on the freshly built model before loading (the deploy loader uses it
    to rewrite the train structure into its deploy form). `others`: the keys of the file's other
    nested entries, named in the error when one of them fits (`check_fit`).
    """
    factory = resolve(spec)
    model = _build_on_meta(factory, kwargs, spec, prepare)
    if model is not None:
        try:
            check_fit(model, state_dict, what, others)
        except BadInput:
            # `prepare` may take another path on meta than on real values (a deploy method
            # that cannot run without them); the normal build below decides, and says why.
            model = None
    if model is not None:
        model.load_state_dict(state_dict, strict=True, assign=True)
        if _has_meta_tensors(model):
            model = None
    if model is None:
        # Every tensor is loaded from the checkpoint below; but `prepare` (the deploy rebuild)
        # plans on the values it finds, which must then be finite: those are initialised.
        with skipping_init() if prepare is None else nullcontext():
            model = _construct(factory, kwargs, spec)
        if prepare is not None:
            prepare(model)
        check_fit(model, state_dict, what, others)
        try:  # assigned, as on meta: the tensors keep the checkpoint's dtypes (float16 stays)
            model.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise BadInput(f"{what} does not fit the architecture: {first}") from None
    return model.eval()


def build_empty(spec: str, kwargs: Mapping[str, Any], flag: str = "--deploy-arch") -> nn.Module:
    """The model named by `spec`, its tensors to be assigned, in eval mode: built on the meta
    device, or, where its constructor needs values (`.item()` on a tensor it makes in
    `__init__`, as RepLKNet's and UniRepLKNet's do), on the CPU with initialisation skipped."""
    factory = resolve(spec, flag)
    try:
        with torch.device("meta"):
            model = _construct(factory, kwargs, spec, flag)
    except BadInput:
        with skipping_init():
            model = _construct(factory, kwargs, spec, flag)
    return model.eval()


# torch.nn.init's in-place initialisers: what `reset_parameters` calls.
_INITIALISERS = tuple(
    name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")
)


@contextmanager
def skipping_init() -> Iterator[None]:
    """While active, torch.nn.init's initialisers leave their tensor as it is: a model whose
    every tensor is about to be assigned or loaded spends no random initialisation on them.
    (A constructor that imported an initialiser by name still runs it: slower, not wrong.)"""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in saved:
            setattr(nn.init, name, _left_as_it_is)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _left_as_it_is(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return tensor


def _build_on_meta(
    factory: Callable[..., nn.Module],
    kwargs: Mapping[str, Any],
    spec: str,
    prepare: Callable[[nn.Module], Any] | None,
) -> nn.Module | None:
    """The model built without initialising weights, or None if it cannot be built that way."""
    try:
        with torch.device("meta"):
            model = _construct(factory, kwargs, spec)
            if prepare is not None:
                prepare(model)
    except Exception:
        return None
    return model


def default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The model's own configured input size, else first conv's channels at 224 (per dim)."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            return tuple(int(v) for v in cfg["input_size"])
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = len(module.kernel_size)
            spatial = {1: (224,), 2: (224, 224), 3: (16, 112, 112)}[dims]
            return (module.in_channels, *spatial)
        if isinstance(module, nn.Linear):
            return (module.in_features,)
    raise BadInput("cannot guess the model's input shape; pass --input-shape, e.g. 3,224,224")


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first conv or linear layer in the model's registration order, with its path.

    Registration order is the order of `forward` in nearly every model; it is only used to read
    an input shape and to explain a rejected one, never to judge a conversion.
    """
    for path, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            return path, module
    return None


def input_shape_for(model: nn.Module, given: Sequence[int] | None) -> list[int]:
    """The input shape without batch that the workflows use, from `--input-shape` or the model.

    `given` may be C,H,W or N,C,H,W (ONNX's and trtexec's form). The first conv decides: a
    shape with one more size than the conv's C + spatial dims is read as N,C,...; N is then
    dropped, since verification runs `--samples` inputs of batch 1 and bench has its own
    `--batch-sizes`. With no conv first (a linear or nothing), the shape is taken as written.
    """
    if not given:
        return list(default_input_shape(model))
    shape = list(given)
    found = first_layer(model)
    layer = found[1] if found is not None else None
    is_conv = isinstance(layer, nn.modules.conv._ConvNd)
    if is_conv and len(shape) == len(layer.kernel_size) + 2:
        return shape[1:]
    return shape


def rejected_input(model: nn.Module, shape: Sequence[int], error: str, given: bool) -> str:
    """Why the model could not run on inputs of `shape` (batch included), in one line.

    Names the shape the first layer expects when that explains it; suggests --input-shape
    only to a user who did not set it.
    """
    shape = list(shape)
    suggestion = "" if given else " (set --input-shape, e.g. 3,224,224)"
    found = first_layer(model)
    if found is not None:
        path, layer = found
        where = path or "(root)"
        if isinstance(layer, nn.modules.conv._ConvNd):
            want, dims = layer.in_channels, len(layer.kernel_size)
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}.get(dims, "...")
            if len(shape) != dims + 2 or shape[1] != want:
                return (
                    f"the model expects {want} input channels as [N, {want}, {spatial}] "
                    f"(first conv {where}), got input shape {shape}{suggestion}"
                )
        elif not shape or shape[-1] != layer.in_features:
            want = layer.in_features
            return (
                f"the model expects {want} input features as [..., {want}] "
                f"(first linear {where}), got input shape {shape}{suggestion}"
            )
    return f"the model cannot run on inputs of shape {shape}: {error}{suggestion}"
