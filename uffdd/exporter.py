"""The export session's data path: lanes that serve source guest memory to the destination.

Each lane runs in its own thread with a blocking socket. The demand lane answers a
request as soon as it arrives; bulk lanes stream every page not yet sent, in chunks,
jumping to just after the most recent demand request (fault locality). Zero pages go out
as markers; every data payload carries a CRC32. Guest memory is read either through a
read-only mapping of the VMM's memory fd, or with process_vm_readv from the VMM's pid for
anonymous memory; the source VMM is paused, and this process never maps it writable.

On a plaintext link the demand lane's common case runs in C (native/fastpath/export.c,
``serve_demand``), which writes the same frames and hands everything unusual back to
the Python code here; it took the source from ~70 to ~28 µs of CPU per fault, nearly
all of the rest being the kernel's (bench demand-latency).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
import socket
import threading
import zlib
from collections.abc import Callable, Iterable
from collections.abc import Mapping as _AbcMapping
from dataclasses import dataclass, field
from typing import Final

from uffdd import peer, protocol
from uffdd._linux.mem import Mapping, buffer_address, give_back, is_hugetlb_fd, process_read
from uffdd.errors import KernelError, PeerUnavailable, ProtocolError, TargetGone
from uffdd.metrics import SessionMetrics
from uffdd.peer import FrameSocket
from uffdd.threads import use_short_switch_interval

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


class PageReader:
    """Reads pages of a region for sending, without copies where the memory is mapped."""

    def __init__(self, state: ExportState, max_bytes: int,
                 native: peer.PayloadNative | None = None) -> None:
        self.state = state
        self.scratch = bytearray(max_bytes)
        self.scratch_view = memoryview(self.scratch)
        self.scratch_addr = buffer_address(self.scratch)
        self.zero = bytes(max(r.page_size for r in state.regions))
        self.native = native  # C zero scan and CRC (bulk lanes, libuffdd_fastpath)
        self._zmap = bytearray(max(1, max_bytes // min(r.page_size for r in state.regions)))
        self._zmap_addr = buffer_address(self._zmap)
        self.zmap_addr = 0  # where the last zero_map call left a C map (0: it did not)

    def close(self) -> None:
        """Let go of the scratch buffer now, not when a garbage collection runs: a lane's
        frame (and this reader in it) can outlive the lane in a traceback cycle, and with
        2 MiB pages the demand lane's scratch is 128 MiB (it stayed resident for good).
        A memoryview of it in such a cycle (a batch's frames, in the traceback of a send
        that failed) still holds the bytearray, so its pages are given back to the kernel
        first: the memory goes whatever still refers to it."""
        give_back(self.scratch)
        with contextlib.suppress(BufferError):
            self.scratch_view.release()
        self.scratch = bytearray()
        self.scratch_view = memoryview(self.scratch)
        self.scratch_addr = 0

    def address(self, region: ExportRegion, page: int, at: int = 0) -> int:
        """Where ``view(region, page, count, at)``'s bytes are (0: not known, read-only)."""
        if region.mapping is not None:
            return region.mapping.address and region.mapping.address + page * region.page_size
        return self.scratch_addr + at

    def zero_map(self, region: ExportRegion, data: memoryview, count: int, at: int,
                 addr: int) -> bytes | bytearray:
        """Byte i is 1 if page i of the ``count`` pages in ``data`` (at ``addr``, if
        known) is all zeros. With the C library, one call for the whole chunk; the
        bytes are then valid until the next call."""
        if self.native is not None and addr:
            self.native.zero_map(addr, count * region.page_size, region.page_size,
                                 self._zmap_addr)
            self.zmap_addr = self._zmap_addr
            return self._zmap
        self.zmap_addr = 0
        return bytes(self.zero_pages(region, data, count, at))

    def view(self, region: ExportRegion, page: int, count: int, at: int = 0) -> memoryview:
        """The pages' bytes: the mapping itself, or (pid mode) read into scratch at ``at``."""
        offset = page * region.page_size
        length = count * region.page_size
        if region.mapping is not None:
            return region.mapping.view[offset : offset + length]
        target = self.scratch_view[at : at + length]
        if region.fd >= 0:  # an unsealed memfd: pread, so a shrunk file cannot SIGBUS us
            got = os.preadv(region.fd, [target], region.offset + offset)
            if got != length:
                raise KernelError("pread", errno.EIO, f"memory fd ends after {got} of "
                                  f"{length} bytes (the VMM shrank it)")
            return target
        process_read(region.pid, region.addr + offset, self.scratch_addr + at, length)
        return target

    def zero_pages(self, region: ExportRegion, data: memoryview, count: int,
                   at: int = 0) -> list[bool]:
        """Which of the ``count`` pages in ``data`` are all zeros.

        Comparing memoryviews runs item by item in CPython (it was 13% of the source's
        bulk CPU); ``bytes.startswith`` at an offset is one memcmp, without a copy per page.
        """
        ps = region.page_size
        raw: bytes | bytearray = self.scratch if data.obj is self.scratch else data.tobytes()
        base = at if raw is self.scratch else 0
        zero = self.zero if ps == len(self.zero) else self.zero[:ps]
        return [raw.startswith(zero, base + i * ps) for i in range(count)]


