"""Registry of built-in architectures, usable as `--arch NAME`.

Each entry is a factory `fn(deploy: bool = False, **kwargs) -> nn.Module` registered with
`@register_model(family=...)`; the same factory builds the train form and the deploy form.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

# Modules that register models on import; imported lazily so `import repconv` stays cheap.
_MODEL_MODULES = ("repconv.zoo.demo", "repconv.zoo.repvgg", "repconv.zoo.dbb_nets")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    factory: Callable[..., nn.Module]
    description: str


_entries: dict[str, ZooEntry] = {}
_loaded = False
_loading = threading.RLock()


def register_model(
    family: str, name: str | None = None, description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or factory.__name__
        if key in _entries and _entries[key].factory is not factory:
            raise ValueError(f"zoo model {key!r} is already registered")
        first_line = (factory.__doc__ or "").strip().split("\n", 1)[0]
        _entries[key] = ZooEntry(key, family, factory, description or first_line)
        return factory

    return decorate


def _load() -> None:
    """Import the model modules once. Threads (a Dask worker converts two entries at once) wait
    for the first to finish: marking the registry loaded before its imports ran let another
    thread see it empty ("demo_mixed is not a built-in model")."""
    global _loaded
    if _loaded:
        return
    with _loading:  # re-entrant: a model module may look an entry up while it is imported
        if not _loaded:
            for module in _MODEL_MODULES:
                importlib.import_module(module)
            _loaded = True


def list_models() -> list[str]:
    _load()
    return sorted(_entries)


def get_entry(name: str) -> ZooEntry | None:
    _load()
    return _entries.get(name)


def build(name: str, deploy: bool = False, **kwargs) -> nn.Module:
    entry = get_entry(name)
    if entry is None:
        raise KeyError(name)
    return entry.factory(deploy=deploy, **kwargs)
