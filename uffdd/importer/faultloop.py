"""The import session's data path: one thread that owns the page state and every install.

Why one thread: the kernel tells us about discards (UFFD_EVENT_REMOVE) on the same fd
that delivers faults, and an install of source data must never land after a discard of
the same page. With a single installer the order is simple: events are read and
applied before any later install looks at the page state, and an install that races a
pending event gets EAGAIN from the kernel and is retried after the event is read.

The thread waits in epoll on the session's userfaultfds, the demand-lane socket and an
eventfd that other threads (bulk receivers, the Trio side) use to hand it work. It never
touches guest memory: the ioctls act on the VMM's address space, and MINOR-mode data is
written through the daemon's own alias mapping of the memory fd, which is not registered,
and only with mem.tenant_write / tenant_zero: a VMM that shrinks its memfd turns a plain
store there into a SIGBUS that would kill the daemon; these fail that one session.
Zero-copy bulk frames (MINOR mode, C engine) arrive in the alias from the bulk threads
instead (recvmsg, checked there under a SIGBUS guard: bulkrx.receive_in_place) into pages
they claimed (RECEIVING) under the C engine's gate, which this thread holds whenever it
runs; this thread then only CONTINUEs them (``_resolve_received``).

A VMM may munmap part of guest RAM mid-session. Without UFFD_FEATURE_EVENT_UNMAP the
kernel says nothing then; an install there fails with ENOENT (RangeGone: the handover
verified the registration, so it means "unmapped since"). Those pages become UNMAPPED,
reported (log line per range, ``pages_unmapped``), and the rest of the session goes on.

The hot part (the table of outstanding requests, the common case of faults and demand
installs) is the engine's (engine.py: the interface and the Python engine; cengine.py:
the C one); this module asks it through ``ImportEngine`` and never which engine it is.

Size: over 500 lines (about 1,200), not yet on purpose: these are the rules and slow
paths of one thread (events, discards, unmaps, installs with their errno policy,
deadlines, the failure policy), which share its state. The bulk receive helpers
run on the bulk threads and live in ``bulkrx``; ``receive_bulk_data`` only checks the
run against the regions and hands the frame to it.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Final

from uffdd import protocol
from uffdd._linux import mem, procmaps, uffd
from uffdd._linux.mem import TenantMemoryFault, buffer_address
from uffdd.errors import AlreadyPresent, KernelError, ProtocolError, RangeGone, Retry, TargetGone
from uffdd.importer import bulkrx, cengine, engine, pagestate
from uffdd.importer.bulkrx import BulkChunk
from uffdd.importer.engine import Counters as Counters
from uffdd.importer.engine import ImportEngine, PyEngine
from uffdd.importer.engine import ImportRegion as ImportRegion
from uffdd.importer.fastimport import ImportIo
from uffdd.importer.pagestate import PageMap
from uffdd.metrics import SessionMetrics
from uffdd.peer import FrameSocket, PayloadNative
from uffdd.threads import use_short_switch_interval

log = logging.getLogger("uffdd.import")

_MSG_BATCH: Final = 64
# Bulk frames may be large (fewer hand-offs between threads); they are installed a slice
# per loop turn (the engine says how: ImportEngine.bulk_slice), so a vCPU's page never
# waits behind more than one slice's copy. A fault this recent makes the slices small.
_FAULTS_RECENT: Final = 0.01
_CHECK_INTERVAL: Final = engine.CHECK_INTERVAL
# How long a dropped demand lane is still read for the source's last frames (its
# 'cancel' follows the close of its bulk lanes by a moment).
_GOODBYE_WAIT: Final = 1.0
# A kernel view of what is still registered is reused this long (ENOENT storms).
_GONE_VIEW_TTL: Final = 1.0


class Outcome:
    """What a page request (from a vCPU exit) ended in."""

    INSTALLED: Final = "installed"
    PRESENT: Final = "present"
    POISONED: Final = "poisoned"
    LOST: Final = "lost"


PageCallback = Callable[[str, str], None]  # (outcome, reason)


class FaultLoop:
    """Runs in the session's fault thread. Other threads call only the *_threadsafe methods."""

    def __init__(
        self,
        regions: list[ImportRegion],
        pages: PageMap,
        *,
        notify: Callable[[str, object], None],
        metrics: SessionMetrics,
        deadline: float,
        policy: str,
        integrity: bool,
        fastpath: ctypes.CDLL | None = None,
    ) -> None:
        self.regions = regions
        self.pages = pages
        self.notify = notify
        self.metrics = metrics
        self.deadline = deadline
        self.policy = policy
        self.integrity = integrity
        self.counters = Counters()
        self._by_uffd: dict[int, list[ImportRegion]] = {}
        for r in regions:
            self._by_uffd.setdefault(r.uffd, []).append(r)
        for rs in self._by_uffd.values():
            rs.sort(key=lambda r: r.addr)
        self._starts = {fd: [r.addr for r in rs] for fd, rs in self._by_uffd.items()}
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._control: queue.SimpleQueue[tuple[object, ...]] = queue.SimpleQueue()
        # From the bulk receivers: received data (BulkChunk), or another bulk frame.
        self.bulk: queue.SimpleQueue[BulkChunk | protocol.Message] = queue.SimpleQueue()
        self._ep = select.epoll()
        self._msgbuf = bytearray(uffd.MSG_SIZE * _MSG_BATCH)
        self._demand: socket.socket | None = None
        self._rx = bytearray(max(8 << 20, 4 * (2 << 20)))
        self._rxview = memoryview(self._rx)
        self._rxaddr = buffer_address(self._rx)
        self._rx_start = 0
        self._rx_end = 0
        self._callbacks: dict[tuple[int, int], list[PageCallback]] = {}
        self._deferred: list[tuple[int, int, int, bytes, str]] = []
        self._zero = bytearray(max(r.page_size for r in regions))
        self._zeroaddr = buffer_address(self._zero)
        self._stopping = False
        self._finished = False
        self._link_down_since: float | None = time.monotonic()
        self._refetch_budget: dict[tuple[int, int], int] = {}
        # Stall detection: a link that stays open but moves nothing while pages are
        # outstanding is as good as lost (a black-holed network never closes a socket).
        self.stall_timeout = 0.0  # 0: off; the session sets peer.stall_timeout
        self.vmm_pid = 0  # the VMM's pid: its pagemap and smaps (0: unknown)
        self.adopt_present = False  # import "present": "keep": its present pages are valid
        self.cancel_reason: str | None = None  # set when the session fails or is cancelled
        self.cancel_code = "failed"  # ... and which of the two: the source's export ends so
        self._last_progress = time.monotonic()
        # Adaptive spinning (the C loop only): waking this thread from epoll_wait costs
        # 25-40 µs on these machines, more than a whole fault round trip. While a demand
        # reply is due the C loop busy-polls for up to ``spin_s`` after the last fault or
        # reply before sleeping; with nothing outstanding it never spins, so an idle
        # session costs no CPU.
        self.spin_s = 0.0  # the session sets peer.spin_us
        self._active_at = 0.0  # last fault read, demand request sent or reply received
        self._bulk_slices: Iterator[bool] | None = None  # the bulk frame being installed
        self._next_checks = 0.0  # deadlines and stalls are checked every _CHECK_INTERVAL
        # The engine (engine.ImportEngine): the common case and the one table of
        # outstanding requests. The C one (libuffdd_fastpath) when the session gives the
        # library (plaintext lanes only): its state lives as long as run(), which makes
        # it (_start_engine); until then, and without the library, the Python one.
        self.fastpath = fastpath
        self._engine: ImportEngine = PyEngine(self.pages, self.counters, self.metrics,
                                              self._ep, self._wakefd, set(self._by_uffd))
        # Zero-copy bulk receive (MINOR mode, C engine; the session sets peer.zero_copy):
        # pages the VMM discarded while a frame was being received into them (they stay
        # RECEIVING until the frame is resolved).
        self.zero_copy = False
        self._discarded_receiving: set[tuple[int, int]] = set()
        # The C engine while its gate is open to claims (bulk receivers read it under
        # _claim_lock, so it is never freed under a claim).
        self._claimer: cengine.CEngine | None = None
        self._claim_lock = threading.Lock()
        self.zero_copy_pages = 0  # pages CONTINUE'd from a zero-copy receive
        # The VMM's registered VMAs, as /proc/PID/smaps last said (see _range_gone).
        self._registered: list[tuple[int, int]] | None = None
        self._registered_at = 0.0

    @property
    def kind(self) -> str:
        """Which loop handles faults: ``c`` (libuffdd_fastpath) or ``python``."""
        return "c" if self.fastpath is not None else "python"

    # ------------------------------------------------------------ thread-safe API

    def stop_threadsafe(self) -> None:
        self._control.put(("stop",))
        self._kick()

    def release_buffers(self) -> None:
        """After ``run`` returned: give the demand receive buffer's pages back (8 MiB).
        A resident session (uffdd.firecracker) keeps the loop for its counters only."""
        mem.give_back(self._rx)

    def attach_demand_threadsafe(self, sock: socket.socket | None) -> None:
        """Hand the fault thread a (new) demand-lane socket, or None when the link is down."""
        self._control.put(("demand", sock))
        self._kick()

    def request_page_threadsafe(self, region: int, page: int, callback: PageCallback) -> None:
        """Make a page present for a vCPU exit; ``callback`` runs in the fault thread."""
        self._control.put(("page", region, page, callback))
        self._kick()

    def bulk_put(self, item: BulkChunk | protocol.Message) -> None:
        """Called by bulk receiver threads: a received data chunk (``receive_bulk_data``),
        or the header of a frame without payload (zero, lost, end, cancel)."""
        self.bulk.put(item)
        self._kick()

    def _kick(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wakefd, 1)

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        """The thread body. Returns when stopped; raises only on bugs."""
        # Bulk receiver threads share the GIL with this one: hand it over quickly (see
        # threads.DEMAND_SWITCH_INTERVAL).
        use_short_switch_interval()
        for fd in self._by_uffd:
            self._ep.register(fd, select.EPOLLIN)
        self._ep.register(self._wakefd, select.EPOLLIN)
        try:
            self._adopt_present_pages()
            self._check_complete()
            self._start_engine()
            claimer = self._claimer
            while not self._stopping:
                self._turn()
                self._bulk_step()
                self._retry_deferred()
                self._periodic_checks()
                self._check_complete()
                if claimer is not None:
                    claimer.gate_pass()  # a receiver waiting to claim goes first
        except TargetGone as e:
            self._fail(f"the destination VMM is gone ({e})")
        except TenantMemoryFault as e:
            self._fail(e.detail)
        except KernelError as e:
            install = e.op.startswith("UFFDIO_")
            what = "kernel refused an install" if install else "kernel call failed"
            self._fail(self._shrunk_memfd() or f"{what}: {e}")
        except ProtocolError as e:
            self._fail(f"protocol error on the demand lane: {e}")
        finally:
            self._close_claims()
            if self._demand is not None:
                self._send_cancel()
                self._demand.close()
            self._engine.close()
            self._ep.close()
            os.close(self._wakefd)

    # ------------------------------------------------------------ the engine

    def _start_engine(self) -> None:
        """The one decision: the C engine when the session gave the library."""
        if self.fastpath is None:
            return
        self._engine = cengine.CEngine(
            self.fastpath, self._ep.fileno(), self._wakefd, self.regions, self.pages,
            self._rx, self.integrity, self.spin_s, self.counters, self.metrics,
            self._progress)
        log.info("session=%s fault loop: C (libuffdd_fastpath)", self.metrics.session)
        if self.zero_copy and any(r.alias is not None for r in self.regions):
            # From here on this thread holds the gate whenever it runs (import.c): bulk
            # receivers claim pages under it, atomically with every state it writes.
            self._engine.gate_enter()
            with self._claim_lock:
                self._claimer = self._engine

    def _turn(self) -> None:
        """One turn of the engine, then whatever it handed back (engine.Yield)."""
        self._rx_start, self._rx_end, handed = self._engine.run(
            self._bulk_backlog, self._rx_start, self._rx_end, bool(self._callbacks),
            self.pages.remaining)
        for y in handed:
            if y.kind == engine.WAKE:
                self._drain_wakefd()
            elif y.kind == engine.UFFD:
                if y.events is None:
                    self._read_uffd(y.a)
                else:
                    self._events(y.a, y.events)
            elif y.kind == engine.DEMAND:
                if self._demand is not None and y.a == self._demand.fileno():
                    self._demand_io(y.b)
                # else: a demand socket closed earlier in this batch; its event is stale.
            elif y.kind == engine.LOST:
                self._demand_ended(y.a, y.b)
            elif y.kind == engine.FRAME:
                self._engine_frame()
            elif y.kind == engine.INSTALLED:
                self._installed_callbacks(y.a, y.b, y.c)
        self._flush_outbox()

    def _engine_frame(self) -> None:
        """The frame at the head of rx is one the engine leaves to FaultLoop."""
        before = self._rx_start
        self._parse_demand()
        if self._rx_start == before and self._rx_end - self._rx_start == len(self._rx):
            raise ProtocolError("demand lane frame larger than the receive buffer")

    def _demand_ended(self, mask: int, err: int) -> None:
        if err:
            self._demand_lost(os.strerror(err))
        elif mask & (select.EPOLLERR | select.EPOLLHUP) and not mask & select.EPOLLIN:
            self._demand_lost("demand lane closed")
        else:
            self._demand_lost("source closed the demand lane")

    def _installed_callbacks(self, r: int, first: int, count: int) -> None:
        for page in range(first, first + count):
            if self.pages.get(r, page) == pagestate.INSTALLED:
                for cb in self._callbacks.pop((r, page), []):
                    cb(Outcome.INSTALLED, "")

    def _progress(self, last_progress: float, active_at: float) -> None:
        """The engine saw the demand lane move (or a fault) at these times."""
        self._last_progress = max(self._last_progress, last_progress)
        self._active_at = max(self._active_at, active_at)

    def _send_cancel(self) -> None:
        """Tell the source the session is over (best effort, bounded): it can stop too."""
        if self.cancel_reason is None or self._demand is None:
            return
        sock = self._demand
        try:
            sock.settimeout(0.2)
            # Whatever is left of a half-sent request goes first, to keep the framing.
            unsent = self._engine.outbox()
            sock.sendall(unsent + protocol.pack_peer(
                {"t": "cancel", "code": self.cancel_code, "reason": self.cancel_reason[:200]}))
            sock.shutdown(socket.SHUT_WR)
            # Closing with replies still arriving would send a RST, and the source would
            # lose the cancel with its receive queue: read until it closes (bounded).
            give_up = time.monotonic() + 1.0
            while time.monotonic() < give_up and sock.recv_into(self._rxview):
                pass
        except OSError:
            pass

    def _adopt_present_pages(self) -> None:
        """Learn what a previous daemon installed, then wake every thread once.

        A VMM re-imports its uffds after a daemon restart. Pages present in its address
        space are installed: never fetch them again (in MINOR mode writing the alias
        would overwrite what the guest wrote since). Threads whose fault message the
        dead daemon had read would wait forever: a wake of each whole range makes them
        fault again, and this time we read the message.
        """
        if self.vmm_pid and self.adopt_present:
            try:
                for region in self.regions:
                    self._seed_region(region)
            except OSError as e:
                log.warning("cannot read the VMM's pagemap (%s): present pages will be "
                            "learnt from EEXIST", e)
        if self.pages.installed:
            log.info("adopted %d pages already present in the VMM", self.pages.installed)
        for region in self.regions:
            with contextlib.suppress(RangeGone):  # the VMM unmapped it: nobody waits there
                uffd.wake(region.uffd, region.addr, region.size)

    def _seed_region(self, region: ImportRegion) -> None:
        with open(f"/proc/{self.vmm_pid}/pagemap", "rb", buffering=0) as f:
            for first, flags in procmaps.present_flags(f.fileno(), region.addr, region.pages,
                                                       region.page_size):
                page = flags.find(1)
                while page >= 0:
                    if self.pages.get(region.index, first + page) <= pagestate.REQUESTED:
                        self.pages.set(region.index, first + page, pagestate.INSTALLED)
                    page = flags.find(1, page + 1)

    def _periodic_checks(self) -> None:
        """Deadlines scan every outstanding page: not on every turn of a busy loop."""
        now = time.monotonic()
        if now >= self._next_checks:
            self._next_checks = now + _CHECK_INTERVAL
            self._check_deadlines()

    def _drain_wakefd(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wakefd)
        while True:
            try:
                cmd = self._control.get_nowait()
            except queue.Empty:
                break
            self._command(cmd)

    @property
    def _bulk_backlog(self) -> bool:
        return self._bulk_slices is not None or not self.bulk.empty()

    def _bulk_step(self) -> None:
        """Install one slice of a bulk frame (the loop comes back for the next one)."""
        if self._bulk_slices is None:
            try:
                item = self.bulk.get_nowait()
            except queue.Empty:
                return
            self._last_progress = time.monotonic()
            if not isinstance(item, BulkChunk):
                self._frame(item, 0, memoryview(b""), "bulk")
                return
            if item.claimed is not None:
                try:
                    self._resolve_received(item)
                finally:
                    item.release(item.buf)
                return
            if not item.crc_ok:
                try:
                    self._corrupt(item.region, item.page, item.count, "bulk")
                finally:
                    item.release(item.buf)
                return
            self.counters.pages_zero += self._installable_in(item)
            self._bulk_slices = self._slices(item)
        if next(self._bulk_slices, True):
            self._bulk_slices = None

    def _slices(self, chunk: BulkChunk) -> Iterator[bool]:
        """Installs a verified chunk a slice at a time: yields False after each slice but
        the last, True after it; then frees the chunk's buffer."""
        try:
            r, page, count = chunk.region, chunk.page, chunk.count
            ps = self.regions[r].page_size
            addr = buffer_address(chunk.buf)
            pos, end = page, page + count
            while pos < end:
                # (pages per call, and the slice within it at which the engine may stop
                # early because a fault waits)
                faulting = time.monotonic() - self._active_at < _FAULTS_RECENT
                most, slice_pages = self._engine.bulk_slice(ps, faulting)
                pos = self._install_data(r, pos, min(most, end - pos),
                                         addr + (pos - page) * ps, "bulk", slice_pages)
                if pos < end:
                    yield False
        finally:
            chunk.release(chunk.buf)
        yield True

    def _command(self, cmd: tuple[object, ...]) -> None:
        kind = cmd[0]
        if kind == "stop":
            self._stopping = True
        elif kind == "demand":
            sock = cmd[1]
            assert sock is None or isinstance(sock, socket.socket)
            self._set_demand(sock)
        elif kind == "page":
            region, page, callback = cmd[1], cmd[2], cmd[3]
            assert isinstance(region, int) and isinstance(page, int) and callable(callback)
            self._page_for_exit(region, page, callback)

    # ------------------------------------------------------------ faults

    def _read_uffd(self, fd: int) -> None:
        while True:
            try:
                events = uffd.read_events(fd, self._msgbuf)
            except KernelError:
                raise
            except OSError as e:  # the same words as the C loop's report (ERROR)
                raise KernelError("read(uffd)", e.errno or errno.EIO,
                                  os.strerror(e.errno or errno.EIO)) from None
            if not events:
                return
            self._events(fd, events)
            if len(events) < _MSG_BATCH:
                return

    def _events(self, fd: int, events: list[uffd.Event]) -> None:
        """A batch of uffd messages: discards and remaps first, then the faults."""
        now = time.monotonic()
        self._active_at = now
        # Discards first: a fault read in the same batch must see them applied.
        for ev in events:
            if isinstance(ev, uffd.Remove):
                self._discard(fd, ev)
            elif isinstance(ev, uffd.Remap):
                self._remap(fd, ev)
        for ev in events:
            if isinstance(ev, uffd.PageFault):
                self._fault(fd, ev, now)

    def _region_at(self, fd: int, address: int) -> ImportRegion | None:
        starts = self._starts[fd]
        i = bisect.bisect_right(starts, address) - 1
        if i < 0:
            return None
        region = self._by_uffd[fd][i]
        return region if region.contains(address) else None

    def _fault(self, fd: int, ev: uffd.PageFault, now: float) -> None:
        region = self._region_at(fd, ev.address)
        self.counters.faults += 1
        self.metrics.fault("minor" if ev.minor else "missing",
                "write" if ev.write else "read")
        if region is None:
            log.warning("fault outside every region addr=%#x", ev.address)
            return
        page = (ev.address - region.addr) // region.page_size
        state = self.pages.get(region.index, page)
        if state <= pagestate.REQUESTED or state == pagestate.RECEIVING:
            # A waiter; an absent page is asked for. A page a bulk frame is being
            # received into waits for that frame (its CONTINUE wakes the thread).
            self._engine.fault(region.index, page, ev.thread_id, now)
        elif state in (pagestate.DISCARDED, pagestate.UNMAPPED):
            # UNMAPPED faulting: the VMM mapped and registered that range again (with
            # this uffd); what it holds is the VMM's, like a discarded page's.
            self._fill_discarded(region, page)
            # Every fault is observed once in the latency histogram, these ones too.
            self.metrics.resolved("demand", time.monotonic() - now)
        else:  # installed or poisoned: the install raced this fault's message; wake again
            self._wake(region, page)
            self.metrics.resolved("background", time.monotonic() - now)

    def _request(self, region: int, page: int, now: float) -> None:
        self._engine.request(region, page, now)

    def _wake(self, region: ImportRegion, page: int) -> None:
        try:
            uffd.wake(region.uffd, region.addr + page * region.page_size, region.page_size)
            self.counters.wakes += 1
        except RangeGone:
            pass

    def _discard(self, fd: int, ev: uffd.Remove) -> None:
        for region in self._by_uffd[fd]:
            lo = max(ev.start, region.addr)
            hi = min(ev.end, region.addr + region.size)
            if lo >= hi:
                continue
            first = (lo - region.addr) // region.page_size
            last = (hi - region.addr + region.page_size - 1) // region.page_size
            if ev.unmapped:  # UFFD_EVENT_UNMAP: the kernel says it, no ENOENT needed
                self._mark_unmapped(region, first, last - first)
                continue
            for page in range(first, last):
                if self.pages.get(region.index, page) == pagestate.RECEIVING:
                    # a bulk frame is being received into it: discarded when resolved
                    self._discarded_receiving.add((region.index, page))
                    continue
                self.pages.set(region.index, page, pagestate.DISCARDED)
            self._engine.forget(region.index, first, last - first)
            log.info("discard region=%d pages=%d..%d unmapped=%s", region.index, first, last,
                     ev.unmapped)

    def _remap(self, fd: int, ev: uffd.Remap) -> None:
        for region in self._by_uffd[fd]:
            if region.addr == ev.old and region.size == ev.length:
                region.addr = ev.new
                self._engine.region_moved(region.index, ev.new)
                self._by_uffd[fd].sort(key=lambda r: r.addr)
                self._starts[fd] = [r.addr for r in self._by_uffd[fd]]
                return
        self._fail(f"VMM remapped part of a region ({ev.old:#x} -> {ev.new:#x}); not supported")

    def _fill_discarded(self, region: ImportRegion, page: int) -> None:
        """A discarded page is needed again (a fault, a vCPU exit, a retry): it reads as
        the VMM left it, never as source data.

        What the VMM left, the page cache says, not the caller: in MINOR mode a page the
        guest dropped with MADV_DONTNEED keeps its data in the page cache (CONTINUE maps
        it); one punched out (MADV_REMOVE, fallocate) has none (CONTINUE says EFAULT),
        and only then is it zeroed. Without a memory fd it reads as zeros.
        """
        try:
            if region.alias is None or not self._continue_cached(region, page):
                self._zero_run(region, page, 1)
        except AlreadyPresent:
            self._wake(region, page)
        except Retry:
            self._deferred.append((region.index, page, 1, b"", "discard"))
        except RangeGone:
            self._range_gone(region, page, 1)

    def _continue_cached(self, region: ImportRegion, page: int) -> bool:
        """CONTINUE one page if the page cache has it; False if it has none (EFAULT)."""
        try:
            uffd.continue_(region.uffd, region.addr + page * region.page_size,
                           region.page_size)
        except (AlreadyPresent, Retry, RangeGone, TargetGone):
            raise
        except KernelError as e:
            if e.errno != errno.EFAULT:
                raise
            return False
        return True

    # ------------------------------------------------------------ demand lane

    def _set_demand(self, sock: socket.socket | None) -> None:
        if self._demand is not None:
            self._read_what_arrived(self._demand)
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(self._demand.fileno())
            self._demand.close()
        self._demand = sock
        self._rx_start = self._rx_end = 0
        if sock is None:
            self._engine.set_demand(None)  # its unsent requests are dropped
            if self._link_down_since is None:
                self._link_down_since = time.monotonic()
            return
        self._link_down_since = None
        self._last_progress = time.monotonic()
        sock.setblocking(False)
        self._ep.register(sock.fileno(), select.EPOLLIN)
        # Every outstanding demand request is asked for again on the new link.
        self._engine.set_demand(sock)

    def _read_what_arrived(self, sock: socket.socket) -> None:
        """Handle the frames already received, or about to be, on a lane being dropped.

        The link supervisor drops the demand lane when a bulk lane ends, which can be
        before the source's last frame arrived here: a source whose VMM died closes its
        bulk lanes and, from its demand lane's own thread, sends 'cancel' a moment later.
        Lost, the session would wait for a source that is gone until its deadline. So
        this reads until the source closes the lane, a 'cancel' or another end of the
        session was handled, or ``_GOODBYE_WAIT`` passed (a lane that stays open and
        silent: a stall, or a source that is still serving). Bounded by the receive
        buffer; errors end it quietly (the lane is being dropped anyway).
        """
        give_up = time.monotonic() + _GOODBYE_WAIT
        while self._rx_end < len(self._rx) and not self._stopping:
            try:
                # The lane is non-blocking already (_set_demand); no MSG_DONTWAIT, which
                # a TLS lane refuses with ValueError (a lost TLS lane was an internal
                # error). ProtocolError: a TLS alert refusing our certificate.
                n = sock.recv_into(self._rxview[self._rx_end :])
            except (BlockingIOError, ssl.SSLWantReadError):
                left = give_up - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(OSError, ValueError):
                    select.select([sock], [], [], left)
                continue
            except (OSError, ProtocolError):
                break
            if not n:
                break
            self._rx_end += n
            with contextlib.suppress(ProtocolError):
                self._parse_demand()
        with contextlib.suppress(ProtocolError):
            self._parse_demand()

    def _demand_io(self, mask: int) -> None:
        if mask & (select.EPOLLERR | select.EPOLLHUP) and not mask & select.EPOLLIN:
            self._demand_lost("demand lane closed")
            return
        if mask & select.EPOLLIN:
            self._demand_recv()

    def _demand_lost(self, why: str) -> None:
        # Not logged here: the session logs the link's loss once, whichever lane saw it.
        self._set_demand(None)
        self.notify("link-lost", why)

    def _flush_outbox(self) -> None:
        failed = self._engine.flush()
        if failed is not None:
            self._demand_lost(failed)

    def _demand_recv(self) -> None:
        sock = self._demand
        assert sock is not None
        while True:
            if self._rx_end == len(self._rx):
                self._compact()
            try:
                n = sock.recv_into(self._rxview[self._rx_end :])
            except BlockingIOError:
                break
            except OSError as e:
                self._demand_lost(str(e))
                return
            if n == 0:
                self._demand_lost("source closed the demand lane")
                return
            self._rx_end += n
            self.counters.bytes_demand += n
            self._last_progress = self._active_at = time.monotonic()
            self.metrics.received("demand", n)
            self._parse_demand()
            if self._demand is not sock:
                return

    def _compact(self) -> None:
        left = self._rx_end - self._rx_start
        if self._rx_start:
            self._rx[:left] = self._rx[self._rx_start : self._rx_end]
        self._rx_start, self._rx_end = 0, left
        if left == len(self._rx):
            raise ProtocolError("demand lane frame larger than the receive buffer")

    def _parse_demand(self) -> None:
        """Handle every complete frame in rx; a partial one stays, from its first byte
        (the C loop, when it runs, starts at a frame boundary)."""
        while True:
            avail = self._rx_end - self._rx_start
            if avail < 4:
                break
            (hlen,) = protocol.LENGTH.unpack_from(self._rx, self._rx_start)
            if not 0 < hlen <= protocol.MAX_PEER_HEADER:
                raise ProtocolError(f"demand frame header of {hlen} bytes")
            if avail < 4 + hlen:
                break
            start = self._rx_start + 4
            header = protocol.unpack_peer_header(self._rxview[start : start + hlen])
            length = protocol.peer_int(header, "len") if header.get("t") == "data" else 0
            if 4 + hlen + length > len(self._rx):
                raise ProtocolError(f"demand frame of {4 + hlen + length} bytes is larger "
                                    f"than the receive buffer")
            if avail < 4 + hlen + length:
                break
            src = start + hlen
            self._rx_start = src + length
            self._frame(header, self._rxaddr + src, self._rxview[src : src + length], "demand")
        if self._rx_start == self._rx_end:
            self._rx_start = self._rx_end = 0

    # ------------------------------------------------------------ frames from either lane

    def _frame(self, header: protocol.Message, addr: int, payload: memoryview,
               lane: str) -> None:
        kind = header.get("t")
        if kind == "data" or kind == "zero" or kind == "lost":
            region, page, count = self._run_of(header)
        if kind == "data":
            if self.integrity and zlib.crc32(payload) != header.get("crc"):
                self._corrupt(region, page, count, lane)
                return
            self._install_data(region, page, count, addr, lane)
        elif kind == "zero":
            self._install_zero(region, page, count, lane)
        elif kind == "lost":
            reason = str(header.get("reason", "source cannot read the page"))
            for p in range(page, page + count):
                # A page no longer needed (installed, unmapped, discarded) is no loss.
                if self.pages.get(region, p) <= pagestate.REQUESTED:
                    self._unrecoverable(region, p, "lost", reason)
        elif kind == "end":
            log.debug("source finished its background stream")
        elif kind == "cancel":
            self._fail(f"the source cancelled the session: {header.get('reason')}")
        else:
            raise ProtocolError(f"unexpected peer frame {kind!r}")

    def _run_of(self, header: protocol.Message, expanded: bool = True) -> tuple[int, int, int]:
        region = protocol.peer_int(header, "r")
        page = protocol.peer_int(header, "p")
        count = protocol.peer_int(header, "n")
        if region >= len(self.regions) or count == 0 or page + count > self.regions[region].pages:
            raise ProtocolError(f"peer frame names pages outside the regions: {header}")
        if expanded and header.get("t") == "data":
            if "zr" in header:
                raise ProtocolError("a data frame with holes on the demand lane")
            length = protocol.peer_int(header, "len")
            if length != count * self.regions[region].page_size:
                raise ProtocolError("data frame length does not match its page count")
        return region, page, count

    def receive_bulk_data(self, fs: FrameSocket, header: protocol.Message, buf: bytearray,
                          release: Callable[[bytearray], object],
                          native: PayloadNative | None = None) -> BulkChunk:
        """Bulk receiver threads: receive a data frame's payload into ``buf``.

        Each page lands at its place in the run and the frame's holes ("zr", zero pages
        the source left out) are zero-filled, so the fault thread installs the whole run
        with one ioctl. The CRC is checked here, off the fault thread (zlib releases the
        GIL). Returns the chunk for ``bulk_put``, its verdict in ``crc_ok``; ``buf``
        goes back with ``release`` once installed. With ``native`` (the C helpers), one
        recvmsg scatters the pages between the holes and one C call zero-fills the holes
        and checksums the rest; without, a receive, CRC and memset per piece.
        """
        region, page, count = self._run_of(header, expanded=False)
        ps = self.regions[region].page_size
        alias = self.regions[region].alias
        if (self.zero_copy and alias is not None and self.fastpath is not None
                and native is not None):
            claimed = self.claim_threadsafe(region, page, count)
            if claimed is not None and any(claimed):
                try:
                    return bulkrx.receive_in_place(
                        fs, header, buf, release, self.fastpath, region=region, page=page,
                        count=count, page_size=ps, integrity=self.integrity,
                        alias=alias.address + page * ps, claimed=claimed)
                except BaseException as e:
                    # Not received whole: the fault thread gives the pages back.
                    fault = e.errno if isinstance(e, bulkrx.AliasFault) else 0
                    self.bulk_put(BulkChunk(region, page, count, bytearray(), _keep, False,
                                            0, [], claimed=claimed, aborted=True,
                                            fault=fault))
                    raise
        return bulkrx.receive_chunk(fs, header, buf, release, native, region=region, page=page,
                                    count=count, page_size=ps, integrity=self.integrity)

    def claim_threadsafe(self, region: int, page: int, count: int) -> bytes | None:
        """Bulk receivers: claim (RECEIVING) the absent or requested pages of a frame's
        run before receiving into the alias; one byte per page, 1 where claimed. Done in
        C under the gate the fault thread holds whenever it runs (import.c), so a claim
        is atomic with its demand installs and costs no round trip to it. None: no
        claims (the loop has not started or has ended): receive the old way."""
        with self._claim_lock:
            claimer = self._claimer
            return None if claimer is None else claimer.claim(region, page, count)

    def _close_claims(self) -> None:
        """The loop ends: the fault thread lets the gate go for good (a receiver blocked
        on it gets None), then no claim reaches the engine it is about to free."""
        claimer = self._claimer
        if claimer is None:
            return
        claimer.gate_close()
        with self._claim_lock:
            self._claimer = None

    def _resolve_received(self, chunk: BulkChunk) -> None:
        """A zero-copy chunk (its pages RECEIVING, the data in the alias): CONTINUE its
        claimed pages if it arrived whole and verified; else give them back (absent;
        the pages someone waits for are asked for again; a bad CRC is refetched under
        the corrupt-payload rule)."""
        assert chunk.claimed is not None
        r, page, count, mask = chunk.region, chunk.page, chunk.count, chunk.claimed
        region = self.regions[r]
        row = self.pages.states[r]
        # Pages discarded meanwhile: what the VMM left is zeros, not the bulk bytes.
        mine = [page + i for i in range(count) if mask[i]] if self._discarded_receiving else []
        for q in mine:
            if (r, q) in self._discarded_receiving:
                self._discarded_receiving.discard((r, q))
                waiting = self._engine.asked(r, q) is not None or (r, q) in self._callbacks
                row[q] = pagestate.ABSENT
                self._alias_write(region, q, 1, 0)
                self.pages.set(r, q, pagestate.DISCARDED)
                self._engine.forget(r, q, 1)
                if waiting:
                    self._fill_discarded(region, q)
        runs = _runs_of(row, page, count, mask)
        for first, n in runs:  # RECEIVING -> ABSENT (claims do not move the totals)
            row[first : first + n] = bytes(n)
        if chunk.aborted or not chunk.crc_ok:
            reason = self._shrunk_memfd(region) if chunk.aborted else None
            if reason is None and chunk.fault:
                hint = " (no free huge page?)" if region.hugetlb else ""
                reason = (f"cannot receive into the memory fd of region {r} (pages "
                          f"{page}+{count}): {os.strerror(chunk.fault)}{hint}")
            if reason is not None:
                self._fail(reason)
                return
            if not chunk.crc_ok and not chunk.aborted:
                self._corrupt(r, page, count, "bulk")
                return
            now = time.monotonic()
            for first, n in runs:
                for q in range(first, first + n):
                    if self._engine.asked(r, q) is not None or (r, q) in self._callbacks:
                        self._request(r, q, now)
            self._flush_outbox()
            return
        self.counters.pages_zero += sum(
            1 for off, k in chunk.holes for i in range(off, off + k) if mask[i])
        for first, n in runs:
            stopped, rest, done = self._engine.install(r, first, n, 0, False, 0)
            if done:
                if not self.zero_copy_pages:
                    log.info("session=%s bulk receive: zero-copy into the memory fd",
                             self.metrics.session)
                self.zero_copy_pages += done
                self.counters.pages_background += done
                if self._callbacks:
                    self._installed_callbacks(r, first, stopped - first)
            if rest:
                for start, k in list(self.pages.installable_runs(r, stopped, first + n - stopped)):
                    self._install_run(region, start, k, 0, "bulk", filled=True)

    def _corrupt(self, region: int, page: int, count: int, lane: str) -> None:
        """A payload failed its checksum: ask again, a few times, then give up on the page."""
        log.warning("checksum mismatch region=%d pages=%d+%d lane=%s", region, page, count, lane)
        for p in range(page, page + count):
            key = (region, p)
            if self.pages.get(region, p) > pagestate.REQUESTED:
                continue
            tries = self._refetch_budget.get(key, 0) + 1
            self._refetch_budget[key] = tries
            if tries > 3:
                self._unrecoverable(region, p, "corrupt", "integrity check failed 3 times")
            else:
                self._request(region, p, self._asked(region, p) or time.monotonic())

    def _asked(self, region: int, page: int) -> float | None:
        return self._engine.asked(region, page)

    def _installable_in(self, chunk: BulkChunk) -> int:
        """How many pages of a bulk run's holes (zero at the source) are not here yet:
        the run's install puts zeros there, and they count as zero pages."""
        return sum(n for off, k in chunk.holes
                   for _start, n in self.pages.installable_runs(chunk.region, chunk.page + off, k))

    # ------------------------------------------------------------ installs

    def _install_data(self, r: int, page: int, count: int, src: int, lane: str,
                      slice_pages: int = 0) -> int:
        """Install the run's installable pages; returns where it stopped (the run's end,
        or earlier, with ``slice_pages``, when the C loop saw a fault waiting)."""
        region = self.regions[r]
        ps = region.page_size
        end = page + count
        # The engine installs what its common case can; the rest comes back here.
        stopped, rest, done = self._engine.install(r, page, count, src, lane == "demand",
                                                   slice_pages)
        if done:
            if lane != "demand":
                self.counters.pages_background += done
            if self._callbacks:
                self._installed_callbacks(r, page, stopped - page)
        if not rest:
            return stopped
        src += (stopped - page) * ps
        page, count = stopped, end - stopped
        for start, n in list(self.pages.installable_runs(r, page, count)):
            self._install_run(region, start, n, src + (start - page) * ps, lane)
        return end

    def _install_run(self, region: ImportRegion, start: int, count: int, src: int,
                     lane: str, filled: bool = False) -> None:
        ps = region.page_size
        method = "continue" if region.alias is not None else "copy"
        # MINOR mode: the alias is written once (``filled``), retries only CONTINUE
        while count:
            dst = region.addr + start * ps
            try:
                if region.alias is not None and not filled:
                    self._alias_write(region, start, count, src)
                    filled = True
                self._map(region, dst, src, count * ps)
                self._installed(region, start, count, lane, method)
                return
            except AlreadyPresent as e:
                done = e.done // ps
                self._installed(region, start, done, lane, method)
                # The page is present already (a previous daemon installed it): success.
                self._installed(region, start + done, 1, lane, "present")
                skip = done + 1
            except Retry as e:
                done = e.done // ps
                self._installed(region, start, done, lane, method)
                if not done:  # the address space is changing: read the pending event first
                    if filled:  # the alias holds the data already: only CONTINUE later
                        self._deferred.append((region.index, start, count, b"", "continue"))
                    else:
                        rest = ctypes.string_at(src, count * ps)
                        self._deferred.append((region.index, start, count, rest, lane))
                    return
                # A partial copy also says EAGAIN (with the bytes done): go on from there;
                # the page that stopped it answers EEXIST on the next call.
                skip = done
            except RangeGone:
                self._range_gone(region, start, count, self._redo_data(
                    region, start, src, lane, filled))
                return
            start, count, src = start + skip, count - skip, src + skip * ps

    def _redo_data(self, region: ImportRegion, first: int, src: int, lane: str,
                   filled: bool) -> Callable[[int, int], None]:
        """Install pages [p, p+n) of a run that started at ``first`` with data at ``src``."""
        ps = region.page_size
        return lambda p, n: self._install_run(region, p, n, src + (p - first) * ps, lane,
                                              filled)

    def _map(self, region: ImportRegion, dst: int, src: int, length: int) -> None:
        if region.alias is not None:
            uffd.continue_(region.uffd, dst, length)
        else:
            uffd.copy(region.uffd, dst, src, length)

    def _install_zero(self, r: int, page: int, count: int, lane: str) -> None:
        region = self.regions[r]
        for start, n in list(self.pages.installable_runs(r, page, count)):
            self._zero_pages(region, start, n, lane)

    def _zero_pages(self, region: ImportRegion, start: int, count: int, lane: str) -> None:
        """Zero one installable run, as _install_run copies one: a partial call counts
        the pages it zeroed (as the C loop does), a present page counts as present."""
        ps = region.page_size
        while count:
            try:
                self._zero_run(region, start, count)
            except RangeGone:
                self._range_gone(region, start, count,
                                 lambda p, k: self._install_zero(region.index, p, k, lane))
                return
            except AlreadyPresent as e:
                done = e.done // ps
                self._zeroed(region, start, done, lane)
                self._installed(region, start + done, 1, lane, "present")
                skip = done + 1
            except Retry as e:
                done = e.done // ps
                self._zeroed(region, start, done, lane)
                if not done:  # the address space is changing: read the pending event first
                    self._deferred.append((region.index, start, count, b"", lane))
                    return
                skip = done
            else:
                self._zeroed(region, start, count, lane)
                return
            start, count = start + skip, count - skip

    def _zeroed(self, region: ImportRegion, start: int, count: int, lane: str) -> None:
        self._installed(region, start, count, lane, "zeropage")
        self.counters.pages_zero += count

    def _zero_run(self, region: ImportRegion, page: int, count: int) -> None:
        ps = region.page_size
        if region.alias is not None:
            self._alias_write(region, page, count, 0)
            uffd.continue_(region.uffd, region.addr + page * ps, count * ps)
        elif region.hugetlb:  # UFFDIO_ZEROPAGE does not support hugetlb
            for i in range(count):
                try:
                    uffd.copy(region.uffd, region.addr + (page + i) * ps, self._zeroaddr, ps)
                except (AlreadyPresent, Retry) as e:
                    e.done += i * ps  # what this run did, not this one page's call
                    raise
        else:
            uffd.zeropage(region.uffd, region.addr + page * ps, count * ps)

    def _alias_write(self, region: ImportRegion, page: int, count: int, src: int) -> None:
        """Write ``count`` pages at ``page`` of the region's alias, from ``src`` or (0)
        zeros. Never a plain store (module doc): a fault fails the session, named."""
        alias = region.alias
        assert alias is not None
        ps = region.page_size
        try:
            if src:
                mem.tenant_write(alias.address + page * ps, src, count * ps)
            else:
                mem.tenant_zero(alias.address + page * ps, count * ps)
        except TenantMemoryFault as e:
            at = alias.offset + page * ps + e.done
            hint = " (no free huge page?)" if region.hugetlb else ""
            raise TenantMemoryFault(e.errno, e.done, self._shrunk_memfd(region) or (
                f"cannot write the memory fd of region {region.index} at offset {at:#x}: "
                f"{os.strerror(e.errno)}{hint}")) from None

    def _shrunk_memfd(self, only: ImportRegion | None = None) -> str | None:
        """The reason to give if the VMM shrank a MINOR region's memory fd, else None."""
        for region in [only] if only is not None else self.regions:
            alias = region.alias
            if alias is None:
                continue
            try:
                size = os.fstat(alias.fd).st_size
            except OSError:
                continue
            need = alias.offset + region.size
            if size < need:
                return (f"the VMM shrank the memory fd of region {region.index} (gpa "
                        f"{region.gpa:#x}) to {size} bytes during the migration, the region "
                        f"needs {need}: guest RAM must not be truncated while it is imported")
        return None

    def _range_gone(self, region: ImportRegion, start: int, count: int,
                    redo: Callable[[int, int], None] | None = None) -> None:
        """An install over [start, start+count) said ENOENT: the VMM unmapped (some of) it.

        An ioctl fails whole if any page of its range is gone, so which pages are gone
        is asked of the kernel: the VMM's VMAs still registered (/proc/PID/smaps). Pages
        of the region outside them become UNMAPPED; ``redo`` installs the rest of the
        run again. A single page that says ENOENT is gone for sure, which is also the way
        on when the kernel's view does not explain the failure: page by page.
        """
        if count == 1:
            self._mark_unmapped(region, start, 1)
            return
        for first, n in self._unregistered_runs(region):
            self._mark_unmapped(region, first, n)
        if redo is None:
            return
        runs = list(self.pages.installable_runs(region.index, start, count))
        if runs == [(start, count)]:  # nothing learnt: find the gone pages one by one
            runs = [(p, 1) for p in range(start, start + count)]
        for first, n in runs:
            redo(first, n)

    def _unregistered_runs(self, region: ImportRegion) -> list[tuple[int, int]]:
        """Page runs of ``region`` that no registered VMA of the VMM covers any more."""
        spans = self._registered_view()
        if spans is None:
            return []
        ps, lo = region.page_size, region.addr
        runs = []
        for a, b in procmaps.uncovered(lo, lo + region.size, spans):
            # A page partly outside a registered VMA cannot be installed.
            first, last = (a - lo) // ps, (b - lo + ps - 1) // ps
            runs.append((first, last - first))
        return runs

    def _registered_view(self) -> list[tuple[int, int]] | None:
        """The VMM's userfaultfd-registered VMAs, sorted (None: cannot tell)."""
        now = time.monotonic()
        if self._registered is not None and now - self._registered_at < _GONE_VIEW_TTL:
            return self._registered
        if not self.vmm_pid:
            return None
        try:
            vmas = procmaps.read_smaps(self.vmm_pid)
        except OSError as e:
            log.warning("session=%s cannot read the VMM's smaps (%s): unmapped pages are "
                        "found one by one", self.metrics.session, e)
            return None
        spans = sorted((v.start, v.end) for v in vmas if v.uffd_registered)
        self._registered, self._registered_at = spans, now
        return self._registered

    def _mark_unmapped(self, region: ImportRegion, first: int, count: int) -> None:
        """Pages the VMM unmapped: done, never installed; reported once per range."""
        r = region.index
        moved = self.pages.set_undone(r, first, count, pagestate.UNMAPPED)
        if not moved:
            return
        ps = region.page_size
        log.warning("session=%s region=%d gpa=%#x..%#x (%d pages) unmapped by the VMM "
                    "during the migration: not filled, the rest goes on", self.metrics.session,
                    r, region.gpa + first * ps, region.gpa + (first + count) * ps, moved)
        self._engine.forget(r, first, count)
        inside = [k for k in self._callbacks if k[0] == r and first <= k[1] < first + count]
        for key in inside:
            for cb in self._callbacks.pop(key, []):
                cb(Outcome.LOST, "the VMM unmapped this page")
        # A thread that faulted there before the munmap still waits: let it go.
        with contextlib.suppress(KernelError):
            uffd.wake(region.uffd, region.addr + first * ps, count * ps)

    def _installed(self, region: ImportRegion, start: int, count: int, lane: str,
                   method: str) -> None:
        if count <= 0:
            return
        r = region.index
        self._engine.installed(r, start, count, lane == "demand")
        if self._callbacks:
            self._installed_callbacks(r, start, count)
        if lane != "demand":
            self.counters.pages_background += count
        if method != "present":
            self.metrics.installed(method, count)

    def _retry_deferred(self) -> None:
        if not self._deferred:
            return
        work, self._deferred = self._deferred, []
        for r, page, count, data, lane in work:
            region = self.regions[r]
            if lane == "discard":
                self._fill_discarded(region, page)
            elif lane == "poison":
                self._poison_run(region, page, count)
            elif lane == "continue":  # the alias holds the data: CONTINUE what is left
                for start, n in list(self.pages.installable_runs(r, page, count)):
                    self._install_run(region, start, n, 0, "bulk", filled=True)
            elif data:
                buf = bytearray(data)
                self._install_data(r, page, count, buffer_address(buf), lane)
            else:
                self._install_zero(r, page, count, lane)

    # ------------------------------------------------------------ vCPU exits

    def _page_for_exit(self, r: int, page: int, callback: PageCallback) -> None:
        state = self.pages.get(r, page)
        if state == pagestate.INSTALLED:
            callback(Outcome.PRESENT, "")
        elif state == pagestate.POISONED:
            callback(Outcome.POISONED, "page was poisoned earlier")
        elif state == pagestate.DISCARDED:
            self._fill_discarded(self.regions[r], page)
            callback(Outcome.INSTALLED, "")
        elif state == pagestate.UNMAPPED:
            callback(Outcome.LOST, "the VMM unmapped this page")
        else:
            self._callbacks.setdefault((r, page), []).append(callback)
            if state == pagestate.ABSENT:
                self._request(r, page, time.monotonic())
                self._flush_outbox()

    # ------------------------------------------------------------ failures

    def _check_stall(self, now: float) -> None:
        """No byte on any lane for ``stall_timeout`` while pages are owed: drop the link."""
        if (self.stall_timeout > 0 and self._demand is not None and self._owed()
                and now - self._last_progress > self.stall_timeout):
            self._last_progress = now
            self._demand_lost(f"link stalled: no data for {self.stall_timeout:.1f}s "
                              f"with {self._owed()} pages outstanding")

    def _owed(self) -> int:
        """How many pages are asked for and not yet installed."""
        return self._engine.outstanding()

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        self._check_stall(now)
        down = self._link_down_since
        if down is not None and now - down > self.deadline and not self._finished:
            # Past the deadline without a link: every page still needed is unrecoverable
            # now, not one deadline per fault.
            self._give_up_remaining("source unreachable past the session deadline")
            return
        for r, page in self._engine.expired(now - self.deadline):
            if self.pages.get(r, page) == pagestate.RECEIVING:
                continue  # its bulk frame is on its way; resolving it decides the page
            self._unrecoverable(r, page, "deadline",
                                "source did not answer within the session deadline")

    def _give_up_remaining(self, reason: str) -> None:
        """Apply the failure policy to every page not yet installed, in whole runs."""
        if self.policy != "poison":
            self._fail(reason)
            return
        session = self.metrics.session
        log.error("session=%s poisoning every remaining page (%d): %s", session,
                  self.pages.remaining, reason)
        before = self.pages.poisoned
        for region in self.regions:
            for start, count in list(self.pages.installable_runs(region.index, 0, region.pages)):
                # One line per run, not per page: a dead source may leave millions.
                ps = region.page_size
                log.error("unrecoverable pages session=%s gpa=%#x..%#x (%d pages) reason=%s "
                          "policy=poison", session, region.gpa + start * ps,
                          region.gpa + (start + count) * ps, count, reason)
                self._poison_run(region, start, count)
        for (r, page) in list(self._callbacks):
            for cb in self._callbacks.pop((r, page), []):
                cb(Outcome.POISONED, reason)
        self._engine.forget(0, 0, 0)
        self.metrics.unrecoverable("deadline", self.pages.poisoned - before)

    def _poison_run(self, region: ImportRegion, start: int, count: int) -> None:
        ps = region.page_size
        try:
            uffd.poison(region.uffd, region.addr + start * ps, count * ps)
        except AlreadyPresent as e:  # one page in the run is present: keep it, go on
            done = e.done // ps
            self._mark(region, start, done, pagestate.POISONED)
            self.pages.set(region.index, start + done, pagestate.INSTALLED)
            if count > done + 1:
                self._poison_run(region, start + done + 1, count - done - 1)
            return
        except Retry:
            self._deferred.append((region.index, start, count, b"", "poison"))
            return
        except RangeGone:
            self._range_gone(region, start, count,
                             lambda p, n: self._poison_run(region, p, n))
            return
        self._mark(region, start, count, pagestate.POISONED)
        self.metrics.installed("poison", count)

    def _mark(self, region: ImportRegion, start: int, count: int, state: int) -> None:
        for page in range(start, start + count):
            self.pages.set(region.index, page, state)
        self._engine.forget(region.index, start, count)

    def _unrecoverable(self, r: int, page: int, code: str, reason: str) -> None:
        region = self.regions[r]
        log.error("unrecoverable page session=%s gpa=%#x reason=%s policy=%s",
                  self.metrics.session, region.gpa + page * region.page_size, reason,
                  self.policy)
        self.metrics.unrecoverable(code, 1)
        self._engine.forget(r, page, 1)
        if self.policy == "poison":
            self._poison(region, page)
            callbacks = self._callbacks.pop((r, page), [])
            for cb in callbacks:
                cb(Outcome.POISONED, reason)
        else:
            for cb in self._callbacks.pop((r, page), []):
                cb(Outcome.LOST, reason)
            self._fail(f"page at gpa {region.gpa + page * region.page_size:#x} lost: {reason}")

    def _poison(self, region: ImportRegion, page: int) -> None:
        if self.pages.get(region.index, page) in (pagestate.INSTALLED, pagestate.POISONED):
            return
        try:
            uffd.poison(region.uffd, region.addr + page * region.page_size, region.page_size)
        except AlreadyPresent:
            self.pages.set(region.index, page, pagestate.INSTALLED)
            return
        except RangeGone:
            self._range_gone(region, page, 1)
            return
        self.pages.set(region.index, page, pagestate.POISONED)
        self._engine.forget(region.index, page, 1)
        self.metrics.installed("poison", 1)

    def _fail(self, reason: str) -> None:
        if self.cancel_reason is None:  # the session learns it later, from the Trio side
            self.cancel_reason = reason
        if not self._finished:
            self._finished = True
            self.notify("failed", reason)
        # vCPU exits waiting for a page get their answer now (crash), not at their timeout.
        for key in list(self._callbacks):
            for cb in self._callbacks.pop(key, []):
                cb(Outcome.LOST, reason)
        self._stopping = True

    def _check_complete(self) -> None:
        if self.pages.complete and not self._finished:
            self._finished = True
            self.notify("complete", None)


def _keep(_buf: bytearray) -> None:
    """The release of an aborted zero-copy chunk: its buffer went back already."""


def _runs_of(row: bytearray, page: int, count: int, mask: bytes) -> list[tuple[int, int]]:
    """Runs (first, n) of pages of [page, page+count) claimed in ``mask`` and still
    RECEIVING in ``row`` (the frame's own claims: another frame's are never touched)."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < count:
        i = mask.find(1, i)
        if i < 0:
            break
        j = mask.find(0, i)
        j = count if j < 0 else j
        q = page + i
        if row[q : page + j].count(pagestate.RECEIVING) == j - i:  # the common case
            runs.append((q, j - i))
            q = page + j
        while q < page + j:  # split where a page is no longer RECEIVING (discarded)
            if row[q] != pagestate.RECEIVING:
                q += 1
                continue
            e = q
            while e < page + j and row[e] == pagestate.RECEIVING:
                e += 1
            runs.append((q, e - q))
            q = e
        i = j
    return runs


def _error_from_c(io: ImportIo) -> None:
    """Raise what the C engine reported (cengine.error_from_c)."""
    raise cengine.error_from_c(io)
