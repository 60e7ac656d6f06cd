"""Checkpoint I/O: read train checkpoints safely, write deploy checkpoints atomically.

Reading never runs code from the file unless the user says so (`trust_pickle`): `.pth/.pt/.ckpt`
go through `torch.load(weights_only=True)`. Writing goes to a temporary file in the output's
folder, which is renamed into place only once complete, so an output is either whole or absent.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import re
import shlex
import sys
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

from repconv import pickle_scan
from repconv.errors import BadInput
from repconv.files import (
    INPUT_SUFFIXES,
    OUTPUT_SUFFIXES,
    PICKLE_SUFFIXES,
    TENSORS_DIGEST_KEY,
    ZipCheck,
    ZipRefused,
    checked_read,
    file_sha256,
    output_location,
    prove_writable,
    write_atomically,
)
from repconv.verification import available_memory

NESTED_KEYS = ("state_dict", "model", "model_state_dict", "model_ema", "state_dict_ema", "ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedCheckpoint:
    path: Path
    sha256: str
    state_dict: dict[str, Tensor] | None
    module: nn.Module | None
    source_key: str | None
    stripped_prefixes: tuple[str, ...]
    # The keys of the file's other nested state dicts (prefixes stripped), by their entry: what
    # a misfit's message may suggest with --key.
    others: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # With --trust-pickle and a pickled model: the whole object the file holds (the layout a
    # same-layout output writes back, `layout.py`); None otherwise.
    container: Any = None


def _check_readable(path: Path, suffixes: tuple[str, ...]) -> None:
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path} is a directory, not a checkpoint file")
    if path.suffix.lower() not in suffixes:
        raise BadInput(
            f"{path.name}: unknown extension {path.suffix!r}; expected {', '.join(suffixes)}"
        )
    if path.stat().st_size == 0:
        raise BadInput(f"{path.name} is empty")


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, Tensor) for v in value.values())


def _tensors_only(value: Mapping) -> dict[str, Tensor]:
    return {str(k): v for k, v in value.items() if isinstance(v, Tensor)}


def _strip_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Drop wrapper prefixes that *every* key carries, only at the start of the key."""
    stripped: list[str] = []
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped.append(prefix)
                changed = True
    return state, tuple(stripped)


def _pickled_objects_error(path: Path, detail: str) -> BadInput:
    return BadInput(
        f"{path.name} holds pickled Python objects (e.g. a whole model), and loading it would run "
        "code from the file; re-run with --trust-pickle if you trust it, or save "
        f"model.state_dict() instead ({detail})"
    )


class _RefusedGlobal(BadInput):
    """weights_only refused a global the file names (`name`)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def _unpickling_error(path: Path, exc: BaseException) -> BadInput:
    """weights_only refusing a global means code would run; anything else is a broken file."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if refused:
        name = refused.group(1)
        return _RefusedGlobal(str(_pickled_objects_error(path, f"it needs {name}")), name)
    return _unreadable(path, exc)


def _load_pickle(path: Path, trust_pickle: bool, mmap: bool = True, key: str | None = None) -> Any:
    """torch.load(weights_only) unless trusted; numpy values beside the weights (a `best_acc`)
    are read as plain numbers when `key` names an entry that holds none of them."""
    try:
        return _torch_load(path, trust_pickle, mmap)
    except _RefusedGlobal as exc:
        allowed = _numpy_values_apart_from(path, key, exc)
    with torch.serialization.safe_globals(allowed):
        try:
            return _torch_load(path, trust_pickle, mmap)
        except _RefusedGlobal as exc:
            raise BadInput(str(exc)) from None


