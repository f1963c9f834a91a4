"""Every Prometheus metric of uffdd, defined once, and the small API that feeds them.

All metrics live in prometheus-client's default registry, carry the ``uffdd_`` prefix,
use base units (seconds, bytes) and end in ``_total`` when they are counters. Every
label has a bounded set of values, listed below as tuples; series for those values are
created with zero in advance, so a query never sees a series appear from nowhere.

The daemon talks to this module through:

* :class:`SessionMetrics` — one per session, created when the session starts, closed
  with :meth:`~SessionMetrics.close` when it ends. Its methods are thread-safe (the
  fault path runs in plain threads) and cheap (label children are resolved once).
* :func:`refused` — a request or peer connection was refused.
* :func:`faults_seen` — faults so far, for a "M faults/s" ``STATUS=`` line.
* :func:`serve_metrics` — the ``/metrics`` HTTP endpoint, a Trio task.

Per-session series (``uffdd_session_*``) carry ``session`` and ``role``: a daemon may
hold an import and an export of the same session id at once (a loopback migration),
and without ``role`` the two would overwrite each other and the first ``close()`` would
delete the other's series.

Size: over 500 lines on purpose. Most of it is the metric definitions with their help
text and bounded label values, which belong in one place (the README's Metrics section
is checked against them); split by metric family, an operator would have to read
several files to learn what one label may hold.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable
from typing import NoReturn

import trio
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder

from uffdd import __version__
from uffdd.listeners import Acceptor, tcp_listener

# ``*_created`` series would double the series count of every counter and histogram
# for a value (process start) that ``process_start_time_seconds`` already gives.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

# --- label values (bounded sets) -------------------------------------------------

FAULT_MODES = ("missing", "minor", "vcpu_exit")
ACCESSES = ("read", "write")
RESOLVED_BY = ("demand", "inflight", "background")
INSTALL_METHODS = ("copy", "zeropage", "continue", "poison")
LANES = ("demand", "bulk")
ROLES = ("import", "export")
STATES = ("connecting", "running", "completed", "failed", "cancelled")
# "custom" stands for every third-party strategy (label values must stay bounded).
STRATEGIES = ("continue-then-populate", "no-uffd-wait", "custom")
VERDICTS = ("resume", "populate", "inject-memory-error", "crash")
UNRECOVERABLE_REASONS = ("deadline", "lost", "corrupt", "kernel", "populate-failed")
REFUSED_REASONS = (
    "unauthorized",
    "bad-frame",
    "frame-too-large",
    "bad-request",
    "bad-fds",
    "bad-region",
    "unknown-session",
    "session-exists",
    "limit",
    "peer-auth",
    "peer-protocol",
    "peer-security",
)

#: Histogram buckets for page-fault scale latencies, 10 µs … 2.5 s. The boundary at
#: 1 ms is the demand-fault SLO: alerts and dashboards use ``le="0.001"``. Changing
#: buckets later breaks every stored series, so choose once.
LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

#: The demand-fault latency objective, in seconds (a bucket boundary above).
SLO_SECONDS = 0.001

# --- daemon-wide metrics ---------------------------------------------------------

BUILD_INFO = Gauge("uffdd_build_info", "Always 1; the labels say which uffdd runs.", ["version"])
FAULTS = Counter(
    "uffdd_faults_total",
    "Page faults seen: uffd missing/minor faults and vCPU memory-fault exits.",
    ["mode", "access"],
)
FAULT_RESOLUTION = Histogram(
    "uffdd_fault_resolution_seconds",
    "Time from a fault seen to its page installed and the waiter woken.",
    ["resolved_by"],
    buckets=LATENCY_BUCKETS,
)
VCPU_BLOCKED = Counter(
    "uffdd_vcpu_blocked_seconds_total",
    "Time vCPU threads spent blocked on faults, summed over all sessions.",
)
PAGES_INSTALLED = Counter(
    "uffdd_pages_installed_total", "Pages installed into guest memory.", ["method"]
)
PEER_RECEIVED = Counter(
    "uffdd_peer_received_bytes_total", "Bytes received from peer daemons.", ["lane"]
)
PEER_SENT = Counter("uffdd_peer_sent_bytes_total", "Bytes sent to peer daemons.", ["lane"])
PEER_RTT = Histogram(
    "uffdd_peer_rtt_seconds",
    "Round-trip time of demand requests to the peer daemon.",
    buckets=LATENCY_BUCKETS,
)
PEER_RECONNECTS = Counter("uffdd_peer_reconnects_total", "Peer links re-established.")
VERDICTS_TOTAL = Counter(
    "uffdd_verdicts_total", "vCPU-exit verdicts given.", ["strategy", "verdict"]
)
UNRECOVERABLE = Counter(
    "uffdd_unrecoverable_pages_total",
    "Pages that could never be had, handed to the failure policy.",
    ["reason"],
)
SESSIONS = Gauge("uffdd_sessions", "Sessions the daemon holds.", ["role", "state"])
REFUSED = Counter(
    "uffdd_refused_requests_total",
    "VMM requests and peer connections refused.",
    ["reason"],
)
LAST_FAULT = Gauge(
    "uffdd_last_fault_timestamp_seconds", "Unix time of the last fault seen (0: none yet)."
)

# --- per-session metrics ---------------------------------------------------------

_S = ["session", "role"]
SESSION_VCPU_BLOCKED = Counter(
    "uffdd_session_vcpu_blocked_seconds_total",
    "Time this session's vCPU threads spent blocked on faults.",
    _S,
)
SESSION_THREAD_BLOCKED = Counter(
    "uffdd_session_thread_blocked_seconds_total",
    "Time one vCPU thread (tid from UFFD_FEATURE_THREAD_ID, or vCPU id) spent blocked.",
    [*_S, "thread"],
)
SESSION_LINK_UP = Gauge("uffdd_session_link_up", "1 while the session's peer link is up.", _S)
SESSION_STATE = Gauge(
    "uffdd_session_state", "1 for the session's current state, 0 for the others.", [*_S, "state"]
)
SESSION_PAGES = Gauge("uffdd_session_pages", "Pages in the session's regions.", _S)
SESSION_PAGES_INSTALLED = Gauge(
    "uffdd_session_pages_installed", "Pages installed (import) or sent (export).", _S
)
SESSION_PAGES_REMAINING = Gauge(
    "uffdd_session_pages_remaining", "Pages neither installed nor unrecoverable.", _S
)
SESSION_PAGES_UNRECOVERABLE = Gauge(
    "uffdd_session_pages_unrecoverable", "Pages that could never be had.", _S
)
SESSION_VERDICTS = Counter(
    "uffdd_session_verdicts_total", "vCPU-exit verdicts given in this session.", [*_S, "verdict"]
)

#: Per-session metrics without extra labels, removed on close by (session, role).
_SESSION_PLAIN: tuple[Counter | Gauge, ...] = (
    SESSION_VCPU_BLOCKED,
    SESSION_LINK_UP,
    SESSION_PAGES,
    SESSION_PAGES_INSTALLED,
    SESSION_PAGES_REMAINING,
    SESSION_PAGES_UNRECOVERABLE,
)


def _check(kind: str, value: str, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; raise ValueError otherwise.

    Keeps label cardinality bounded: a typo in a caller fails its tests loudly
    instead of creating a new series in production.
    """
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {sorted(allowed)}")
    return value