# A zero run at least this long goes as its own marker (installed with UFFDIO_ZEROPAGE,
# no memory used); shorter ones ride inside a bulk data frame as holes ("zr"), so a
# chunk with scattered zero pages is still one frame and one install, not dozens.
ZERO_RUN_ALONE: Final = 16

Run = tuple[str, int, int]  # kind ("lost", "zero", "data"), first, end (indexes in a view)


def _runs(reader: PageReader, region: ExportRegion, data: memoryview, page: int,
          count: int, at: int) -> list[Run]:
    """Split ``count`` pages into lost pages and runs of zero / non-zero pages."""
    lost = reader.state.lost
    zmap = reader.zero_map(region, data, count, at, reader.address(region, page, at))
    runs: list[Run] = []
    if not lost:  # a run ends where the map changes: one find per run, not a step per page
        i = 0
        while i < count:
            zero = zmap[i]
            j = zmap.find(0 if zero else 1, i + 1, count)
            j = count if j < 0 else j
            runs.append(("zero" if zero else "data", i, j))
            i = j
        return runs
    i = 0
    while i < count:
        if (region.index, page + i) in lost:
            runs.append(("lost", i, i + 1))
            i += 1
            continue
        zero = zmap[i]
        j = i + 1
        while j < count and (region.index, page + j) not in lost and zmap[j] == zero:
            j += 1
        runs.append(("zero" if zero else "data", i, j))
        i = j
    return runs


def send_pages(fs: FrameSocket, reader: PageReader, region: ExportRegion, page: int,
               count: int, lane: str, *, at: int = 0, out: list[Frame] | None = None) -> int:
    """Send pages [page, page+count) as zero markers and data frames; return bytes sent.

    Zero pages never cross the wire. On a bulk lane, short zero runs become holes of one
    data frame; on the demand lane every run is its own frame (a request is 1-64 pages).
    The frames go out with one sendmsg, or are appended to ``out`` for the caller to
    send with others (pid mode: ``at`` is where in scratch these pages are read to).
    """
    state = reader.state
    frames: list[Frame] = [] if out is None else out
    try:
        data = reader.view(region, page, count, at)
    except (KernelError, OSError) as e:
        # The source VMM's memory cannot be read (it is gone, unmapped or shrank its
        # memfd): those pages are lost, and the destination's failure policy decides.
        if count > 1 and not isinstance(e, TargetGone):
            # Part of the run may still be readable: find exactly which pages are not.
            ps = region.page_size
            for i in range(count):
                send_pages(fs, reader, region, page + i, 1, lane, at=at + i * ps, out=frames)
        else:
            # Once per region: a VMM that shrank its memfd leaves thousands of such pages.
            first = region.index not in state.unreadable
            state.unreadable.add(region.index)
            log.log(logging.ERROR if first else logging.DEBUG,
                    "cannot read region=%d pages=%d+%d: %s%s", region.index, page, count, e,
                    " (the region's further unreadable pages are not logged)" if first else "")
            frames.append(({"t": "lost", "r": region.index, "p": page, "n": count,
                            "reason": f"source cannot read the page: {e}"}, ()))
    else:
        if count == 1 and not state.lost and not state.corrupt_frames:
            _one_page(frames, reader, region, page, data, at)  # a fault: skip the run logic
        else:
            runs = _runs(reader, region, data, page, count, at)
            crc = _Crc(reader.native, reader.address(region, page, at), reader.zmap_addr)
            _frames_for(frames, state, region, page, data, runs, lane, crc)
    if out is not None:
        return 0
    sent = fs.send_frames(frames)
    state.bytes_sent += sent
    return sent


