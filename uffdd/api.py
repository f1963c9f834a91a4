"""The VMM API: one task per Unix-socket connection, framed msgpack with SCM_RIGHTS.

Every connection is identified with SO_PEERCRED and refused unless its uid or gid is
allowed. Every request is checked (protocol.check_request), and every fd that came with
it is either taken over by a session or closed before the reply is sent. A bad request
gets an error reply naming what is wrong; only a broken stream (bad length, truncated
frame) closes the connection, and never anything beyond it.

Size: over 500 lines, not yet on purpose. About half is the connection (framing,
SCM_RIGHTS, the one ordered writer), half the request handlers; the handlers were left
here this round because splitting them from ``Connection`` needs the ``Host`` protocol
to carry the connection's view too. The next split is ``api`` (the connection) and a
``requests`` module (the handlers).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from uffdd import firecracker, handover, metrics, protocol, schema, strategies, warmorder
from uffdd._linux import scm, sdnotify
from uffdd._linux.fds import OwnedFds
from uffdd._linux.mem import Mapping
from uffdd.config import Config, is_host_port
from uffdd.errors import ProtocolError, RequestError, UffddError
from uffdd.exporter import ExportRegion, open_file_region, open_memfd_region
from uffdd.exporter.session import ExportSession
from uffdd.importer.faultloop import ImportRegion
from uffdd.importer.session import ImportSession
from uffdd.registry import Registry
from uffdd.session import SessionBase, fdstore_name, first_of

log = logging.getLogger("uffdd.api")

Handler = Callable[["Connection", protocol.Message, list[int]], Awaitable[protocol.Message]]


#: The only requests that carry fds; fds sent with any other are refused (bad-fds).
FD_OPS = frozenset({"import", "export", "prepare"})
#: Events queued for one connection's writer before it is dropped as not reading.
_OUTBOX = 1024
_RECV_CHUNK = 65536  # bytes asked per recvmsg: a frame sent in tiny pieces costs no more


class Host(Protocol):
    """What a VMM API connection needs from the daemon that accepted it.

    :class:`uffdd.daemon.Daemon` is the one implementation; naming only this here keeps
    the API below the daemon (the daemon imports the API, never the reverse).
    """

    config: Config
    sessions: Registry
    client_in_flight: dict[int, int]  # pid -> resolve requests in flight
    stored_fds: dict[str, list[int]]  # session id -> fds from the fd store
    peer_port: int  # the peer listener's port (0: none)

    @property
    def nursery(self) -> trio.Nursery: ...

    def first_refusal(self, pid: int, why: str) -> bool: ...

    async def start_session(self, session: SessionBase, owner: Connection) -> None: ...


class _Refused:
    """The fds of a frame were refused: why (a bad-fds reply names it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Connection:
    """One VMM's connection to the API socket.

    Reads one frame at a time; every fd that came with a frame is counted against
    limits.max_fds_per_request over the whole frame (however many sendmsg pieces it
    came in), and the excess is closed at once. Replies are written whole within
    limits.send_timeout; events go through a bounded outbox written by the
    connection's own task, so a session never waits for a VMM's socket. A VMM that
    stops reading is dropped: its connection closed, its sessions going on.
    """

    def __init__(self, daemon: Host, sock: trio.socket.SocketType,
                 cred: scm.PeerCred | None = None) -> None:
        self.daemon = daemon
        self.sock = sock
        self.cred = cred if cred is not None else scm.peer_cred(sock)  # type: ignore[arg-type]
        self._send_lock = trio.Lock()
        self.owned: list[SessionBase] = []
        self.closed = False
        self.dropped = False  # closed by us for not reading: its sessions go on
        self.in_flight = 0  # resolve requests of this connection not answered yet
        # Every reply and event of a served connection goes out through this one queue and
        # its one writer, so the VMM reads them in the order they were made (README,
        # "Order of replies and events"): a reply after each event queued before it.
        self._outbox_in, self._outbox_out = trio.open_memory_channel[
            tuple[protocol.Message, object, trio.Event | None]](_OUTBOX)
        self._scope: trio.CancelScope | None = None  # the connection's nursery, once serving
        self._written = trio.Event()  # the writer has ended (its queue closed and drained)

    def allowed(self) -> bool:
        api = self.daemon.config.api
        return self.cred.uid in api.allowed_uids or self.cred.gid in api.allowed_gids

    async def send(self, message: protocol.Message, op: object = None) -> None:
        """Write one frame whole within limits.send_timeout, else drop the connection.

        Every reply (to ``op``) and event is checked against its definition first
        (:func:`check_outgoing`).
        """
        if self.closed:
            raise trio.ClosedResourceError("connection closed")
        check_outgoing(message, op)
        data = protocol.pack(message)
        timeout = self.daemon.config.limits.send_timeout
        with trio.move_on_after(timeout) as scope:
            async with self._send_lock:
                await _sendall(self.sock, data)
        if scope.cancelled_caught:
            # Part of a frame may be written: the stream is out of step for good.
            self.drop(f"it read nothing for {timeout:g}s (limits.send_timeout)")
            raise trio.BrokenResourceError("VMM stopped reading")

    def drop(self, why: str) -> None:
        """Close a connection whose VMM does not read; its sessions are not cancelled."""
        if self.closed:
            return
        log.warning("dropped VMM connection pid=%d: %s", self.cred.pid, why)
        metrics.refused("limit")
        self.dropped = True
        self.closed = True
        self._outbox_in.close()
        if self._scope is not None:
            self._scope.cancel()  # the reader and writer end; run() closes the socket
        else:
            self.sock.close()

    async def run(self) -> None:
        """Serve requests until the VMM closes the connection."""
        try:
            if not self.allowed():
                metrics.refused("unauthorized")
                if self.daemon.first_refusal(self.cred.pid, "unauthorized"):
                    log.warning("refused VMM connection pid=%d uid=%d gid=%d: not allowed",
                                self.cred.pid, self.cred.uid, self.cred.gid)
                await self.send(protocol.error_reply(
                    None, "unauthorized",
                    f"uid {self.cred.uid} / gid {self.cred.gid} may not use this daemon"))
                return
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self.closed:  # dropped before its nursery opened
                    return
                nursery.start_soon(self._write_events)
                await self._serve(nursery)
                # The VMM is done sending: what is queued for it still goes out (bounded
                # as any send), then the connection ends.
                self._outbox_in.close()
                with trio.move_on_after(self.daemon.config.limits.send_timeout):
                    await self._written.wait()
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the VMM went away (or was dropped): its sessions are dealt with below
        finally:
            self.closed = True
            self.sock.close()
            self._outbox_in.close()
            if not self.dropped:
                for session in self.owned:
                    if not session.finished:
                        session.set_state("cancelled", "the VMM closed its connection")

    async def _serve(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await self._read_frame()
            except RequestError as e:  # the stream is out of step: say why, then close
                metrics.refused(e.code)
                log.info("closing VMM connection pid=%d: %s", self.cred.pid, e.message)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         OSError):
                    await self.send(protocol.error_reply(None, e.code, e.message))
                return
            if frame is None:
                return
            body, fds = frame
            if isinstance(fds, list) and fds and body.get("op") not in FD_OPS:
                # Only import and export take fds: any other request (resolve waits up
                # to a page deadline) would hold them for nothing.
                scm.close_all(fds)
                fds = _Refused(f"{len(fds)} fds came with {body.get('op')!r}, which takes "
                               "none (only import and export take fds)")
            if body.get("op") in ("resolve", "populate-failed"):
                if (self.daemon.client_in_flight.get(self.cred.pid, 0)
                        >= self.daemon.config.limits.max_outstanding_requests):
                    # Each waits up to the page deadline: unbounded, they would pin memory
                    # and tasks for any VMM that keeps asking. Counted per client (pid),
                    # so that more connections do not buy a client more.
                    await self._handle({**body, "op": "__limit__"}, fds)
                    continue
                self._in_flight(+1)
                nursery.start_soon(self._handle_in_flight, body, fds)
            else:
                await self._handle(body, fds)

    async def _write_events(self) -> None:
        try:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                     OSError):
                async for message, op, sent in self._outbox_out:
                    await self.send(message, op)  # checked as a reply to op, or an event
                    if sent is not None:
                        sent.set()
        finally:
            self._written.set()

    def _queue_event(self, event: protocol.Message) -> None:
        try:
            self._outbox_in.send_nowait((event, None, None))
        except trio.WouldBlock:
            self.drop(f"{_OUTBOX} events are waiting for it to read")
            raise trio.BrokenResourceError("VMM stopped reading") from None

    async def _read_some(self, n: int, fds: list[int] | _Refused
                         ) -> tuple[bytes, list[int] | _Refused]:
        """One recvmsg; fds counted against the frame's limit, the excess closed now."""
        limit = self.daemon.config.limits.max_fds_per_request
        chunk, anc, flags, _addr = await self.sock.recvmsg(
            min(n, _RECV_CHUNK), scm.fd_control_space(limit))
        try:
            got = scm.parse_fds(anc, flags)
        except ProtocolError as e:  # parse_fds closed what it got
            if isinstance(fds, list):
                scm.close_all(fds)
            return chunk, _Refused(str(e))
        if isinstance(fds, _Refused):
            scm.close_all(got)
            return chunk, fds
        if len(fds) + len(got) > limit:
            scm.close_all(fds)
            scm.close_all(got)
            return chunk, _Refused(f"more than {limit} fds came with one request "
                                   "(limits.max_fds_per_request)")
        fds.extend(got)
        return chunk, fds

    async def _read_exactly(self, n: int, fds: list[int] | _Refused
                            ) -> tuple[bytes | None, list[int] | _Refused]:
        data = bytearray()
        while len(data) < n:
            chunk, fds = await self._read_some(n - len(data), fds)
            if not chunk:
                if data:
                    raise _Truncated(fds)
                return None, fds
            data += chunk
        return bytes(data), fds

    async def _read_frame(self) -> tuple[protocol.Message, list[int] | _Refused] | None:
        """The next frame and its fds (or why they were refused); None at end of stream."""
        fds: list[int] | _Refused = []
        try:
            head, fds = await self._read_exactly(4, fds)
            if head is None:
                if isinstance(fds, list):
                    scm.close_all(fds)
                return None
            (length,) = protocol.LENGTH.unpack(head)
            protocol.check_length(length, self.daemon.config.limits.max_frame_bytes)
            data, fds = await self._read_exactly(length, fds)
            if data is None:
                raise _Truncated(fds)
        except _Truncated as e:
            if isinstance(e.fds, list):
                scm.close_all(e.fds)
            raise RequestError("bad-frame", "connection closed in the middle of a frame"
                               ) from None
        except BaseException:
            if isinstance(fds, list):
                scm.close_all(fds)
            raise
        try:
            return protocol.unpack_body(data), fds
        except RequestError as e:
            # The frame boundary is intact, so the connection can carry on.
            if isinstance(fds, list):
                scm.close_all(fds)
            return {"op": "__invalid__", "error": e.code, "message": e.message}, []

    async def _handle_in_flight(self, body: protocol.Message, fds: list[int] | _Refused
                                ) -> None:
        try:
            await self._handle(body, fds)
        finally:
            self._in_flight(-1)

    def _in_flight(self, delta: int) -> None:
        self.in_flight += delta
        table = self.daemon.client_in_flight
        left = table.get(self.cred.pid, 0) + delta
        if left > 0:
            table[self.cred.pid] = left
        else:
            table.pop(self.cred.pid, None)

    async def _handle(self, body: protocol.Message, fds: list[int] | _Refused) -> None:
        req_id = body.get("id")
        op = body.get("op")
        try:
            reply = await self._reply(body, fds)
            fds = []  # the handler took them over
        except RequestError as e:
            metrics.refused(e.code if e.code in metrics.REFUSED_REASONS else "bad-request")
            log.info("refused op=%s pid=%d code=%s: %s", op, self.cred.pid, e.code, e.message)
            reply = protocol.error_reply(req_id, e.code, e.message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the VMM went away while its request ran: nobody to answer
        except UffddError as e:
            log.warning("request op=%s pid=%d failed: %s", op, self.cred.pid, e)
            reply = protocol.error_reply(req_id, "internal", str(e))
        except OSError as e:
            # The kernel refused something the handler asked on the VMM's behalf (an
            # mmap of its memfd, say): an answer for the VMM, not a daemon failure.
            log.warning("request op=%s pid=%d failed: %s", op, self.cred.pid, e)
            reply = protocol.error_reply(req_id, "internal", f"{op}: the kernel refused: {e}")
        except Exception as e:  # a bug: logged with its traceback, answered all the same
            log.exception("request op=%s pid=%d failed with an internal error", op,
                          self.cred.pid)
            reply = protocol.error_reply(req_id, "internal", f"{op}: internal error: {e!r}")
        finally:
            if isinstance(fds, list):
                scm.close_all(fds)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._send_in_order(reply, op)

    async def _send_in_order(self, reply: protocol.Message, op: object) -> None:
        """Send a reply behind the events made before it, through the one writer, and
        wait until it is written: the next request is read only then, as before, so a
        VMM that stops reading stops being read (and is dropped by the writer's send,
        at limits.send_timeout)."""
        sent = trio.Event()
        timeout = self.daemon.config.limits.send_timeout
        with trio.move_on_after(timeout) as scope:
            await self._outbox_in.send((reply, op, sent))
        if scope.cancelled_caught:
            self.drop(f"{_OUTBOX} frames waited {timeout:g}s for it to read "
                      "(limits.send_timeout)")
            return
        await first_of(sent, self._written)  # the writer may end first (a drop)

    async def _reply(self, body: protocol.Message, fds: list[int] | _Refused
                     ) -> protocol.Message:
        if body.get("op") == "__invalid__":
            raise RequestError(str(body["error"]), str(body["message"]))
        if body.get("op") == "__limit__":
            raise RequestError("limit", f"{self.daemon.client_in_flight.get(self.cred.pid, 0)} "
                               f"resolve requests of pid {self.cred.pid} are still in "
                               "flight (limits.max_outstanding_requests)")
        if isinstance(fds, _Refused):
            raise RequestError("bad-fds", f"fds refused and closed: {fds.reason}")
        op = protocol.check_request(body)
        reply = await HANDLERS[op](self, body, fds)
        reply.update({"id": body.get("id"), "ok": True})
        return reply

    def event_sink(self) -> Callable[[protocol.Message], Awaitable[None]]:
        """Where a session's events for this VMM go: queued, never waited for.

        The same object every time, so a session lists a connection at most once
        however often it subscribes (subscribers stay bounded by connections).
        """
        return self._sink

    async def _sink(self, event: protocol.Message) -> None:
        if self.closed:
            raise trio.ClosedResourceError("connection closed")
        self._queue_event(event)


#: Violations already logged (outside strict mode each is logged once, not per frame).
_REPORTED: set[str] = set()


def check_outgoing(message: protocol.Message, op: object = None) -> None:
    """Check a reply to ``op`` (or an event) against uffdd.schema before it is sent.

    A violation is a daemon bug: logged as an internal error, and recorded for the test
    suite (``UFFDD_SCHEMA_LOG``), which fails the test that caused it. The frame is still
    sent (the VMM's client decides what an unknown field means to it).
    """
    known = op if isinstance(op, str) and op in schema.REPLIES else None
    problems = schema.check_message(message, known)
    if not problems:
        return
    schema.record("daemon", problems, message)
    key = "; ".join(problems)
    if schema.strict() or (key not in _REPORTED and len(_REPORTED) < 256):
        _REPORTED.add(key)
        log.error("internal error: a frame violates its definition in uffdd/schema.py: %s "
                  "(frame: %.500r)", key, message)


class _Truncated(Exception):
    """The stream ended inside a frame (carries the fds read so far, to close)."""

    def __init__(self, fds: list[int] | _Refused) -> None:
        super().__init__("truncated frame")
        self.fds = fds


async def _sendall(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data``: a stream socket may take only part of it per send."""
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


# ---------------------------------------------------------------- handlers


def _used_fds(specs: list[protocol.RegionSpec], fds: list[int], *keys: str,
              others: frozenset[int] = frozenset()) -> None:
    """Every received fd is referenced (by a region, or one of ``others``: fds named
    by other fields), and every reference exists."""
    used: set[int] = set(others)
    for i, spec in enumerate(specs):
        for key in keys:
            index = getattr(spec, key)
            if index < 0:
                continue
            if index >= len(fds):
                raise RequestError("bad-fds", f"regions[{i}].{key} = {index}, but only "
                                   f"{len(fds)} fds came with the request")
            if index in others:
                raise RequestError("bad-fds", f"regions[{i}].{key} = {index} names a warm-"
                                   "order fd")
            used.add(index)
    if len(used) != len(fds):
        raise RequestError("bad-fds", f"{len(fds)} fds came with the request but only "
                           f"{len(used)} are referenced by the regions")


def _region_table(body: protocol.Message, daemon: Host, role: str
                  ) -> list[protocol.RegionSpec]:
    """The region table, shape-checked and bounded before anything is opened or mapped."""
    limits = daemon.config.limits
    specs = protocol.parse_regions(body["regions"], role=role,
                                   limit=limits.max_regions_per_request)
    handover.check_pages(specs, limits, daemon.sessions.running_pages())
    return specs


async def handle_export(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    daemon = conn.daemon
    session_id = str(body["session"])
    token = protocol.token_bytes(body["token"])
    specs = _region_table(body, daemon, "export")
    pid = body.get("pid")
    regions: list[ExportRegion] = []
    warm = warmorder.warm_fds(body, fds, "export")
    replay = warmorder.read_replay(fds[warm["warm_replay"]]) if "warm_replay" in warm \
        else None
    if "warm_record" in warm:
        warmorder.check_record_fd(fds[warm["warm_record"]])
    if isinstance(pid, int):
        if len(fds) > len(warm):
            raise RequestError("bad-fds", "export with 'pid' reads memory with process_vm_readv "
                               "and takes no fds")
        if pid != conn.cred.pid and conn.cred.uid != 0:
            raise RequestError("unauthorized", "a VMM may export only its own memory")
        for i, spec in enumerate(specs):
            if not spec.addr:
                raise RequestError("bad-region", f"regions[{i}]: pid mode needs 'addr'")
        handover.check_pid_regions(pid, specs)
        for i, spec in enumerate(specs):
            regions.append(ExportRegion(i, spec.gpa, spec.size, spec.page_size, pid=pid,
                                        addr=spec.addr))
    else:
        for i, spec in enumerate(specs):
            if spec.fd < 0:
                raise RequestError("bad-fds", f"regions[{i}]: needs 'fd' (or give 'pid')")
        _used_fds(specs, fds, "fd", others=frozenset(warm.values()))
        # A memfd (or shmem, hugetlbfs file), or a plain file: a snapshot's memory file
        # (Firecracker's PUT /snapshot/create), read with pread only.
        plain = {spec.fd: handover.is_plain_file(fds[spec.fd]) for spec in specs}
        for i, spec in enumerate(specs):  # every fd checked before any is mapped
            if plain[spec.fd]:
                handover.check_file_region(fds[spec.fd], spec, f"regions[{i}]")
            else:
                handover.check_memfd(fds[spec.fd], spec, f"regions[{i}]", writes=False)
        daemon.sessions.check_new_session("export", session_id)
        try:
            for i, spec in enumerate(specs):
                opener = open_file_region if plain[spec.fd] else open_memfd_region
                regions.append(opener(i, spec, fds[spec.fd]))
        except BaseException:
            for region in regions:
                region.close()
            raise
    daemon.sessions.check_new_session("export", session_id)
    record_fd = fds[warm["warm_record"]] if "warm_record" in warm else -1
    owned = OwnedFds.adopt(fds)  # from here the session closes them, whatever happens
    try:
        session = ExportSession(session_id, "export", token, conn.cred.pid, daemon.config,
                                regions=regions, fds=owned, warm_record_fd=record_fd)
        state = session.export_state
        if session.warm_record_fd >= 0:
            state.recorder = warmorder.Recorder(state.layout)
        if replay is not None and (why := state.use_replay(replay)):
            raise RequestError("bad-request", f"export: 'warm_replay' does not fit: {why}")
    except BaseException:
        for region in regions:
            region.close()
        owned.close()
        raise
    await daemon.start_session(session, conn)
    return {"session": session_id, "pages": sum(r.pages for r in regions)}


async def handle_import(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    """Take over a destination VMM's uffds once every claim is verified (uffdd.handover)."""
    daemon = conn.daemon
    session_id = str(body["session"])
    token = protocol.token_bytes(body["token"])
    specs = _region_table(body, daemon, "import")
    _used_fds(specs, fds, "uffd", "fd")
    strategy, policy, deadline = _session_options(body, daemon, "import")
    peer_address = str(body["peer"])
    if not is_host_port(peer_address):
        raise RequestError("bad-request", "import: field 'peer' must be HOST:PORT")
    handover.check_peer_security(daemon.config.peer, peer_address)
    present = str(body.get("present", protocol.PRESENT_NONE))
    if present not in protocol.PRESENT_VALUES:
        raise RequestError("bad-request", "import: field 'present' must be 'none' or 'keep'")
    # The fd store still holds this session's fds: the daemon ran it before a restart,
    # so what is present was installed by the previous daemon.
    keep = present == protocol.PRESENT_KEEP or session_id in daemon.stored_fds
    daemon.sessions.check_new_session("import", session_id)
    claims = _import_claims(specs, fds, policy)
    checks = await trio.to_thread.run_sync(handover.verify_import, conn.cred.pid, claims,
                                           policy, keep)
    # The checks waited for a thread: another request may have started a session since.
    handover.check_pages(specs, daemon.config.limits, daemon.sessions.running_pages())
    daemon.sessions.check_new_session("import", session_id)
    _drop_stored_fds(daemon, session_id)
    regions = _import_regions(claims, checks)
    owned = OwnedFds.adopt(fds)  # from here the session closes them, whatever happens
    try:
        session = ImportSession(
            session_id, "import", token, conn.cred.pid, daemon.config, regions=regions,
            peer_address=peer_address, strategy=strategy, policy=policy, deadline=deadline,
            fds=owned, adopt_present=keep)
    except BaseException:
        for region in regions:
            if region.alias is not None:
                region.alias.close()
        owned.close()
        raise
    await daemon.start_session(session, conn)
    return {"session": session_id, "pages": session.pages.total}


async def handle_prepare(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    """An import without fds: its uffd and regions come from Firecracker's handover
    socket, whose path the reply names (uffdd.firecracker)."""
    daemon = conn.daemon
    session_id = str(body["session"])
    sources = [key for key in ("peer", "file", "fd") if key in body]
    if len(sources) != 1:
        raise RequestError("bad-request", "prepare: give exactly one page source: 'peer' "
                           "(HOST:PORT of the source daemon), 'file' (the snapshot memory "
                           "file's path) or 'fd' (the snapshot file sent with the request)")
    named = warmorder.fd_indices(body, len(fds))
    strategy, policy, deadline = _session_options(body, daemon, "prepare")
    wait = _seconds(body, "handover_deadline", firecracker.DEFAULT_HANDOVER_DEADLINE, "prepare")
    peer_address = ""
    token = b""
    if "peer" in body:
        peer_address = str(body["peer"])
        if not is_host_port(peer_address):
            raise RequestError("bad-request", "prepare: field 'peer' must be HOST:PORT")
        if "token" not in body:
            raise RequestError("bad-request", "prepare: 'peer' needs the export's 'token'")
        token = protocol.token_bytes(body["token"])
        handover.check_peer_security(daemon.config.peer, peer_address)
    daemon.sessions.check_new_session("import", session_id)
    if ("warm_record" in named or "warm_replay" in named) and "peer" in body:
        raise RequestError("bad-request", "prepare: warm restore ('warm_record', "
                           "'warm_replay') needs a 'file' or 'fd' source; for a remote "
                           "one give them to the source host's 'export'")
    replay = warmorder.read_replay(fds[named["warm_replay"]]) if "warm_replay" in named \
        else None  # its fd is closed with the request's: the order is read whole
    if "warm_record" in named:
        warmorder.check_record_fd(fds[named["warm_record"]])
    if "fd" in named:
        firecracker.check_snapshot_fd(fds[named["fd"]])
    taken = {key: fds[i] for key, i in named.items() if key != "warm_replay"}
    fds[:] = [fd for fd in fds if fd not in taken.values()]  # owned here from now on
    file_fd = taken.get("fd", -1)
    record_fd = taken.get("warm_record", -1)
    try:
        if "file" in body:
            file_fd = firecracker.open_snapshot(str(body["file"]), conn.cred)
        session = firecracker.prepare(
            daemon.config, daemon.sessions, conn.cred,
            firecracker.Prepared(session_id, token, peer_address, file_fd, policy, deadline,
                                 wait, record_fd, replay),
            strategy, lambda: firecracker.own_peer_address(daemon.config, daemon.peer_port))
    except BaseException:
        for fd in (file_fd, record_fd):
            if fd >= 0:
                os.close(fd)
        raise
    await daemon.start_session(session, conn)
    return {"session": session_id, "handover": session.handover}


def _drop_stored_fds(daemon: Host, session_id: str) -> None:
    """The VMM handed its fds over again: the fd store's copies have done their job."""
    stored = daemon.stored_fds.pop(session_id, None)
    if not stored:
        return
    log.info("session=%s imported again: closing the %d fds the fd store gave back",
             session_id, len(stored))
    sdnotify.remove_fds(fdstore_name(session_id))
    scm.close_all(stored)


def _import_claims(specs: list[protocol.RegionSpec], fds: list[int], policy: str
                   ) -> list[handover.ImportClaim]:
    """The cheap checks of each region's fds (kind, flags, features, size, seals)."""
    claims = []
    for i, spec in enumerate(specs):
        where = f"regions[{i}]"
        hugetlb = spec.page_size != 4096
        memfd = fds[spec.fd] if spec.fd >= 0 else -1
        if memfd >= 0:
            hugetlb = handover.check_memfd(memfd, spec, where, writes=spec.mode == "minor")
        handover.check_uffd(fds[spec.uffd], where,
                            handover.needed_features(spec.mode, hugetlb, policy))
        claims.append(handover.ImportClaim(where, spec, fds[spec.uffd], memfd, hugetlb))
    return claims


def _import_regions(claims: list[handover.ImportClaim], checks: list[handover.ImportCheck]
                    ) -> list[ImportRegion]:
    regions: list[ImportRegion] = []
    try:
        for i, (claim, check) in enumerate(zip(claims, checks, strict=True)):
            spec = claim.spec
            alias = None
            if spec.mode == "minor":
                try:
                    alias = Mapping(claim.memfd, spec.size, spec.offset, writable=True)
                except OSError as e:
                    raise RequestError("bad-fds", f"{claim.where}: cannot map the memory fd "
                                       f"for writing ({e.strerror})") from None
            regions.append(ImportRegion(i, spec.gpa, spec.addr, spec.size, spec.page_size,
                                        claim.uffd, spec.mode, alias=alias,
                                        hugetlb=check.hugetlb))
    except BaseException:
        for region in regions:
            if region.alias is not None:
                region.alias.close()
        raise
    return regions


def _session_options(body: protocol.Message, daemon: Host, op: str
                     ) -> tuple[strategies.Strategy, str, float]:
    """An import's (or a prepare's) strategy, policy and deadline, defaults from the
    config's [session]."""
    defaults = daemon.config.session
    strategy = _strategy(str(body.get("strategy", defaults.strategy)))
    policy = str(body.get("policy", defaults.policy))
    if policy not in ("crash", "poison"):
        raise RequestError("bad-request", f"{op}: field 'policy' must be 'crash' or 'poison'")
    return strategy, policy, _seconds(body, "deadline", defaults.deadline, op)


def _seconds(body: protocol.Message, key: str, default: float, op: str) -> float:
    """A duration field in (0, 86400] seconds."""
    value = float(body.get(key, default))  # type: ignore[arg-type]
    if not 0 < value <= 86400:
        raise RequestError("bad-request", f"{op}: field '{key}' must be in (0, 86400] seconds")
    return value


def _strategy(name: str) -> strategies.Strategy:
    try:
        return strategies.load(name)
    except UffddError as e:
        raise RequestError("bad-request", f"import: {e}") from None


def _may_observe(conn: Connection, session: SessionBase) -> bool:
    """Status and events of a session: for the VMM that created it and for the admin.

    The admin is root or the daemon's own uid (``uffdd status`` run by the operator).
    Other allowed VMMs do not even learn that the session exists: its id, peer and
    progress are another tenant's business.
    """
    return session.owner_pid == conn.cred.pid or conn.cred.uid in (0, os.geteuid())


async def handle_status(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    session_id = body.get("session")
    sessions = [s for s in conn.daemon.sessions.all_sessions() if _may_observe(conn, s)]
    if isinstance(session_id, str):
        sessions = [s for s in sessions if s.session_id == session_id]
        if not sessions:
            raise RequestError("unknown-session", f"no session {session_id!r}")
    return {"sessions": [s.status() for s in sessions]}  # type: ignore[attr-defined]


def _own_session(conn: Connection, session_id: str, role: str | None = None) -> SessionBase:
    """A session this connection may act on (resolve, cancel): created by the same pid.

    Not even root gets another VMM's session: acting on a VM is its own VMM's job, and
    a second VMM resolving its exits or cancelling it would be a bug or an attack.
    """
    found = [s for s in conn.daemon.sessions.all_sessions() if s.session_id == session_id
             and (role is None or s.role == role) and not s.finished]
    for session in found:
        if session.owner_pid == conn.cred.pid:
            return session
    if any(_may_observe(conn, s) for s in found):  # the admin may know it exists
        raise RequestError("unauthorized", f"session {session_id!r} belongs to another VMM")
    # Everyone else gets the answer for a session that does not exist: "unauthorized"
    # would tell a tenant which ids other tenants' sessions have (status hides them).
    raise RequestError("unknown-session", f"no running session {session_id!r}")


async def handle_subscribe(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    session_id = str(body["session"])
    # Another tenant's session is answered as one that does not exist, as in status:
    # "unauthorized" would confirm which ids other tenants' sessions have.
    found = [s for s in conn.daemon.sessions.all_sessions()
             if s.session_id == session_id and _may_observe(conn, s)]
    if not found:
        raise RequestError("unknown-session", f"no session {session_id!r}")
    for session in found:
        if session.final_event is not None:  # ended and told: the same event again
            conn.daemon.nursery.start_soon(_replay_final, session.final_event,
                                           conn.event_sink())
        elif conn.event_sink() not in session.subscribers:  # once per connection
            session.subscribers.append(conn.event_sink())
    return {}


async def _replay_final(event: protocol.Message,
                        sink: Callable[[protocol.Message], Awaitable[None]]) -> None:
    await trio.sleep(0)  # after the reply to the subscribe
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await sink(event)


async def handle_cancel(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    session = _own_session(conn, str(body["session"]))
    session.cancel()
    return {}


async def handle_resolve(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    try:
        session = _own_session(conn, str(body["session"]), "import")
    except RequestError as e:
        ended = _ended_import(conn, str(body["session"])) if e.code == "unknown-session" else None
        if ended is None:
            raise
        # The VM's session failed: a vCPU that still asks must stop, with the reason.
        verdict = _crash_verdict(ended, _exit_gpa(ended, body))
        return {"verdict": verdict.kind, "gpa": verdict.gpa, "addr": verdict.addr,
                "size": verdict.size, "reason": verdict.reason}
    assert isinstance(session, ImportSession)
    gpa = _exit_gpa(session, body)
    errno_value = body.get("errno")
    access = str(body.get("access", "read"))
    if access not in ("read", "write", "exec"):
        raise RequestError("bad-request", "resolve: field 'access' must be read, write or exec")
    exit = strategies.VcpuExit(
        vcpu=int(body["vcpu"]),  # type: ignore[call-overload]
        gpa=gpa, size=int(body.get("size", 1)),  # type: ignore[call-overload]
        access=access, flags=int(body.get("flags", 0)),  # type: ignore[call-overload]
        populate_errno=errno_value if isinstance(errno_value, int) else None)
    verdict = await session.resolve(exit)
    return {"verdict": verdict.kind, "gpa": verdict.gpa, "addr": verdict.addr,
            "size": verdict.size, "reason": verdict.reason}


def _ended_import(conn: Connection, session_id: str) -> ImportSession | None:
    """This VMM's import session of that id if it ended in failure (or was cancelled)."""
    for s in conn.daemon.sessions.all_sessions():
        if (isinstance(s, ImportSession) and s.session_id == session_id
                and s.state in ("failed", "cancelled") and s.owner_pid == conn.cred.pid):
            return s
    return None


def _crash_verdict(session: ImportSession, gpa: int) -> strategies.Verdict:
    region, page = session.region_of_gpa(gpa)
    return strategies.Verdict(strategies.CRASH, region.gpa + page * region.page_size,
                              region.addr + page * region.page_size, region.page_size,
                              f"session {session.state}: {session.reason or session.state}")


def _exit_gpa(session: ImportSession, body: protocol.Message) -> int:
    gpa, addr = body.get("gpa"), body.get("addr")
    try:
        if isinstance(gpa, int):
            session.region_of_gpa(gpa)
            return gpa
        if isinstance(addr, int):
            region, _page = session.region_of_addr(addr)
            return region.gpa + (addr - region.addr)
    except UffddError as e:
        raise RequestError("bad-region", str(e)) from None
    raise RequestError("bad-request", f"{body.get('op')}: give 'gpa' or 'addr'")


async def handle_inject(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    """Fault injection on an export session (only with ``testing.fault_injection``).

    ``lose``: 4 KiB guest page numbers (gpa // 4096) the source will report it cannot
    read; ``corrupt``: how many data frames to send with a wrong checksum.
    """
    if not conn.daemon.config.testing.fault_injection:
        raise RequestError("bad-request", "inject: fault injection is disabled "
                           "(testing.fault_injection / --enable-fault-injection)")
    session = conn.daemon.sessions.exports.get(str(body["session"]))
    if session is None or not _may_observe(conn, session):  # its VMM or the admin only
        raise RequestError("unknown-session", f"no export session {body['session']!r}")
    lose = body.get("lose", [])
    assert isinstance(lose, list)
    for item in lose:
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            raise RequestError("bad-request", "inject: 'lose' must be a list of page numbers")
        session.lose_gpa(item * 4096)
    corrupt = body.get("corrupt", 0)
    assert isinstance(corrupt, int)
    session.export_state.corrupt_frames += corrupt
    return {"lost": len(lose), "corrupt": corrupt}


HANDLERS: dict[str, Handler] = {
    "inject": handle_inject,
    "export": handle_export,
    "import": handle_import,
    "prepare": handle_prepare,
    "status": handle_status,
    "subscribe": handle_subscribe,
    "cancel": handle_cancel,
    "resolve": handle_resolve,
    "populate-failed": handle_resolve,
}

__all__ = ["HANDLERS", "Connection", "Host"]
