"""Bulk receive: what the bulk receiver threads do with a data frame's payload.

A bulk receiver thread (``ImportSession._receive_bulk``) reads a frame header, takes a
buffer from its lane's pool and calls :func:`receive_chunk` (through
``FaultLoop.receive_bulk_data``, which checks the run against the regions): each page
lands at its place in the run, the frame's holes (``zr``, zero pages the source left
out) are zero-filled, and the CRC is checked here, off the fault thread. The result,
a :class:`BulkChunk`, goes to the fault thread, which installs the run as one.

Zero-copy (MINOR mode, C fault loop, ``[peer] zero_copy``): :func:`receive_in_place`
receives the pages the fault loop let this thread claim straight into the memory fd's
alias and checks them there; the fault thread only CONTINUEs them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from uffdd import protocol
from uffdd._linux import mem
from uffdd._linux.mem import TenantMemoryFault, buffer_address
from uffdd.errors import PeerUnavailable, ProtocolError
from uffdd.peer import FrameSocket, PayloadNative


class AliasFault(PeerUnavailable):
    """A zero-copy receive found the memory fd gone under the alias (EFAULT: the VMM
    shrank it; ENOMEM: no huge page): the lane is lost, and the fault thread fails the
    session with the reason (``errno``)."""

    def __init__(self, err: int) -> None:
        super().__init__(f"bulk receive into the memory fd failed: {os.strerror(err)}")
        self.errno = err


@dataclass(eq=False)
class BulkChunk:
    """A bulk data frame as a bulk receiver thread hands it to the fault thread.

    A plain run of ``count`` pages from ``page`` of region ``region``: the frame's
    ``holes`` are zero-filled in ``buf`` already, so the run installs as one (and the
    fault thread counts the holes' pages it fills as zero pages). ``crc_ok`` is the
    receiver's checksum verdict (True when integrity is off); ``received`` the payload
    bytes the lane carried. The fault thread gives ``buf`` back with ``release``.
    """

    region: int
    page: int
    count: int
    buf: bytearray
    release: Callable[[bytearray], object]
    crc_ok: bool
    received: int
    holes: list[tuple[int, int]]  # the frame's zero pages ([offset, pages]), now zeroed
    #: Zero-copy (MINOR mode): one byte per page of the run, 1 for a page claimed
    #: (RECEIVING) and received straight into the memory fd's alias (its holes zeroed
    #: there), 0 for one received into ``buf`` and dropped. None: an ordinary chunk.
    claimed: bytes | None = None
    #: The frame was not received whole (the lane failed mid-frame): its claimed
    #: pages go back to absent (their waiters asked again), nothing is installed.
    aborted: bool = False
    #: ... because the memory fd faulted (AliasFault's errno), else 0.
    fault: int = 0


def receive_chunk(fs: FrameSocket, header: protocol.Message, buf: bytearray,
                  release: Callable[[bytearray], object], native: PayloadNative | None, *,
                  region: int, page: int, count: int, page_size: int,
                  integrity: bool) -> BulkChunk:
    """Receive a data frame's payload of a checked run into ``buf``; returns the chunk.

    With ``native`` (the C helpers), one recvmsg scatters the pages between the holes
    and one C call zero-fills the holes and checksums the rest; without, a receive, CRC
    and memset per piece."""
    ps = page_size
    total = count * ps
    if total > len(buf):
        raise ProtocolError(f"bulk data frame of {total} bytes exceeds {len(buf)}")
    holes = _holes(header.get("zr"), count)
    length = protocol.peer_int(header, "len")
    if length != total - sum(n for _, n in holes) * ps:
        raise ProtocolError("data frame length does not match its pages and holes")
    if native is not None:
        crc = _receive_scattered(fs, buf, ps, count, holes, integrity, native)
    else:
        crc = _receive_pieces(fs, buf, ps, count, holes, integrity)
    return BulkChunk(region, page, count, buf, release,
                     not integrity or crc == header.get("crc"), length, holes)


def receive_in_place(fs: FrameSocket, header: protocol.Message, buf: bytearray,
                     release: Callable[[bytearray], object], lib: ctypes.CDLL, *,
                     region: int, page: int, count: int, page_size: int, integrity: bool,
                     alias: int, claimed: bytes) -> BulkChunk:
    """Zero-copy receive (MINOR mode) of a checked run whose pages the fault thread
    claimed (``claimed``, one byte per page): claimed pages go straight to ``alias``
    (the alias address of the run's first page), the others to their place in ``buf``
    (dropped: they are installed already, or not ours to fill), in one scattered
    recvmsg; the CRC is then checked and the claimed holes zeroed in place under a
    SIGBUS guard (native/fastpath/tenant.c). The fault thread only CONTINUEs.

    Never a plain load or store of the alias from Python: the bytes the header read
    buffered go there with ``tenant_write``; a shrunk memfd makes the receive fail with
    EFAULT (PeerUnavailable) or the check with TenantMemoryFault."""
    try:
        return _receive_in_place(fs, header, buf, release, lib, region, page, count,
                                 page_size, integrity, alias, claimed)
    except TenantMemoryFault as e:  # the fault thread names it (the memfd shrank)
        raise AliasFault(e.errno) from None
    except PeerUnavailable as e:
        # recvmsg's own EFAULT / ENOMEM: the kernel's copy into the alias faulted
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError) and cause.errno in (errno.EFAULT, errno.ENOMEM):
            raise AliasFault(cause.errno) from None
        raise


def _receive_in_place(fs: FrameSocket, header: protocol.Message, buf: bytearray,
                      release: Callable[[bytearray], object], lib: ctypes.CDLL,
                      region: int, page: int, count: int, page_size: int, integrity: bool,
                      alias: int, claimed: bytes) -> BulkChunk:
    ps = page_size
    if count * ps > len(buf):
        raise ProtocolError(f"bulk data frame of {count * ps} bytes exceeds {len(buf)}")
    holes = _holes(header.get("zr"), count)
    length = protocol.peer_int(header, "len")
    if length != count * ps - sum(n for _, n in holes) * ps:
        raise ProtocolError("data frame length does not match its pages and holes")
    base = buffer_address(buf)
    pieces: list[tuple[int, int, bool]] = []  # (address, bytes, in the alias), in order
    pos = 0
    for off, n in [*holes, (count, 0)]:
        while pos < off:
            end = pos + 1
            while end < off and claimed[end] == claimed[pos]:
                end += 1
            mine = bool(claimed[pos])
            pieces.append(((alias if mine else base) + pos * ps, (end - pos) * ps, mine))
            pos = end
        pos = off + n
    parts: list[memoryview] = []
    head = fs.take_buffered(length)
    got, head_addr = len(head), _view_address(head) if len(head) else 0
    for addr, n, in_alias in pieces:
        take = min(got, n)
        if take:  # what the header's read buffered: copied, never stored by hand
            if in_alias:
                mem.tenant_write(addr, head_addr, take)
            else:
                ctypes.memmove(addr, head_addr, take)
            head_addr += take
            got -= take
        if n > take:
            room = (ctypes.c_char * (n - take)).from_address(addr + take)
            parts.append(memoryview(room).cast("B"))
    del head
    fs.recv_parts(parts)
    flat = array("I", [v for hole in holes for v in hole])
    mask = (ctypes.c_char * count).from_buffer_copy(claimed)
    crc = ctypes.c_uint32()
    err = _alias_verify(lib)(alias, base, ps, count, ctypes.addressof(mask),
                             flat.buffer_info()[0] if holes else 0, len(holes),
                             int(integrity), 0, ctypes.byref(crc))
    if err:
        raise TenantMemoryFault(err, 0)
    return BulkChunk(region, page, count, buf, release,
                     not integrity or crc.value == header.get("crc"), length, holes,
                     claimed=claimed)


def _view_address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


_VERIFY: dict[int, Callable[..., int]] = {}


def _alias_verify(lib: ctypes.CDLL) -> Callable[..., int]:
    """uffdd_fp_alias_verify of ``lib``, its types declared once."""
    fn = _VERIFY.get(id(lib))
    if fn is None:
        f = lib.uffdd_fp_alias_verify
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                      ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
        fn = _VERIFY[id(lib)] = f
    return fn


def _receive_pieces(fs: FrameSocket, buf: bytearray, ps: int, count: int,
                    holes: list[tuple[int, int]], integrity: bool) -> int:
    """The Python way: a receive, a CRC update and a memset per piece of the run."""
    view = memoryview(buf)
    crc, pos = 0, 0
    for off, n in [*holes, (count, 0)]:
        if off > pos:
            piece = view[pos * ps : off * ps]
            fs.recv_into(piece)
            if integrity:
                crc = zlib.crc32(piece, crc)
        if n:
            ctypes.memset(buffer_address(buf) + off * ps, 0, n * ps)
        pos = off + n
    return crc


def _receive_scattered(fs: FrameSocket, buf: bytearray, ps: int, count: int,
                       holes: list[tuple[int, int]], integrity: bool,
                       native: PayloadNative) -> int:
    """The C way: one recvmsg into every piece, one call for the holes and the CRC."""
    view = memoryview(buf)
    parts, pos = [], 0
    for off, n in [*holes, (count, 0)]:
        if off > pos:
            parts.append(view[pos * ps : off * ps])
        pos = off + n
    fs.recv_parts(parts)
    flat = array("I", [v for hole in holes for v in hole])
    return int(native.fill_holes(buffer_address(buf), ps, count,
                                 flat.buffer_info()[0] if holes else 0, len(holes),
                                 integrity, 0))


def _holes(raw: object, count: int) -> list[tuple[int, int]]:
    """A data frame's holes: sorted, disjoint [offset, pages] runs inside its ``count`` pages."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ProtocolError("data frame: 'zr' must be a list")
    holes: list[tuple[int, int]] = []
    end = 0
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
            raise ProtocolError("data frame: each hole must be [offset, pages]")
        off, n = item
        if off < end or n < 1 or off + n > count:
            raise ProtocolError("data frame: holes must be sorted, disjoint, inside the run")
        holes.append((off, n))
        end = off + n
    return holes
