"""The export session's data path: lanes that serve source guest memory to the destination.

Each lane runs in its own thread with a blocking socket. The demand lane answers a
request as soon as it arrives; bulk lanes stream every page not yet sent, in chunks,
jumping to just after the most recent demand request (fault locality). Zero pages go out
as markers; every data payload carries a CRC32. Guest memory is read either through a
read-only mapping of the VMM's memory fd, or with process_vm_readv from the VMM's pid for
anonymous memory; the source VMM is paused, and this process never maps it writable.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from dataclasses import dataclass, field

from uffdd._linux.mem import Mapping, buffer_address, process_read
from uffdd.errors import PeerUnavailable, ProtocolError
from uffdd.peer import FrameSocket
from uffdd import protocol

log = logging.getLogger("uffdd.export")


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

    @property
    def pages(self) -> int:
        return self.size // self.page_size

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()


@dataclass
class ExportState:
    """What every lane of one export session shares (guarded by ``lock``)."""

    regions: list[ExportRegion]
    chunk_bytes: int
    integrity: bool = True
    lost: set[tuple[int, int]] = field(default_factory=set)  # fault injection: pages we "cannot read"
    corrupt_frames: int = 0  # fault injection: data frames still to send with a bad CRC
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: list[bytearray] = field(default_factory=list)
    hint: tuple[int, int] | None = None
    pages_sent: int = 0
    pages_zero: int = 0
    pages_demand: int = 0
    bytes_sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sent = [bytearray(r.pages) for r in self.regions]

    def reset_sent(self) -> None:
        """Forget what was sent (a new link: the destination tells us what it has)."""
        with self.lock:
            self.sent = [bytearray(r.pages) for r in self.regions]


class PageReader:
    """Reads pages of a region for sending, without copies where the memory is mapped."""

    def __init__(self, state: ExportState, max_bytes: int) -> None:
        self.state = state
        self.scratch = bytearray(max_bytes)
        self.scratch_view = memoryview(self.scratch)
        self.scratch_addr = buffer_address(self.scratch)
        self.zero = bytes(max(r.page_size for r in state.regions))

    def view(self, region: ExportRegion, page: int, count: int) -> memoryview:
        offset = page * region.page_size
        length = count * region.page_size
        if region.mapping is not None:
            return region.mapping.view[offset : offset + length]
        process_read(region.pid, region.addr + offset, self.scratch_addr, length)
        return self.scratch_view[:length]

    def is_zero(self, region: ExportRegion, data: memoryview, index: int) -> bool:
        ps = region.page_size
        return data[index * ps : (index + 1) * ps] == self.zero[:ps]


def send_pages(fs: FrameSocket, reader: PageReader, region: ExportRegion, page: int,
               count: int, lane: str) -> int:
    """Send pages [page, page+count) as zero markers and data frames; return bytes sent."""
    state = reader.state
    before = fs.sent
    data = reader.view(region, page, count)
    i = 0
    while i < count:
        if (region.index, page + i) in state.lost:
            fs.send({"t": "lost", "r": region.index, "p": page + i, "n": 1,
                     "reason": "source cannot read this page (fault injection)"})
            i += 1
            continue
        zero = reader.is_zero(region, data, i)
        j = i + 1
        while j < count and (region.index, page + j) not in state.lost and \
                reader.is_zero(region, data, j) == zero:
            j += 1
        n = j - i
        if zero:
            fs.send({"t": "zero", "r": region.index, "p": page + i, "n": n})
            state.pages_zero += n
        else:
            ps = region.page_size
            payload = data[i * ps : j * ps]
            header: dict[str, object] = {"t": "data", "r": region.index, "p": page + i, "n": n,
                                         "len": len(payload)}
            header["crc"] = zlib.crc32(payload) if state.integrity else 0
            if state.corrupt_frames > 0:
                state.corrupt_frames -= 1
                header["crc"] = (int(header["crc"]) ^ 0x5A5A5A5A) if state.integrity else 0
            fs.send(header, payload)
        i = j
    sent = fs.sent - before
    state.bytes_sent += sent
    return sent


def serve_demand(fs: FrameSocket, state: ExportState, metrics: object) -> None:
    """Demand lane thread body: answer requests until the link closes."""
    max_page = max(r.page_size for r in state.regions)
    reader = PageReader(state, max_page * 64)
    while True:
        header = fs.recv_header()
        if header.get("t") != "req":
            raise ProtocolError(f"unexpected frame on the demand lane: {header.get('t')!r}")
        r = protocol.peer_int(header, "r")
        p = protocol.peer_int(header, "p")
        n = protocol.peer_int(header, "n")
        if r >= len(state.regions) or n == 0 or n > 64 or p + n > state.regions[r].pages:
            raise ProtocolError(f"demand request outside the session's regions: {header}")
        region = state.regions[r]
        with state.lock:
            row = state.sent[r]
            for page in range(p, p + n):
                row[page] = 1
            state.hint = (r, p + n)
            state.pages_demand += n
        nbytes = send_pages(fs, reader, region, p, n, "demand")
        _metric(metrics, "sent", "demand", nbytes)


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


def serve_bulk(fs: FrameSocket, state: ExportState, metrics: object) -> None:
    """Bulk lane thread body: read what the destination has, stream the rest, await 'done'."""
    _receive_have(fs, state)
    reader = PageReader(state, max(state.chunk_bytes, max(r.page_size for r in state.regions)))
    cursor = (0, 0)
    while True:
        run = _next_run(state, cursor, state.chunk_bytes)
        if run is None:
            break
        region, page, count = run
        nbytes = send_pages(fs, reader, region, page, count, "bulk")
        _metric(metrics, "sent", "bulk", nbytes)
        cursor = (region.index, page + count)
    fs.send({"t": "end"})
    header = fs.recv_header()
    if header.get("t") != "done":
        raise ProtocolError(f"expected 'done' from the destination, got {header.get('t')!r}")
    state.done.set()


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
    """Map a source memory fd read-only for one region."""
    mapping = Mapping(fd, spec.size, spec.offset, writable=False)
    return ExportRegion(index, spec.gpa, spec.size, spec.page_size, mapping=mapping)


def _metric(metrics: object, method: str, *args: object) -> None:
    fn = getattr(metrics, method, None)
    if fn is not None:
        fn(*args)


def link_error(e: BaseException) -> str:
    """A one-line reason for a lane that ended with an error."""
    if isinstance(e, PeerUnavailable | ProtocolError | OSError):
        return str(e) or e.__class__.__name__
    return repr(e)


__all__ = ["ExportRegion", "ExportState", "open_memfd_region", "serve_bulk", "serve_demand",
           "link_error", "os"]
