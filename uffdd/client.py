"""The Python client library for VMMs: export, import, follow events, resolve vCPU exits.

Blocking and thread-compatible (one ``Client`` per thread). Example, destination side::

    from uffdd.client import Client, GuestRegion

    with Client("/run/uffdd/vmm.sock") as c:
        c.import_session("vm42-mig7", token, peer="192.0.2.10:4460",
                         regions=[GuestRegion(gpa=0, addr=ram_addr, size=ram_size, uffd=ufd)])
        event = c.wait_finished("vm42-mig7")   # {"event": "completed", ...} or "failed"

The wire format is documented in README, wire protocol (and the README's integration guide).
Errors the daemon reports are raised as :class:`ClientError` with its ``code``.

With ``resilient=True`` a lost daemon connection (the daemon was restarted) is not an
error: the client reconnects with capped exponential backoff and hands the daemon every
session it created again, with the same fds (the VMM keeps its own copies), then goes on
waiting. A session is forgotten once its terminal event (``completed``, ``failed``,
``cancelled``) arrived.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from uffdd import protocol, schema
from uffdd._linux import scm
from uffdd.errors import UffddError

log = logging.getLogger("uffdd.client")

_RESENT_OPS = ("export", "import")
#: The events that end a session: exactly one of them, last (README, ``subscribe``).
TERMINAL_EVENTS = schema.TERMINAL_EVENTS

class ClientError(UffddError):
    """The daemon refused a request (``code`` as in README, wire protocol) or the link broke."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class MemoryRegion:
    """A region of source guest RAM: a memory fd (``fd``, ``offset``) or, with a pid
    export, its address ``addr`` in the VMM."""

    gpa: int
    size: int
    page_size: int = 4096
    fd: int | None = None
    offset: int = 0
    addr: int | None = None


@dataclass(frozen=True)
class GuestRegion:
    """A region of destination guest RAM at ``addr`` in the VMM, registered with ``uffd``.

    ``mode`` is "missing" (UFFDIO_COPY) or "minor" (UFFDIO_CONTINUE; needs ``fd``).
    """

    gpa: int
    addr: int
    size: int
    uffd: int
    mode: str = "missing"
    page_size: int = 4096
    fd: int | None = None
    offset: int = 0


