"""The source side of a migration: an :class:`ExportSession` owns the memory fds and
serves the lanes the destination connects (demand: ``exporter.demand``, bulk:
``exporter.bulk``), each in a thread of its own, until the destination says 'done'
(with its tally), cancels, or the source VMM goes away."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from uffdd import peer, protocol, warmorder
from uffdd._linux.fds import OwnedFds
from uffdd.config import join_host_port
from uffdd.errors import PeerUnavailable, ProtocolError, UffddError
from uffdd.exporter import ExportRegion, ExportState, link_error
from uffdd.exporter.bulk import serve_bulk
from uffdd.exporter.demand import serve_demand
from uffdd.session import (
    _CANCEL_REASON,
    _LANE_STOP_GRACE,
    _REFUSAL_EVENT_INTERVAL,
    SessionBase,
    _quietly,
    log,
)
from uffdd.threads import run_thread, to_data_path_thread

# ============================================================== export


@dataclass
class ExportSession(SessionBase):
    """The source side of a migration."""

    regions: list[ExportRegion] = field(default_factory=list)
    fds: OwnedFds = field(default_factory=OwnedFds)
    export_state: ExportState = field(init=False)
    lanes: int = 0
    #: The importing daemon's address, from its first demand lane (None before).
    peer_address: str | None = None
    reconnects: int = 0
    #: Warm restore (uffdd.warmorder): one of ``fds``, the record is written to it once,
    #: when the session ends (-1: not recording); pages written, once written.
    warm_record_fd: int = -1
    warm_recorded_pages: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.export_state = ExportState(self.regions, self.config.peer.chunk_bytes,
                                        integrity=self.config.peer.integrity,
                                        background=self.config.peer.background,
                                        spin_s=self.config.peer.spin_us / 1e6)
        self._nursery: trio.Nursery | None = None
        self._token = trio.lowlevel.current_trio_token()
        self.refusals = 0  # handshakes with a wrong token for this session
        self._refusal_event_at: float | None = None

    def lose_gpa(self, gpa: int) -> None:
        """Fault injection: the page holding ``gpa`` becomes unreadable for the peer."""
        for region in self.regions:
            if region.gpa <= gpa < region.gpa + region.size:
                self.export_state.lost.add((region.index, (gpa - region.gpa) // region.page_size))
                return
        raise UffddError(f"gpa {gpa:#x} is outside the session's regions")

    @property
    def shapes(self) -> list[peer.RegionShape]:
        return [(r.gpa, r.size, r.page_size) for r in self.regions]

    def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._progress_loop)

    async def _until_end(self) -> None:
        try:
            await self._done.wait()
        finally:
            if not self.handed_over:  # left to the next daemon: it records afresh
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await self._write_warm_record()

    async def _write_warm_record(self) -> None:
        recorder = self.export_state.recorder
        if self.warm_record_fd < 0 or recorder is None:
            return
        order = recorder.order(self.state == "completed")
        try:
            await trio.to_thread.run_sync(warmorder.write_fd, self.warm_record_fd, order)
        except OSError as e:
            log.warning("session=%s warm restore: cannot write the record: %s",
                        self.session_id, e)
            return
        self.warm_recorded_pages = order.pages
        log.info("session=%s warm restore: recorded %d demanded pages in %d runs",
                 self.session_id, order.pages, len(order.runs))

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Start ``fn`` in the session's nursery; False once that nursery has closed (the
        session ended while a lane's handshake or a refusal was under way elsewhere):
        a start on a closed nursery raises, and it used to take the daemon down."""
        if self._nursery is None or self.finished:
            return False
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # "Nursery is closed to new arrivals"
            return False
        return True

    def attach_lane(self, lane: str, fs: peer.FrameSocket) -> None:
        """A destination lane authenticated for this session: serve it."""
        if self._nursery is None or self.finished:
            fs.close()
            return
        if self.state == "connecting":
            self.set_state("running")
        if lane == "demand":  # one demand lane per link: a second one is a reconnection
            self.reconnects += self.peer_address is not None
            self.peer_address = _peer_name(fs)
        _watch_for_cancel(fs, self._cancelled_by_peer_threadsafe)
        if not self._spawn(self._serve_lane, lane, fs):
            fs.close()

    def _cancelled_by_peer_threadsafe(self, reason: str, code: str) -> None:
        """The destination's 'cancel': the export ends as the import did. A region
        mismatch it found, or its own failure, fails the export (only the destination
        can judge it, and the source VMM must hear why); its VMM's cancel cancels it."""
        if code == "region-mismatch":
            state, text = "failed", f"the destination refused the session: {reason}"
        elif code == "cancelled":
            state, text = "cancelled", f"the destination cancelled the session: {reason}"
        else:  # "failed", or a destination that does not say
            state, text = "failed", f"the destination's session failed: {reason}"
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self.set_state, state, text)

    def peer_refused(self, addr: object, lane: str) -> None:
        """A peer presented a wrong token for this export (see README, Security).

        The export is not failed: session ids are not secret, and failing it would let
        anyone who can reach the peer port end any export by guessing ids. Its VMM
        hears of it (``peer-refused`` events, at most one a second, with the count),
        so it can cancel when it knows no other destination is coming.
        """
        self.refusals += 1
        peer_address = _address_text(addr)
        now = trio.current_time()
        last = self._refusal_event_at
        if last is not None and now - last < _REFUSAL_EVENT_INTERVAL:
            return
        self._refusal_event_at = now
        self._spawn(self.emit, {
            "event": "peer-refused", "session": self.session_id, "refusals": self.refusals,
            "reason": f"a peer at {peer_address} presented a wrong token for this session "
                      f"({lane} lane); the destination VMM must be given this export's token"})

    async def _serve_lane(self, lane: str, fs: peer.FrameSocket) -> None:
        serve = serve_demand if lane == "demand" else serve_bulk
        if lane == "bulk":
            self.export_state.reset_sent()
            serve = partial(serve_bulk, fastpath=self.config.peer.fastpath)
        self.lanes += 1
        self.metrics.link(True)
        body = partial(serve, fs, self.export_state, self.metrics)
        if lane == "demand":  # its common case in C when built ([peer] fastpath)
            body = partial(serve_demand, fs, self.export_state, self.metrics,
                           library=peer.demand_library(self.config.peer, fs.sock))
        try:
            if lane == "demand":  # the lane's own thread says 'cancel' (no racing sends)
                await _run_lane_thread(partial(self._demand_lane, body, fs),
                                       partial(_stop_reading, fs), fs.close,
                                       self.config.peer.demand_slice_us * 1000)
            else:
                await run_thread(body, fs.close)
        except (PeerUnavailable, ProtocolError, OSError, UffddError) as e:
            if not self.export_state.done.is_set():
                log.warning("session=%s %s lane ended: %s", self.session_id, lane,
                            link_error(e))
        finally:
            fs.close()
            self.lanes -= 1
            if not self.lanes:
                self.metrics.link(False)
        if self.export_state.done.is_set():
            tally = self.export_state.final_tally
            poisoned = tally is not None and tally.poisoned > 0
            self.set_state("completed",
                           "completed-with-poisoned-pages" if poisoned else "completed")

    def _demand_lane(self, body: Callable[[], None], fs: peer.FrameSocket) -> None:
        """Serve the demand lane; if the export was cancelled, tell the destination.

        Runs in the lane's thread, after ``_stop_reading`` ended its wait for requests,
        so the 'cancel' frame never interleaves with a reply. The destination fails
        its import at once instead of reconnecting until its deadline.
        """
        try:
            body()
        finally:
            if self.state in ("cancelled", "failed"):
                try:
                    fs.sock.settimeout(1.0)
                    fs.send({"t": "cancel", "reason": (self.reason or self.state)[:200]})
                except (OSError, PeerUnavailable):
                    pass

    async def _progress_loop(self) -> None:
        while True:
            await trio.sleep(0.5)
            self._report_progress()
            await self.emit({"event": "progress", **self._progress_fields()})

    def _report_progress(self) -> None:
        total = sum(r.pages for r in self.regions)
        self.metrics.progress(total, min(total, self.export_state.pages_sent))

    def _progress_fields(self) -> protocol.Message:
        """Before the end, what this source sent (a page sent twice, on demand and by
        the stream, counts once in installed, in both of the others); at ``completed``,
        the destination's own counters, which it sends in 'done'."""
        st = self.export_state
        total = sum(r.pages for r in self.regions)
        tally = st.final_tally
        if tally is not None:
            return {"session": self.session_id, "pages_total": total,
                    "pages_installed": tally.installed, "pages_demand": tally.demand,
                    "pages_background": tally.background, "pages_zero": tally.zero,
                    "pages_poisoned": tally.poisoned}
        return {"session": self.session_id, "pages_total": total,
                "pages_installed": min(total, st.pages_sent), "pages_demand": st.pages_demand,
                "pages_background": max(0, st.pages_sent - st.pages_demand),
                "pages_zero": st.pages_zero, "pages_poisoned": 0}

    def poisoned_ranges(self) -> list[list[int]]:
        """The pages the destination poisoned, as it reported them in 'done'."""
        tally = self.export_state.final_tally
        return [] if tally is None else [list(r) for r in tally.ranges]

    def _end_counters(self) -> protocol.Message:
        fields = self._progress_fields()
        return {key: fields[key] for key in ("pages_total", "pages_installed",
                                             "pages_poisoned")} | {
            "poisoned": self.poisoned_ranges()}

    def _release(self) -> None:
        for region in self.regions:
            _quietly(region.close, "unmap a region of", self.session_id)
        self.fds.close()
        self._report_progress()
        self.metrics.close()

    async def _after_release(self) -> None:
        await self.emit(self._final_event())

    def _final_event(self) -> protocol.Message:
        if self.state != "completed":
            return super()._final_event()
        return {"event": "completed", "session": self.session_id,
                "outcome": self.reason or "completed", **self._end_counters()}

    def status(self) -> protocol.Message:
        return {
            **self._progress_fields(), "role": "export", "state": self.state,
            "bytes_received": 0, "bytes_sent": self.export_state.bytes_sent,
            "started": self.started, "elapsed_seconds": self.elapsed(),
            "demand_latency_p50_us": None, "demand_latency_p99_us": None,
            "peer": self.peer_address, "link": "up" if self.lanes else "down",
            "reconnects": self.reconnects, "faults": 0, "reason": self.reason,
            "loop": "c" if peer.demand_library(self.config.peer) is not None else "python",
            "poisoned": self.poisoned_ranges(),
            **({"warm_recorded_pages": self.warm_recorded_pages}
               if self.warm_record_fd >= 0 else {}),
        }


