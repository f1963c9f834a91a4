"""What every lane of one export session shares: its regions (a memfd mapped read-only,
a regular file read with pread, or a VMM's memory by pid), which pages were sent, the
destination's final tally, and the words shared with the demand lane's C loop.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import threading
from collections.abc import Callable, Iterable
from collections.abc import Mapping as _AbcMapping
from dataclasses import dataclass, field
from typing import Final

from uffdd import protocol, warmorder
from uffdd._linux.mem import Mapping, is_hugetlb_fd
from uffdd.errors import ProtocolError

log = logging.getLogger("uffdd.export")
Header = _AbcMapping[str, object]

@dataclass(eq=False)
class ExportRegion:
    """A region of the source guest's RAM and how to read it."""

    index: int
    gpa: int
    size: int
    page_size: int
    mapping: Mapping | None = None  # memfd mode
    pid: int = 0  # pid mode
    addr: int = 0
    fd: int = -1  # memfd mode without a mapping (unsealed memfd): read with pread
    offset: int = 0

    @property
    def pages(self) -> int:
        return self.size // self.page_size

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()


@dataclass(frozen=True)
class FinalTally:
    """The destination's final counters, from its 'done' frame (README, peer link)."""

    installed: int
    demand: int
    background: int
    zero: int
    poisoned: int
    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def from_done(cls, header: protocol.Message) -> FinalTally | None:
        """The tally in a 'done' header; None from a destination that sends none."""
        if "installed" not in header:
            return None
        raw = header.get("ranges", [])
        if not isinstance(raw, list) or len(raw) > MAX_DONE_RANGES:
            raise ProtocolError("'done': ranges must be a list of at most "
                                f"{MAX_DONE_RANGES} [gpa, bytes] pairs")
        ranges = []
        for item in raw:
            if (not isinstance(item, list) or len(item) != 2
                    or not all(isinstance(v, int) and v >= 0 for v in item)):
                raise ProtocolError(f"'done': a poisoned range is not [gpa, bytes]: {item!r}")
            ranges.append((item[0], item[1]))
        installed, demand, background, zero, poisoned = (protocol.peer_int(header, k) for k in (
            "installed", "demand", "background", "zero", "poisoned"))
        return cls(installed, demand, background, zero, poisoned, tuple(ranges))


#: Poisoned ranges a 'done' frame may list (the destination sends at most 1024).
MAX_DONE_RANGES: Final = 4096


