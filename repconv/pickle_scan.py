"""What a zip checkpoint's pickle holds, read without running any of it (torch-free).

Only for messages: when torch.load(weights_only=True) refuses a global, this tells which
top-level keys hold the refused values and which hold tensors. Every global the pickle names
becomes an inert stand-in (a dict that remembers the name and ignores its arguments), storages
become None: no module is imported, no function of the file's choosing is called.
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAX_PICKLE = 64 << 20  # a larger data.pkl is not scanned (the message just says less)
_MAX_DEPTH = 32
_MAX_NODES = 200_000
_TENSOR_REBUILDERS = ("torch._utils._rebuild_tensor", "torch._utils._rebuild_parameter")
# numpy values training scripts save beside the weights (a `best_acc`): a scalar rebuilt from
# its dtype and bytes. Unpickling them imports only numpy and builds a number.
_NUMPY_VALUES = re.compile(r"numpy\.(_?core\.multiarray\.scalar|dtype|dtypes\.\w+DType)")


def numpy_values(names: Collection[str]) -> list[Any] | None:
    """The numpy globals named, as objects, when every one is a numpy value's (a scalar, a
    dtype); None if any is something else or cannot be imported."""
    found = []
    for name in names:
        if not _NUMPY_VALUES.fullmatch(name):
            return None
        module, _, attr = name.rpartition(".")
        try:
            with warnings.catch_warnings():  # numpy.core is numpy._core's deprecated alias
                warnings.simplefilter("ignore")
                found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return None
    return found + _numeric_dtype_classes() if found else found


def _numeric_dtype_classes() -> list[Any]:
    """numpy's dtype classes of numbers and booleans: a pickled dtype is rebuilt through its
    class (`numpy.dtypes.Float64DType`), which the pickle does not name as a global."""
    try:
        import numpy
        from numpy import dtypes
    except ImportError:
        return []
    kinds = (numpy.number, numpy.bool_)
    return [
        cls
        for cls in vars(dtypes).values()
        if isinstance(cls, type)
        and isinstance(getattr(cls, "type", None), type)
        and issubclass(cls.type, kinds)
    ]


class _Inert(dict):
    """Stands for an object of any global: accepts every argument and state, does nothing."""

    global_name = ""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, _state: Any) -> None:
        pass

    def append(self, _item: Any) -> None:
        pass

    def extend(self, _items: Any) -> None:
        pass


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Inert,), {"global_name": f"{module}.{name}"})

    def persistent_load(self, _pid: Any) -> None:
        return None


@dataclass(frozen=True)
class TopLevel:
    """Of a pickled top-level mapping: the refused globals under each key, and the keys whose
    value is a state dict."""

    refused: dict[str, tuple[str, ...]]
    weights: tuple[str, ...]


def top_level(path: str | Path, refused: Collection[str]) -> TopLevel | None:
    """Which top-level keys of the zip checkpoint at `path` hold the globals in `refused`, and
    which hold tensors; None when that cannot be told (not a zip, not a mapping, too big)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if name is None or archive.getinfo(name).file_size > _MAX_PICKLE:
                return None
            data = archive.read(name)
        top = _InertUnpickler(io.BytesIO(data)).load()
    except Exception:  # any damage: the message says less, nothing more
        return None
    if not isinstance(top, dict) or isinstance(top, _Inert):
        return None
    wanted = set(refused)
    holding = {}
    for key, value in top.items():
        found = sorted(_globals_in(value, wanted))
        if found:
            holding[str(key)] = tuple(found)
    weights = tuple(str(k) for k, v in top.items() if _holds_tensors(v))
    return TopLevel(holding, weights)


def _globals_in(value: Any, wanted: set[str]) -> set[str]:
    """The names in `wanted` of the stand-ins anywhere inside `value` (bounded walk)."""
    found: set[str] = set()
    stack, seen = [(value, 0)], 0
    while stack and seen < _MAX_NODES:
        item, depth = stack.pop()
        seen += 1
        if isinstance(item, _Inert) and item.global_name in wanted:
            found.add(item.global_name)
        if depth >= _MAX_DEPTH:
            continue
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in item)
    return found


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, dict) and any(
        isinstance(v, _Inert) and v.global_name.startswith(_TENSOR_REBUILDERS)
        for v in value.values()
    )