class Client:
    """A connection to the uffdd VMM API socket."""

    def __init__(self, path: str, *, timeout: float = 60.0, resilient: bool = False,
                 reconnect_timeout: float = 120.0, reconnect_max_delay: float = 1.0) -> None:
        """Connect to the daemon at ``path``. Raises ClientError if it cannot.

        ``resilient``: survive daemon restarts (see the module docstring); reconnecting
        gives up after ``reconnect_timeout`` seconds without a daemon.
        """
        self.path = path
        self.timeout = timeout
        self.resilient = resilient
        self.reconnect_timeout = reconnect_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self.reconnects = 0
        self._sessions: dict[str, tuple[dict[str, Any], list[int]]] = {}
        self._sock = self._connect()
        self._next_id = 1
        self._events: deque[dict[str, Any]] = deque()
        self._buf = bytearray()
        self._ops: dict[int, str] = {}  # id -> op of the requests not answered yet

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise ClientError("unavailable", f"cannot connect to {self.path}: {e}") from None
        return sock

    def close(self) -> None:
        """Close the connection (sessions this connection created are cancelled)."""
        self._sessions.clear()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests

    def export_session(self, session: str, token: bytes, regions: list[MemoryRegion], *,
                       pid: int | None = None) -> int:
        """Hand source guest RAM to the daemon. Returns the number of pages."""
        fds: list[int] = []
        table = []
        for r in regions:
            entry: dict[str, Any] = {"gpa": r.gpa, "size": r.size, "page_size": r.page_size}
            if pid is None:
                if r.fd is None:
                    raise ValueError("each region needs fd (or pass pid=)")
                entry["fd"] = _index(fds, r.fd)
                entry["offset"] = r.offset
            else:
                if r.addr is None:
                    raise ValueError("with pid=, each region needs addr")
                entry["addr"] = r.addr
            table.append(entry)
        body: dict[str, Any] = {"op": "export", "session": session, "token": token,
                                "regions": table}
        if pid is not None:
            body["pid"] = pid
        return int(self.request(body, fds)["pages"])

    def import_session(self, session: str, token: bytes, *, peer: str,
                       regions: list[GuestRegion], strategy: str | None = None,
                       policy: str | None = None, deadline: float | None = None,
                       present: str | None = None) -> int:
        """Hand the destination's uffds (and memory fds) to the daemon. Returns pages.

        ``present="keep"``: pages already present in guest RAM hold valid data (the VMM
        copied them itself before postcopy); without it the daemon refuses an import
        over guest RAM with present pages, since it would never fetch them.
        """
        fds: list[int] = []
        table = []
        for r in regions:
            entry: dict[str, Any] = {"gpa": r.gpa, "addr": r.addr, "size": r.size,
                                     "page_size": r.page_size, "uffd": _index(fds, r.uffd),
                                     "mode": r.mode}
            if r.fd is not None:
                entry["fd"] = _index(fds, r.fd)
                entry["offset"] = r.offset
            table.append(entry)
        body: dict[str, Any] = {"op": "import", "session": session, "token": token,
                                "peer": peer, "regions": table}
        for key, value in (("strategy", strategy), ("policy", policy), ("deadline", deadline),
                           ("present", present)):
            if value is not None:
                body[key] = value
        return int(self.request(body, fds)["pages"])

    def prepare(self, session: str, *, file: str | None = None, fd: int | None = None,
                peer: str | None = None, token: bytes | None = None,
                strategy: str | None = None, policy: str | None = None,
                deadline: float | None = None, handover_deadline: float | None = None,
                warm_record: int | None = None, warm_replay: int | None = None) -> str:
        """Prepare an import for Firecracker's UFFD handover; returns the handover socket
        path to give Firecracker as ``mem_backend.backend_path``.

        The page source is exactly one of ``file`` (a snapshot memory file on this host,
        opened by the daemon as this client could), ``fd`` (that file, open, sent with
        the request) or ``peer`` with the export's ``token`` (the source host's uffdd).
        This connection gets the session's events (README, "Using uffdd with
        Firecracker"). ``warm_record`` / ``warm_replay``: fds of a warm-order file, open
        for writing (the demand order is recorded into it) or for reading (its order is
        streamed first).
        """
        body: dict[str, Any] = {"op": "prepare", "session": session}
        fds: list[int] = []
        if fd is not None:
            body["fd"] = _index(fds, fd)
        for key, warm in (("warm_record", warm_record), ("warm_replay", warm_replay)):
            if warm is not None:
                body[key] = _index(fds, warm)
        for key, value in (("file", file), ("peer", peer), ("token", token),
                           ("strategy", strategy), ("policy", policy), ("deadline", deadline),
                           ("handover_deadline", handover_deadline)):
            if value is not None:
                body[key] = value
        return str(self.request(body, fds)["handover"])

    def status(self, session: str | None = None) -> list[dict[str, Any]]:
        """Status of every session (or one)."""
        body: dict[str, Any] = {"op": "status"}
        if session is not None:
            body["session"] = session
        sessions = self.request(body)["sessions"]
        assert isinstance(sessions, list)
        return sessions

    def subscribe(self, session: str) -> None:
        """Receive the session's events on this connection."""
        self.request({"op": "subscribe", "session": session})

    def cancel(self, session: str) -> None:
        """End a session this VMM created."""
        self.request({"op": "cancel", "session": session})

    def resolve(self, session: str, *, vcpu: int, gpa: int, size: int = 8,
                access: str = "read", flags: int = 0) -> dict[str, Any]:
        """Report a vCPU memory-fault exit; returns the verdict reply."""
        return self.request({"op": "resolve", "session": session, "vcpu": vcpu, "gpa": gpa,
                             "size": size, "access": access, "flags": flags})

    def populate_failed(self, session: str, *, vcpu: int, gpa: int, errno: int) -> dict[str, Any]:
        """Report that MADV_POPULATE_WRITE failed after a populate verdict."""
        return self.request({"op": "populate-failed", "session": session, "vcpu": vcpu,
                             "gpa": gpa, "errno": errno})

    # -- events

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event (None on timeout)."""
        if self._events:
            event = self._events.popleft()
            self._forget(event)
            return event
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                message = self._receive(deadline)
            except ClientError as e:
                if not (self.resilient and e.code == "unavailable" and self._sessions):
                    raise
                self._reconnect(e)
                continue
            if message is None:
                return None
            if "event" in message:
                self._forget(message)
                return message

    def wait_finished(self, session: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the session's terminal event (``completed``, ``failed`` or
        ``cancelled``) and return it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self.next_event(left)
            if event is None:
                raise ClientError("timeout", f"session {session} did not finish in time")
            if event.get("session") == session and event["event"] in schema.TERMINAL_EVENTS:
                return event

    # -- plumbing

    def request(self, body: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        """Send one request (with fds) and return its successful reply.

        Resilient mode: if the connection breaks, reconnect (re-creating the sessions)
        and send the request again; an export or import is remembered for that.
        """
        while True:
            try:
                reply = self._request_once(body, fds)
            except ClientError as e:
                if not (self.resilient and e.code == "unavailable"):
                    raise
                self._reconnect(e)
                if body.get("op") in _RESENT_OPS and str(body.get("session")) in self._sessions:
                    return {"ok": True, "session": body["session"],
                            "pages": self._sessions[str(body["session"])][0].get("pages", 0)}
                continue
            if self.resilient and body.get("op") in _RESENT_OPS:
                self._sessions[str(body["session"])] = ({**body, "pages": reply.get("pages")},
                                                        list(fds or []))
            return reply

    def _reconnect(self, why: ClientError) -> None:
        """Connect again with capped exponential backoff and re-create every session."""
        give_up = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        log.warning("lost the daemon (%s): reconnecting", why.message)
        while True:
            self._sock.close()
            self._buf.clear()
            self._ops.clear()
            try:
                self._sock = self._connect()
                for body, fds in list(self._sessions.values()):
                    self._resend(body, fds)
                break
            except ClientError as e:
                if e.code != "unavailable" or time.monotonic() + delay > give_up:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_delay)
        self.reconnects += 1
        log.warning("reconnected to the daemon; %d sessions handed over again",
                    len(self._sessions))

    def _resend(self, body: dict[str, Any], fds: list[int]) -> None:
        request = {k: v for k, v in body.items() if k != "pages"}
        if request.get("op") == "import":
            # The daemon that died installed pages: they are the guest's now, keep them.
            request["present"] = "keep"
        try:
            self._request_once(request, fds)
        except ClientError as e:
            # The daemon did not die after all (only our connection did) and still
            # runs the session: it is ours again through the subscription.
            if e.code != "session-exists":
                raise
            self._request_once({"op": "subscribe", "session": body["session"]}, [])

    def _forget(self, event: dict[str, Any]) -> None:
        """A final event: the session must not be handed over again."""
        if event.get("event") in schema.TERMINAL_EVENTS:
            self._sessions.pop(str(event.get("session")), None)

    def _request_once(self, body: dict[str, Any], fds: list[int] | None = None
                      ) -> dict[str, Any]:
        req_id = self._next_id
        self._next_id += 1
        body = {**body, "id": req_id}
        self._ops[req_id] = str(body.get("op"))
        try:
            scm.send_with_fds(self._sock, protocol.pack(body), fds or [])
        except OSError as e:
            raise ClientError("unavailable", f"daemon connection broken: {e}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline, keep_events=True)
            if reply is None:
                raise ClientError("timeout", f"no reply to {body['op']} in {self.timeout}s")
            if "event" in reply:
                continue
            if reply.get("id") not in (req_id, None):
                continue
            if not reply.get("ok"):
                raise ClientError(str(reply.get("error")), str(reply.get("message")))
            return reply

    def _receive(self, deadline: float | None, keep_events: bool = False
                 ) -> dict[str, Any] | None:
        while True:
            message = self._pop_frame()
            if message is not None:
                if keep_events and "event" in message:
                    self._events.append(message)
                    return message
                return message
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                return None
            except OSError as e:
                raise ClientError("unavailable", f"daemon connection broken: {e}") from None
            if not data:
                raise ClientError("unavailable", "the daemon closed the connection")
            self._buf += data

    def _pop_frame(self) -> dict[str, Any] | None:
        if len(self._buf) < 4:
            return None
        (length,) = protocol.LENGTH.unpack_from(self._buf)
        if len(self._buf) < 4 + length:
            return None
        body = protocol.unpack_body(bytes(self._buf[4 : 4 + length]))
        del self._buf[: 4 + length]
        op = None
        req_id = body.get("id")
        if "event" not in body and isinstance(req_id, int):
            op = self._ops.pop(req_id, None)
        # UFFDD_STRICT_SCHEMA=1 (the test suite): a frame that does not match its
        # definition in uffdd.schema is an error here, in whichever test received it.
        schema.validate_received(body, op)
        return body


def _index(fds: list[int], fd: int) -> int:
    """Index of ``fd`` in the list sent with a request (each fd is sent once)."""
    if fd in fds:
        return fds.index(fd)
    fds.append(fd)
    return len(fds) - 1