@dataclass
class ExportState:
    """What every lane of one export session shares (guarded by ``lock``)."""

    regions: list[ExportRegion]
    chunk_bytes: int
    integrity: bool = True
    background: bool = True  # [peer] background: stream unrequested pages at all
    spin_s: float = 0.0  # [peer] spin_us: the C demand lane busy-polls this long after a batch
    # fault injection: pages we "cannot read"
    lost: set[tuple[int, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: list[bytearray] = field(default_factory=list)
    pages_sent: int = 0
    pages_zero: int = 0
    pages_demand: int = 0
    pages_demand_c: int = 0  # of pages_demand, answered by the demand lane's C loop
    bytes_sent: int = 0
    unreadable: set[int] = field(default_factory=set)  # regions whose read failure is logged
    done: threading.Event = field(default_factory=threading.Event)
    final_tally: FinalTally | None = None  # the destination's counters, from its 'done'
    # shared with the demand lane's C loop: the bulk lanes' hint, "fault injection active"
    control: DemandControl = field(default_factory=lambda: DemandControl(), init=False,
                                   repr=False)
    # Warm restore (uffdd.warmorder): the demand order recorded, and a recorded order
    # the bulk lanes stream first (runs of (region, first page, pages)).
    recorder: warmorder.Recorder | None = None
    replay: tuple[tuple[int, int, int], ...] = ()
    replay_at: int = 0  # the first run of ``replay`` not yet sent whole
    pages_replayed: int = 0  # pages the bulk lanes sent because the replay listed them
    _corrupt: int = field(default=0, init=False, repr=False)
    region_pages: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sent = [bytearray(r.pages) for r in self.regions]
        self.region_pages = [r.pages for r in self.regions]  # for protocol.check_req
        self.lost = _LostPages(self.lost, self._injection_changed)
        self._injection_changed()

    def reset_sent(self) -> None:
        """Forget what was sent (a new link: the destination tells us what it has).

        The rows are cleared in place: the demand lane's C loop writes into these very
        bytearrays, so a page it answers from now on is marked where the new bulk lanes
        look (with new rows it marked the old ones until its next return, and bulk sent
        those pages again; a bulk lane still sending when the destination completes
        never reads its 'done')."""
        with self.lock:
            for row in self.sent:
                row[:] = bytes(len(row))
            self.replay_at = 0  # what the destination lacks is streamed in order again

    @property
    def layout(self) -> warmorder.Layout:
        """The regions as a warm-order record describes them (file offset, size, page)."""
        return warmorder.layout_of([(r.offset, r.size, r.page_size) for r in self.regions])

    def use_replay(self, order: warmorder.Order) -> str:
        """Stream ``order``'s runs first; '' or why it does not fit (then it is unused)."""
        why = warmorder.mismatch(order, self.layout)
        if not why:
            self.replay, self.replay_at = warmorder.blocks(order), 0
        return why

    @property
    def corrupt_frames(self) -> int:
        """Fault injection: data frames still to send with a bad CRC."""
        return self._corrupt

    @corrupt_frames.setter
    def corrupt_frames(self, value: int) -> None:
        self._corrupt = value
        self._injection_changed()

    @property
    def hint(self) -> tuple[int, int] | None:
        """Where bulk continues (region, page): just after the latest demand request."""
        return self.control.hint()

    @hint.setter
    def hint(self, value: tuple[int, int] | None) -> None:
        self.control.set_hint(value)

    @property
    def injecting(self) -> bool:
        """Fault injection is active: the demand lane runs the Python code, which has it."""
        return bool(self.lost) or self._corrupt > 0

    def _injection_changed(self) -> None:
        # The demand lane's C loop reads this word before every batch, so a page lost
        # (or a frame corrupted) by 'inject' mid-session is never answered by C.
        self.control.set_python_only(self.injecting)


class DemandControl:
    """Words shared with the demand lane's C loop (native/fastpath/export.c, FPX_CTL_*).

    Word 0 is the bulk lanes' hint, written by whichever demand loop runs (one aligned
    64-bit word: never torn): bit 63 set, region << 40, page. Word 1 is non-zero while
    fault injection is active (the C loop hands every batch to Python then). Both are
    read and written without ``ExportState.lock``: a hint the C loop writes just as a
    bulk lane takes the previous one is lost, and bulk keeps its own cursor until the
    next request -- steering, not correctness.
    """

    _VALID: Final = 1 << 63
    _SHIFT: Final = 40
    _PAGE_MASK: Final = (1 << 40) - 1
    _REGION_MASK: Final = (1 << 23) - 1

    def __init__(self) -> None:
        self.words = (ctypes.c_uint64 * 2)()

    @property
    def address(self) -> int:
        return ctypes.addressof(self.words)

    def hint(self) -> tuple[int, int] | None:
        word = int(self.words[0])
        if not word & self._VALID:
            return None
        return (word >> self._SHIFT) & self._REGION_MASK, word & self._PAGE_MASK

    def set_hint(self, value: tuple[int, int] | None) -> None:
        if value is None:
            self.words[0] = 0
            return
        region, page = value
        self.words[0] = (self._VALID | (region & self._REGION_MASK) << self._SHIFT
                         | page & self._PAGE_MASK)

    def set_python_only(self, on: bool) -> None:
        self.words[1] = 1 if on else 0


class _LostPages(set[tuple[int, int]]):
    """``ExportState.lost``: every change tells the demand lane's C loop (see above)."""

    def __init__(self, pages: set[tuple[int, int]], changed: Callable[[], None]) -> None:
        super().__init__(pages)
        self._changed = changed

    def add(self, element: tuple[int, int], /) -> None:
        super().add(element)
        self._changed()

    def update(self, *others: Iterable[tuple[int, int]]) -> None:
        super().update(*others)
        self._changed()

    def discard(self, element: object, /) -> None:
        super().discard(element)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()



def open_memfd_region(index: int, spec: protocol.RegionSpec, fd: int) -> ExportRegion:
    """Prepare to read one region of a source memory fd.

    Reading a mapping past the end of a file raises SIGBUS, which would kill the daemon
    and every session in it. So the region is mapped only if the memfd can be sealed
    against shrinking (F_SEAL_SHRINK, memfds made with MFD_ALLOW_SEALING); otherwise
    pages are read with pread, which just returns short. A hugetlb memfd is never
    mapped: reading a hole of it (never written, or punched out with fallocate, which
    the seal allows) allocates a huge page, and with the pool empty that is a SIGBUS
    too; pread of a hole returns zeros without allocating.
    """
    region = ExportRegion(index, spec.gpa, spec.size, spec.page_size, fd=fd,
                          offset=spec.offset)
    if not is_hugetlb_fd(fd) and _seal_shrink(fd):
        region.mapping = Mapping(fd, spec.size, spec.offset, writable=False)
    return region


def open_file_region(index: int, spec: protocol.RegionSpec, fd: int) -> ExportRegion:
    """Prepare to read one region of a plain file (a snapshot's memory file): with pread
    only, never a mapping, so a file truncated under the export costs the pages past
    its end (a short read: a lost page, the importer's policy) and never the daemon."""
    return ExportRegion(index, spec.gpa, spec.size, spec.page_size, fd=fd, offset=spec.offset)


def _seal_shrink(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True
