"""The destination side of a migration: an :class:`ImportSession` owns the VMM's
userfaultfds, the fault thread (:mod:`uffdd.importer.faultloop`), the link to the source
(a demand lane and bulk lanes, with reconnection) and resolves vCPU exits with its
strategy; it ends with one terminal event, and at completion tells the source its
final tally in 'done'.

Size: about 700 lines: the import session's Trio side (link supervision with its
dialer, bulk receivers, completion and the tally in 'done', vCPU-exit resolution with its
strategy context). The strategy context (``_Context``) and the dialer are the pieces
that could leave it next.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio

from uffdd import peer, protocol, strategies
from uffdd._linux import sdnotify
from uffdd._linux.fds import OwnedFds
from uffdd.errors import AuthError, PeerUnavailable, ProtocolError, RefusedHere, UffddError
from uffdd.importer import pagestate
from uffdd.importer.faultloop import FaultLoop, ImportRegion, Outcome
from uffdd.importer.pagestate import PageMap
from uffdd.session import (
    _CANCEL_REASON,
    EVENT_SEND_TIMEOUT,
    MAX_POISONED_RANGES,
    SessionBase,
    _quietly,
    fdstore_name,
    first_of,
    latency_percentiles,
    log,
)
from uffdd.threads import run_thread

_BULK_BUFFERS: Final = 8


class RegionMismatch(UffddError):
    """The source's regions are not the import's: final on both sides."""


# ============================================================== import


@dataclass
class ImportSession(SessionBase):
    """The destination side of a migration."""

    regions: list[ImportRegion] = field(default_factory=list)
    peer_address: str = ""
    strategy: strategies.Strategy = field(default_factory=strategies.ContinueThenPopulate)
    policy: str = "crash"
    deadline: float = 30.0
    fds: OwnedFds = field(default_factory=OwnedFds)
    adopt_present: bool = False  # import "present": "keep" (or a re-import from the fd store)
    #: The process whose memory the uffds serve, when it is not the API client that
    #: created the session (Firecracker's handover: the orchestrator owns the session,
    #: Firecracker is the VMM). 0: the owner is the VMM. Its pidfd is what the crash
    #: policy kills.
    vmm_pid: int = 0
    #: The session id the link names in its handshake, when the source's export has
    #: another id than this import ("" : the same). uffdd.firecracker's local file
    #: source is an export with a random id, so that no tenant can squat on it.
    peer_session: str = ""
    #: Keep the uffds in the service manager's fd store (a restarted daemon gets them
    #: back and the VMM re-imports). Off where no VMM can re-import (uffdd.firecracker).
    use_fdstore: bool = True
    pages: PageMap = field(init=False)
    loop: FaultLoop = field(init=False)
    link: str = "down"
    reconnects: int = 0
    bytes_bulk: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pages = PageMap([])  # attach_regions builds these
        self._by_gpa: list[ImportRegion] = []
        self._token = trio.lowlevel.current_trio_token()
        self._link_lost = trio.Event()
        self._completed = trio.Event()
        self._bulk_socks: list[peer.FrameSocket] = []
        self._pidfd: int | None = None  # the VMM, under the crash policy (see _open_pidfd)
        self._dialer: _Dialer | None = None  # the connection attempt in progress
        self._link_error: str | None = None  # why the last attempt to link failed
        self._attached = False
        if self.regions:
            self.attach_regions(self.regions)

    def attach_regions(self, regions: list[ImportRegion]) -> None:
        """Build the page state and the fault loop for ``regions`` (before ``_start``).

        At construction for an ``import``; later for a session prepared without its
        regions (uffdd.firecracker: they come with Firecracker's handover).
        """
        self.regions = regions
        self.pages = PageMap([r.pages for r in self.regions])
        self.loop = FaultLoop(
            self.regions, self.pages, notify=self._notify_threadsafe, metrics=self.metrics,
            deadline=self.deadline, policy=self.policy, integrity=self.config.peer.integrity,
            fastpath=peer.demand_library(self.config.peer),
        )
        self.loop.stall_timeout = self.config.peer.stall_timeout
        self.loop.spin_s = self.config.peer.spin_us / 1e6
        self.loop.zero_copy = self.config.peer.zero_copy
        self.loop.vmm_pid = self.vmm
        self.loop.adopt_present = self.adopt_present  # "keep" (or a re-import): adopt them
        self._by_gpa = sorted(self.regions, key=lambda r: r.gpa)
        self._attached = True

    @property
    def vmm(self) -> int:
        """The pid of the VMM whose memory this session fills."""
        return self.vmm_pid or self.owner_pid

    def set_state(self, state: str, reason: str | None = None) -> None:
        if (state in ("failed", "cancelled") and not self.finished and not self.handed_over
                and self._attached):
            # The fault thread tells the source on its way out (a 'cancel' frame), so
            # the source VMM learns at once that its guest will not be needed.
            self.loop.cancel_reason = reason or state
            self.loop.cancel_code = state
        super().set_state(state, reason)

    # -- thread -> Trio

    def _notify_threadsafe(self, kind: str, data: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._on_notify, kind, data)

    def _on_notify(self, kind: str, data: object) -> None:
        if kind == "complete":
            self._completed.set()
        elif kind == "failed":
            self.set_state("failed", self._failure_reason(str(data)))
        elif kind == "link-lost":
            self._lose_link(f"demand lane: {data}")

    def _lose_link(self, why: str) -> None:
        """A lane of the link ended: the link is down, logged once (the first lane's
        reason; the others end because the link supervisor closes them), and reconnected."""
        if self._link_lost.is_set():
            return
        log.warning("session=%s link lost: %s", self.session_id, why)
        self._link_lost.set()

    def _failure_reason(self, reason: str) -> str:
        """The fault thread's reason, with why the link is down when that is the cause.

        Past the deadline without a link the fault thread only knows that the source was
        unreachable; the link supervisor knows why (a refusal, a connect error).
        """
        if self.link == "up" or not self._link_error or "unreachable" not in reason:
            return reason
        if self._link_error.startswith("source refused"):
            return (f"{self._link_error} (retried for the session deadline of "
                    f"{self.deadline:g}s: {reason})")
        return f"{reason} (last attempt: {self._link_error})"

    # -- lifetime

    def _start(self, nursery: trio.Nursery) -> None:
        # Under systemd the service manager keeps copies of the VMM's fds, so a
        # restarted daemon has them back even before the VMM reconnects.
        self._fdstored = bool(self.fds) and self.use_fdstore and sdnotify.store_fds(
            fdstore_name(self.session_id), list(self.fds))
        self._open_pidfd()
        nursery.start_soon(self._fault_thread)
        nursery.start_soon(self._link_supervisor)
        nursery.start_soon(self._progress_loop)

    async def _until_end(self) -> None:
        async with trio.open_nursery() as n:
            async def completed() -> None:
                await self._completed.wait()
                await self._send_done()
                outcome = "completed-with-poisoned-pages" if self.pages.poisoned else "completed"
                self.set_state("completed", outcome)
            n.start_soon(completed)
            await self._done.wait()
            n.cancel_scope.cancel()

    async def _fault_thread(self) -> None:
        await run_thread(self.loop.run, self.loop.stop_threadsafe,
                         slice_ns=self.config.peer.demand_slice_us * 1000)

    def _release(self) -> None:
        if getattr(self, "_fdstored", False) and not self.handed_over:
            sdnotify.remove_fds(fdstore_name(self.session_id))
        for fs in self._bulk_socks:
            fs.close()
        self._bulk_socks = []
        if self._dialer is not None:  # normally closed by _connect already
            self._dialer.close_all()
        for region in self.regions:
            if region.alias is not None:
                _quietly(region.alias.close, "unmap the alias of", self.session_id)
        self.fds.close()
        if not self._kill_due():
            self._close_pidfd()
        self._report_progress()
        self.metrics.link(False)
        self.metrics.close()

    def _kill_due(self) -> bool:
        return self.state == "failed" and self.policy == "crash" and self._pidfd is not None

    async def _after_release(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.emit, self._final_event())
                if self._kill_due():
                    nursery.start_soon(self._kill_lingering_vmm)
        finally:
            self._close_pidfd()

    def _final_event(self) -> protocol.Message:
        if self.state == "completed":
            return self._completed_event()
        return super()._final_event()

    def _completed_event(self) -> protocol.Message:
        return {"event": "completed", "session": self.session_id,
                "outcome": self.reason or "completed", **self._end_counters()}

    def _end_counters(self) -> protocol.Message:
        return {"pages_total": self.pages.total,
                "pages_installed": self.pages.installed + self.pages.discarded,
                "pages_poisoned": self.pages.poisoned, "poisoned": self.poisoned_ranges(),
                "pages_unmapped": self.pages.unmapped}

    def poisoned_ranges(self) -> list[list[int]]:
        """The poisoned pages as ``[gpa, bytes]`` ranges, adjacent pages merged, in gpa
        order; at most MAX_POISONED_RANGES of them."""
        ranges: list[list[int]] = []
        for region in self._by_gpa:
            left = MAX_POISONED_RANGES - len(ranges)
            for first, count in self.pages.runs_of(region.index, pagestate.POISONED, left):
                ranges.append([region.gpa + first * region.page_size,
                               count * region.page_size])
        return ranges

    def final_tally(self) -> protocol.Message:
        """What the source is told in 'done', so both roles report the same counters."""
        c = self.loop.counters
        return {"installed": self.pages.installed + self.pages.discarded,
                "demand": c.pages_demand, "background": c.pages_background,
                "zero": c.pages_zero, "poisoned": self.pages.poisoned,
                "ranges": self.poisoned_ranges()}

    def _open_pidfd(self) -> None:
        """Hold the VMM as a pidfd from the start, so the kill can never hit another
        process that reused its pid, and its exit is a readable fd rather than a poll."""
        if self.policy != "crash":
            return
        try:
            self._pidfd = os.pidfd_open(self.vmm)
        except OSError as e:  # already gone: there is nothing to kill later
            log.info("session=%s VMM pid=%d: no pidfd (%s)", self.session_id, self.vmm, e)

    def _close_pidfd(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    async def _kill_lingering_vmm(self) -> None:
        """Crash policy: a VMM still running ``kill_grace`` after the failure is killed."""
        pidfd = self._pidfd
        assert pidfd is not None
        grace = self.config.session.kill_grace
        start = self._failed_at if self._failed_at is not None else trio.current_time()
        due = start + grace
        if self._hurry_by is not None:
            due = min(due, self._hurry_by)
        with trio.move_on_at(due) as self._kill_scope:
            await trio.lowlevel.wait_readable(pidfd)  # readable: the VMM has exited
            return
        log.error("session=%s VMM pid=%d still running %.1fs after failure%s: killing it",
                  self.session_id, self.vmm, trio.current_time() - start,
                  " (the daemon is stopping)" if self._hurry_by is not None else "")
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    # -- the link to the source

    async def _link_supervisor(self) -> None:
        delay = 0.05
        first = True
        while True:
            try:
                demand, bulks, rtt = await self._connect()
            except peer.SessionRefused as e:
                # The one answer for "no such export" and "wrong token": a restarted
                # source daemon has no export until its VMM exports again, so it is not
                # final. The deadline ends the retries, and the reason says why.
                self._link_error = f"source refused: {peer.SESSION_REFUSAL}"
                log.info("session=%s source refused: %s (not final: retrying until the "
                         "deadline)", self.session_id, e)
            except RegionMismatch as e:
                self.set_state("failed", str(e))
                return
            except RefusedHere as e:
                self.set_state("failed", f"this daemon refused the link to the source "
                               f"{self.peer_address}: {e}")
                return
            except AuthError as e:  # RefusedByPeer, or a refusal of no known kind
                self.set_state("failed", f"source {self.peer_address} refused the link: {e}")
                return
            except (PeerUnavailable, ProtocolError, OSError) as e:
                self._link_error = f"cannot reach the source {self.peer_address}: {e}"
                log.warning("session=%s cannot reach source %s: %s", self.session_id,
                            self.peer_address, e)
            else:
                if not first:
                    self.reconnects += 1
                    self.metrics.reconnected()
                first = False
                delay = 0.05
                self._link_error = None
                self.metrics.rtt(rtt)
                await self._run_link(demand, bulks)
            await trio.sleep(delay)
            delay = min(delay * 2, self.config.peer.reconnect_max_delay)

    async def _connect(self) -> tuple[socket.socket, list[peer.FrameSocket], float]:
        """Connect and authenticate every lane, within connect_timeout per lane in all.

        The thread's sockets time out per operation only; a source that answers one
        byte at a time would hold it (and the session's end) for far longer. Past the
        budget, or when the session ends, the dialer shuts its sockets down, which wakes
        the thread at once, and every socket of the attempt is closed.
        """
        cfg = self.config.peer
        budget = cfg.connect_timeout * (1 + cfg.bulk_lanes)
        dialer = _Dialer()
        self._dialer = dialer
        handed = False
        try:
            with trio.move_on_after(budget) as scope:
                try:
                    lanes = await run_thread(partial(self._connect_lanes, dialer), dialer.stop)
                except (PeerUnavailable, ProtocolError, OSError):
                    if not scope.cancel_called:
                        raise
                else:
                    handed = True
                    return lanes
            raise PeerUnavailable(f"the {1 + cfg.bulk_lanes} lanes to {self.peer_address} were "
                                  f"not up within {budget:g}s (peer.connect_timeout per lane)")
        finally:
            dialer.close_guards()
            if not handed:
                dialer.close_all()
            self._dialer = None

    def _connect_lanes(self, dialer: _Dialer
                       ) -> tuple[socket.socket, list[peer.FrameSocket], float]:
        """Blocking: connect and authenticate the demand lane and every bulk lane."""
        timeout = self.config.peer.connect_timeout
        t0 = time.monotonic()
        # Mutual TLS (or the allowed plaintext) comes from [peer]: see uffdd.tls.
        demand = peer.FrameSocket(peer.connect(self.peer_address, timeout, self.config.peer,
                                               dialer.opened))
        dialer.own(demand.sock)
        peer.mark_demand(demand.sock, self.config.peer)
        link_id = self.peer_session or self.session_id
        shapes = peer.client_handshake(demand, link_id, self.token, "demand")
        rtt = (time.monotonic() - t0) / 3
        self._check_shapes(demand, shapes)
        bulks = []
        for _ in range(self.config.peer.bulk_lanes):
            fs = peer.FrameSocket(peer.connect(self.peer_address, timeout, self.config.peer,
                                               dialer.opened))
            dialer.own(fs.sock)
            peer.client_handshake(fs, link_id, self.token, "bulk")
            self._send_have(fs)
            bulks.append(fs)
        for sock in (demand.sock, *(fs.sock for fs in bulks)):
            sock.settimeout(None)
        return demand.sock, bulks, rtt

    def _check_shapes(self, demand: peer.FrameSocket, shapes: list[peer.RegionShape]) -> None:
        """The source's regions must be this import's. Only a mismatch found here can
        tell the source: a 'cancel' with code region-mismatch fails its export too, so
        its VMM hears why (the source has no other way to know)."""
        mine = [(r.gpa, r.size, r.page_size) for r in self.regions]
        if shapes == mine:
            return
        error = RegionMismatch(
            f"region mismatch: the source exports {_shapes_text(shapes)}, this import has "
            f"{_shapes_text(mine)} (both VMMs must describe the same guest RAM)")
        with contextlib.suppress(PeerUnavailable, OSError):
            demand.send({"t": "cancel", "code": "region-mismatch",
                         "reason": str(error)[:_CANCEL_REASON]})
        raise error

    def _send_have(self, fs: peer.FrameSocket) -> None:
        for region in self.regions:
            if self.pages.done:
                bits = self.pages.have_bitmap(region.index)
                fs.send({"t": "have", "r": region.index, "bits": bits})
        chunk = max(self.config.peer.chunk_bytes, max(r.page_size for r in self.regions))
        fs.send({"t": "start", "chunk": chunk})

    async def _run_link(self, demand: socket.socket, bulks: list[peer.FrameSocket]) -> None:
        self._link_lost = trio.Event()
        self._bulk_socks = bulks
        self.loop.attach_demand_threadsafe(demand)
        self.link = "up"
        self.metrics.link(True)
        if self.state == "connecting":
            self.set_state("running")
        log.info("session=%s link up to %s (%d bulk lanes)", self.session_id, self.peer_address,
                 len(bulks))
        async with trio.open_nursery() as n:
            for fs in bulks:
                n.start_soon(self._bulk_lane, fs, n.cancel_scope)
            await self._link_lost.wait()
            n.cancel_scope.cancel()
        for fs in bulks:
            fs.close()
        self._bulk_socks = []
        self.loop.attach_demand_threadsafe(None)
        self.link = "reconnecting"
        self.metrics.link(False)

    async def _bulk_lane(self, fs: peer.FrameSocket, scope: trio.CancelScope) -> None:
        chunk = max(self.config.peer.chunk_bytes, max(r.page_size for r in self.regions))
        pool: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(_BULK_BUFFERS):
            pool.put(bytearray(chunk))
        native = peer.PayloadNative.load(self.config.peer.fastpath)
        try:
            await run_thread(partial(self._receive_bulk, fs, pool, native), fs.close)
        except (PeerUnavailable, ProtocolError, OSError) as e:
            if not self._completed.is_set():
                self._lose_link(f"bulk lane ended: {e}")

    def _receive_bulk(self, fs: peer.FrameSocket, pool: queue.SimpleQueue[bytearray],
                      native: peer.PayloadNative | None) -> None:
        """Bulk receiver thread: frames go to the fault thread; data into pooled buffers."""
        while True:
            header = fs.recv_header()
            kind = header.get("t")
            if kind == "data":
                buf = _take_buffer(pool, fs)
                try:  # pages land in place, holes zeroed, CRC checked (see FaultLoop)
                    chunk = self.loop.receive_bulk_data(fs, header, buf, pool.put, native)
                except BaseException:
                    pool.put(buf)
                    raise
                self.bytes_bulk += chunk.received
                self.metrics.received("bulk", chunk.received)
                self.loop.bulk_put(chunk)
            elif kind in ("zero", "lost", "end", "cancel"):
                self.loop.bulk_put(header)
            else:
                raise ProtocolError(f"unexpected frame on a bulk lane: {kind!r}")

    async def _send_done(self) -> None:
        """Tell the source on each bulk lane; a source that does not take a few bytes
        within EVENT_SEND_TIMEOUT gets its lane closed (the session is complete anyway).
        'done' carries this side's final counters: the source reports them as its own."""
        tally = self.final_tally()
        for fs in self._bulk_socks:
            with trio.move_on_after(EVENT_SEND_TIMEOUT) as scope:
                try:
                    await run_thread(partial(fs.send, {"t": "done", **tally}), fs.close)
                except (PeerUnavailable, OSError) as e:
                    log.warning("session=%s could not tell the source we are done: %s",
                                self.session_id, e)
            if scope.cancelled_caught:
                log.warning("session=%s the source took no 'done' for %gs: lane closed",
                            self.session_id, EVENT_SEND_TIMEOUT)

    # -- progress

    async def _progress_loop(self) -> None:
        interval = 0.5
        while True:
            await trio.sleep(interval)
            self._report_progress()
            await self.emit({"event": "progress", **self._progress_fields()})

    def _report_progress(self) -> None:
        self.metrics.progress(self.pages.total, self.pages.installed + self.pages.discarded,
                              self.pages.poisoned)

    def _progress_fields(self) -> protocol.Message:
        c = self.loop.counters
        return {"session": self.session_id, "pages_total": self.pages.total,
                "pages_installed": self.pages.installed + self.pages.discarded,
                "pages_demand": c.pages_demand, "pages_background": c.pages_background,
                "pages_zero": c.pages_zero, "pages_poisoned": self.pages.poisoned,
                "pages_unmapped": self.pages.unmapped}

    def status(self) -> protocol.Message:
        """The session's entry of the ``status`` reply (README, wire protocol)."""
        c = self.loop.counters
        p50, p99 = latency_percentiles(list(c.latencies_us))
        return {
            **self._progress_fields(), "role": "import", "state": self.state,
            "bytes_received": c.bytes_demand + self.bytes_bulk, "bytes_sent": 0,
            "faults": c.faults, "started": self.started, "elapsed_seconds": self.elapsed(),
            "demand_latency_p50_us": p50, "demand_latency_p99_us": p99,
            "peer": self.peer_address, "link": self.link, "reconnects": self.reconnects,
            "strategy": self.strategy.name, "policy": self.policy, "reason": self.reason,
            "loop": self.loop.kind, "poisoned": self.poisoned_ranges(),
        }

    # -- vCPU exits

    def region_of_gpa(self, gpa: int) -> tuple[ImportRegion, int]:
        for region in self._by_gpa:
            if region.gpa <= gpa < region.gpa + region.size:
                return region, (gpa - region.gpa) // region.page_size
        raise UffddError(f"gpa {gpa:#x} is outside every region of session {self.session_id}")

    def region_of_addr(self, addr: int) -> tuple[ImportRegion, int]:
        for region in self.regions:
            if region.contains(addr):
                return region, (addr - region.addr) // region.page_size
        raise UffddError(f"address {addr:#x} is outside every region of session {self.session_id}")

    async def resolve(self, exit: strategies.VcpuExit) -> strategies.Verdict:
        """Resolve a vCPU exit with this session's strategy."""
        self.metrics.fault("vcpu_exit", exit.access)
        ctx = _Context(self)
        try:
            verdict = await self.strategy.resolve(exit, ctx)
        except Exception as e:  # a strategy's bug must not leave the vCPU without an answer
            log.error("session=%s strategy %s failed on gpa=%#x: %r", self.session_id,
                      self.strategy.name, exit.gpa, e)
            verdict = ctx.verdict(strategies.CRASH, exit.gpa, f"strategy {self.strategy.name} "
                                  f"failed: {e!r}")
        if verdict.kind not in strategies.VERDICTS:
            log.error("session=%s strategy %s returned verdict %r", self.session_id,
                      self.strategy.name, verdict.kind)
            verdict = ctx.verdict(strategies.CRASH, exit.gpa, f"strategy {self.strategy.name} "
                                  f"returned an unknown verdict {verdict.kind!r}")
        # Metric label values are bounded: every third-party strategy counts as "custom".
        label = self.strategy.name if self.strategy.name in strategies.BUILTIN else "custom"
        self.metrics.verdict(label, verdict.kind)
        if verdict.kind in (strategies.CRASH, strategies.INJECT):
            log.error("session=%s vcpu=%d gpa=%#x verdict=%s reason=%s", self.session_id,
                      exit.vcpu, verdict.gpa, verdict.kind, verdict.reason)
        if verdict.kind == strategies.CRASH:
            self.set_state("failed", verdict.reason or "crash verdict")
        return verdict


class _Context:
    """The ResolveContext a strategy gets for one session."""

    def __init__(self, session: ImportSession) -> None:
        self._s = session
        self.session = session.session_id
        self.policy = session.policy
        self.reason = ""

    def page_state(self, gpa: int) -> str:
        region, page = self._s.region_of_gpa(gpa)
        return pagestate.STATE_NAMES[self._s.pages.get(region.index, page)]

    async def make_present(self, gpa: int) -> str:
        region, page = self._s.region_of_gpa(gpa)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[str] = []

        def callback(outcome: str, reason: str) -> None:  # runs in the fault thread
            result.append(outcome)
            self.reason = reason
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        self._s.loop.request_page_threadsafe(region.index, page, callback)
        # Bounded twice: by the page deadline (with a margin for the fault thread's own
        # check), and by the session's end, after which the fault thread answers nobody.
        with trio.move_on_after(self._s.deadline + 5):
            await first_of(done, self._s._done)
        if result:
            return result[0]
        if self._s.finished:
            return self._after_the_end(region.index, page)
        return Outcome.LOST

    def _after_the_end(self, region: int, page: int) -> str:
        """The session ended before the fault thread answered this page's request.

        Its fault thread has stopped writing page states by then, so the page's state is
        the answer: a session that completed has installed or poisoned every page, and a
        vCPU waiting on one of them must get resume or inject, not a crash. Only a page
        that is still not there is lost, for the reason the session ended.
        """
        state = self._s.pages.get(region, page)
        if state == pagestate.INSTALLED:
            self.reason = ""
            return Outcome.INSTALLED
        if state == pagestate.POISONED:
            self.reason = "page is unrecoverable (poisoned)"
            return Outcome.POISONED
        self.reason = self._s.reason or f"the session ended ({self._s.state})"
        return Outcome.LOST

    async def fail_page(self, gpa: int, reason: str) -> strategies.Verdict:
        region, page = self._s.region_of_gpa(gpa)
        # A page the fault loop poisoned was logged and counted as unrecoverable there
        # (FaultLoop._unrecoverable); a vCPU that touches it again is the same loss.
        if self._s.pages.get(region.index, page) != pagestate.POISONED:
            log.error("unrecoverable page session=%s gpa=%#x reason=%s policy=%s",
                      self.session, gpa, reason, self.policy)
            self._s.metrics.unrecoverable("populate-failed")
        if self.policy == "poison":
            return self.verdict(strategies.INJECT, gpa, reason)
        return self.verdict(strategies.CRASH, gpa, reason)

    def verdict(self, kind: str, gpa: int, reason: str | None = None) -> strategies.Verdict:
        region, page = self._s.region_of_gpa(gpa)
        return strategies.Verdict(
            kind, region.gpa + page * region.page_size, region.addr + page * region.page_size,
            region.page_size, reason)


def _take_buffer(pool: queue.SimpleQueue[bytearray], fs: peer.FrameSocket) -> bytearray:
    """A free receive buffer; gives up when the lane is closed (the session is ending).

    The fault thread returns buffers after installing from them; once it has stopped,
    none come back, so waiting without looking at the lane would never end.
    """
    try:
        return pool.get_nowait()  # the common case: no timed wait to set up
    except queue.Empty:
        pass
    while True:
        try:
            return pool.get(timeout=0.1)
        except queue.Empty:
            if fs.closed:
                raise PeerUnavailable("bulk lane closed while waiting for a buffer") from None


def _shapes_text(shapes: list[peer.RegionShape]) -> str:
    """Region shapes for a reason: the first few, and how many in all."""
    text = ", ".join(f"[gpa {g:#x} size {z:#x} page {p:#x}]" for g, z, p in shapes[:4])
    more = f" and {len(shapes) - 4} more" if len(shapes) > 4 else ""
    return f"{len(shapes)} region{'s' if len(shapes) != 1 else ''} {text}{more}"


class _Dialer:
    """The sockets of one attempt to connect a session's lanes, shared with its thread.

    ``stop`` (any thread) shuts down a duplicate of each TCP socket: shutdown acts on
    the socket, not the descriptor, so it wakes a connect thread blocked in the TLS
    handshake or the session handshake. Sockets opened after ``stop`` are refused.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._guards: list[socket.socket] = []
        self._owned: list[socket.socket] = []

    def opened(self, sock: socket.socket) -> None:
        """A new TCP socket (before TLS): keep a guard for ``stop``."""
        with self._lock:
            if self._stopped:
                raise PeerUnavailable("connection attempt stopped")
            self._guards.append(sock.dup())

    def own(self, sock: socket.socket) -> None:
        """The lane's socket (TLS or plain), closed by ``close_all`` unless handed over."""
        with self._lock:
            self._owned.append(sock)
            stopped = self._stopped
        if stopped:
            raise PeerUnavailable("connection attempt stopped")

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            guards = list(self._guards)
        for guard in guards:
            with contextlib.suppress(OSError):
                guard.shutdown(socket.SHUT_RDWR)

    def close_guards(self) -> None:
        with self._lock:
            guards, self._guards = self._guards, []
        for guard in guards:
            guard.close()

    def close_all(self) -> None:
        """Close every lane socket of the attempt (it failed, or the session ended)."""
        self.stop()
        with self._lock:
            owned, self._owned = self._owned, []
        for sock in owned:
            sock.close()