def _one_page(frames: list[Frame], reader: PageReader, region: ExportRegion, page: int,
              data: memoryview, at: int) -> None:
    state = reader.state
    if reader.zero_pages(region, data, 1, at)[0]:
        frames.append(({"t": "zero", "r": region.index, "p": page, "n": 1}, ()))
        state.pages_zero += 1
        return
    crc = zlib.crc32(data) if state.integrity else 0
    frames.append(({"t": "data", "r": region.index, "p": page, "n": 1, "len": len(data),
                    "crc": crc}, (data,)))


class _Crc:
    """CRC-32 of one chunk's frames: in C where its address is known, else zlib."""

    def __init__(self, native: peer.PayloadNative | None, addr: int, zmap_addr: int = 0) -> None:
        self.native = native if addr else None
        self.addr = addr
        self.zmap_addr = zmap_addr  # the C zero map of this chunk (0: none)

    def group(self, data: memoryview, group: list[Run], ps: int) -> int:
        """The CRC of a data frame's payload: the group's data runs, in order."""
        first, end = group[0][1], group[-1][2]
        if self.native is not None and self.zmap_addr:  # holes are the map's zero pages
            return self.native.crc32_nonzero(0, self.addr, ps, self.zmap_addr, first, end)
        crc = 0
        for kind, i, j in group:
            if kind == "data":
                if self.native is not None:
                    crc = self.native.crc32(crc, self.addr + i * ps, (j - i) * ps)
                else:
                    crc = zlib.crc32(data[i * ps : j * ps], crc)
        return crc


def _frames_for(frames: list[Frame], state: ExportState, region: ExportRegion, page: int,
                data: memoryview, runs: list[Run], lane: str, crc: _Crc | None = None) -> None:
    crc = crc or _Crc(None, 0)
    fs = _Collector(frames)
    group: list[Run] = []
    for run in runs:
        kind, i, j = run
        if lane == "bulk" and (kind == "data" or (kind == "zero" and j - i < ZERO_RUN_ALONE)):
            group.append(run)
            continue
        _send_group(fs, state, region, page, data, group, crc)
        group = []
        if kind == "data":
            _send_group(fs, state, region, page, data, [run], crc)
        elif kind == "zero":
            fs.send({"t": "zero", "r": region.index, "p": page + i, "n": j - i})
            state.pages_zero += j - i
        else:
            fs.send({"t": "lost", "r": region.index, "p": page + i, "n": 1,
                     "reason": "source cannot read this page (fault injection)"})
    _send_group(fs, state, region, page, data, group, crc)


Frame = tuple[Header, tuple[memoryview | bytes, ...]]


class _Collector:
    """Collects frames (header, payload pieces) to send them with one sendmsg."""

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames

    def send(self, header: Header, *payload: memoryview | bytes) -> None:
        self.frames.append((header, payload))


def _send_group(fs: _Collector, state: ExportState, region: ExportRegion, page: int,
                data: memoryview, group: list[Run], crc32: _Crc) -> None:
    """One data frame for adjacent runs: the data runs' bytes, the zero runs as holes."""
    while group and group[-1][0] == "zero":  # trailing zeros: a marker, not a hole
        _, i, j = group.pop()
        fs.send({"t": "zero", "r": region.index, "p": page + i, "n": j - i})
        state.pages_zero += j - i
    if not group:
        return
    ps = region.page_size
    first, end = group[0][1], group[-1][2]
    parts = [data[i * ps : j * ps] for kind, i, j in group if kind == "data"]
    holes = [[i - first, j - i] for kind, i, j in group if kind == "zero"]
    crc = crc32.group(data, group, ps) if state.integrity else 0
    if state.corrupt_frames > 0:
        state.corrupt_frames -= 1
        crc = (crc ^ 0x5A5A5A5A) if state.integrity else 0
    header: dict[str, object] = {"t": "data", "r": region.index, "p": page + first,
                                 "n": end - first, "len": sum(len(p) for p in parts),
                                 "crc": crc}
    if holes:
        header["zr"] = holes
        state.pages_zero += sum(n for _, n in holes)
    fs.send(header, *parts)