def _numpy_values_apart_from(path: Path, key: str | None, exc: _RefusedGlobal) -> list[Any]:
    """The numpy globals to allow, if every refused global is a numpy value's and `key` names
    an entry holding none of them; else the error that says which key would do, or what."""
    try:
        refused = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a file too damaged to list them: what torch said is all there is
        refused = [exc.name]
    numpy = pickle_scan.numpy_values(refused)
    scan = pickle_scan.top_level(path, refused)
    if numpy is None or scan is None:
        where = f"; found under {_keys(scan.refused)}" if scan and scan.refused else ""
        raise BadInput(f"{exc}{where}") from None
    if key is not None and key in scan.weights and key not in scan.refused:
        return numpy
    clean = [k for k in scan.weights if k not in scan.refused]
    names = ", ".join(refused)
    how = f"pass --key {shlex.quote(clean[0])} to read the weights under it, " if clean else ""
    raise BadInput(
        f"{path.name}: {_keys(scan.refused)} {'holds' if len(scan.refused) == 1 else 'hold'} "
        f"numpy values ({names}), which loading "
        f"without --trust-pickle refuses; {how}re-run with --trust-pickle if you trust the "
        f"file, or in Python allow them with torch.serialization.safe_globals([{names}, "
        "and the numpy.dtypes classes of their dtypes])"
    ) from None


def _keys(keys: Mapping[str, Any]) -> str:
    named = [repr(k) for k in list(keys)[:5]]
    return (
        ("key " if len(keys) == 1 else "keys ")
        + ", ".join(named)
        + (", ..." if len(keys) > 5 else "")
    )


def _torch_load(path: Path, trust_pickle: bool, mmap: bool = True) -> Any:
    """torch.load, memory-mapped when it may be: a zip whose members are compressed is read
    whole (mapping would hand out the compressed bytes as tensor data)."""
    if not mmap:
        return _load_unmapped(path, trust_pickle)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        if "mmap" in str(exc) and "zip" in str(exc).lower():
            # Legacy (non-zip) torch.save files cannot be memory-mapped; read them plainly.
            return _load_unmapped(path, trust_pickle)
        raise _unreadable(path, exc) from None
    except Exception as exc:
        raise BadInput(f"cannot read {path.name}: {_short(exc)}") from None


