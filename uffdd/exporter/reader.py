"""Reading source guest memory: never through a mapping that could fault the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Mapping as _AbcMapping

from uffdd import peer
from uffdd._linux.mem import buffer_address, give_back, process_read
from uffdd.errors import KernelError
from uffdd.exporter.state import ExportRegion, ExportState

log = logging.getLogger("uffdd.export")
Header = _AbcMapping[str, object]

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