def _lookup(children: dict[str, Counter], kind: str, value: str) -> Counter:
    """Return the pre-resolved child for label ``value``; ValueError if unknown."""
    child = children.get(value)
    if child is None:
        _check(kind, value, children)
        raise AssertionError("unreachable")  # pragma: no cover
    return child


def _export_zeros() -> None:
    """Create every daemon-wide series with zero, so it exists before first use."""
    BUILD_INFO.labels(version=__version__).set(1)
    for mode in FAULT_MODES:
        for access in ACCESSES:
            FAULTS.labels(mode=mode, access=access)
    for by in RESOLVED_BY:
        FAULT_RESOLUTION.labels(resolved_by=by)
    for method in INSTALL_METHODS:
        PAGES_INSTALLED.labels(method=method)
    for lane in LANES:
        PEER_RECEIVED.labels(lane=lane)
        PEER_SENT.labels(lane=lane)
    for strategy in STRATEGIES:
        for verdict in VERDICTS:
            VERDICTS_TOTAL.labels(strategy=strategy, verdict=verdict)
    for reason in UNRECOVERABLE_REASONS:
        UNRECOVERABLE.labels(reason=reason)
    for role in ROLES:
        for state in STATES:
            SESSIONS.labels(role=role, state=state)
    for reason in REFUSED_REASONS:
        REFUSED.labels(reason=reason)