_DEMAND_BATCH_PAGES: Final = 64  # most pages answered with one sendmsg (and scratch size)
assert _DEMAND_BATCH_PAGES >= protocol.MAX_REQUEST_PAGES  # a batch holds any one request


def serve_demand(fs: FrameSocket, state: ExportState, metrics: SessionMetrics, *,
                 library: ctypes.CDLL | None = None) -> None:
    """Demand lane thread body: answer requests until the link closes.

    Every request already received is answered in one batch with one sendmsg: with many
    faulting vCPUs the destination sends requests in bursts, and a syscall per page
    capped the source at ~16k pages/s.

    With ``library`` (the C library, as ``peer.demand_library`` decided for this lane),
    the common case runs in C (``_CDemandLane``): it returns here for everything else
    (a frame that is not a request it can answer, a page it cannot read, fault
    injection), and this loop answers that batch in Python, with every rule it has.
    """
    use_short_switch_interval()
    max_page = max(r.page_size for r in state.regions)
    reader = PageReader(state, max_page * _DEMAND_BATCH_PAGES)
    lane = _CDemandLane.open(library, fs, state, reader)
    label = getattr(fs, "label", "") or "demand lane"
    if lane is not None:
        log.info("%s: answered by the C fast path", label)
    carried: tuple[ExportRegion, int, int] | None = None
    python_requests = 0
    try:
        while True:
            if (lane is not None and carried is None and not state.injecting
                    and not lane.serve(metrics)):
                continue  # the C loop's regular return: call it again
            carried, answered = _answer_batch(fs, state, reader, metrics, carried)
            python_requests += answered
    finally:
        if lane is not None:
            lane.close()  # unpins the scratch first
            log.info("%s ended: %d requests answered by the C fast path, %d by Python",
                     label, lane.requests, python_requests)
        reader.close()


def _answer_batch(fs: FrameSocket, state: ExportState, reader: PageReader,
                  metrics: SessionMetrics,
                  carried: tuple[ExportRegion, int, int] | None
                  ) -> tuple[tuple[ExportRegion, int, int] | None, int]:
    """Receive and answer one batch of requests (the Python demand loop's body).

    Returns the request that did not fit (the next batch starts with it) and how many
    requests were answered."""
    if carried is None:
        carried = _request(state, fs.recv_header())
    batch, carried = [carried], None
    pages = batch[0][2]
    while fs.header_ready() and pages < _DEMAND_BATCH_PAGES:
        req = _request(state, fs.recv_header())
        if pages + req[2] > _DEMAND_BATCH_PAGES:  # scratch is full: next batch
            carried = req
            break
        batch.append(req)
        pages += req[2]
    _claim(state, batch)
    frames: list[Frame] = []
    at = 0
    for region, p, n in batch:
        send_pages(fs, reader, region, p, n, "demand", at=at, out=frames)
        at += n * region.page_size
    nbytes = fs.send_frames(frames)
    state.bytes_sent += nbytes
    metrics.sent("demand", nbytes)
    return carried, len(batch)


# -- the demand lane's C loop (native/fastpath/export.c)

_C_RETURN_MS: Final = 50  # the C loop comes back at least this often (counters, stopping)
# export.c's return codes
_C_TIMEOUT: Final = 0
_C_HANDBACK: Final = 1
_C_EOF: Final = 2
_C_RECV_ERROR: Final = 3
_C_SEND_ERROR: Final = 4
# export.c's ways of reading a region
_C_MAP: Final = 0
_C_PREAD: Final = 1
_C_PID: Final = 2


class _CRegion(ctypes.Structure):
    """struct fpx_region."""

    _fields_ = (("pages", ctypes.c_uint64), ("page_size", ctypes.c_uint64),
                ("base", ctypes.c_uint64), ("offset", ctypes.c_uint64),
                ("sent", ctypes.c_void_p), ("mode", ctypes.c_int32), ("fd", ctypes.c_int32),
                ("pid", ctypes.c_int32), ("pad", ctypes.c_int32))


