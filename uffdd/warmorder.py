"""Warm restore: the order in which a restore's pages were first demanded, recorded by the
export side of the link and replayed as the bulk stream's order on the next restore.

The export side sees every demand request, in order, whether the page source is a local
snapshot file (served by this daemon's internal loopback export) or the source host's
export. A :class:`Recorder` there keeps each page the first time it is requested (a
byte per page says "already recorded"; one 64-bit entry per page in first-demand order).
The demand lane's C loop (native/fastpath/export.c) and the Python loop both append to
it; nothing is written to a file on the fault path. When the export ends, the entries
are coalesced into runs and written once, with :func:`encode`.

What a record holds is the *demanded* set, deduplicated, in first-demand order: a page
the bulk stream delivered before anything faulted on it is never demanded, so it is not
in the record (with ``[peer] background = false`` every page the guest touched is).

The file (little-endian, version 1)::

    0   8  magic b"uffdwarm"
    8   4  version (1)
    12  4  flags: bit 0 = the restore completed, bit 1 = the record was truncated at
           MAX_RECORD_PAGES (later demands are missing)
    16  4  regions (1 .. MAX_REGIONS)
    20  4  runs (0 .. MAX_RUNS)
    24  4  CRC32 of every byte after the header
    28  4  zero
    32     regions x (u64 offset in the snapshot file, u64 size, u64 page size)
    ..     runs x (u32 region, u32 pages, u64 first page), in first-demand order

Every run lies inside its region and no page is listed twice; a file that breaks any
rule (or is larger than MAX_FILE_BYTES) is refused with :class:`OrderError`. A replay
changes only the order in which pages are sent, never which bytes: every page still
comes from the page source, and the destination installs each one once.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from uffdd import protocol
from uffdd.errors import RequestError

MAGIC: Final = b"uffdwarm"
VERSION: Final = 1
FLAG_COMPLETED: Final = 1
FLAG_TRUNCATED: Final = 2
_HEADER: Final = struct.Struct("<8sIIIIII")
_REGION: Final = struct.Struct("<QQQ")
_RUN: Final = struct.Struct("<IIQ")
#: Regions a record may describe (the import's limit, limits.max_regions_per_request).
MAX_REGIONS: Final = 256
#: Pages a record keeps (8 bytes each while recording: 8 MiB); later demands are dropped.
MAX_RECORD_PAGES: Final = 1 << 20
MAX_RUNS: Final = MAX_RECORD_PAGES
MAX_FILE_BYTES: Final = _HEADER.size + MAX_REGIONS * _REGION.size + MAX_RUNS * _RUN.size
_PAGE_SIZES: Final = (4096, 2 << 20)
#: Recorder entries: region << 40 | page (the C loop's hint encoding).
_SHIFT: Final = 40
_PAGE_MASK: Final = (1 << _SHIFT) - 1


class OrderError(ValueError):
    """A warm-order file breaks a rule of the format (the message says which)."""


#: (offset in the snapshot file, size, page size) of one region.
Layout = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class Order:
    """A parsed record: the regions it was made for and its runs, in order."""

    layout: Layout
    runs: tuple[tuple[int, int, int], ...]  # (region, first page, pages)
    flags: int = 0

    @property
    def pages(self) -> int:
        return sum(n for _r, _p, n in self.runs)


def encode(order: Order) -> bytes:
    body = b"".join(_REGION.pack(*r) for r in order.layout) + b"".join(
        _RUN.pack(r, n, p) for r, p, n in order.runs)
    return _HEADER.pack(MAGIC, VERSION, order.flags, len(order.layout), len(order.runs),
                        zlib.crc32(body), 0) + body


def decode(data: bytes) -> Order:
    """Parse and check a record strictly (OrderError says what is wrong)."""
    if len(data) > MAX_FILE_BYTES:
        raise OrderError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    if len(data) < _HEADER.size:
        raise OrderError("the file is shorter than its header")
    magic, version, flags, nregions, nruns, crc, zero = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise OrderError("not a uffdd warm-order file (bad magic)")
    if version != VERSION:
        raise OrderError(f"version {version} is not supported (this daemon reads {VERSION})")
    if flags & ~(FLAG_COMPLETED | FLAG_TRUNCATED) or zero:
        raise OrderError("unknown flags or a non-zero reserved word")
    if not 1 <= nregions <= MAX_REGIONS or nruns > MAX_RUNS:
        raise OrderError(f"{nregions} regions / {nruns} runs: out of bounds (1..{MAX_REGIONS}"
                         f", 0..{MAX_RUNS})")
    size = _HEADER.size + nregions * _REGION.size + nruns * _RUN.size
    if len(data) != size:
        raise OrderError(f"the file has {len(data)} bytes, its header says {size}")
    if zlib.crc32(memoryview(data)[_HEADER.size:]) != crc:
        raise OrderError("checksum mismatch (the file is damaged)")
    at = _HEADER.size
    layout = []
    for i in range(nregions):
        offset, rsize, page = _REGION.unpack_from(data, at)
        at += _REGION.size
        if page not in _PAGE_SIZES or not rsize or rsize % page or offset % page:
            raise OrderError(f"region {i}: size {rsize} / offset {offset} / page size "
                             f"{page} is not a valid region")
        layout.append((offset, rsize, page))
    seen = [bytearray(s // p) for _o, s, p in layout]
    runs = []
    for i in range(nruns):
        r, n, p = _RUN.unpack_from(data, at)
        at += _RUN.size
        if r >= nregions or not n or p + n > len(seen[r]):
            raise OrderError(f"run {i}: pages [{p}, {p + n}) of region {r} lie outside "
                             "the regions")
        if seen[r].find(1, p, p + n) >= 0:
            raise OrderError(f"run {i}: a page of region {r} is listed twice")
        seen[r][p:p + n] = b"\x01" * n
        runs.append((r, p, n))
    return Order(tuple(layout), tuple(runs), flags)


def read_fd(fd: int) -> Order:
    """Read and check a record from an fd the client sent (from offset 0, bounded)."""
    chunks, total = [], 0
    while total <= MAX_FILE_BYTES:
        chunk = os.pread(fd, min(1 << 20, MAX_FILE_BYTES + 1 - total), total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return decode(b"".join(chunks))


def write_fd(fd: int, order: Order) -> int:
    """Replace the file's contents with ``order``; the bytes written."""
    data = encode(order)
    os.ftruncate(fd, 0)
    view, at = memoryview(data), 0
    while at < len(data):
        at += os.pwrite(fd, view[at:], at)
    return len(data)


