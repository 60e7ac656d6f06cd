"""File plumbing that needs no torch: formats, hashing, safetensors headers, atomic writes.

Kept torch-free so that processes which only orchestrate (the CLI's help, `repconv batch`'s
runner) start in a fraction of a second and stay small.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from repconv.errors import BadInput

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
INPUT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors")
OUTPUT_SUFFIXES = (".safetensors", ".pth", ".pt")
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


_CHUNK = 1 << 20
# Metadata key of deploy files: sha256 of the data section (every tensor's bytes, in file order).
TENSORS_DIGEST_KEY = "tensors_sha256"
_LOCAL_HEADER = 30  # fixed part of a zip member's local header; name and extra field follow
_LOCAL_SIGNATURE = b"PK\x03\x04"


class CorruptZipMember(ValueError):
    """A zip member whose stored bytes do not match what the zip directory says of them."""

    def __init__(self, member: str, problem: str) -> None:
        super().__init__(f"member {member} {problem}")
        self.member, self.problem = member, problem


@dataclass
class _StoredMember:
    name: str
    start: int  # offset of the member's data in the file
    end: int
    expected_crc: int
    crc: int = 0


def file_sha256(path: str | Path, *, check_zip_crcs: bool = False) -> str:
    """The file's sha256. With `check_zip_crcs`, a zip file's stored members are also checked
    against the CRC-32 its directory records, in the same single read of the file
    (CorruptZipMember if one differs). torch.load never checks them, so a flipped bit in a
    tensor would otherwise pass unnoticed. A file zipfile cannot parse is only hashed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        members = _stored_members(f) if check_zip_crcs else []
        f.seek(0)
        if members:
            _hash_checking_members(f, digest, members)
        else:
            buffer = bytearray(_CHUNK)
            while size := f.readinto(buffer):
                digest.update(memoryview(buffer)[:size])
    return digest.hexdigest()


def _stored_members(f: BinaryIO) -> list[_StoredMember]:
    """Where each uncompressed member's data lies, by the zip directory and local headers."""
    try:
        with zipfile.ZipFile(f) as archive:  # handles zip64 directories and sizes
            infos = archive.infolist()
    except Exception:  # not a zip (a legacy torch file), or one torch.load will reject itself
        return []
    size = os.fstat(f.fileno()).st_size
    members = []
    for info in infos:
        # The CRC covers uncompressed bytes; torch.save stores every member uncompressed.
        if info.compress_type != zipfile.ZIP_STORED:
            continue
        local = os.pread(f.fileno(), _LOCAL_HEADER, info.header_offset)
        if len(local) < _LOCAL_HEADER or local[:4] != _LOCAL_SIGNATURE:
            raise CorruptZipMember(info.filename, "has no local header where the directory says")
        name_length = int.from_bytes(local[26:28], "little")
        extra_length = int.from_bytes(local[28:30], "little")
        start = info.header_offset + _LOCAL_HEADER + name_length + extra_length
        end = start + info.compress_size
        if end > size:
            raise CorruptZipMember(info.filename, "extends past the end of the file")
        members.append(_StoredMember(info.filename, start, end, info.CRC))
    return sorted(members, key=lambda m: m.start)


def _hash_checking_members(f: BinaryIO, digest: Any, members: list[_StoredMember]) -> None:
    """Feed the whole file to `digest`, and each member's bytes to its CRC as they pass."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    waiting, active = iter(members), []
    upcoming = next(waiting, None)
    position = 0
    while size := f.readinto(buffer):
        chunk, end = view[:size], position + size
        digest.update(chunk)
        while upcoming is not None and upcoming.start < end:
            active.append(upcoming)
            upcoming = next(waiting, None)
        for member in active:
            low, high = max(member.start, position) - position, min(member.end, end) - position
            if low < high:
                member.crc = zlib.crc32(chunk[low:high], member.crc)
        finished = [m for m in active if m.end <= end]
        active = [m for m in active if m.end > end]
        _check_crcs(finished)
        position = end
    # Members still open when the file ended (it shrank while read) are short, so they fail.
    _check_crcs([*active, *([upcoming] if upcoming else []), *waiting])


def _check_crcs(members: list[_StoredMember]) -> None:
    for member in members:
        if member.crc != member.expected_crc:
            raise CorruptZipMember(member.name, "fails its CRC check")


def _read_safetensors_header(f: BinaryIO, name: str) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and where its data section starts (ValueError if bad)."""
    file_size = os.fstat(f.fileno()).st_size
    size = int.from_bytes(f.read(8), "little")
    if not 0 < size <= min(_MAX_HEADER, file_size - 8):
        raise ValueError(f"{name} is not a safetensors file")
    try:
        header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{name} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name} has a corrupt safetensors header")
    return header, 8 + size


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, from its header alone (ValueError if bad)."""
    path = Path(path)
    with open(path, "rb") as f:
        header = _read_safetensors_header(f, path.name)[0]
    metadata = header.get("__metadata__")
    return dict(metadata) if isinstance(metadata, dict) else {}


def check_tensors_digest(path: str | Path) -> None:
    """ValueError unless the file is as long as its header says and its data section hashes
    to the digest its metadata records (a file written without one fails too)."""
    path = Path(path)
    with open(path, "rb") as f:
        header, data_start = _read_safetensors_header(f, path.name)
        metadata = header.get("__metadata__")
        recorded = metadata.get(TENSORS_DIGEST_KEY) if isinstance(metadata, dict) else None
        if not isinstance(recorded, str):
            raise ValueError(f"{path.name} records no {TENSORS_DIGEST_KEY}")
        expected = data_start + _data_length(header, path.name)
        if os.fstat(f.fileno()).st_size != expected:
            raise ValueError(f"{path.name} is not {expected} bytes long, as its header says")
        digest = hashlib.sha256()
        buffer = bytearray(_CHUNK)
        while size := f.readinto(buffer):
            digest.update(memoryview(buffer)[:size])
    if digest.hexdigest() != recorded:
        raise ValueError(f"{path.name}: its tensors do not match their {TENSORS_DIGEST_KEY}")


def _data_length(header: dict[str, Any], name: str) -> int:
    """The data section's length by the header: where the last tensor ends."""
    length = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{name}: tensor {key} has bad data_offsets")
        length = max(length, offsets[1])
    return length


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A temp file in `path`'s folder (so the final rename is atomic), named after `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:  # a signal turned exception (Ctrl-C, SIGTERM) leaves no file either
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
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


@contextmanager
def replacing(path: str | Path) -> Iterator[str]:
    """A temp file beside `path` for the block to fill; it replaces `path` in one step when the
    block ends, and is removed if the block raises (an OS error becomes BadInput): readers see
    the old file or the new one, never part of it."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace `path` with what `write` writes, synced to disk first (see `replacing`)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomically(path: str | Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode()))
