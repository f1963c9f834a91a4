"""The import side's engine: the hot part of the fault thread, behind one interface.

``FaultLoop`` (faultloop.py) holds the rules and the slow paths; an engine holds the
common case and the one outstanding-request table (page -> when it was asked, and the
threads waiting for it). The calls are shaped like the C engine's (``fp_imp_*`` in
native/fastpath/import.c, wrapped by ``cengine.CEngine``); ``PyEngine`` below is the
same interface in Python, the reference, with no common case of its own: every install
it is handed goes back to FaultLoop's slow path.

An engine is made for one run of the fault thread and is used only from that thread.
Both write page states through ``PageMap`` (the C engine writes the bytes in place and
brings the totals along when it folds) and report what they did into the session's
``Counters`` and ``SessionMetrics``, so FaultLoop never asks which engine it holds.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol

from uffdd import protocol
from uffdd._linux.mem import Mapping
from uffdd.errors import KernelError
from uffdd.importer import pagestate

if TYPE_CHECKING:
    from uffdd._linux.uffd import Event
    from uffdd.importer.pagestate import PageMap
    from uffdd.metrics import SessionMetrics

# The Python engine installs a bulk chunk this much per loop turn, so that a vCPU's page
# never waits behind more than one slice's copy.
_BULK_SLICE: Final = 256 << 10

# How long a turn may wait when there is nothing else to do: the Python engine sleeps
# this long; the C engine only while no page is outstanding (deadlines are checked
# every _CHECK_INTERVAL).
EPOLL_TIMEOUT: Final = 0.05
CHECK_INTERVAL: Final = 0.01

Key = tuple[int, int]  # (region, page)

# What one turn of an engine hands back to FaultLoop, in order. The engine leaves each
# input where FaultLoop's own code finds it (import.c's FP_Y_*):
WAKE: Final = "wake"  # ("wake",): the eventfd is readable (commands, bulk work)
UFFD: Final = "uffd"  # ("uffd", fd, events or None): events to apply (None: read the fd)
DEMAND: Final = "demand"  # ("demand", fd, mask): the demand lane is readable: read it
LOST: Final = "lost"  # ("lost", mask, errno): the demand lane ended or failed
FRAME: Final = "frame"  # ("frame",): the frame at the head of rx is FaultLoop's
INSTALLED: Final = "installed"  # ("installed", region, page, count): check callbacks


class Yield(NamedTuple):
    kind: str
    a: int = 0
    b: int = 0
    c: int = 0
    events: list[Event] | None = None


_LATENCY_SAMPLES: Final = 1 << 20


@dataclass(eq=False)
class ImportRegion:
    """A region of guest RAM in the destination VMM, as this daemon fills it."""

    index: int
    gpa: int
    addr: int
    size: int
    page_size: int
    uffd: int
    mode: str  # "missing" | "minor"
    alias: Mapping | None = None
    hugetlb: bool = False

    @property
    def pages(self) -> int:
        return self.size // self.page_size

    def contains(self, address: int) -> bool:
        return self.addr <= address < self.addr + self.size


@dataclass
class Counters:
    """What the session reports in status and events (read by other threads)."""

    pages_demand: int = 0
    pages_background: int = 0
    pages_zero: int = 0
    faults: int = 0
    bytes_demand: int = 0
    wakes: int = 0
    latencies_us: array = field(default_factory=lambda: array("f"))  # type: ignore[type-arg]

    def record_latency(self, seconds: float) -> None:
        if len(self.latencies_us) < _LATENCY_SAMPLES:
            self.latencies_us.append(seconds * 1e6)

    def room_for_latencies(self) -> int:
        return _LATENCY_SAMPLES - len(self.latencies_us)




class ImportEngine(Protocol):
    """What FaultLoop asks of an engine (see the module doc)."""

    #: ``c`` (libuffdd_fastpath) or ``python``: the status's "loop".
    kind: str

    def fault(self, region: int, page: int, tid: int, seen: float) -> None:
        """A thread faulted on an ABSENT or REQUESTED page: note it as a waiter; an
        ABSENT page is requested (as ``request``, asked at ``seen``)."""

    def request(self, region: int, page: int, asked: float) -> None:
        """Mark the page REQUESTED, note when it was asked, queue its ``req`` frame."""

    def installed(self, region: int, page: int, count: int, demand: bool) -> None:
        """Pages [page, page+count) were installed by FaultLoop: mark them INSTALLED,
        forget their requests, account their waiters' latencies (demand or
        background) and, for ``demand``, count them as demand pages."""

    def install(self, region: int, page: int, count: int, src: int, demand: bool,
                slice_pages: int) -> tuple[int, bool, int]:
        """Install the run's installable pages from ``src`` (the run's first page) as
        far as the common case goes: (stopped at, the rest is FaultLoop's, pages done).

        ``stopped`` < page+count with ``rest`` False: it stopped early (``slice_pages``)
        because a fault waits; FaultLoop calls again for the rest later."""

    def forget(self, region: int, page: int, count: int) -> None:
        """Drop pages [page, page+count) from the table, waiters too; count 0: all."""

    def expired(self, before: float) -> list[Key]:
        """Outstanding pages asked for before ``before``."""

    def asked(self, region: int, page: int) -> float | None:
        """When the page was asked for, or None if it is not outstanding."""

    def outstanding(self) -> int:
        """How many pages are asked for and not yet installed."""

    def set_demand(self, sock: socket.socket | None) -> None:
        """A new demand lane (registered for EPOLLIN), or None: the unsent requests
        are dropped and every outstanding page is asked for again on the new lane."""

    def flush(self) -> str | None:
        """Send what the outbox holds; the reason the lane failed, or None."""

    def outbox(self) -> bytes:
        """The requests queued and not yet sent (a cancel goes after them)."""

    def region_moved(self, region: int, addr: int) -> None:
        """The VMM moved a region (mremap) to ``addr``."""

    def bulk_slice(self, page_size: int, faulting: bool) -> tuple[int, int]:
        """How a bulk run is cut: (pages per call of ``install``, its ``slice_pages``)."""

    def run(self, backlog: bool, rx_start: int, rx_end: int, want_installed: bool,
            remaining: int) -> tuple[int, int, list[Yield]]:
        """One turn: wait (not at all with a ``backlog`` of bulk work), handle the
        common case, return the new [rx_start, rx_end) of the receive buffer and what
        is left for FaultLoop. A failed epoll_wait or uffd read raises KernelError."""

    def close(self) -> None:
        """The fault thread ends: fold what is left, free the engine's state."""


class PyEngine:
    """The Python engine: the outstanding table in dicts, installs left to FaultLoop."""

    kind = "python"

    def __init__(self, pages: PageMap, counters: Counters, metrics: SessionMetrics,
                 ep: select.epoll, wakefd: int, uffds: set[int]) -> None:
        self._wakefd = wakefd
        self._uffds = uffds
        self._pages = pages
        self._counters = counters
        self._metrics = metrics
        self._ep = ep
        self._asked: dict[Key, float] = {}
        self._waiters: dict[Key, list[tuple[int, float]]] = {}
        self._outbox = bytearray()
        self._sock: socket.socket | None = None
        self._mask = 0  # epoll events registered for the demand socket

    def fault(self, region: int, page: int, tid: int, seen: float) -> None:
        self._waiters.setdefault((region, page), []).append((tid, seen))
        if self._pages.get(region, page) == pagestate.ABSENT:
            self.request(region, page, seen)

    def request(self, region: int, page: int, asked: float) -> None:
        self._pages.set(region, page, pagestate.REQUESTED)
        self._asked[(region, page)] = asked
        if self._sock is not None:
            self._outbox += protocol.pack_peer({"t": "req", "r": region, "p": page, "n": 1})

    def installed(self, region: int, page: int, count: int, demand: bool) -> None:
        now = time.monotonic()
        for p in range(page, page + count):
            self._pages.set(region, p, pagestate.INSTALLED)
            key = (region, p)
            asked = self._asked.pop(key, None)
            waiters = self._waiters.pop(key, None)
            if waiters:
                self._resolved(waiters, now, demand, asked)
        if demand:
            self._counters.pages_demand += count

    def _resolved(self, waiters: list[tuple[int, float]], now: float, demand: bool,
                  asked: float | None) -> None:
        for i, (tid, seen) in enumerate(waiters):
            waited = now - seen
            if not demand:
                how = "background"
            else:
                how = "demand" if i == 0 and asked is not None and asked <= seen else "inflight"
            self._counters.record_latency(waited)
            self._metrics.resolved(how, waited)
            self._metrics.blocked(tid, waited)

    def install(self, region: int, page: int, count: int, src: int, demand: bool,
                slice_pages: int) -> tuple[int, bool, int]:
        return page, True, 0  # no common case here: all of it is FaultLoop's

    def forget(self, region: int, page: int, count: int) -> None:
        if count == 0:
            self._asked.clear()
            self._waiters.clear()
            return
        if count <= len(self._asked) + len(self._waiters):
            for p in range(page, page + count):
                self._asked.pop((region, p), None)
                self._waiters.pop((region, p), None)
            return
        for table in (self._asked, self._waiters):
            inside = [k for k in table if k[0] == region and page <= k[1] < page + count]
            for key in inside:
                del table[key]

    def expired(self, before: float) -> list[Key]:
        if not self._asked or min(self._asked.values()) >= before:
            return []
        return [key for key, asked in self._asked.items() if asked < before]

    def asked(self, region: int, page: int) -> float | None:
        return self._asked.get((region, page))

    def outstanding(self) -> int:
        return len(self._asked)

    def set_demand(self, sock: socket.socket | None) -> None:
        self._sock = sock
        self._outbox.clear()
        self._mask = select.EPOLLIN
        if sock is None:
            return
        for region, page in self._asked:
            self._outbox += protocol.pack_peer({"t": "req", "r": region, "p": page, "n": 1})

    def flush(self) -> str | None:
        sock = self._sock
        if not self._outbox or sock is None:
            return None
        try:
            n = sock.send(self._outbox)
        except BlockingIOError:
            n = 0
        except OSError as e:
            return str(e)
        del self._outbox[:n]
        mask = select.EPOLLIN | (select.EPOLLOUT if self._outbox else 0)
        if mask != self._mask:  # a syscall per fault otherwise
            self._ep.modify(sock.fileno(), mask)
            self._mask = mask
        return None

    def outbox(self) -> bytes:
        return bytes(self._outbox)

    def region_moved(self, region: int, addr: int) -> None:
        pass  # FaultLoop's ImportRegion is the only copy of the address

    def bulk_slice(self, page_size: int, faulting: bool) -> tuple[int, int]:
        return max(1, _BULK_SLICE // page_size), 0

    def run(self, backlog: bool, rx_start: int, rx_end: int, want_installed: bool,
            remaining: int) -> tuple[int, int, list[Yield]]:
        # Sleeps in epoll: it never spins (spinning from Python, with the GIL shared by
        # the bulk threads, measured slower; the C engine spins). Bulk work waiting: only
        # a peek at faults and demand replies, so that a vCPU's page never queues behind
        # more than one bulk chunk.
        try:
            ready = self._ep.poll(0 if backlog else EPOLL_TIMEOUT)
        except OSError as e:  # the same words as the C engine's report
            err = e.errno or errno.EIO
            raise KernelError("epoll_wait", err, os.strerror(err)) from None
        out: list[Yield] = []
        for fd, mask in ready:
            if fd == self._wakefd:
                out.append(Yield(WAKE))
            elif fd in self._uffds:
                out.append(Yield(UFFD, fd))
            else:  # the demand lane, or one closed earlier in this batch (FaultLoop sees)
                out.append(Yield(DEMAND, fd, mask))
        return rx_start, rx_end, out

    def close(self) -> None:
        pass
