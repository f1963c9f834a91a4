"""The VMM API: one task per Unix-socket connection, framed msgpack with SCM_RIGHTS.

Every connection is identified with SO_PEERCRED and refused unless its uid or gid is
allowed. Every request is checked (protocol.check_request), and every fd that came with
it is either taken over by a session or closed before the reply is sent. A bad request
gets an error reply naming what is wrong; only a broken stream (bad length, truncated
frame) closes the connection, and never anything beyond it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from uffdd import metrics, protocol, strategies
from uffdd._linux import scm, sdnotify, uffd
from uffdd._linux.mem import Mapping, is_hugetlb_fd
from uffdd.config import is_host_port
from uffdd.errors import KernelError, ProtocolError, RequestError, UffddError
from uffdd.exporter import ExportRegion, open_memfd_region
from uffdd.faultloop import ImportRegion
from uffdd.session import ExportSession, ImportSession, SessionBase, fdstore_name

if TYPE_CHECKING:
    from uffdd.daemon import Daemon

log = logging.getLogger("uffdd.api")

Handler = Callable[["Connection", protocol.Message, list[int]], Awaitable[protocol.Message]]


class Connection:
    """One VMM's connection to the API socket."""

    def __init__(self, daemon: Daemon, sock: trio.socket.SocketType) -> None:
        self.daemon = daemon
        self.sock = sock
        self.cred = scm.peer_cred(sock)  # type: ignore[arg-type]
        self._send_lock = trio.Lock()
        self.owned: list[SessionBase] = []
        self.closed = False
        self.in_flight = 0  # resolve requests not answered yet (limits.max_outstanding_requests)

    def allowed(self) -> bool:
        api = self.daemon.config.api
        return self.cred.uid in api.allowed_uids or self.cred.gid in api.allowed_gids

    async def send(self, message: protocol.Message) -> None:
        if self.closed:
            raise trio.ClosedResourceError("connection closed")
        data = protocol.pack(message)
        async with self._send_lock:
            await self.sock.send(data) if len(data) < 4096 else await _sendall(self.sock, data)

    async def run(self) -> None:
        """Serve requests until the VMM closes the connection."""
        try:
            if not self.allowed():
                metrics.refused("unauthorized")
                log.warning("refused VMM connection pid=%d uid=%d gid=%d: not allowed",
                            self.cred.pid, self.cred.uid, self.cred.gid)
                await self.send(protocol.error_reply(
                    None, "unauthorized",
                    f"uid {self.cred.uid} / gid {self.cred.gid} may not use this daemon"))
                return
            async with trio.open_nursery() as nursery:
                await self._serve(nursery)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        finally:
            self.closed = True
            self.sock.close()
            for session in self.owned:
                if not session.finished:
                    session.set_state("cancelled", "the VMM closed its connection")

    async def _serve(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await self._read_frame()
            except RequestError as e:  # the stream is out of step: say why, then close
                metrics.refused(e.code)
                await self.send(protocol.error_reply(None, e.code, e.message))
                return
            except OSError:  # the VMM went away (reset): its sessions end in run()
                return
            if frame is None:
                return
            body, fds = frame
            if body.get("op") in ("resolve", "populate-failed"):
                if self.in_flight >= self.daemon.config.limits.max_outstanding_requests:
                    # Each waits up to the page deadline: unbounded, they would pin memory
                    # and tasks for any VMM that keeps asking.
                    await self._handle({**body, "op": "__limit__"}, fds)
                    continue
                self.in_flight += 1
                nursery.start_soon(self._handle_in_flight, body, fds)
            else:
                await self._handle(body, fds)

    async def _read_exactly(self, n: int, fds: list[int]) -> bytes | None:
        data = bytearray()
        space = scm.fd_control_space(self.daemon.config.limits.max_fds_per_request)
        while len(data) < n:
            chunk, anc, flags, _addr = await self.sock.recvmsg(n - len(data), space)
            try:
                fds.extend(scm.parse_fds(anc, flags))
            except ProtocolError as e:
                scm.close_all(fds)
                fds.clear()
                fds.append(-1)  # marks "fds were refused" for the request
                log.warning("pid=%d: %s", self.cred.pid, e)
            if not chunk:
                if data:
                    raise RequestError("bad-frame", "connection closed in the middle of a frame")
                return None
            data += chunk
        return bytes(data)

    async def _read_frame(self) -> tuple[protocol.Message, list[int]] | None:
        fds: list[int] = []
        try:
            head = await self._read_exactly(4, fds)
            if head is None:
                return None
            (length,) = protocol.LENGTH.unpack(head)
            protocol.check_length(length, self.daemon.config.limits.max_frame_bytes)
            data = await self._read_exactly(length, fds)
            if data is None:
                raise RequestError("bad-frame", "connection closed in the middle of a frame")
        except BaseException:
            scm.close_all([fd for fd in fds if fd >= 0])
            raise
        try:
            return protocol.unpack_body(data), fds
        except RequestError as e:
            # The frame boundary is intact, so the connection can carry on.
            scm.close_all([fd for fd in fds if fd >= 0])
            return {"op": "__invalid__", "error": e.code, "message": e.message}, []

    async def _handle_in_flight(self, body: protocol.Message, fds: list[int]) -> None:
        try:
            await self._handle(body, fds)
        finally:
            self.in_flight -= 1

    async def _handle(self, body: protocol.Message, fds: list[int]) -> None:
        req_id = body.get("id")
        try:
            if body.get("op") == "__invalid__":
                raise RequestError(str(body["error"]), str(body["message"]))
            if body.get("op") == "__limit__":
                raise RequestError("limit", f"{self.in_flight} resolve requests of this "
                                   "connection are still in flight "
                                   "(limits.max_outstanding_requests)")
            if fds and fds[0] == -1:
                raise RequestError("bad-fds", "too many fds or unexpected ancillary data")
            op = protocol.check_request(body)
            handler = HANDLERS[op]
            reply = await handler(self, body, fds)
            fds = []  # the handler took them over
            reply.update({"id": req_id, "ok": True})
        except RequestError as e:
            metrics.refused(e.code if e.code in metrics.REFUSED_REASONS else "bad-request")
            log.info("refused op=%s pid=%d code=%s: %s", body.get("op"), self.cred.pid, e.code,
                     e.message)
            reply = protocol.error_reply(req_id, e.code, e.message)
        except UffddError as e:
            log.warning("request op=%s failed: %s", body.get("op"), e)
            reply = protocol.error_reply(req_id, "internal", str(e))
        finally:
            scm.close_all([fd for fd in fds if fd >= 0])
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.send(reply)

    def event_sink(self) -> Callable[[protocol.Message], Awaitable[None]]:
        return self.send


async def _sendall(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


# ---------------------------------------------------------------- handlers


def _used_fds(specs: list[protocol.RegionSpec], fds: list[int], *keys: str) -> None:
    """Every received fd is referenced, and every reference exists."""
    used: set[int] = set()
    for i, spec in enumerate(specs):
        for key in keys:
            index = getattr(spec, key)
            if index < 0:
                continue
            if index >= len(fds):
                raise RequestError("bad-fds", f"regions[{i}].{key} = {index}, but only "
                                   f"{len(fds)} fds came with the request")
            used.add(index)
    if len(used) != len(fds):
        raise RequestError("bad-fds", f"{len(fds)} fds came with the request but only "
                           f"{len(used)} are referenced by the regions")


def _check_memfd(fd: int, spec: protocol.RegionSpec, where: str) -> bool:
    """The fd is a memory file large enough for the region; returns 'is hugetlb'."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RequestError("bad-fds", f"{where}: fd is not a memory file (memfd)")
    if spec.offset + spec.size > st.st_size:
        raise RequestError("bad-region", f"{where}: region ends at {spec.offset + spec.size} "
                           f"but the memory fd is {st.st_size} bytes")
    hugetlb = is_hugetlb_fd(fd)
    if hugetlb != (spec.page_size != 4096):
        raise RequestError("bad-region", f"{where}: page_size {spec.page_size} does not match "
                           f"the memory fd ({'hugetlb' if hugetlb else 'regular pages'})")
    return hugetlb


async def handle_export(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    daemon = conn.daemon
    session_id = str(body["session"])
    token = protocol.token_bytes(body["token"])
    specs = protocol.parse_regions(body["regions"], role="export")
    pid = body.get("pid")
    regions: list[ExportRegion] = []
    if isinstance(pid, int):
        if fds:
            raise RequestError("bad-fds", "export with 'pid' reads memory with process_vm_readv "
                               "and takes no fds")
        if pid != conn.cred.pid and conn.cred.uid != 0:
            raise RequestError("unauthorized", "a VMM may export only its own memory")
        for i, spec in enumerate(specs):
            if not spec.addr:
                raise RequestError("bad-region", f"regions[{i}]: pid mode needs 'addr'")
            regions.append(ExportRegion(i, spec.gpa, spec.size, spec.page_size, pid=pid,
                                        addr=spec.addr))
    else:
        for i, spec in enumerate(specs):
            if spec.fd < 0:
                raise RequestError("bad-fds", f"regions[{i}]: needs 'fd' (or give 'pid')")
        _used_fds(specs, fds, "fd")
        try:
            for i, spec in enumerate(specs):
                _check_memfd(fds[spec.fd], spec, f"regions[{i}]")
                regions.append(open_memfd_region(i, spec, fds[spec.fd]))
        except BaseException:
            for region in regions:
                region.close()
            raise
    daemon.check_new_session("export", session_id)
    session = ExportSession(session_id, "export", token, conn.cred.pid, daemon.config,
                            regions=regions, fds=list(fds))
    await daemon.start_session(session, conn)
    return {"session": session_id, "pages": sum(r.pages for r in regions)}


async def handle_import(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    daemon = conn.daemon
    session_id = str(body["session"])
    token = protocol.token_bytes(body["token"])
    specs = protocol.parse_regions(body["regions"], role="import")
    _used_fds(specs, fds, "uffd", "fd")
    defaults = daemon.config.session
    strategy = _strategy(str(body.get("strategy", defaults.strategy)))
    policy = str(body.get("policy", defaults.policy))
    if policy not in ("crash", "poison"):
        raise RequestError("bad-request", "import: field 'policy' must be 'crash' or 'poison'")
    deadline = float(body.get("deadline", defaults.deadline))  # type: ignore[arg-type]
    if not 0 < deadline <= 86400:
        raise RequestError("bad-request", "import: field 'deadline' must be in (0, 86400] seconds")
    peer_address = str(body["peer"])
    if not is_host_port(peer_address):
        raise RequestError("bad-request", "import: field 'peer' must be HOST:PORT")
    daemon.check_new_session("import", session_id)
    _drop_stored_fds(daemon, session_id)
    regions = _import_regions(specs, fds)
    try:
        session = ImportSession(
            session_id, "import", token, conn.cred.pid, daemon.config, regions=regions,
            peer_address=peer_address, strategy=strategy, policy=policy, deadline=deadline,
            fds=list(fds))
    except BaseException:
        for region in regions:
            if region.alias is not None:
                region.alias.close()
        raise
    await daemon.start_session(session, conn)
    return {"session": session_id, "pages": session.pages.total}


def _drop_stored_fds(daemon: Daemon, session_id: str) -> None:
    """The VMM handed its fds over again: the fd store's copies have done their job."""
    stored = daemon.stored_fds.pop(session_id, None)
    if not stored:
        return
    log.info("session=%s imported again: closing the %d fds the fd store gave back",
             session_id, len(stored))
    sdnotify.remove_fds(fdstore_name(session_id))
    scm.close_all(stored)


def _import_regions(specs: list[protocol.RegionSpec], fds: list[int]) -> list[ImportRegion]:
    regions: list[ImportRegion] = []
    try:
        for i, spec in enumerate(specs):
            where = f"regions[{i}]"
            ufd = fds[spec.uffd]
            if not uffd.is_userfaultfd(ufd):
                raise RequestError("bad-fds", f"{where}: fd 'uffd' is not a userfaultfd")
            try:
                uffd.granted_features(ufd)
            except KernelError:
                raise RequestError("bad-fds", f"{where}: the userfaultfd has not had UFFDIO_API "
                                   "done on it") from None
            hugetlb = spec.page_size != 4096
            alias = None
            if spec.fd >= 0:
                hugetlb = _check_memfd(fds[spec.fd], spec, where)
                if spec.mode == "minor":
                    alias = Mapping(fds[spec.fd], spec.size, spec.offset, writable=True)
            regions.append(ImportRegion(i, spec.gpa, spec.addr, spec.size, spec.page_size, ufd,
                                        spec.mode, alias=alias, hugetlb=hugetlb))
    except BaseException:
        for region in regions:
            if region.alias is not None:
                region.alias.close()
        raise
    return regions


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
    sessions = [s for s in conn.daemon.all_sessions() if _may_observe(conn, s)]
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
    found = [s for s in conn.daemon.all_sessions() if s.session_id == session_id
             and (role is None or s.role == role) and not s.finished]
    if not found:
        raise RequestError("unknown-session", f"no running session {session_id!r}")
    for session in found:
        if session.owner_pid == conn.cred.pid:
            return session
    raise RequestError("unauthorized", f"session {session_id!r} belongs to another VMM")


async def handle_subscribe(
    conn: Connection, body: protocol.Message, fds: list[int]
) -> protocol.Message:
    session_id = str(body["session"])
    found = [s for s in conn.daemon.all_sessions() if s.session_id == session_id]
    if not found:
        raise RequestError("unknown-session", f"no session {session_id!r}")
    for session in found:
        if not _may_observe(conn, session):
            raise RequestError("unauthorized", f"session {session_id!r} belongs to another VMM")
    for session in found:
        if session.finished:
            conn.daemon.nursery.start_soon(_replay_final, session, conn.send)
        else:
            session.subscribers.append(conn.send)
    return {}


async def _replay_final(session: SessionBase, sink: Callable[[protocol.Message], Awaitable[None]]
                        ) -> None:
    await trio.sleep(0)
    event: protocol.Message
    if session.state == "completed":
        event = {"event": "completed", "session": session.session_id, "outcome": session.reason}
    else:
        event = {"event": "failed", "session": session.session_id, "reason": session.reason}
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
    for s in conn.daemon.all_sessions():
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
    session = conn.daemon.exports.get(str(body["session"]))
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
    "status": handle_status,
    "subscribe": handle_subscribe,
    "cancel": handle_cancel,
    "resolve": handle_resolve,
    "populate-failed": handle_resolve,
}

__all__ = ["HANDLERS", "Connection", "errno"]
