"""Give back the memory of checkpoint tensors that a conversion has consumed (Linux).

A memory-mapped checkpoint is read page by page as its tensors are used, and every page read
stays in the process's resident set until the whole mapping is closed, which is after the last
tensor of the file dies. So a converted model would hold its train weights *and* its deploy
weights at the end. Once a block is fused, its train tensors' pages are dropped from this
process with `madvise(MADV_DONTNEED)`.

That is only done where it cannot change what any tensor holds: for pages of a private file
mapping that were never written (present pages still belong to the file, none swapped out), a
later read simply maps the file's page again. Written (copied-on-write) or anonymous memory is
never touched. Elsewhere than Linux, or where the kernel refuses, nothing happens.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import sys
from collections.abc import Iterable

import torch
from torch import Tensor

_MADV_DONTNEED = 4
_SWAPPED = 1 << 62
_FILE_PAGE = 1 << 61
_PAGE = mmap.PAGESIZE


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every private, file-backed mapping of this process, sorted."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] == "0" or not fields[1].endswith("p"):
                continue  # anonymous (inode 0) or shared
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return sorted(spans)


class PageReleaser:
    """Releases tensors' pages; one snapshot of the mappings serves many calls."""

    def __init__(self) -> None:
        self.active = sys.platform.startswith("linux")
        if not self.active:
            return
        try:
            self.spans = _file_mappings()
            self.libc = ctypes.CDLL(None, use_errno=True)
            self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            # Opened last: nothing that can fail comes after it, so it is closed in __exit__.
            self.pagemap = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115
        except (OSError, AttributeError):
            self.active = False
            return
        self.starts = [s for s, _ in self.spans]
        self.seen: set[int] = set()

    def __enter__(self) -> PageReleaser:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.pagemap.close()

    def release(self, tensors: Iterable[Tensor], *, keep: Iterable[Tensor] = ()) -> int:
        """Drop the resident pages of these tensors where they are unwritten file pages.

        Tensors whose storage one of `keep` (still in use) shares are skipped. Returns the
        bytes of address range given back (0 when nothing could be). The tensors stay valid:
        reading one again maps its pages from the file again.
        """
        if not self.active:
            return 0
        kept = {t.untyped_storage().data_ptr() for t in keep}
        total = 0
        for tensor in tensors:
            if tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            base, nbytes = storage.data_ptr(), storage.nbytes()
            if base in self.seen or base in kept:
                continue
            self.seen.add(base)
            total += self._release_range(base, base + nbytes)
        return total

    def _release_range(self, base: int, limit: int) -> int:
        start = -(-base // _PAGE) * _PAGE
        end = limit // _PAGE * _PAGE
        if end <= start or not self._inside_a_file_mapping(start, end):
            return 0
        if not self._only_file_pages(start, end):
            return 0
        if self.libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
            return 0
        return end - start

    def _inside_a_file_mapping(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.spans[i][1] >= end

    def _only_file_pages(self, start: int, end: int) -> bool:
        """No page in the range was written (copied) or swapped: each is absent or the file's."""
        count = (end - start) // _PAGE
        self.pagemap.seek(start // _PAGE * 8)
        raw = self.pagemap.read(count * 8)
        if len(raw) != count * 8:
            return False
        entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        present = entries < 0  # bit 63
        swapped = (entries & _SWAPPED) != 0
        file_page = (entries & _FILE_PAGE) != 0
        return not bool((swapped | (present & ~file_page)).any())


def tensors_of(module: torch.nn.Module) -> list[Tensor]:
    """Every parameter and buffer of `module` and its children."""
    return [*module.parameters(), *module.buffers()]