def _load_unmapped(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc) from None
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> BadInput:
    # torch's safe unpickler reports an unknown opcode as a bare KeyError(<byte>), or as an
    # UnpicklingError whose text is a paragraph about weights_only.
    garbled = isinstance(exc, (KeyError, pickle.UnpicklingError))
    cause = "unrecognised data" if garbled else _short(exc)
    return BadInput(
        f"cannot read {path.name}: file is truncated or not a PyTorch checkpoint ({cause})"
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def read_checkpoint(
    path: str | Path, *, key: str | None = None, trust_pickle: bool = False
) -> LoadedCheckpoint:
    """Read a train checkpoint: a state dict (possibly nested), or with trust a whole module."""
    path = Path(path)
    _check_readable(path, INPUT_SUFFIXES)
    checked = _intact(path)
    sha = checked.sha256
    if path.suffix.lower() == ".safetensors":
        return _read_train_safetensors(path, sha, key)
    if checked.torchscript:
        raise BadInput(
            f"{path.name} is a TorchScript archive (torch.jit.save), not a checkpoint: loading "
            "it runs the code it holds; if you trust it, torch.jit.load it in Python and "
            "torch.save its state_dict()"
        )
    obj = _load_pickle(path, trust_pickle, mmap=not checked.compressed, key=key)
    source_key, found = _find_weights(path, obj, key)
    container = None
    if isinstance(found, nn.Module):
        module, state, container = found, dict(found.state_dict()), obj
    else:
        module, state = None, _own_copies_of_integers(_tensors_only(found))
    if not state:
        raise BadInput(f"{path.name} holds no tensors")
    state, stripped = _strip_prefixes(state)
    others = _other_entries(obj, source_key)
    return LoadedCheckpoint(path, sha, state, module, source_key, stripped, others, container)


def _other_entries(obj: Any, source_key: str | None) -> dict[str, tuple[str, ...]]:
    """The keys of every top-level entry but the one read that holds a state dict."""
    if not isinstance(obj, Mapping):
        return {}
    entries = {}
    for name, value in obj.items():
        if name != source_key and isinstance(value, Mapping) and _is_state_dict(value):
            keys = _strip_prefixes(_tensors_only(value))[0]
            entries[str(name)] = tuple(keys)
    return entries


def _read_train_safetensors(path: Path, sha: str, key: str | None) -> LoadedCheckpoint:
    state = _read_safetensors(path)[0]
    if key is not None:
        raise BadInput(f"--key does not apply to {path.name}: safetensors files are flat")
    state, stripped = _strip_prefixes(state)
    return LoadedCheckpoint(path, sha, state, None, None, stripped)


def _find_weights(path: Path, obj: Any, key: str | None) -> tuple[str | None, Any]:
    """(the key the weights were found under, a module or a state dict) in a loaded pickle."""
    if isinstance(obj, nn.Module):
        # A whole pickled module is its own weights: there is no key to choose.
        return None, obj
    if key is not None:
        return key, _entry_under_key(path, obj, key)
    return _locate_weights(path, obj)


def _entry_under_key(path: Path, obj: Any, key: str) -> Any:
    """The module or state dict the user named with --key."""
    if not isinstance(obj, Mapping) or key not in obj:
        available = ", ".join(map(str, obj)) if isinstance(obj, Mapping) else "none"
        raise BadInput(f"{path.name} has no key {key!r} (top-level keys: {available})")
    value = obj[key]
    if not (isinstance(value, nn.Module) or _is_state_dict(value)):
        raise BadInput(f"{path.name}[{key!r}] is not a state dict")
    return value


def _locate_weights(path: Path, obj: Any) -> tuple[str | None, Any]:
    """Without --key: a flat state dict, else the first usual nesting key that holds weights,
    else the tensors among the top level's other values."""
    if _is_state_dict(obj) and all(isinstance(v, Tensor) for v in obj.values()):
        return None, obj
    if not isinstance(obj, Mapping):
        raise BadInput(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    for candidate in NESTED_KEYS:
        value = obj.get(candidate)
        if isinstance(value, nn.Module) or _is_state_dict(value):
            return candidate, value
    if _is_state_dict(obj):
        return None, obj
    keys = ", ".join(map(str, list(obj)[:10])) or "none"
    raise BadInput(
        f"{path.name} holds no state dict at the top level or under "
        f"{', '.join(NESTED_KEYS)} (top-level keys: {keys}); choose one with --key"
    )


def _intact(path: Path) -> ZipCheck:
    """The file's sha256; a zip checkpoint's members are checked against their CRCs on the way
    (torch.load does not check them), so a damaged tensor is refused, not converted; compressed
    members are decompressed for it, within the memory a whole read of the file may take."""
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return ZipCheck(file_sha256(path))
    try:
        return checked_read(path, memory=available_memory())
    except ZipRefused as exc:
        why = " (file is corrupt)" if exc.corrupt else ""
        raise BadInput(f"cannot read {path.name}: {exc}{why}") from None


def _own_copies_of_integers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy the (tiny) integer tensors out of the memory-mapped file.

    Every tensor of a mapped checkpoint keeps the whole mapping, and with it every page read so
    far, in memory. The float tensors die as the model is converted (to float64 for
    verification, or fused); without this, a `num_batches_tracked` scalar would pin the file.
    """
    return {k: v if v.is_floating_point() else v.clone() for k, v in state.items()}


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_safetensors(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadInput(
            f"cannot read {path.name}: file is truncated or not a safetensors file ({_short(exc)})"
        ) from None
    if not tensors:
        raise BadInput(f"{path.name} holds no tensors")
    return tensors, metadata


def read_deploy(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A deploy checkpoint's tensors and metadata ({} for .pth/.pt, which carry none)."""
    path = Path(path)
    _check_readable(path, INPUT_SUFFIXES)
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    loaded = read_checkpoint(path)
    return loaded.state_dict, {}


def check_output_path(output: str | Path, *, inputs: tuple | list = ()) -> Path:
    """Refuse outputs we could not write, or that would overwrite an input."""
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise BadInput(
            f"{output.name}: unknown output extension {output.suffix!r}; "
            f"use {', '.join(OUTPUT_SUFFIXES)}"
        )
    for source in inputs:
        # The output's own name is replaced, never followed (`files.output_location`): a
        # symlink to the input is no clash, a hard link or the input's own path is.
        source = Path(source)
        same = output_location(output) == source.resolve()
        if not same and os.path.lexists(output) and source.exists():
            same = os.path.samestat(os.lstat(output), os.stat(source))
        if same:
            raise BadInput(f"OUTPUT {output} is the same file as INPUT; choose another name")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"cannot write {output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write {output}: folder {parent} is not writable")
    if output.is_dir() and not output.is_symlink():
        raise BadInput(f"cannot write {output}: it is a directory")
    prove_writable(output)
    return output


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw_bytes(tensor: Tensor) -> memoryview:
    """The tensor's memory as bytes, without a copy (it must be contiguous, on the CPU)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _write_safetensors(
    f, tensors: dict[str, Tensor], metadata: dict[str, str], *, tensors_digest: bool = False
) -> None:
    """The safetensors format, written tensor by tensor straight from memory.

    The header is sorted JSON so equal inputs give equal bytes (the safetensors library writes
    metadata from a hash map whose order changes between processes), and no serialised copy of
    the whole file is ever held in memory. With `tensors_digest` the metadata also records the
    sha256 of the data section, hashed from the same memory that is written, so `batch --resume`
    can tell an intact file from a damaged one.
    """
    if sys.byteorder != "little":
        raise BadInput("writing safetensors needs a little-endian machine")
    names = sorted(tensors)
    if not tensors_digest:
        f.write(_safetensors_header(tensors, names, metadata))
        _write_data(f, tensors, names)
        return
    # The header holds the digest, but hashing before writing would add the whole hash time
    # (~0.2 s for 420 MiB) to the write. So a thread hashes while this one writes the tensors
    # behind a placeholder header of the same length (a sha256 is always 64 hex digits) and
    # syncs them; then the header is written again. hashlib and file writes release the GIL.
    placeholder = _safetensors_header(tensors, names, {**metadata, TENSORS_DIGEST_KEY: "0" * 64})
    hashed: list[str] = []
    hasher = threading.Thread(target=lambda: hashed.append(_tensors_sha256(tensors, names)))
    hasher.start()
    try:
        f.write(placeholder)
        _write_data(f, tensors, names)
        f.flush()
        os.fsync(f.fileno())
    finally:
        hasher.join()
    if not hashed:
        raise RuntimeError("hashing the tensors failed")
    header = _safetensors_header(tensors, names, {**metadata, TENSORS_DIGEST_KEY: hashed[0]})
    if len(header) != len(placeholder):
        raise RuntimeError("the digest changed the header's length")
    f.seek(0)
    f.write(header)
    f.seek(0, os.SEEK_END)


def _safetensors_header(tensors: dict[str, Tensor], names: list[str], metadata: dict) -> bytes:
    """The 8-byte length and the JSON header (padded to 8 bytes) for `names` in that order."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise BadInput(f"cannot write {name}: dtype {t.dtype} has no safetensors code")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_data(f, tensors: dict[str, Tensor], names: list[str]) -> None:
    for name in names:
        f.write(_raw_bytes(tensors[name]))


def _tensors_sha256(tensors: dict[str, Tensor], names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(_raw_bytes(tensors[name]))
    return digest.hexdigest()


def _contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, Tensor],
    metadata: dict[str, str],
    *,
    tensors_digest: bool = False,
) -> None:
    """Write atomically: a temp file in the same folder, fsynced, then renamed into place.

    `tensors_digest`: a safetensors file also records its tensors' sha256 in the metadata
    (`files.TENSORS_DIGEST_KEY`); .pth/.pt files carry no metadata.
    """
    path = Path(path)
    if any(not isinstance(v, str) for v in metadata.values()):
        raise TypeError("safetensors metadata values must be strings")
    tensors = _contiguous(state_dict)
    if path.suffix.lower() == ".safetensors":
        write_atomically(
            path, lambda f: _write_safetensors(f, tensors, metadata, tensors_digest=tensors_digest)
        )
    else:
        write_atomically(path, lambda f: torch.save(tensors, f))
