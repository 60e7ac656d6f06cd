"""File plumbing that needs no torch: formats, hashing, safetensors headers, atomic writes.

Kept torch-free so that processes which only orchestrate (the CLI's help, `repconv batch`'s
runner) start in a fraction of a second and stay small.
"""

from __future__ import annotations

import glob
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


class ZipRefused(ValueError):
    """A zip checkpoint repconv will not read as torch.load would: its words say why."""

    corrupt = False  # whether the file is damaged (else: readable, but not by torch.load)


class CorruptZipMember(ZipRefused):
    """A zip member whose stored bytes do not match what the zip directory says of them."""

    corrupt = True

    def __init__(self, member: str, problem: str) -> None:
        super().__init__(f"member {member} {problem}")
        self.member, self.problem = member, problem


class UnreadableZipMember(CorruptZipMember):
    """A member stored in a way torch.load cannot read (another compression, encryption)."""

    corrupt = False


# Deflate never expands a byte into more than about 1032 (RFC 1951: a 258-byte match per
# 2 bits); a directory claiming more is lying, whatever the data turns out to be.
_MAX_DEFLATE_RATIO = 1032
_DEFLATE_SLACK = 1 << 10
_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


@dataclass(frozen=True)
class ZipCheck:
    """What one read of a file found: its sha256, and of a zip, what torch.load must know."""

    sha256: str
    compressed: tuple[str, ...] = ()  # deflated members: read whole, never memory-mapped
    torchscript: bool = False  # a torch.jit.save archive (code/ and constants.pkl)


@dataclass
class _Member:
    name: str
    start: int  # offset of the member's data in the file
    end: int
    expected_crc: int
    size: int  # uncompressed bytes, by the directory
    decoder: Any = None  # a zlib decompressor for a deflated member
    crc: int = 0
    produced: int = 0

    def feed(self, data: memoryview) -> None:
        """Bytes of the member as stored, in order: their CRC (and for a deflated member
        what they decompress to, never more than the directory records)."""
        if self.decoder is None:
            self._count(data)
            return
        while data:
            try:
                out = self.decoder.decompress(data, min(self.size - self.produced + 1, _CHUNK))
            except zlib.error:
                raise CorruptZipMember(self.name, "is not valid deflate data") from None
            self._count(out)
            data = self.decoder.unconsumed_tail
            if data and not out:
                raise CorruptZipMember(self.name, "is not valid deflate data")

    def _count(self, data: bytes | memoryview) -> None:
        self.produced += len(data)
        if self.produced > self.size:
            raise CorruptZipMember(self.name, f"holds more than the {self.size} bytes recorded")
        self.crc = zlib.crc32(data, self.crc)

    def check(self) -> None:
        """Once every stored byte was fed: the whole member, and its CRC."""
        if self.decoder is not None:
            try:
                self._count(self.decoder.flush())
            except zlib.error:
                raise CorruptZipMember(self.name, "is not valid deflate data") from None
            if not self.decoder.eof:
                raise CorruptZipMember(self.name, "ends before its deflate data does")
        if self.produced != self.size:
            raise CorruptZipMember(self.name, f"holds {self.produced} bytes, not {self.size}")
        if self.crc != self.expected_crc:
            raise CorruptZipMember(self.name, "fails its CRC check")


def file_sha256(path: str | Path, *, check_zip_crcs: bool = False) -> str:
    """The file's sha256. With `check_zip_crcs`, a zip file's members are also checked as
    `checked_read` does (ZipRefused if one fails)."""
    if check_zip_crcs:
        return checked_read(path).sha256
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        _hash(f, digest)
    return digest.hexdigest()


def checked_read(path: str | Path, *, memory: int | None = None) -> ZipCheck:
    """The file's sha256 and, for a zip file, every member checked in the same single read:
    stored bytes (deflated ones decompressed, never past the size the directory records)
    against the CRC-32 the directory records (CorruptZipMember if one differs; torch.load never
    checks them, so a flipped bit in a tensor would otherwise pass unnoticed). A file with
    deflated members must be read whole, so the uncompressed sizes it claims are bounded by
    `memory` (bytes) before anything is decompressed (ZipRefused). A file zipfile cannot parse
    is only hashed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        members, names = _members(f)
        compressed = tuple(m.name for m in members if m.decoder is not None)
        if compressed and memory is not None:
            _check_fits(path, members, memory)
        f.seek(0)
        if members:
            _hash_checking_members(f, digest, members)
        else:
            _hash(f, digest)
    torchscript = any(n.endswith("/constants.pkl") for n in names) and any(
        "/code/" in n for n in names
    )
    return ZipCheck(digest.hexdigest(), compressed, torchscript)


def _hash(f: BinaryIO, digest: Any) -> None:
    buffer = bytearray(_CHUNK)
    while size := f.readinto(buffer):
        digest.update(memoryview(buffer)[:size])


def _check_fits(path: str | Path, members: list[_Member], memory: int) -> None:
    """torch.load reads a file with compressed members into memory whole: refuse one whose
    members claim more than the memory there is (a zip bomb), before decompressing any."""
    total = sum(m.size for m in members)
    if total > memory:
        raise ZipRefused(
            f"its compressed members would take {total} bytes once decompressed, more than the "
            f"{memory} bytes of memory available"
        )


def _members(f: BinaryIO) -> tuple[list[_Member], list[str]]:
    """Where each member's data lies, by the zip directory and local headers; every name."""
    try:
        with zipfile.ZipFile(f) as archive:  # handles zip64 directories and sizes
            infos = archive.infolist()
    except Exception:  # not a zip (a legacy torch file), or one torch.load will reject itself
        return [], []
    size = os.fstat(f.fileno()).st_size
    members = [_member_of(f, info, size) for info in infos]
    return sorted(members, key=lambda m: m.start), [info.filename for info in infos]


