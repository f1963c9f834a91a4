"""Sessions: what both roles share. One migration of one VM on one side, with a Trio
task tree that owns it: identity, owner, state, subscribers and their events (one
terminal event each), metrics, and the run that ends it.

The roles are :class:`uffdd.importer.session.ImportSession` (destination: the VMM's
userfaultfds, the fault thread, the link to the source, vCPU exits) and
:class:`uffdd.exporter.session.ExportSession` (source: the memory fds and the lanes).

Each session runs in its own nursery; when it ends, all of its tasks and threads end and
every fd and mapping it held is released.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from uffdd import protocol
from uffdd.config import Config
from uffdd.metrics import SessionMetrics

log = logging.getLogger("uffdd.session")

EventSink = Callable[[protocol.Message], Awaitable[None]]
FINAL_STATES: Final = ("completed", "failed", "cancelled")
FDSTORE_PREFIX: Final = "uffdd-import-"
#: A Firecracker session's fds (uffdd.firecracker): resumed by the daemon itself.
FDSTORE_PREFIX_FIRECRACKER: Final = "uffdd-firecracker-"
#: How long one subscriber may take to accept one event before it is dropped.
EVENT_SEND_TIMEOUT: Final = 2.0
#: How long a lane thread that was told to stop may take before its socket is closed
#: under it (a send to a peer that no longer reads does not notice a SHUT_RD).
_LANE_STOP_GRACE: Final = 1.0
_CANCEL_REASON: Final = 500  # characters of a reason sent in a 'cancel' frame
#: Peer refusals of a wrong token reported to the export's VMM: at most one a second.
_REFUSAL_EVENT_INTERVAL: Final = 1.0
#: Poisoned ranges listed in ``status`` and in a terminal event, at most (``pages_poisoned``
#: is always the exact count); bounded so the list fits any frame and the 'done' header.
MAX_POISONED_RANGES: Final = 1024


@dataclass
class SessionBase:
    """What both roles share: identity, owner, state, subscribers, metrics."""

    session_id: str
    role: str
    token: bytes
    owner_pid: int
    config: Config
    state: str = "connecting"
    reason: str | None = None
    started: float = field(default_factory=time.time)
    finished_at: float | None = None
    subscribers: list[EventSink] = field(default_factory=list)
    #: The terminal event, once emitted: nothing is sent after it, and a late
    #: ``subscribe`` gets this very dict again.
    final_event: protocol.Message | None = None
    metrics: SessionMetrics = field(init=False)
    _done: trio.Event = field(default_factory=trio.Event)
    _cancel_scope: trio.CancelScope | None = None
    _failed_at: float | None = None  # Trio clock: the crash policy's kill_grace counts from it
    _hurry_by: float | None = None  # Trio clock: the daemon is stopping, cleanup ends by then
    _kill_scope: trio.CancelScope | None = None  # the crash policy's wait for the VMM
    #: The daemon is being stopped by the service manager (a restart, an upgrade): the
    #: session is left to the next daemon, as after a crash. It ends here without a
    #: final state, so neither its VMM nor the peer is told it ended, and an import's
    #: fds stay in the fd store; the VMM re-attaches through the socket unit.
    handed_over: bool = False

    def __post_init__(self) -> None:
        self.metrics = SessionMetrics(self.session_id, self.role)

    def hand_over(self) -> None:
        """Leave this session to the next daemon (see ``handed_over``)."""
        if not self.finished:
            self.handed_over = True
            log.info("session=%s role=%s left to the next daemon", self.session_id, self.role)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def set_state(self, state: str, reason: str | None = None) -> None:
        if self.finished or self.handed_over:
            return
        self.state = state
        if reason:
            self.reason = reason
        self.metrics.state(state)
        if state in FINAL_STATES:
            self.finished_at = time.time()
            self._done.set()
        if state == "failed":
            with contextlib.suppress(RuntimeError):  # outside Trio: the cleanup's own time
                self._failed_at = trio.current_time()
        log.info("session=%s role=%s state=%s%s", self.session_id, self.role, state,
                 f" reason={reason!r}" if reason else "")

    async def emit(self, event: protocol.Message) -> None:
        """Send an event to every subscriber, each within ``EVENT_SEND_TIMEOUT``.

        Subscribers are sent to concurrently, and one that is gone or does not take the
        event in time is dropped: a VMM that stops reading costs the session nothing.
        Nothing goes out after the terminal event, and no ``progress`` once the session
        has ended (its counts would be stale; the terminal event has the final ones).
        """
        if self.final_event is not None:
            return
        if event.get("event") in FINAL_STATES:
            self.final_event = event
        elif self.finished:
            return
        async with trio.open_nursery() as nursery:
            for sink in list(self.subscribers):
                nursery.start_soon(self._send_event, sink, event)

    async def _send_event(self, sink: EventSink, event: protocol.Message) -> None:
        with trio.move_on_after(EVENT_SEND_TIMEOUT) as scope:
            try:
                await sink(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                log.info("session=%s dropped an event subscriber: %r", self.session_id, e)
                self._drop(sink)
        if scope.cancelled_caught:
            log.warning("session=%s dropped an event subscriber that took no %r event for "
                        "%gs", self.session_id, event.get("event"), EVENT_SEND_TIMEOUT)
            self._drop(sink)

    def _drop(self, sink: EventSink) -> None:
        with contextlib.suppress(ValueError):
            self.subscribers.remove(sink)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the session until it completes, fails or is cancelled; release everything."""
        started = False
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                self._start(nursery)
                task_status.started()
                started = True
                await self._until_end()
                nursery.cancel_scope.cancel()
        except Exception as e:
            self.set_state("failed", f"internal error: {e!r}")
            if not started:
                raise  # it never ran: its start fails, and the daemon logs why
            # A bug in one session must not take the daemon down. Handled (and logged,
            # once) here, before the cleanup runs, so the VMM's event says why and the
            # crash policy's kill of a lingering VMM applies.
            log.exception("session=%s role=%s failed with an internal error",
                          self.session_id, self.role)
        finally:
            # Cleanup cannot be skipped. Every fd and mapping is released first, by code
            # that never waits. What may wait comes after: the final event (each
            # subscriber within EVENT_SEND_TIMEOUT) and, under the crash policy, the kill
            # of a lingering VMM at kill_grace after the failure. It is shielded by a
            # scope sized from the config, so no outer timer (the daemon's shutdown
            # grace) cuts it short; the task still belongs to the daemon's root nursery,
            # which waits for it.
            try:
                self._release()
            finally:  # a release step that raised must not cost the VMM its event or kill
                if not self.handed_over:  # handed over: nothing ended, nobody to tell
                    with trio.move_on_after(self._cleanup_budget(), shield=True):
                        await self._after_release()

    def _cleanup_budget(self) -> float:
        """How long the waits after the release may take, at most (see ``run``)."""
        grace = self.config.session.kill_grace if self._kill_due() else 0.0
        if self._hurry_by is not None:
            grace = min(grace, max(0.0, self._hurry_by - trio.current_time()))
        return max(EVENT_SEND_TIMEOUT, grace) + 1.0

    def _kill_due(self) -> bool:
        """Whether the crash policy's kill of a lingering VMM applies to this end."""
        return False

    def _release(self) -> None:
        """Release every fd and mapping of the session; never waits."""
        raise NotImplementedError

    async def _after_release(self) -> None:
        """Tell the VMM how it ended (and apply the crash policy): bounded waits."""
        raise NotImplementedError

    def _final_event(self) -> protocol.Message:
        """The terminal event of a session that did not complete: ``cancelled`` (by
        either VMM) or ``failed``, with the counters as they ended."""
        kind = "cancelled" if self.state == "cancelled" else "failed"
        return {"event": kind, "session": self.session_id,
                "reason": self.reason or self.state, **self._end_counters()}

    def _end_counters(self) -> protocol.Message:
        """The counters every terminal event carries (README, ``subscribe``)."""
        raise NotImplementedError

    def _start(self, nursery: trio.Nursery) -> None:
        """Start the role's tasks in the session's nursery."""
        raise NotImplementedError

    async def _until_end(self) -> None:
        """Return when the session has reached a final state."""
        raise NotImplementedError

    def hurry_cleanup(self, by: float) -> None:
        """The daemon is stopping: a kill still due (see ``_kill_lingering_vmm``) happens
        by ``by`` (Trio clock) at the latest, so a long kill_grace cannot hold SIGTERM."""
        self._hurry_by = by if self._hurry_by is None else min(self._hurry_by, by)
        if self._kill_scope is not None:
            self._kill_scope.deadline = min(self._kill_scope.deadline, by)

    def cancel(self, reason: str = "cancelled by the VMM") -> None:
        self.set_state("cancelled", reason)

    async def wait_finished(self) -> None:
        await self._done.wait()

    def elapsed(self) -> float:
        return (self.finished_at or time.time()) - self.started