class _CLane(ctypes.Structure):
    """struct fpx_lane."""

    _fields_ = (("regions", ctypes.c_void_p), ("nregions", ctypes.c_uint64),
                ("buf", ctypes.c_void_p), ("cap", ctypes.c_uint64),
                ("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("scratch", ctypes.c_void_p), ("scratch_len", ctypes.c_uint64),
                ("ctl", ctypes.c_void_p), ("max_header", ctypes.c_uint64),
                ("spin_ns", ctypes.c_int64), ("fd", ctypes.c_int32),
                ("return_ms", ctypes.c_int32), ("integrity", ctypes.c_int32),
                ("pad", ctypes.c_int32),
                ("bytes_sent", ctypes.c_uint64), ("bytes_received", ctypes.c_uint64),
                ("pages_demand", ctypes.c_uint64), ("pages_zero", ctypes.c_uint64),
                ("requests", ctypes.c_uint64), ("batches", ctypes.c_uint64),
                ("error", ctypes.c_int32), ("pad2", ctypes.c_int32))


class _PyBuffer(ctypes.Structure):
    """Py_buffer: how to get the address of a read-only mapping (ctypes cannot)."""

    _fields_ = (("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p))


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None


def _demand_function(lib: ctypes.CDLL) -> Callable[[object], int] | None:
    """The library's demand loop, if it has one built for these structs."""
    try:
        fn = lib.uffdd_fp_export_demand
        layout = lib.uffdd_fp_export_layout
    except AttributeError:
        return None
    layout.argtypes = ()
    layout.restype = ctypes.c_uint64
    if layout() != ctypes.sizeof(_CLane) << 32 | ctypes.sizeof(_CRegion):
        log.warning("fast path: the library's demand loop has another struct layout "
                    "(rebuild native/); the demand lane runs in Python")
        return None
    fn.argtypes = (ctypes.POINTER(_CLane),)
    fn.restype = ctypes.c_int
    return fn


class _CDemandLane:
    """One demand lane's C loop: the struct it runs on, and everything it points into,
    pinned (buffer exports) for as long as the lane lives.

    The receive buffer is the FrameSocket's own: bytes it already holds are the C
    loop's first input, and what the C loop hands back is simply still in it for
    ``recv_header``. The socket is a dup() closed by ``close``: another thread's
    ``fs.close()`` shuts the connection down (waking the C loop's poll), and the
    descriptor number the C loop uses cannot be reused while it runs.
    """

    def __init__(self, fn: Callable[[object], int], fs: FrameSocket, state: ExportState,
                 reader: PageReader) -> None:
        self.fn = fn
        self.fs = fs
        self.state = state
        self.requests = 0
        self._pins: list[object] = []
        self._views: list[_PyBuffer] = []
        self._rows: list[bytearray] | None = None
        self._row_pins: list[ctypes.c_char] = []
        self.c_regions = (_CRegion * len(state.regions))()
        self.lane = lane = _CLane()
        self.fd = os.dup(fs.sock.fileno())
        try:
            for i, region in enumerate(state.regions):
                self._describe(self.c_regions[i], region)
            # FrameSocket's receive buffer (peer.py): read and written in place, never resized
            buf = fs._buf
            lane.buf = self._pin(buf)
            lane.cap = len(buf)
            lane.scratch = self._pin(reader.scratch)
            lane.scratch_len = len(reader.scratch)
            lane.regions = ctypes.addressof(self.c_regions)
            lane.nregions = len(state.regions)
            lane.ctl = state.control.address
            lane.max_header = min(fs.max_header, protocol.MAX_PEER_HEADER)
            lane.fd = self.fd
            lane.return_ms = _C_RETURN_MS
            lane.integrity = 1 if state.integrity else 0
            self._bind_rows()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, lib: ctypes.CDLL | None, fs: FrameSocket, state: ExportState,
             reader: PageReader) -> _CDemandLane | None:
        """The C loop for this lane, or None where the Python loop must run: no library
        (``peer.demand_library`` decided: off, not built, or not a plain TCP socket)."""
        if lib is None:
            return None
        if type(fs.sock) is not socket.socket:  # the decision is peer.demand_library's
            raise ValueError("the C demand loop needs a plain socket (see demand_library)")
        fn = _demand_function(lib)
        if fn is None:
            return None
        return cls(fn, fs, state, reader)

    def _pin(self, buf: bytearray) -> int:
        """The address of ``buf``, which cannot be resized (or freed) until ``close``."""
        pin = ctypes.c_char.from_buffer(buf)
        self._pins.append(pin)
        return ctypes.addressof(pin)

    def _describe(self, c: _CRegion, region: ExportRegion) -> None:
        c.pages = region.pages
        c.page_size = region.page_size
        if region.mapping is not None:  # PageReader.view's order of preference
            view = _PyBuffer()
            _get_buffer(region.mapping.map, ctypes.byref(view), 0)  # PyBUF_SIMPLE: read-only
            self._views.append(view)  # an export: the mapping cannot go while it is held
            c.mode, c.base = _C_MAP, view.buf
        elif region.fd >= 0:
            c.mode, c.fd, c.offset = _C_PREAD, region.fd, region.offset
        else:
            c.mode, c.pid, c.base = _C_PID, region.pid, region.addr

    def _bind_rows(self) -> None:
        """Point the C loop at the current ``state.sent`` rows (a new bulk link replaces
        them: until the next return the C loop marks the old ones, so a page may go
        twice, which the destination drops)."""
        rows = self.state.sent
        pins = [ctypes.c_char.from_buffer(row) for row in rows]
        for c, pin in zip(self.c_regions, pins, strict=True):
            c.sent = ctypes.addressof(pin)
        self._row_pins = pins  # the old rows' pins go (the C loop is not running)
        self._rows = rows

    def serve(self, metrics: SessionMetrics) -> bool:
        """Run the C loop until it returns; True if Python must handle what comes next.

        Folds the call's counters into the session's. A closed link raises
        PeerUnavailable, as the Python loop's recv and send do."""
        fs, lane, state = self.fs, self.lane, self.state
        if fs.closed:
            raise PeerUnavailable("peer link receive failed: the lane was closed")
        if state.sent is not self._rows:
            self._bind_rows()
        lane.start, lane.end = fs._start, fs._end
        lane.spin_ns = int(state.spin_s * 1e9)
        lane.bytes_sent = lane.bytes_received = lane.pages_demand = lane.pages_zero = 0
        lane.requests = lane.batches = 0
        rc = self.fn(ctypes.byref(lane))  # ctypes releases the GIL for the call
        fs._start, fs._end = lane.start, lane.end
        fs.received += lane.bytes_received
        if lane.bytes_sent:
            fs.sent += lane.bytes_sent
            state.bytes_sent += lane.bytes_sent
            state.pages_zero += lane.pages_zero
            with state.lock:
                state.pages_demand += lane.pages_demand
            state.pages_demand_c += lane.pages_demand
            self.requests += lane.requests
            metrics.sent("demand", lane.bytes_sent)
        if rc in (_C_TIMEOUT, _C_HANDBACK):
            return rc == _C_HANDBACK
        if rc == _C_EOF:
            raise PeerUnavailable("peer closed the link")
        what = "receive" if rc == _C_RECV_ERROR else "send"
        raise PeerUnavailable(f"peer link {what} failed: "
                              f"{OSError(lane.error, os.strerror(lane.error))}")

    def close(self) -> None:
        """Release the descriptor and every pinned buffer (the lane's thread, after the
        last call)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for view in self._views:
            _release_buffer(ctypes.byref(view))
        self._views.clear()
        self._pins.clear()
        self._row_pins.clear()


def _request(state: ExportState, header: protocol.Message) -> tuple[ExportRegion, int, int]:
    if header.get("t") != "req":
        raise ProtocolError(f"unexpected frame on the demand lane: {header.get('t')!r}")
    r, p, n = protocol.check_req(header, state.region_pages)
    return state.regions[r], p, n


def _claim(state: ExportState, batch: list[tuple[ExportRegion, int, int]]) -> None:
    """Mark requested pages sent (the bulk lanes skip them) and steer bulk after them."""
    with state.lock:
        for region, p, n in batch:
            row = state.sent[region.index]
            for page in range(p, p + n):
                row[page] = 1
            state.pages_demand += n
        region, p, n = batch[-1]
        state.hint = (region.index, p + n)


def _next_run(state: ExportState, cursor: tuple[int, int], max_bytes: int
              ) -> tuple[ExportRegion, int, int] | None:
    """Claim the next run of unsent pages at or after ``cursor`` (wrapping around)."""
    with state.lock:
        if state.hint is not None:
            cursor, state.hint = state.hint, None
        order = list(range(cursor[0], len(state.regions))) + list(range(cursor[0]))
        for r in order:
            row = state.sent[r]
            start_at = cursor[1] if r == cursor[0] else 0
            page = row.find(0, start_at)
            if page < 0 and start_at:
                page = row.find(0)
            if page < 0:
                continue
            region = state.regions[r]
            limit = min(len(row), page + max(1, max_bytes // region.page_size))
            end = row.find(1, page, limit)
            end = limit if end < 0 else end
            row[page:end] = b"\x01" * (end - page)
            state.pages_sent += end - page
            return region, page, end - page
    return None


def serve_bulk(fs: FrameSocket, state: ExportState, metrics: SessionMetrics, *,
               fastpath: str = "off") -> None:
    """Bulk lane thread body: read what the destination has, stream the rest, await 'done'.

    With the C library (``fastpath``, ``[peer] fastpath``) a chunk's zero scan and CRC
    are one C call each instead of a Python step per page and zlib's slower CRC.
    """
    _receive_have(fs, state)
    reader = PageReader(state, max(state.chunk_bytes, max(r.page_size for r in state.regions)),
                        peer.PayloadNative.load(fastpath))
    try:
        _stream(fs, state, reader, metrics)
    finally:
        reader.close()


def _stream(fs: FrameSocket, state: ExportState, reader: PageReader,
            metrics: SessionMetrics) -> None:
    cursor = (0, 0)
    try:
        while state.background:
            if _done_arrived(fs, state):  # demand faults brought every page first
                return
            run = _next_run(state, cursor, state.chunk_bytes)
            if run is None:
                break
            region, page, count = run
            nbytes = send_pages(fs, reader, region, page, count, "bulk")
            metrics.sent("bulk", nbytes)
            cursor = (region.index, page + count)
        fs.send({"t": "end"})
    except PeerUnavailable:
        # The destination completes, says 'done' and closes as soon as it has every
        # page, possibly while we are still sending: its 'done' may be waiting for us.
        if _done_arrived(fs, state):
            return
        raise
    _take_done(state, fs.recv_header())


def _take_done(state: ExportState, header: protocol.Message) -> None:
    """The destination's 'done': the export is complete, with its counters."""
    if header.get("t") != "done":
        raise ProtocolError(f"expected 'done' from the destination, got {header.get('t')!r}")
    tally = FinalTally.from_done(header)
    with state.lock:  # every bulk lane gets the same 'done': the first one counts
        if state.final_tally is None:
            state.final_tally = tally
    state.done.set()


def _done_arrived(fs: FrameSocket, state: ExportState) -> bool:
    """Without blocking: has the destination said 'done' (then the export is complete)?

    The destination sends nothing else on a bulk lane after 'start', so any frame here
    is 'done' or a protocol error."""
    try:
        if not fs.header_ready() and not select.select([fs.sock], [], [], 0)[0]:
            return False
        header = fs.recv_header()
    except (PeerUnavailable, OSError, ValueError):
        return False
    _take_done(state, header)
    return True


def _receive_have(fs: FrameSocket, state: ExportState) -> None:
    while True:
        header = fs.recv_header()
        kind = header.get("t")
        if kind == "start":
            return
        if kind != "have":
            raise ProtocolError(f"expected 'have' or 'start', got {kind!r}")
        r = protocol.peer_int(header, "r")
        bits = header.get("bits")
        if r >= len(state.regions) or not isinstance(bits, bytes):
            raise ProtocolError("bad 'have' frame")
        pages = state.regions[r].pages
        if len(bits) != (pages + 7) // 8:
            raise ProtocolError("'have' bitmap has the wrong length")
        with state.lock:
            row = state.sent[r]
            for page in range(pages):
                if bits[page >> 3] >> (page & 7) & 1:
                    row[page] = 1


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




def link_error(e: BaseException) -> str:
    """A one-line reason for a lane that ended with an error."""
    if isinstance(e, PeerUnavailable | ProtocolError | OSError):
        return str(e) or e.__class__.__name__
    return repr(e)


__all__ = ["ExportRegion", "ExportState", "link_error", "open_file_region", "open_memfd_region",
           "serve_bulk", "serve_demand"]