_export_zeros()

#: Label children resolved once; the fault path only does a dict lookup.
_FAULT_CHILDREN = {(m, a): FAULTS.labels(m, a) for m in FAULT_MODES for a in ACCESSES}
_RESOLUTION_CHILDREN = {by: FAULT_RESOLUTION.labels(by) for by in RESOLVED_BY}
_INSTALLED_CHILDREN = {m: PAGES_INSTALLED.labels(m) for m in INSTALL_METHODS}
_RECEIVED_CHILDREN = {lane: PEER_RECEIVED.labels(lane) for lane in LANES}
_SENT_CHILDREN = {lane: PEER_SENT.labels(lane) for lane in LANES}


def refused(reason: str) -> None:
    """Count one refused VMM request or peer connection; ``reason`` is an error code."""
    REFUSED.labels(reason=_check("reason", reason, REFUSED_REASONS)).inc()


def faults_seen() -> float:
    """Return the number of faults counted since start, all modes (for ``STATUS=``).

    Reads the counter through its public ``collect()``; cheap enough for a watchdog
    tick, not meant for the fault path.
    """
    return sum(
        sample.value
        for family in FAULTS.collect()
        for sample in family.samples
        if sample.name == "uffdd_faults_total"
    )


class SessionMetrics:
    """The metrics of one session; every method is thread-safe.

    Create it when the session is created (state ``connecting``), call
    :meth:`close` exactly once when the daemon forgets the session. Calls after
    ``close()`` still count daemon-wide metrics but no longer touch per-session
    series, so a late fault thread cannot resurrect them.
    """

    def __init__(self, session: str, role: str) -> None:
        """Create the session's series (zeros) and count it as ``connecting``."""
        self.session = session
        self.role = _check("role", role, ROLES)
        self._lock = threading.Lock()
        self._closed = False
        self._state = "connecting"
        self._threads: dict[int, Counter] = {}
        key = (session, self.role)
        self._blocked = SESSION_VCPU_BLOCKED.labels(*key)
        self._link = SESSION_LINK_UP.labels(*key)
        self._pages = SESSION_PAGES.labels(*key)
        self._installed = SESSION_PAGES_INSTALLED.labels(*key)
        self._remaining = SESSION_PAGES_REMAINING.labels(*key)
        self._unrecoverable = SESSION_PAGES_UNRECOVERABLE.labels(*key)
        self._verdicts = {v: SESSION_VERDICTS.labels(*key, v) for v in VERDICTS}
        for state in STATES:
            SESSION_STATE.labels(*key, state).set(1 if state == self._state else 0)
        SESSIONS.labels(self.role, self._state).inc()

    # -- fault path (plain threads) --

    def fault(self, mode: str, access: str) -> None:
        """Count one fault. ``access`` ``exec`` (an instruction fetch) counts as ``read``."""
        if access == "exec":
            access = "read"
        child = _FAULT_CHILDREN.get((mode, access))
        if child is None:
            _check("mode", mode, FAULT_MODES)
            _check("access", access, ACCESSES)
            return
        child.inc()
        LAST_FAULT.set(time.time())

    def resolved(self, resolved_by: str, seconds: float) -> None:
        """Observe one fault's time from seen to page installed and waiter woken."""
        child = _RESOLUTION_CHILDREN.get(resolved_by)
        if child is None:
            _check("resolved_by", resolved_by, RESOLVED_BY)
            return
        child.observe(seconds)

    def faults(self, mode: str, access: str, count: int) -> None:
        """Count ``count`` faults of one kind at once (the C fault loop's totals)."""
        child = _FAULT_CHILDREN.get((mode, "read" if access == "exec" else access))
        if child is None:
            _check("mode", mode, FAULT_MODES)
            _check("access", access, ACCESSES)
            return
        child.inc(count)
        LAST_FAULT.set(time.time())

    def resolved_many(self, resolved_by: str, buckets: list[int], seconds: float) -> None:
        """Add observations counted elsewhere: ``buckets[i]`` of them fell in bucket i.

        ``buckets`` has one count per LATENCY_BUCKETS boundary plus +Inf, each counted
        where ``observe`` would (the first boundary >= the value); ``seconds`` is their
        sum. The C fault loop counts this way; observing a million faults one by one
        from Python would cost more than resolving them. prometheus-client has no bulk
        observe, so this adds to the child's bucket and sum values directly (its
        internals since 0.4; tests/test_metrics_unit.py checks the exposition).
        """
        child = _RESOLUTION_CHILDREN.get(resolved_by)
        if child is None:
            _check("resolved_by", resolved_by, RESOLVED_BY)
            return
        values = child._buckets
        if len(buckets) != len(values):
            raise ValueError(f"{len(buckets)} bucket counts for {len(values)} buckets")
        for value, count in zip(values, buckets, strict=True):
            if count:
                value.inc(count)
        child._sum.inc(seconds)

    def blocked(self, thread: int, seconds: float) -> None:
        """Add time vCPU thread ``thread`` (tid or vCPU id) spent blocked on a fault."""
        VCPU_BLOCKED.inc(seconds)
        with self._lock:
            if self._closed:
                return
            self._blocked.inc(seconds)
            child = self._threads.get(thread)
            if child is None:
                child = SESSION_THREAD_BLOCKED.labels(self.session, self.role, str(thread))
                self._threads[thread] = child
            child.inc(seconds)

    def installed(self, method: str, pages: int = 1) -> None:
        """Count ``pages`` installed with ``method`` (copy, zeropage, continue, poison)."""
        _lookup(_INSTALLED_CHILDREN, "method", method).inc(pages)

    # -- peer link --

    def received(self, lane: str, nbytes: int) -> None:
        """Count bytes received from the peer on ``lane`` (demand or bulk)."""
        _lookup(_RECEIVED_CHILDREN, "lane", lane).inc(nbytes)

    def sent(self, lane: str, nbytes: int) -> None:
        """Count bytes sent to the peer on ``lane`` (demand or bulk)."""
        _lookup(_SENT_CHILDREN, "lane", lane).inc(nbytes)

    def rtt(self, seconds: float) -> None:
        """Observe one demand request's round trip to the peer."""
        PEER_RTT.observe(seconds)

    def reconnected(self) -> None:
        """Count one re-established peer link."""
        PEER_RECONNECTS.inc()

    def link(self, up: bool) -> None:
        """Set whether the session's peer link is up."""
        with self._lock:
            if not self._closed:
                self._link.set(1 if up else 0)

    # -- session progress and outcome --

    def progress(self, total: int, installed: int, unrecoverable: int = 0) -> None:
        """Set the session's page counts; remaining is derived (never below zero)."""
        with self._lock:
            if self._closed:
                return
            self._pages.set(total)
            self._installed.set(installed)
            self._unrecoverable.set(unrecoverable)
            self._remaining.set(max(0, total - installed - unrecoverable))

    def state(self, state: str) -> None:
        """Move the session to ``state`` and the ``uffdd_sessions`` gauge with it."""
        _check("state", state, STATES)
        with self._lock:
            if self._closed or state == self._state:
                return
            key = (self.session, self.role)
            SESSION_STATE.labels(*key, self._state).set(0)
            SESSION_STATE.labels(*key, state).set(1)
            SESSIONS.labels(self.role, self._state).dec()
            SESSIONS.labels(self.role, state).inc()
            self._state = state

    def verdict(self, strategy: str, verdict: str) -> None:
        """Count one vCPU-exit verdict given by ``strategy``."""
        _check("verdict", verdict, VERDICTS)
        VERDICTS_TOTAL.labels(_check("strategy", strategy, STRATEGIES), verdict).inc()
        with self._lock:
            if not self._closed:
                self._verdicts[verdict].inc()

    def unrecoverable(self, reason: str, pages: int = 1) -> None:
        """Count ``pages`` handed to the failure policy for ``reason``."""
        UNRECOVERABLE.labels(_check("reason", reason, UNRECOVERABLE_REASONS)).inc(pages)

    def close(self) -> None:
        """Remove every per-session series; daemon-wide counters keep their values.

        Idempotent. The session leaves the ``uffdd_sessions`` gauge.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            key = (self.session, self.role)
            SESSIONS.labels(self.role, self._state).dec()
            for metric in _SESSION_PLAIN:
                _remove(metric, key)
            for state in STATES:
                _remove(SESSION_STATE, (*key, state))
            for verdict in VERDICTS:
                _remove(SESSION_VERDICTS, (*key, verdict))
            for thread in self._threads:
                _remove(SESSION_THREAD_BLOCKED, (*key, str(thread)))
            self._threads.clear()


def _remove(metric: Counter | Gauge, labels: tuple[str, ...]) -> None:
    """Remove one label set from ``metric``; absent label sets are fine."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


