"""The frames a source sends for a run of pages: zero markers, data with its CRC32, and
for the bulk lanes data frames with holes (the zero pages left out).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping as _AbcMapping
from typing import Final

from uffdd import peer
from uffdd.errors import KernelError, TargetGone
from uffdd.exporter.reader import PageReader
from uffdd.exporter.state import ExportRegion, ExportState
from uffdd.peer import FrameSocket

log = logging.getLogger("uffdd.export")
Header = _AbcMapping[str, object]

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
