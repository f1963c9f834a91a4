"""A process's memory as the kernel reports it: ``/proc/<pid>/smaps`` and ``pagemap``.

Both the handover (is the memory a VMM names really mapped, registered, of this page
size and file? are pages of it present already?) and the fault loop (which registered
ranges did the VMM unmap since? which pages did a previous daemon install?) ask the
kernel the same questions; this is the one place that reads the answers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

#: smaps VmFlags of a range registered with a userfaultfd (missing, write-protect, minor).
UFFD_VMFLAGS: Final = frozenset({"um", "uw", "ui"})

_PAGEMAP_PAGE: Final = 4096
_PAGEMAP_BATCH: Final = 1 << 16  # pagemap entries per read (512 KiB)
# Byte 7 of each little-endian pagemap entry holds bit 63 (present) and 62 (swapped).
_PRESENT_TABLE: Final = bytes(1 if b & 0xC0 else 0 for b in range(256))

_HEADER = re.compile(r"([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)")


@dataclass(frozen=True, slots=True)
class Vma:
    """One mapping of a process, from ``/proc/<pid>/smaps``."""

    start: int
    end: int
    offset: int
    dev: int
    inode: int
    page_size: int
    flags: frozenset[str]

    @property
    def uffd_registered(self) -> bool:
        return not UFFD_VMFLAGS.isdisjoint(self.flags)


def parse_smaps(text: str) -> list[Vma]:
    """The mappings in an smaps text, in address order."""
    vmas: list[Vma] = []
    head: re.Match[str] | None = None
    page_size = 4096
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            head, page_size = m, 4096
        elif line.startswith("KernelPageSize:"):
            page_size = int(line.split()[1]) * 1024
        elif line.startswith("VmFlags:") and head is not None:
            vmas.append(Vma(int(head[1], 16), int(head[2], 16), int(head[3], 16),
                            os.makedev(int(head[4], 16), int(head[5], 16)), int(head[6]),
                            page_size, frozenset(line.split()[1:])))
            head = None
    return vmas


def read_smaps(pid: int) -> list[Vma]:
    """The mappings of process ``pid`` (OSError if it is gone or not ours to read)."""
    with open(f"/proc/{pid}/smaps") as f:
        return parse_smaps(f.read())


def uncovered(start: int, end: int, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) that none of the sorted ``spans`` covers."""
    out = []
    pos = start
    for lo, hi in spans:
        if hi <= pos or lo >= end:
            continue
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < end:
        out.append((pos, end))
    return out


def present_flags(pagemap_fd: int, addr: int, pages: int, page_size: int
                  ) -> Iterator[tuple[int, bytes]]:
    """(first page, one byte per page: 1 if present or swapped) for ``pages`` pages of
    ``page_size`` at ``addr``, read from an open ``/proc/<pid>/pagemap`` in batches.

    The first 4 KiB entry of each page stands for the page (a huge page is mapped whole).
    """
    step = page_size // _PAGEMAP_PAGE
    batch = max(1, _PAGEMAP_BATCH // step)
    for first in range(0, pages, batch):
        count = min(batch, pages - first)
        vpage = (addr + first * page_size) // _PAGEMAP_PAGE
        data = os.pread(pagemap_fd, count * step * 8, vpage * 8)
        yield first, data[7 :: 8 * step].translate(_PRESENT_TABLE)