# --- /metrics over HTTP, in Trio -------------------------------------------------

#: Largest request head we read; a scrape request is a few hundred bytes.
_MAX_REQUEST_HEAD = 8192
#: Seconds a client has to send its request and read the answer.
_REQUEST_TIMEOUT = 10.0


#: Scrapes answered at once; more connections are closed unread (a Prometheus server
#: scrapes one at a time, so only a flood gets here).
_MAX_SCRAPES = 16


async def serve_metrics(
    host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Serve ``GET /metrics`` on ``host:port`` until cancelled (see ``serve_metrics_on``)."""
    await serve_metrics_on(tcp_listener("metrics.listen", host, port), task_status=task_status)


async def serve_metrics_on(
    sock: socket.socket, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Serve ``GET /metrics`` on the bound, listening ``sock`` until cancelled.

    Calls ``task_status.started(port)`` with the bound port (useful with port 0)
    once the listener accepts connections.

    Why not ``prometheus_client.start_http_server``: its thread outlives a Trio
    cancellation and only stops through a private-ish ``shutdown()`` call. A small
    Trio server is stopped by the daemon's cancel scope like every other task. The
    exposition text is built in a worker thread (``trio.to_thread``) so a scrape of
    many series never stalls the event loop. HTTP/1.0 semantics: one request per
    connection, then close.

    Bounds: every connection is answered or closed within _REQUEST_TIMEOUT, at most
    _MAX_SCRAPES at a time (the rest are closed at once), and running out of fds
    makes accept wait and retry (uffdd.listeners.Acceptor), never fail the daemon.
    """
    listener = trio.socket.from_stdlib_socket(sock)
    bound = listener.getsockname()[1]
    acceptor = Acceptor(listener, f"metrics listener port {bound}")
    busy = 0

    async def scrape(conn: trio.socket.SocketType) -> None:
        nonlocal busy
        try:
            await _handle_scrape(trio.SocketStream(conn))
        finally:
            busy -= 1

    with listener:
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            while True:
                conn, _addr = await acceptor.accept()
                if busy >= _MAX_SCRAPES:
                    conn.close()
                    continue
                busy += 1
                nursery.start_soon(scrape, conn)
    raise AssertionError("unreachable")  # pragma: no cover


async def _handle_scrape(stream: trio.SocketStream) -> None:
    """Answer one HTTP request on ``stream`` and close it."""
    async with stream:
        with trio.move_on_after(_REQUEST_TIMEOUT):
            try:
                head = await _read_head(stream)
                if head is not None:
                    await stream.send_all(await _response(head))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """Read an HTTP request head (up to the blank line); None if too large or cut."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > _MAX_REQUEST_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    return data


async def _response(head: bytes) -> bytes:
    """Build the full HTTP response for request ``head``."""
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split() if lines else []
    if len(parts) != 3:
        return _http(400, "text/plain", b"bad request\n")
    method, target, _version = parts
    if method not in ("GET", "HEAD"):
        return _http(405, "text/plain", b"only GET\n", extra="Allow: GET, HEAD\r\n")
    if target.split("?", 1)[0] not in ("/metrics", "/"):
        return _http(404, "text/plain", b"try /metrics\n")
    accept = _header(lines[1:], "accept")
    encoder, content_type = choose_encoder(accept)
    body = await trio.to_thread.run_sync(encoder, REGISTRY)
    return _http(200, content_type, b"" if method == "HEAD" else body, length=len(body))


def _header(lines: list[str], name: str) -> str:
    """Return the value of header ``name`` (case-insensitive) or an empty string."""
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return ""


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _http(
    status: int, content_type: str, body: bytes, *, extra: str = "", length: int | None = None
) -> bytes:
    """Format an HTTP/1.0 response with ``body`` (``length`` overrides for HEAD)."""
    size = len(body) if length is None else length
    head = (
        f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {size}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body