def _member_of(f: BinaryIO, info: zipfile.ZipInfo, size: int) -> _Member:
    if info.flag_bits & 0x1:
        raise UnreadableZipMember(info.filename, "is encrypted, which torch.load cannot read")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
        raise UnreadableZipMember(
            info.filename,
            f"is compressed with {method}, which torch.load cannot read; save the checkpoint "
            "again with torch.save",
        )
    local = os.pread(f.fileno(), _LOCAL_HEADER, info.header_offset)
    if len(local) < _LOCAL_HEADER or local[:4] != _LOCAL_SIGNATURE:
        raise CorruptZipMember(info.filename, "has no local header where the directory says")
    name_length = int.from_bytes(local[26:28], "little")
    extra_length = int.from_bytes(local[28:30], "little")
    start = info.header_offset + _LOCAL_HEADER + name_length + extra_length
    end = start + info.compress_size
    if end > size:
        raise CorruptZipMember(info.filename, "extends past the end of the file")
    decoder = None
    if info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > info.compress_size * _MAX_DEFLATE_RATIO + _DEFLATE_SLACK:
            raise CorruptZipMember(
                info.filename,
                f"claims {info.file_size} bytes from {info.compress_size} compressed, more "
                "than deflate can give",
            )
        decoder = zlib.decompressobj(-zlib.MAX_WBITS)
    return _Member(info.filename, start, end, info.CRC, info.file_size, decoder)


def _hash_checking_members(f: BinaryIO, digest: Any, members: list[_Member]) -> None:
    """Feed the whole file to `digest`, and each member's bytes to it as they pass."""
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
                member.feed(chunk[low:high])
        for member in [m for m in active if m.end <= end]:
            member.check()
        active = [m for m in active if m.end > end]
        position = end
    # Members still open when the file ended (it shrank while read) are short, so they fail.
    for member in [*active, *([upcoming] if upcoming else []), *waiting]:
        member.check()


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


def output_location(path: str | Path) -> Path:
    """Where an output is written, as an absolute path: its folder resolved (a symlinked folder
    is where you asked to write), its name kept as given. The one policy for an existing output
    path (`convert`, `batch`, reports): it is replaced by a new regular file in one rename, so
    a symlink there is replaced, never followed, and the file it pointed to is left alone."""
    path = Path(path).expanduser()
    return path.absolute().parent.resolve() / path.name


def _temp_prefix(path: Path, pid: int) -> str:
    return f".{path.name}.{pid}."


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A temp file in `path`'s folder (so the final rename is atomic), named after `path` and
    its owner: `.NAME.PID.RANDOM.tmp`, so a clean-up can tell its own from another process's."""
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=_temp_prefix(path, os.getpid()), suffix=".tmp"
    )
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


def remove_temp_files_of(pid: int, path: str | Path) -> None:
    """Remove the temp files process `pid` made for writing `path` (`temp_file_beside`), and
    no other: a killed worker's leftovers, never another process's file in progress."""
    path = Path(path)
    pattern = glob.escape(_temp_prefix(path, pid)) + "*.tmp"
    for leftover in path.parent.glob(pattern):
        leftover.unlink(missing_ok=True)


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


# Every file this process has put in place with `replacing`, in order: what a command had
# completed when a signal stopped it (`completed_since`). Appended to only.
_completed: list[Path] = []


def writes_so_far() -> int:
    """A mark for `completed_since`."""
    return len(_completed)


def completed_since(mark: int) -> list[Path]:
    """The files put in place (complete, renamed) since `writes_so_far()` returned `mark`."""
    return list(_completed[mark:])


@contextmanager
def replacing(path: str | Path) -> Iterator[str]:
    """A temp file beside `path` for the block to fill; it replaces `path` in one step when the
    block ends, and is removed if the block raises (an OS error becomes BadInput): readers see
    the old file or the new one, never part of it. A file put in place is recorded, even when
    a signal strikes right after the rename (`completed_since`)."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    os.close(fd)
    renaming = False
    try:
        yield tmp
        renaming = True
        os.replace(tmp, path)
        _completed.append(path)
    except BaseException as exc:
        if renaming and not os.path.lexists(tmp):
            # renamed when the exception (a signal) arrived: the file is in place, complete
            if not _completed or _completed[-1] is not path:
                _completed.append(path)
            raise
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
