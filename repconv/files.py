"""File plumbing that needs no torch: formats, hashing, safetensors headers, atomic writes.

Kept torch-free so that processes which only orchestrate (the CLI's help, `repconv batch`'s
runner) start in a fraction of a second and stay small.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from repconv.errors import BadInput

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
INPUT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors")
OUTPUT_SUFFIXES = (".safetensors", ".pth", ".pt")
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, from its header alone (ValueError if bad)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= min(_MAX_HEADER, path.stat().st_size - 8):
            raise ValueError(f"{path.name} is not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path.name} has a corrupt safetensors header") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(metadata) if isinstance(metadata, dict) else {}


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A temp file in `path`'s folder (so the final rename is atomic), named after `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp creates the file private (0600); give it the permissions a plain open would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def check_report_path(path: str | Path) -> Path:
    """Refuse a report path we could not write, before any work is done; make its folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise BadInput(f"cannot write {path}: it is a directory")
    prove_writable(path)
    return path


def prove_writable(path: Path) -> None:
    """Create and remove a temp file beside `path`: the write that comes later will work.

    Permission bits say little (root ignores them, /proc refuses files whatever they say), so
    only trying tells for sure.
    """
    try:
        fd, tmp = temp_file_beside(path)
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what `write` writes, in one step: readers see the old file or the
    new one, never part of it. OS errors become BadInput."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode()))
