"""The C engine: ``engine.ImportEngine`` over libuffdd_fastpath's ``fp_imp_*`` calls.

``fastimport.CImport`` wraps each C call; this adapter gives FaultLoop the interface both
engines share. The C state holds the outstanding table (a hash table in import.c) and
writes the page-state bytes of the session's ``PageMap`` in place; what it counts
(pages installed, faults, latencies, demand bytes) it accumulates in ``struct
fp_imp_io``, and this adapter folds that into the PageMap's totals, the session's
counters and its metrics after every call that may move them, so FaultLoop sees the
same numbers the Python engine keeps as it goes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address
from uffdd.errors import KernelError
from uffdd.importer import engine, fastimport

if TYPE_CHECKING:
    from uffdd.importer.engine import Counters, ImportRegion
    from uffdd.importer.pagestate import PageMap
    from uffdd.metrics import SessionMetrics

# The C engine's bulk slices: small while vCPUs fault (a slice's first writes into memory
# the hypervisor took back cost up to ~35 µs a page on these VMs: fault p99 under load
# was 2.0-2.4 ms with 256 KiB slices, 0.9-1.3 ms with 64 KiB), large when no fault came
# recently (fewer ioctls). The C install checks for a waiting fault between slices.
_C_SLICE_FAULTING: Final = 256 << 10
_C_SLICE_QUIET: Final = 2 << 20
_WHOLE: Final = 1 << 62  # one install call takes the whole run (it slices itself)

#: One progress report: (last byte on the demand lane, last fault or reply).
Progress = Callable[[float, float], None]


class CEngine:
    """One fault-thread run's C engine (see the module doc)."""

    kind = "c"

    def __init__(self, lib: ctypes.CDLL, epfd: int, wakefd: int,
                 regions: list[ImportRegion], pages: PageMap, rx: bytearray,
                 integrity: bool, spin_s: float, counters: Counters,
                 metrics: SessionMetrics, progress: Progress) -> None:
        c = fastimport.CImport(lib, epfd, wakefd, len(regions))
        for r in regions:
            c.region(r.index, r.addr, r.size, r.page_size, r.uffd,
                     r.alias.address if r.alias is not None else 0, r.hugetlb,
                     buffer_address(pages.states[r.index]))
        c.io.rx = buffer_address(rx)
        c.io.rx_cap = len(rx)
        c.io.integrity = int(integrity)
        c.io.spin_s = spin_s
        self._c = c
        self._pages = pages
        self._counters = counters
        self._metrics = metrics
        self._progress = progress

    # -- the table

    def fault(self, region: int, page: int, tid: int, seen: float) -> None:
        self._c.fault(region, page, tid, seen)

    def request(self, region: int, page: int, asked: float) -> None:
        self._c.request(region, page, asked)

    def installed(self, region: int, page: int, count: int, demand: bool) -> None:
        self._c.installed(region, page, count, demand)
        self._fold()

    def install(self, region: int, page: int, count: int, src: int, demand: bool,
                slice_pages: int) -> tuple[int, bool, int]:
        stopped, err, done = self._c.install(region, page, count, src, demand, slice_pages)
        self._fold()
        return stopped, bool(err), done

    def forget(self, region: int, page: int, count: int) -> None:
        self._c.forget(region, page, count)

    def expired(self, before: float) -> list[engine.Key]:
        oldest, pages = self._c.expired(before)
        return pages if oldest is not None and oldest < before else []

    def asked(self, region: int, page: int) -> float | None:
        return self._c.asked(region, page)

    def outstanding(self) -> int:
        return self._c.outstanding()

    # -- the demand lane

    def set_demand(self, sock: socket.socket | None) -> None:
        self._c.set_demand(sock.fileno() if sock is not None else -1)

    def flush(self) -> str | None:
        return None  # the C engine sends its outbox when it runs next

    def outbox(self) -> bytes:
        return self._c.outbox()

    def region_moved(self, region: int, addr: int) -> None:
        self._c.region_moved(region, addr)

    # -- the gate (zero-copy bulk receive; see import.c)

    def gate_enter(self) -> None:
        self._c.gate_enter()

    def gate_pass(self) -> None:
        self._c.gate_pass()

    def gate_close(self) -> None:
        self._c.gate_close()

    def claim(self, region: int, page: int, count: int) -> bytes | None:
        return self._c.claim(region, page, count)

    def bulk_slice(self, page_size: int, faulting: bool) -> tuple[int, int]:
        piece = _C_SLICE_FAULTING if faulting else _C_SLICE_QUIET
        return _WHOLE, max(1, piece // page_size)

    # -- the loop

    def run(self, backlog: bool, rx_start: int, rx_end: int, want_installed: bool,
            remaining: int) -> tuple[int, int, list[engine.Yield]]:
        c, io = self._c, self._c.io
        io.rx_start, io.rx_end = rx_start, rx_end
        io.want_installed = int(want_installed)
        io.remaining = remaining
        if backlog:
            timeout = 0.0
        else:
            timeout = engine.CHECK_INTERVAL if c.outstanding() else engine.EPOLL_TIMEOUT
        why = c.run(timeout)
        self._fold()
        out: list[engine.Yield] = []
        if why == fastimport.WAKE:
            out.append(engine.Yield(engine.WAKE))
        elif why == fastimport.UFFD:
            out.append(engine.Yield(engine.UFFD, io.msg_fd,
                                    events=uffd.decode(bytes(io.msgs), io.nmsgs)))
        elif why == fastimport.FRAME:
            out.append(engine.Yield(engine.FRAME))
        elif why == fastimport.DEMAND:
            out.append(engine.Yield(engine.LOST, io.demand_mask, io.demand_errno))
            io.demand_errno = 0
        elif why == fastimport.INSTALLED:
            out.append(engine.Yield(engine.INSTALLED, io.y_region, io.y_page, io.y_count))
        elif why == fastimport.ERROR:
            raise error_from_c(io)
        return io.rx_start, io.rx_end, out

    def close(self) -> None:
        self._fold()
        self._c.close()

    # -- folding what C counted

    def _fold(self) -> None:
        """Move what the C engine counted into the page totals, counters and metrics."""
        io = self._c.io
        dirty = io.dirty
        if not dirty:
            return
        io.dirty = 0
        c = self._counters
        if dirty & fastimport.DIRTY_PAGES:
            self._pages.installed_in_place(io.installed_delta)
            c.pages_demand += io.demand_pages
            c.pages_zero += io.zero_pages
            for method, n in (("copy", io.copy_pages), ("continue", io.continue_pages),
                              ("zeropage", io.zero_pages)):
                if n:
                    self._metrics.installed(method, n)
            io.installed_delta = io.demand_pages = 0
            io.copy_pages = io.continue_pages = io.zero_pages = 0
        if dirty & fastimport.DIRTY_FAULTS:
            for i, (mode, access) in enumerate(fastimport.FAULT_KINDS):
                n = io.faults[i]
                if n:
                    c.faults += n
                    self._metrics.faults(mode, access, n)
                    io.faults[i] = 0
        if dirty & fastimport.DIRTY_LATENCY:
            self._fold_latency(io)
        if dirty & fastimport.DIRTY_LANE:
            if io.bytes_demand:
                c.bytes_demand += io.bytes_demand
                self._metrics.received("demand", io.bytes_demand)
                io.bytes_demand = 0
            self._progress(io.last_progress, io.active_at)

    def _fold_latency(self, io: fastimport.ImportIo) -> None:
        for h, how in enumerate(fastimport.HOW):
            counts = list(io.hist[h])
            if any(counts):
                self._metrics.resolved_many(how, counts, io.hist_sum[h])
        ctypes.memset(ctypes.addressof(io.hist), 0, ctypes.sizeof(io.hist))
        ctypes.memset(ctypes.addressof(io.hist_sum), 0, ctypes.sizeof(io.hist_sum))
        for i in range(io.ntids):
            self._metrics.blocked(io.tids[i], io.tid_seconds[i])
        io.ntids = 0
        c = self._counters
        room = c.room_for_latencies()
        if room > 0:
            c.latencies_us.extend(io.samples_us[: min(room, io.nsamples)])
        io.nsamples = 0


def error_from_c(io: fastimport.ImportIo) -> KernelError:
    """What the Python engine raises for the failure the C engine reported (one policy:
    the session fails with that reason)."""
    op, err = io.err_op, io.err_errno
    if op == fastimport.E_SHORT_UFFD:
        return uffd.IncompleteMessage("read(uffd)", errno.EIO,
                                      f"{io.err_bytes} bytes is not whole messages")
    if op == fastimport.E_READ_UFFD:
        return KernelError("read(uffd)", err, os.strerror(err))
    if op == fastimport.E_EPOLL_WAIT:
        return KernelError("epoll_wait", err, os.strerror(err))
    return KernelError("C fault loop", err, f"unknown error report {op} (a bug)")