def mismatch(order: Order, layout: Layout) -> str:
    """Why ``order`` does not fit an export of ``layout`` ('' when it does)."""
    if order.layout != layout:
        return (f"it was recorded for regions {list(order.layout)}, this restore has "
                f"{list(layout)} (another snapshot?)")
    return ""


class Recorder:
    """Pages in first-demand order, shared with the demand lane's C loop.

    ``entries`` (region << 40 | page) and ``count`` are written by the C loop without
    the export state's lock (an atomic add on ``count``) and by the Python loop under
    it; ``seen`` has a byte per page, set when the page is recorded. Two demand lanes
    answer at once only while a link is replaced; a page both record then appears once
    (``order`` dedups), and an entry one of them overwrites is lost: a slightly shorter
    record, never a wrong one (a replay only reorders).
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.seen = [bytearray(size // page) for _o, size, page in layout]
        self.capacity = min(MAX_RECORD_PAGES, sum(len(s) for s in self.seen))
        self.entries = (ctypes.c_uint64 * max(1, self.capacity))()
        self.count = ctypes.c_uint64(0)  # may run past capacity: then truncated

    def add(self, region: int, page: int, pages: int) -> None:
        """Record [page, page + pages) of ``region`` (caller holds the state lock)."""
        row = self.seen[region]
        for p in range(page, page + pages):
            if row[p]:
                continue
            row[p] = 1
            i = self.count.value
            self.count.value = i + 1
            if i < self.capacity:
                self.entries[i] = region << _SHIFT | p

    @property
    def pages(self) -> int:
        return min(self.count.value, self.capacity)

    def order(self, completed: bool) -> Order:
        """The record so far, coalesced into runs."""
        n = self.pages
        runs: list[tuple[int, int, int]] = []
        done = [bytearray(len(s)) for s in self.seen]
        for i in range(n):
            e = int(self.entries[i])
            r, p = e >> _SHIFT, e & _PAGE_MASK
            if r >= len(done) or p >= len(done[r]) or done[r][p]:
                continue  # a racing duplicate (see the class docstring)
            done[r][p] = 1
            if runs and runs[-1][0] == r and runs[-1][1] + runs[-1][2] == p:
                runs[-1] = (r, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((r, p, 1))
        flags = (FLAG_COMPLETED if completed else 0) | (
            FLAG_TRUNCATED if self.count.value > self.capacity else 0)
        return Order(self.layout, tuple(runs), flags)


#: A replay streams whole aligned blocks of this many bytes around each recorded page
#: (one page for 2 MiB pages): the bulk chunk, so a replayed stream moves as fast as a
#: sequential one. A frame per page made it several times slower, and 64 KiB blocks
#: (16 pages per recorded page) still made a restore with the stream on slower than no
#: replay at all (README, "Warm restore", measured).
REPLAY_BLOCK_BYTES: Final = 2 << 20


def blocks(order: Order) -> tuple[tuple[int, int, int], ...]:
    """The runs a replay streams: each recorded run widened to the aligned blocks that
    hold it, each block once, in the order of its first recorded page."""
    out: list[tuple[int, int, int]] = []
    taken = [bytearray((size // page + _per(page) - 1) // _per(page))
             for _o, size, page in order.layout]
    for r, first, count in order.runs:
        _o, size, page = order.layout[r]
        per, pages = _per(page), size // page
        for b in range(first // per, (first + count - 1) // per + 1):
            if taken[r][b]:
                continue
            taken[r][b] = 1
            start, end = b * per, min(pages, (b + 1) * per)
            if out and out[-1][0] == r and out[-1][1] + out[-1][2] == start:
                out[-1] = (r, out[-1][1], out[-1][2] + end - start)
            else:
                out.append((r, start, end - start))
    return tuple(out)


def _per(page: int) -> int:
    return max(1, REPLAY_BLOCK_BYTES // page)


# ---------------------------------------------------------------- the requests' fds


#: ``prepare`` fields that name one of the request's fds (by index).
PREPARE_FD_FIELDS: Final = ("fd", "warm_record", "warm_replay")


def fd_indices(body: protocol.Message, count: int, keys: tuple[str, ...] = PREPARE_FD_FIELDS,
               op: str = "prepare", every: bool = True) -> dict[str, int]:
    """Which of the request's ``count`` fds each fd field of ``keys`` names: each one a
    different index, and (``every``) every fd sent named by one of them."""
    named: dict[str, int] = {}
    for key in keys:
        if key not in body:
            continue
        value = body[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
            raise RequestError("bad-fds", f"{op}: '{key}' must be the index of one of "
                               f"the {count} fds sent with the request")
        if value in named.values():
            raise RequestError("bad-fds", f"{op}: '{key}' names an fd another field "
                               "names too")
        named[key] = value
    if every and len(named) != count:
        raise RequestError("bad-fds", f"prepare: {count} fds came with the request, "
                           f"{len(named)} of them named ({', '.join(keys)})")
    return named


def warm_fds(body: protocol.Message, fds: list[int], op: str) -> dict[str, int]:
    """The warm-restore fields of an ``export`` (the region table names the rest)."""
    return fd_indices(body, len(fds), ("warm_record", "warm_replay"), op, every=False)


def check_record_fd(fd: int) -> None:
    """Warm restore: the record's fd, a regular file open for writing."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise RequestError("bad-fds", "the 'warm_record' fd is not a regular file")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise RequestError("bad-fds", "the 'warm_record' fd is open read-only")


def read_replay(fd: int) -> Order:
    """Warm restore: read and check the recorded order now, so that a bad file is
    refused by ``prepare`` rather than noticed at the handover."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise RequestError("bad-fds", "the 'warm_replay' fd is not a regular file")
    try:
        return read_fd(fd)
    except OSError as e:
        raise RequestError("bad-fds", "cannot read the 'warm_replay' fd: "
                           f"{e.strerror}") from None
    except OrderError as e:
        raise RequestError("bad-request", "'warm_replay' is not a valid warm-"
                           f"order file: {e}") from None


def layout_of(regions: Sequence[tuple[int, int, int]]) -> Layout:
    return tuple((int(o), int(s), int(p)) for o, s, p in regions)


__all__ = ["MAGIC", "MAX_FILE_BYTES", "MAX_RECORD_PAGES", "VERSION", "Order", "OrderError",
           "Recorder", "decode", "encode", "layout_of", "mismatch", "read_fd", "write_fd"]