def _peer_name(fs: peer.FrameSocket) -> str:
    try:
        return _address_text(fs.sock.getpeername())
    except OSError:
        return "unknown"


def _address_text(addr: object) -> str:
    """A socket address as 'host:port' ('[v6]:port'), anything else as it prints."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return join_host_port(str(addr[0]), int(addr[1]))
    return str(addr)


def _watch_for_cancel(fs: peer.FrameSocket, on_cancel: Callable[[str, str], None]) -> None:
    """Make a lane's reader notice the destination's ``cancel`` frame wherever it reads.

    The exporter reads headers in several places (requests, 'have', 'done'); hooking the
    socket's header reader covers them all without teaching each one about 'cancel'.
    """
    inner = fs.recv_header

    def recv_header() -> protocol.Message:
        header = inner()
        if header.get("t") == "cancel":
            on_cancel(str(header.get("reason", ""))[:_CANCEL_REASON], str(header.get("code", "")))
            raise PeerUnavailable("the destination cancelled the session")
        return header

    fs.recv_header = recv_header  # type: ignore[method-assign]


def _stop_reading(fs: peer.FrameSocket) -> None:
    """End a lane thread's wait for frames but leave its sending side open.

    The base socket's shutdown: an SSL socket's own would drop its TLS state.
    """
    with contextlib.suppress(OSError):
        socket.socket.shutdown(fs.sock, socket.SHUT_RD)


async def _run_lane_thread(fn: Callable[[], None], stop: Callable[[], None],
                           close: Callable[[], None], slice_ns: int) -> None:
    """``run_thread`` with a second, harder stop: ``close`` when the thread has not
    returned ``_LANE_STOP_GRACE`` after ``stop`` (a thread stuck in a send to a peer that
    no longer reads does not notice a SHUT_RD). The wait for it is owned by this task,
    not by a timer thread, so the lane is closed before its session's cleanup runs.
    ``slice_ns``: the demand lane's scheduler slice (``[peer] demand_slice_us``).
    """
    finished = trio.Event()

    async def stop_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not finished.is_set():
                stop()
                with trio.CancelScope(shield=True), trio.move_on_after(_LANE_STOP_GRACE):
                    await finished.wait()
                if not finished.is_set():
                    close()

    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_cancel)
        try:
            await to_data_path_thread(fn, slice_ns=slice_ns)
        except Exception as e:  # re-raised below, outside the nursery: callers see it bare
            error = e
        finally:
            finished.set()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
