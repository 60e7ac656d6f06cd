"""Module paths as torch names them ("blocks.3.conv"; "" is the model itself), torch-free."""

from __future__ import annotations


def join_path(prefix: str, path: str) -> str:
    """A module path under `prefix`; either may be "" (the module itself, the root)."""
    return f"{prefix}.{path}" if prefix and path else prefix or path


def within(path: str, scope: str) -> bool:
    """Whether `path` is the module at `scope` or inside it ("" holds everything)."""
    return not scope or path == scope or path.startswith(scope + ".")
