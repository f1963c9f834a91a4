"""Per-page state of an import session: pure data, no I/O.

One byte per page of each region. A page moves ABSENT -> REQUESTED -> INSTALLED (or
POISONED); a range the VMM discarded becomes DISCARDED and is never filled with source
data again; a range the VMM unmapped becomes UNMAPPED (nothing can be installed there any
more). A page a bulk receiver is receiving straight into the memory fd (zero-copy, MINOR
mode) is RECEIVING: claimed for that frame, installed by nothing else until the fault
thread resolves the frame (CONTINUE, or back to absent). The import session's fault
thread is the only writer but for claims, which a bulk receiver makes in C under the
gate the fault thread holds whenever it runs (native/fastpath/import.c); other threads only read
counters and snapshots, which may be a moment stale but never wrong in a way
that matters (a stale "absent" only causes a redundant send).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

ABSENT: Final = 0
REQUESTED: Final = 1
INSTALLED: Final = 2
POISONED: Final = 3
DISCARDED: Final = 4
UNMAPPED: Final = 5
RECEIVING: Final = 6  # not done; > INSTALLED, so every "installable?" test says no

STATE_NAMES: Final = ("absent", "requested", "installed", "poisoned", "discarded", "unmapped",
                      "receiving")
_DONE: Final = frozenset((INSTALLED, POISONED, DISCARDED, UNMAPPED))
# For each done state, a table mapping ABSENT and REQUESTED to it, the rest to itself.
_UNDONE_TO: Final = {s: bytes(s if b in (ABSENT, REQUESTED) else b for b in range(256))
                     for s in _DONE}


class PageMap:
    """Page states for every region of a session, with running totals."""

    def __init__(self, pages_per_region: list[int]) -> None:
        self.states = [bytearray(n) for n in pages_per_region]
        self.total = sum(pages_per_region)
        self.done = 0
        self.installed = 0
        self.poisoned = 0
        self.discarded = 0
        self.unmapped = 0

    def get(self, region: int, page: int) -> int:
        return self.states[region][page]

    def set(self, region: int, page: int, state: int) -> None:
        """Move one page to ``state``, keeping the totals right."""
        row = self.states[region]
        old = row[page]
        if old == state:
            return
        row[page] = state
        self._count(old, -1)
        self._count(state, +1)

    def set_undone(self, region: int, first: int, count: int, state: int) -> int:
        """Move every page of [first, first+count) not done yet (absent or requested) to
        ``state``, a done state, in one pass over the bytes; returns how many moved."""
        assert state in _DONE
        row = self.states[region]
        chunk = bytes(row[first : first + count])
        moved = chunk.count(ABSENT) + chunk.count(REQUESTED)
        if moved:
            # Same length: the row's buffer stays where the C loop has it.
            row[first : first + count] = chunk.translate(_UNDONE_TO[state])
            self._count(state, moved)
        return moved

    def installed_in_place(self, count: int) -> None:
        """The C engine, which shares ``states``, moved ``count`` pages from absent or
        requested to INSTALLED by writing their bytes: bring the totals along."""
        self._count(INSTALLED, count)

    def _count(self, state: int, delta: int) -> None:
        if state in _DONE:
            self.done += delta
        if state == INSTALLED:
            self.installed += delta
        elif state == POISONED:
            self.poisoned += delta
        elif state == DISCARDED:
            self.discarded += delta
        elif state == UNMAPPED:
            self.unmapped += delta

    @property
    def complete(self) -> bool:
        return self.done == self.total

    @property
    def remaining(self) -> int:
        return self.total - self.done

    def installable_runs(self, region: int, first: int, count: int) -> Iterator[tuple[int, int]]:
        """Sub-runs of [first, first+count) whose pages may receive source data.

        Only ABSENT and REQUESTED pages may; installed, poisoned, discarded and unmapped
        ones never.
        """
        row = self.states[region]
        start = -1
        for page in range(first, first + count):
            ok = row[page] <= REQUESTED
            if ok and start < 0:
                start = page
            elif not ok and start >= 0:
                yield start, page - start
                start = -1
        if start >= 0:
            yield start, first + count - start

    def have_bitmap(self, region: int) -> bytes:
        """Bitmap (LSB first) of pages the destination no longer needs from the source."""
        row = self.states[region]
        bits = bytearray((len(row) + 7) // 8)
        for page, state in enumerate(row):
            if state in _DONE:
                bits[page >> 3] |= 1 << (page & 7)
        return bytes(bits)

    def runs_of(self, region: int, state: int, limit: int) -> list[tuple[int, int]]:
        """The first ``limit`` runs ``(first, count)`` of pages in ``state`` in a region.

        Found with ``bytes.find``, so a region with no such page costs one scan in C
        (``status`` and the terminal events ask this for POISONED pages)."""
        row = self.states[region]
        mark = bytes([state])
        runs: list[tuple[int, int]] = []
        page = row.find(mark)
        while page >= 0 and len(runs) < limit:
            end = page + 1
            while end < len(row) and row[end] == state:
                end += 1
            runs.append((page, end - page))
            page = row.find(mark, end)
        return runs