def fdstore_name(session_id: str) -> str:
    """FDNAME= of an import session's fds in the fd store (FDNAME may not hold ':')."""
    return FDSTORE_PREFIX + session_id.replace(":", "=")  # '=' is never in a session id


def firecracker_fdstore_name(session_id: str) -> str:
    """FDNAME= of a Firecracker session's fds in the fd store."""
    return FDSTORE_PREFIX_FIRECRACKER + session_id.replace(":", "=")


def stored_firecracker(handed: dict[str, list[int]]) -> dict[str, list[int]]:
    """Take the Firecracker sessions' fds out of what the fd store gave back, by session
    id: the daemon resumes those sessions itself (Firecracker never reconnects)."""
    stored: dict[str, list[int]] = {}
    for name in [n for n in handed if n.startswith(FDSTORE_PREFIX_FIRECRACKER)]:
        session_id = name[len(FDSTORE_PREFIX_FIRECRACKER) :].replace("=", ":")
        stored[session_id] = handed.pop(name)
    return stored


def stored_sessions(handed: dict[str, list[int]]) -> dict[str, list[int]]:
    """The import sessions' fds the fd store gave back at start, by session id.

    They are kept (and logged) until each session's VMM imports it again; fds under a
    name that is neither ``vmm`` (the API socket) nor a session's are closed.
    """
    stored: dict[str, list[int]] = {}
    for name, fds in handed.items():
        if name.startswith(FDSTORE_PREFIX):
            session_id = name[len(FDSTORE_PREFIX) :].replace("=", ":")
            stored[session_id] = fds
            log.warning("session=%s the fd store gave back %d fds of an import session: "
                        "kept until its VMM imports it again", session_id, len(fds))
        elif name != "vmm":
            log.warning("closing %d fds named %r passed by the service manager", len(fds), name)
            for fd in fds:
                os.close(fd)
    return stored


def latency_percentiles(samples: list[float]) -> tuple[float | None, float | None]:
    """p50 and p99 of latency samples (None when there are none)."""
    if not samples:
        return None, None
    if len(samples) == 1:
        return samples[0], samples[0]
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return round(q[49], 1), round(q[98], 1)


def _quietly(close: Callable[[], None], what: str, session_id: str) -> None:
    """Run one release step; a failure is logged and the other steps still run."""
    try:
        close()
    except (OSError, ValueError, BufferError) as e:
        log.error("session=%s could not %s the session: %r", session_id, what, e)


async def first_of(*events: trio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    async with trio.open_nursery() as nursery:
        for event in events:
            nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
