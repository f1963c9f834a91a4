"""Firecracker's UFFD handover: an import prepared without fds, completed by Firecracker.

Firecracker restores a snapshot with ``"mem_backend": {"backend_type": "Uffd",
"backend_path": <socket>}``: it maps guest RAM anonymous and private, creates a
userfaultfd (O_CLOEXEC | O_NONBLOCK, UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE),
registers every region MISSING, connects to the socket and makes one ``sendmsg``: a
JSON array of ``GuestRegionUffdMapping`` and, as SCM_RIGHTS, the uffd. It never reads
or writes the socket again and never unregisters.

So an orchestrator first ``prepare``\\ s the session (page source, policy, strategy); the
daemon answers with a handover socket, ``<api.handover_dir>/<session>.sock``. One socket
per session, not one for all: Firecracker sends no session id, so a shared socket
could only tell sessions apart by guessing from the payload; per session, the socket's
path *is* the session, its permissions can be set per VM (a jailer's uid), and nothing
has to be demultiplexed.

The payload is checked as strictly as any ``import`` (uffdd.handover), and the region
table against the page source. A malformed payload, a connection with no fd or more
than one, regions past the end of the file, a uffd without EVENT_REMOVE, a second
connection after a good one: each is refused (logged once, the connection closed, a
``handover-refused`` event), and the session waits for a correct handover until its
``handover_deadline``.

Page sources: ``peer`` (the source host's uffdd exports the snapshot file: a regular
file as an export region) or ``file`` (the snapshot memory file on this host). The
file is served by this very daemon over loopback: an internal export session with a
random id and token, so demand first, the background stream, zero markers, integrity
and deadlines are the one engine's, unchanged.

Firecracker's uffd stays registered for the VM's whole life: after ``completed`` the
session goes *resident*. Its fault thread stops; one Trio task waits for the uffd to
become readable and answers what a balloon's inflate and deflate cause (a remove, then
faults in the removed range) with zero pages, never source data. It ends when
Firecracker's socket reaches EOF or Firecracker exits (its pidfd).

Firecracker hands its uffd over once and never reconnects, so a daemon restart cannot
wait for it to come back: under a service manager the session's fds and a sealed
description go to the fd store at the handover (uffdd.fcstore), and ``resume`` is how
the next daemon takes each session back itself, after the same kernel checks as a
handover, adopting the pages present in Firecracker's memory.

Size: about 900 lines, on purpose for now: Firecracker's side is one contract (the
``prepare`` request, the handover socket, the payload's rules, the resident state, the
resume), and every rule of it is in this one file so that it can be read against
Firecracker's source; the kernel checks themselves are ``handover``'s, the stored form
``fcstore``'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from uffdd import (
    fcstore,
    handover,
    listeners,
    metrics,
    peer,
    protocol,
    strategies,
    warmorder,
)
from uffdd._linux import scm, sdnotify, uffd
from uffdd._linux.fds import OwnedFds
from uffdd._linux.mem import buffer_address
from uffdd.config import Config, is_host_port, join_host_port, split_host_port
from uffdd.errors import (
    AlreadyPresent,
    KernelError,
    ProtocolError,
    RangeGone,
    RequestError,
    Retry,
    TargetGone,
)
from uffdd.exporter import ExportRegion, open_file_region
from uffdd.exporter.session import ExportSession
from uffdd.fcstore import ResumeError
from uffdd.importer import pagestate
from uffdd.importer.faultloop import ImportRegion
from uffdd.importer.session import ImportSession
from uffdd.registry import Registry
from uffdd.session import firecracker_fdstore_name, latency_percentiles

log = logging.getLogger("uffdd.firecracker")

#: Firecracker's payload is a few hundred bytes; one recvmsg of this much takes it whole.
PAYLOAD_MAX: Final = 64 * 1024
#: Ancillary room for this many fds, so that "more than one" is seen, not truncated.
_FDS_ROOM: Final = 8
#: How long a connection may take to send its payload before it is refused.
RECV_TIMEOUT: Final = 5.0
SUN_PATH_MAX: Final = 107
DEFAULT_HANDOVER_DEADLINE: Final = 60.0
_MSG_BATCH: Final = 64
#: A handover refusal names the reason (for the log, the event and the final failure).
_REASON_MAX: Final = 300


# ---------------------------------------------------------------- the payload


def parse_mappings(payload: bytes, limit: int) -> list[protocol.RegionSpec]:
    """Firecracker's JSON array of GuestRegionUffdMapping as import regions.

    gpa is ``offset`` (the snapshot file's offset space, the same on the source side),
    addr ``base_host_virt_addr``; ``page_size`` (or the deprecated ``page_size_kib``,
    which is in bytes despite its name); unknown fields are ignored. The result has
    passed every shape check of an import's region table (protocol.parse_regions).
    """
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError("bad-request", f"the payload is not JSON: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise RequestError("bad-request", "the payload must be a non-empty JSON array of "
                           "GuestRegionUffdMapping")
    table: list[dict[str, object]] = []
    for i, item in enumerate(raw[: limit + 1]):
        if not isinstance(item, dict):
            raise RequestError("bad-request", f"mapping[{i}] is not an object")
        page_size = item.get("page_size", item.get("page_size_kib"))
        fields = {"base_host_virt_addr": item.get("base_host_virt_addr"),
                  "size": item.get("size"), "offset": item.get("offset"),
                  "page_size": page_size}
        for name, value in fields.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RequestError("bad-request", f"mapping[{i}]: '{name}' must be an "
                                   "integer >= 0")
        table.append({"gpa": fields["offset"], "addr": fields["base_host_virt_addr"],
                      "size": fields["size"], "page_size": fields["page_size"],
                      "uffd": 0, "mode": "missing"})
    return protocol.parse_regions(table, role="import", limit=limit)


def export_specs(specs: list[protocol.RegionSpec]) -> list[protocol.RegionSpec]:
    """The export regions that serve ``specs`` from the snapshot file (gpa = offset)."""
    return [protocol.RegionSpec(gpa=s.gpa, size=s.size, page_size=s.page_size, fd=0,
                                offset=s.gpa) for s in specs]


def mapping_claims(specs: list[protocol.RegionSpec], uffd: int, file_fd: int
                   ) -> list[handover.ImportClaim]:
    """The kernel checks of a handover's mappings that need no thread (the snapshot
    file holds every region, if local; the uffd's API and features), and the claims
    ``handover.verify_import`` then checks against Firecracker's memory. The same at the
    handover and at a resume after a daemon restart."""
    if file_fd >= 0:
        for i, spec in enumerate(export_specs(specs)):
            handover.check_file_region(file_fd, spec, f"mapping[{i}]")
    claims = []
    for i, spec in enumerate(specs):
        where = f"mapping[{i}]"
        hugetlb = spec.page_size != 4096
        # Firecracker asks UFFDIO_API for EVENT_REMOVE only. UFFD_FEATURE_POISON is a
        # feature bit for detection: UFFDIO_POISON works without it (the kernel lists it
        # among the range's ioctls, which verify_import checks under the poison
        # policy), so it is not required here.
        handover.check_uffd(uffd, where, handover.needed_features("missing", hugetlb,
                                                                   "crash"))
        claims.append(handover.ImportClaim(where, spec, uffd, -1, hugetlb))
    return claims


# ---------------------------------------------------------------- prepare


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked ``prepare`` request (api.handle_prepare parses the common fields)."""

    session_id: str
    token: bytes
    peer: str  # "" with a file source
    file_fd: int  # -1 with a peer source; owned by the session once created
    policy: str
    deadline: float
    handover_deadline: float
    warm_record_fd: int = -1  # warm restore: the record is written here; owned as file_fd
    warm_replay: warmorder.Order | None = None  # warm restore: the order to stream first


def open_snapshot(path: str, cred: scm.PeerCred) -> int:
    """Open the snapshot file a client names, as that client could (not as root).

    The daemon opens it for the client, so it checks what the kernel would have checked
    for the client, for the file itself: root or the daemon's own uid, the file's
    owner, its group (the client's primary gid) or everyone, with read permission.
    A client that cannot be described so sends the file as an fd instead.
    """
    if not os.path.isabs(path):
        raise RequestError("bad-request", "prepare: 'file' must be an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise RequestError("bad-request", f"prepare: cannot open {path}: {e.strerror}"
                           ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestError("bad-request", f"prepare: {path} is not a regular file")
        if not _may_read(cred, st):
            raise RequestError("unauthorized", f"prepare: uid {cred.uid} / gid {cred.gid} "
                               f"may not read {path}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _may_read(cred: scm.PeerCred, st: os.stat_result) -> bool:
    if cred.uid in (0, os.geteuid()):
        return True
    if st.st_uid == cred.uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == cred.gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def check_snapshot_fd(fd: int) -> None:
    """A snapshot file sent as an fd: a regular file, open for reading."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RequestError("bad-fds", "prepare: the fd is not a regular file")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        raise RequestError("bad-fds", "prepare: the file fd is open write-only")


def handover_path(config: Config, session_id: str) -> str:
    path = os.path.join(config.api.handover_dir, f"{session_id}.sock")
    if len(path.encode()) > SUN_PATH_MAX:
        raise RequestError("bad-request", f"prepare: the handover socket path {path!r} is "
                           f"longer than a Unix socket allows ({SUN_PATH_MAX} bytes): use a "
                           "shorter session id or api.handover_dir")
    return path


def listen_handover(config: Config, path: str) -> socket.socket:
    """Bind the session's handover socket with the API socket's mode, owner and group."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise RequestError("bad-request", f"prepare: {path} exists and is not a socket")
        # Left by a session of an earlier daemon (ids of running imports are unique).
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # no window in which the socket is world-accessible
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise RequestError("internal", f"prepare: cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, int(config.api.socket_mode, 8))
        listeners.chown_socket(path, config.api.socket_owner, config.api.socket_group)
        sock.listen(4)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock


def own_peer_address(config: Config, port: int) -> str:
    """Where this daemon's own peer listener is reached from this host."""
    if not config.peer.listen or not port:
        raise RequestError("bad-request", "prepare: a 'file' source is served through this "
                           "daemon's peer listener, and peer.listen is off")
    host, _port = split_host_port(config.peer.listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return join_host_port(host, port)


# ---------------------------------------------------------------- the session


class _Refusal(Exception):
    """One handover connection is refused (the session goes on waiting)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:_REASON_MAX]


@dataclass
class FirecrackerSession(ImportSession):
    """An import whose uffd and regions come from Firecracker's handover socket."""

    handover: str = ""  # the socket path
    handover_deadline: float = DEFAULT_HANDOVER_DEADLINE
    listener: socket.socket | None = None  # bound and listening; owned from here on
    file_fd: int = -1  # the local snapshot file (source "file"); -1 for "peer"
    registry: Registry | None = None  # for the internal export of a file source
    own_peer: Callable[[], str] | None = None  # this daemon's peer address (file source)
    source: str = "peer"  # or "file"
    handover_state: str = "waiting"  # waiting | accepted | ended
    resident: bool = False
    refusals: int = 0
    resident_faults: int = 0  # faults zero-filled in the resident state
    resident_removes: int = 0  # UFFD_EVENT_REMOVEs read in the resident state
    #: Taken over from the fd store by a restarted daemon (not handed over to this one).
    resumed: bool = False
    warm_record_fd: int = -1  # warm restore (uffdd.warmorder): written once, at the end
    warm_replay: warmorder.Order | None = None
    warm_replay_state: str | None = None  # None (no replay), "used" or "ignored: why"
    warm_recorded_pages: int | None = None  # pages in the record, once written
    _fc_sock: trio.socket.SocketType | None = field(default=None, init=False, repr=False)
    _fc_pidfd: int | None = field(default=None, init=False, repr=False)
    _last_refusal: str = field(default="", init=False, repr=False)
    _latency_at_completion: tuple[float | None, float | None] | None = field(
        default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._handed = trio.Event()
        self._loop_ended = trio.Event()
        self._vmm_gone = trio.Event()  # Firecracker's socket reached EOF or it exited
        self._vmm_gone_why = ""
        self._link_scope = trio.CancelScope()
        self._progress_scope = trio.CancelScope()
        self._fdstored = False  # the session's fds are in the service manager's fd store
        self._specs: list[protocol.RegionSpec] = []  # the validated region table
        self._resume_resident = False  # resumed in the resident state

    # -- lifetime

    def hand_over(self) -> None:
        """A service-manager stop: a session whose fds are in the fd store (accepted,
        running or resident) is left to the next daemon, which resumes it (``resume``).
        One still waiting for Firecracker ends here: nothing of it is in the store."""
        if self._fdstored and (not self.finished or self.resident):
            self.handed_over = True
            log.info("session=%s left to the next daemon (its fds are in the fd store)",
                     self.session_id)
            return
        self.set_state("cancelled", "daemon stopping: a Firecracker session still waiting "
                       "for its handover cannot be taken over by the next daemon")

    def _start(self, nursery: trio.Nursery) -> None:
        if self.resumed:
            nursery.start_soon(self._resume_phase, nursery)
        else:
            nursery.start_soon(self._handover_phase, nursery)

    async def _until_end(self) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self._complete_then_reside)
            await self._done.wait()
            if self.resident:
                await self._vmm_gone.wait()
                log.info("session=%s resident session ended: %s", self.session_id,
                         self._vmm_gone_why)
            n.cancel_scope.cancel()

    async def _fault_thread(self) -> None:
        try:
            await super()._fault_thread()
        finally:
            self._loop_ended.set()

    async def _link_supervisor(self) -> None:
        with self._link_scope:
            await super()._link_supervisor()

    async def _progress_loop(self) -> None:
        with self._progress_scope:
            await super()._progress_loop()

    def _release(self) -> None:
        if self._fdstored and not self.handed_over:  # ended: the next daemon gets nothing
            sdnotify.remove_fds(firecracker_fdstore_name(self.session_id))
        self._fdstored = False  # (ImportSession's own store is not used)
        self.handover_state = "ended" if self._attached else self.handover_state
        self.resident = False
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.handover)
        if self._fc_sock is not None:
            self._fc_sock.close()
            self._fc_sock = None
        for fd in (self._fc_pidfd, self.file_fd, self.warm_record_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fc_pidfd = None
        self.file_fd = self.warm_record_fd = -1
        super()._release()

    # -- waiting for Firecracker

    async def _handover_phase(self, nursery: trio.Nursery) -> None:
        assert self.listener is not None
        lsock = trio.socket.from_stdlib_socket(self.listener)
        with trio.move_on_after(self.handover_deadline):
            while True:
                conn, _addr = await lsock.accept()
                if await self._try(conn, nursery):
                    break
        if not self._handed.is_set():
            why = f"; the last refusal: {self._last_refusal}" if self._last_refusal else ""
            self.set_state("failed", f"no valid Firecracker handover on {self.handover} "
                           f"within {self.handover_deadline:g}s (handover_deadline){why}")
            return
        # Later connections: refused, logged, the session goes on.
        while True:
            conn, _addr = await lsock.accept()
            with conn:
                pid = _peer_pid(conn)
                with contextlib.suppress(_Refusal):  # read it (its fds closed), no reset
                    _payload, fd = await self._receive(conn)
                    os.close(fd)
                await self._refused(pid, "bad-request", "the session already has its "
                                    "Firecracker handover (a second connection)")

    async def _try(self, conn: trio.socket.SocketType, nursery: trio.Nursery) -> bool:
        """One connection: True if it was a valid handover (the session now runs)."""
        pid = _peer_pid(conn)
        fd = -1
        try:
            payload, fd = await self._receive(conn)
            await self._take(conn, pid, payload, fd, nursery)
        except BaseException as e:
            if fd >= 0 and fd not in self.fds:  # not taken over by the session
                os.close(fd)
            if conn is not self._fc_sock:
                conn.close()
            if not isinstance(e, _Refusal):
                raise
            await self._refused(pid, e.code, e.reason)
            return False
        return True

    async def _refused(self, pid: int, code: str, reason: str) -> None:
        self.refusals += 1
        self._last_refusal = reason
        metrics.refused(code if code in metrics.REFUSED_REASONS else "bad-request")
        log.warning("session=%s refused a Firecracker handover from pid=%d: %s",
                    self.session_id, pid, reason)
        await self.emit({"event": "handover-refused", "session": self.session_id,
                         "pid": pid, "reason": reason})

    async def _receive(self, conn: trio.socket.SocketType) -> tuple[bytes, int]:
        """ONE recvmsg: the payload and exactly one fd, or a refusal (every fd closed).

        Firecracker makes one sendmsg of a few hundred bytes; the ancillary room is for
        several fds, so that two are seen (and refused), not cut off."""
        with trio.move_on_after(RECV_TIMEOUT):
            data, anc, flags, _addr = await conn.recvmsg(PAYLOAD_MAX,
                                                         scm.fd_control_space(_FDS_ROOM))
            try:
                fds = scm.parse_fds(anc, flags)  # closes what it got on a problem
            except ProtocolError as e:
                raise _Refusal("bad-fds", str(e)) from None
            if len(fds) != 1:
                scm.close_all(fds)
                raise _Refusal("bad-fds", f"{len(fds)} fds came with the payload: "
                               "Firecracker sends exactly one, the userfaultfd")
            return data, fds[0]
        raise _Refusal("bad-request", f"no payload came within {RECV_TIMEOUT:g}s")

    async def _take(self, conn: trio.socket.SocketType, pid: int, payload: bytes, fd: int,
                    nursery: trio.Nursery) -> None:
        """Check everything; on success the session owns ``fd`` and ``conn`` and runs."""
        limits = self.config.limits
        try:
            specs = parse_mappings(payload, limits.max_regions_per_request)
            registry = self.registry
            assert registry is not None
            handover.check_pages(specs, limits, registry.running_pages())
            claims = mapping_claims(specs, fd, self.file_fd)
            checks = await trio.to_thread.run_sync(handover.verify_import, pid, claims,
                                                   self.policy, False)
            handover.check_pages(specs, limits, registry.running_pages())
        except RequestError as e:
            raise _Refusal(e.code, e.message) from None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            raise _Refusal("bad-request", f"Firecracker pid {pid} is gone ({e.strerror})"
                           ) from None
        regions = [ImportRegion(i, c.spec.gpa, c.spec.addr, c.spec.size, c.spec.page_size,
                                fd, "missing", hugetlb=check.hugetlb)
                   for i, (c, check) in enumerate(zip(claims, checks, strict=True))]
        # From here on the session owns the uffd, the socket and the pidfd, and the
        # handover deadline no longer applies: it is shielded from it.
        self.fds = OwnedFds([fd])
        self._fc_sock = conn
        self._fc_pidfd = pidfd
        self.vmm_pid = pid
        self._handed.set()
        with trio.CancelScope(shield=True):
            if self.file_fd >= 0:
                await self._start_file_export(specs, nursery)
            self.attach_regions(regions)
            self.handover_state = "accepted"
            log.info("session=%s Firecracker pid=%d handed over %d regions (%d pages), "
                     "source %s", self.session_id, pid, len(regions), self.pages.total,
                     self.source)
            nursery.start_soon(self._watch_firecracker)
            ImportSession._start(self, nursery)
            self._specs = specs
            self._store_in_fdstore()
            await self.emit({"event": "handover", "session": self.session_id, "pid": pid,
                             "regions": len(regions), "pages": self.pages.total})

    async def _start_file_export(self, specs: list[protocol.RegionSpec],
                                 nursery: trio.Nursery) -> None:
        """The local file, served by this daemon to itself: an internal export session.

        Its id and token are random (no tenant can guess, squat on or join it); it is
        owned by the preparing client and lives inside this session's nursery.
        """
        assert self.registry is not None and self.own_peer is not None
        address = self.own_peer()
        export_id = f"fc-file-{secrets.token_hex(8)}"
        token = secrets.token_bytes(32)
        fd = os.dup(self.file_fd)
        try:
            regions: list[ExportRegion] = [open_file_region(i, spec, fd)
                                           for i, spec in enumerate(export_specs(specs))]
            # the record's fd stays this session's (closed at its release, after the
            # export's end, where the export writes the record)
            export = ExportSession(export_id, "export", token, self.owner_pid, self.config,
                                   regions=regions, fds=OwnedFds([fd]),
                                   warm_record_fd=self.warm_record_fd)
        except BaseException:
            os.close(fd)
            raise
        self._warm_start(export)
        self.peer_address = address
        self.peer_session = export_id
        self.token = token
        await nursery.start(self._run_internal_export, export)

    def _warm_start(self, export: ExportSession) -> None:
        """Warm restore: record the demand order, and stream a recorded one first."""
        state = export.export_state
        if self.warm_record_fd >= 0:
            state.recorder = warmorder.Recorder(state.layout)
        if self.warm_replay is not None:
            why = state.use_replay(self.warm_replay)
            self.warm_replay_state = f"ignored: {why}" if why else "used"
            if why:
                log.warning("session=%s warm restore: the replay is ignored: %s",
                            self.session_id, why)
            else:
                log.info("session=%s warm restore: streaming %d recorded pages (%d runs) "
                         "first", self.session_id, self.warm_replay.pages,
                         len(self.warm_replay.runs))

    async def _run_internal_export(self, export: ExportSession, *,
                                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                   ) -> None:
        registry = self.registry
        assert registry is not None
        registry.add(export)
        try:
            await export.run(task_status=task_status)
        finally:
            if not export.finished:
                export.set_state("cancelled", f"its import session {self.session_id} ended")
            registry.finish(export)
            self.warm_recorded_pages = export.warm_recorded_pages  # it wrote the record

    async def _watch_firecracker(self) -> None:
        """Firecracker's socket reaching EOF, or its exit (pidfd): the session ends."""
        sock, pidfd = self._fc_sock, self._fc_pidfd
        assert sock is not None and pidfd is not None
        why = ""
        async with trio.open_nursery() as n:
            async def eof() -> None:
                nonlocal why
                while True:  # Firecracker never writes; anything it does is dropped
                    try:
                        data = await sock.recv(4096)
                    except OSError as e:
                        why = f"its handover socket failed ({e.strerror})"
                        break
                    if not data:
                        why = "Firecracker closed its handover socket"
                        break
                n.cancel_scope.cancel()

            async def exited() -> None:
                nonlocal why
                await trio.lowlevel.wait_readable(pidfd)
                why = why or f"Firecracker (pid {self.vmm_pid}) exited"
                n.cancel_scope.cancel()

            n.start_soon(eof)
            n.start_soon(exited)
        self._vmm_gone_why = why
        self._vmm_gone.set()
        if not self.resident and not self._completed.is_set():  # completion wins a tie
            self.set_state("cancelled", f"{why} before the restore completed")

    # -- completion and the resident state

    async def _complete_then_reside(self) -> None:
        await self._completed.wait()
        outcome = "completed-with-poisoned-pages" if self.pages.poisoned else "completed"
        if self._resume_resident:  # resumed resident: no fault thread ever ran here
            outcome = self.reason or outcome
        else:
            await self._send_done()
            # Firecracker never unregisters: stop what a completed import no longer needs
            # (the link, progress events, the fault thread), then serve removes and the
            # faults after them here, with one wait.
            self._link_scope.cancel()
            self._progress_scope.cancel()
            self.loop.stop_threadsafe()
            await self._loop_ended.wait()
            self._report_progress()
            # What stays is what a resident session needs: the page states, the counters,
            # the uffd. The fault loop's buffers and latency samples go (status keeps the
            # percentiles as they were at completion), and so does the crash policy's
            # pidfd: a completed session kills nobody.
            self.loop.release_buffers()
            samples = self.loop.counters.latencies_us
            self._latency_at_completion = latency_percentiles(list(samples))
            del samples[:]
            self._close_pidfd()
        if self._vmm_gone.is_set():  # gone meanwhile: nothing left to serve
            self.set_state("completed", outcome)
            return
        self.resident = True
        self.set_state("completed", outcome)
        if not self._resume_resident:  # a restarted daemon must resume it resident
            self._store_description(resident=True)
        # The terminal event goes out now, not at the end: the VM runs on for days.
        await self.emit(self._completed_event())
        try:
            await self._serve_resident()
        except (KernelError, OSError) as e:
            log.error("session=%s resident session stopped: %s", self.session_id, e)
            self._vmm_gone_why = f"the uffd failed: {e}"
            self._vmm_gone.set()

    async def _serve_resident(self) -> None:
        """Zero-fill every fault after completion: only a range the guest removed
        (balloon inflate, free page reporting) can fault again, and it must read as
        zeros. One blocking wait on the uffd; no timer, no spinning."""
        fd = self.regions[0].uffd
        buf = bytearray(uffd.MSG_SIZE * _MSG_BATCH)
        zero: bytearray | None = None
        for region in self.regions:  # a thread the fault loop left waiting faults again
            with contextlib.suppress(RangeGone, Retry):
                uffd.wake(fd, region.addr, region.size)
        pending: list[int] = []
        while True:
            if not pending:
                await trio.lowlevel.wait_readable(fd)
            while True:
                events = uffd.read_events(fd, buf)
                for ev in events:
                    if isinstance(ev, uffd.PageFault):
                        pending.append(ev.address)
                        self.metrics.fault("missing", "write" if ev.write else "read")
                    elif isinstance(ev, uffd.Remove):
                        self.resident_removes += 1
                        log.debug("session=%s resident: removed [%#x, %#x)", self.session_id,
                                  ev.start, ev.end)
                if len(events) < _MSG_BATCH:
                    break
            retry: list[int] = []
            for address in pending:
                hit = next((r for r in self.regions if r.contains(address)), None)
                if hit is None:
                    log.warning("session=%s resident: fault outside every region addr=%#x",
                                self.session_id, address)
                    continue
                page = address - (address - hit.addr) % hit.page_size
                try:
                    if hit.hugetlb:  # no UFFDIO_ZEROPAGE on hugetlb: copy zeros
                        if zero is None:
                            zero = bytearray(hit.page_size)
                        uffd.copy(fd, page, buffer_address(zero), hit.page_size)
                    else:
                        uffd.zeropage(fd, page, hit.page_size)
                    self.resident_faults += 1
                except AlreadyPresent:
                    with contextlib.suppress(RangeGone, Retry):
                        uffd.wake(fd, page, hit.page_size)
                except Retry:  # a remove is pending: read it, then install again
                    retry.append(address)
                except RangeGone:
                    pass  # unmapped since: nobody waits there
                except TargetGone:
                    self._vmm_gone_why = "Firecracker's address space is gone"
                    self._vmm_gone.set()
                    return
            pending = retry
            if pending:  # the remove's madvise has not finished yet: yield, then retry
                await trio.sleep(0.001)

    # -- the fd store: surviving a restart of the daemon

    def _store_in_fdstore(self) -> None:
        """Under a service manager, everything a restarted daemon needs to resume the
        session goes to the fd store under the session's name: the uffd, Firecracker's
        connection (its EOF, and its pid again from SO_PEERCRED), a file source's
        snapshot file, and the description (a sealed memfd). Firecracker never hands
        its uffd over again, so this copy is the only way back."""
        assert self._fc_sock is not None
        fds = [self.regions[0].uffd, self._fc_sock.fileno()]
        if self.file_fd >= 0:
            fds.append(self.file_fd)
        try:
            desc = fcstore.description_memfd(self._description(resident=False))
        except OSError as e:
            log.warning("session=%s cannot write its description for the fd store (%s): "
                        "it will not survive a daemon restart", self.session_id, e)
            return
        try:
            self._fdstored = sdnotify.store_fds(firecracker_fdstore_name(self.session_id),
                                                [*fds, desc])
        finally:
            os.close(desc)  # the service manager has its own copy
        if self._fdstored:
            log.info("session=%s its uffd, socket%s and description are in the fd store",
                     self.session_id, ", snapshot file" if self.file_fd >= 0 else "")

    def _store_description(self, *, resident: bool) -> None:
        """A newer description, added beside the first (the highest generation wins):
        the store never holds the session without one, as a remove-then-add would."""
        if not self._fdstored:
            return
        try:
            desc = fcstore.description_memfd(self._description(resident=resident))
        except OSError as e:
            log.warning("session=%s cannot write its resident description (%s): it will "
                        "not survive a daemon restart", self.session_id, e)
            sdnotify.remove_fds(firecracker_fdstore_name(self.session_id))
            self._fdstored = False
            return
        try:
            stored = sdnotify.store_fds(firecracker_fdstore_name(self.session_id), [desc])
        finally:
            os.close(desc)
        if not stored:  # resumed as not resident, it would load ballooned pages: drop it
            log.warning("session=%s could not store its resident description: it will "
                        "not survive a daemon restart", self.session_id)
            sdnotify.remove_fds(firecracker_fdstore_name(self.session_id))
            self._fdstored = False

    def _description(self, *, resident: bool) -> protocol.Message:
        file: protocol.Message | None = None
        if self.file_fd >= 0:
            st = os.fstat(self.file_fd)
            file = {"dev": st.st_dev, "ino": st.st_ino}
        return {
            "kind": fcstore.DESCRIPTION_KIND, "version": fcstore.DESCRIPTION_VERSION,
            "generation": 1 if resident else 0, "session": self.session_id,
            "owner_pid": self.owner_pid, "owner_start": fcstore.process_start(self.owner_pid),
            "pid": self.vmm_pid, "source": self.source,
            # A peer source's token is needed to link to it again: it stays in the
            # service manager's memory (README, "Resident sessions").
            "peer": self.peer_address if self.source == "peer" else "",
            "token": self.token.hex() if self.source == "peer" else "",
            "file": file, "policy": self.policy, "strategy": self.strategy.name,
            "deadline": self.deadline, "handover": self.handover, "started": self.started,
            "regions": [{"gpa": r.gpa, "addr": r.addr, "size": r.size,
                         "page_size": r.page_size} for r in self._specs],
            "resident": resident, "outcome": self.reason if resident else None,
        }

    async def _resume_phase(self, nursery: trio.Nursery) -> None:
        """Continue where the previous daemon stopped: the link (to the peer, or to the
        file's new internal export), the fault thread that adopts what is present and
        wakes every region, or straight into the resident state."""
        with trio.CancelScope(shield=True):
            if self.file_fd >= 0 and not self._resume_resident:
                await self._start_file_export(self._specs, nursery)
            nursery.start_soon(self._watch_firecracker)
            if self._resume_resident:  # a completed session kills nobody: no pidfd
                self._loop_ended.set()
                self._completed.set()
            else:
                ImportSession._start(self, nursery)
            self._fdstored = True  # the store has had them since the first daemon
            log.info("session=%s resumed from the fd store: Firecracker pid=%d, %d regions "
                     "(%d pages), source %s%s", self.session_id, self.vmm_pid,
                     len(self.regions), self.pages.total, self.source,
                     ", resident" if self._resume_resident else "")

    # -- status

    def status(self) -> protocol.Message:
        extra: protocol.Message = {"handover": self.handover,
                                   "handover_state": self.handover_state,
                                   "vmm_pid": self.vmm_pid or None, "resident": self.resident,
                                   "source": self.source, "handover_refusals": self.refusals,
                                   "resident_faults": self.resident_faults,
                                   "resident_removes": self.resident_removes,
                                   "resumed": self.resumed,
                                   "warm_replay": self.warm_replay_state,
                                   "warm_recorded_pages": self.warm_recorded_pages}
        if self._attached:
            status = {**super().status(), **extra}
            if self._latency_at_completion is not None:
                p50, p99 = self._latency_at_completion
                status.update(demand_latency_p50_us=p50, demand_latency_p99_us=p99)
            return status
        return {"session": self.session_id, "role": "import", "state": self.state,
                "pages_total": 0, "pages_installed": 0, "pages_demand": 0,
                "pages_background": 0, "pages_zero": 0, "pages_poisoned": 0,
                "pages_unmapped": 0, "bytes_received": 0, "bytes_sent": 0, "faults": 0,
                "started": self.started, "elapsed_seconds": self.elapsed(),
                "demand_latency_p50_us": None, "demand_latency_p99_us": None,
                "peer": self.peer_address, "link": self.link, "reconnects": 0,
                "strategy": self.strategy.name, "policy": self.policy,
                "reason": self.reason, "poisoned": [], **extra,
                "loop": "c" if peer.demand_library(self.config.peer) is not None else "python"}


def _peer_pid(conn: trio.socket.SocketType) -> int:
    try:
        return scm.peer_cred(conn).pid  # type: ignore[arg-type]
    except OSError:
        return 0


def prepare(config: Config, registry: Registry, cred: scm.PeerCred, request: Prepared,
            strategy: strategies.Strategy, own_peer: Callable[[], str]) -> FirecrackerSession:
    """Create the session and its handover socket (the caller starts it)."""
    registry.check_new_session("import", request.session_id)
    path = handover_path(config, request.session_id)
    if request.file_fd >= 0:
        own_peer()  # refused now, not at the handover, when there is no peer listener
    listener = listen_handover(config, path)
    try:
        return FirecrackerSession(
            request.session_id, "import", request.token, cred.pid, config,
            peer_address=request.peer, strategy=strategy, policy=request.policy,
            deadline=request.deadline, handover=path,
            handover_deadline=request.handover_deadline, listener=listener,
            file_fd=request.file_fd, registry=registry, own_peer=own_peer,
            warm_record_fd=request.warm_record_fd, warm_replay=request.warm_replay,
            # Not ImportSession's store (a VMM that re-imports): this session stores
            # its fds itself at the handover, with a description (_store_in_fdstore).
            use_fdstore=False,
            source="file" if request.file_fd >= 0 else "peer")
    except BaseException:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


# ---------------------------------------------------------------- resume


async def resume(config: Config, registry: Registry, session_id: str, fds: list[int],
                 own_peer: Callable[[], str]) -> FirecrackerSession:
    """A session of the previous daemon, from the fds the fd store gave back.

    Everything is checked again against the kernel, as at a handover: the uffd is a
    uffd with Firecracker's features, the socket's peer is the stored pid, the regions
    are mapped there and registered MISSING with this very uffd and nothing else, the
    snapshot file is the same file and large enough. Raises ResumeError (or
    RequestError) on the first thing that does not hold; the caller closes ``fds``.
    On success the session owns them.
    """
    stored = fcstore.classify(fds)
    desc = max(stored.descriptions, key=fcstore.generation)
    if desc.get("session") != session_id:
        raise ResumeError(f"the description names session {desc.get('session')!r}")
    pid = fcstore.int_field(desc, "pid")
    source = fcstore.str_field(desc, "source")
    if source not in ("file", "peer") or (source == "file") != (stored.file >= 0):
        raise ResumeError(f"source {source!r} does not match the stored fds")
    regions = desc.get("regions")
    if not isinstance(regions, list):
        raise ResumeError("the description has no region table")
    table = [{**r, "uffd": 0, "mode": "missing"} if isinstance(r, dict) else r
             for r in regions]
    limits = config.limits
    specs = protocol.parse_regions(table, role="import", limit=limits.max_regions_per_request)
    handover.check_pages(specs, limits, registry.running_pages())
    registry.check_new_session("import", session_id)
    with socket.socket(fileno=os.dup(stored.sock)) as conn:
        if conn.type != socket.SOCK_STREAM or conn.family != socket.AF_UNIX:
            raise ResumeError("the stored socket is not a Unix stream socket")
        cred = scm.peer_cred(conn)
    if cred.pid != pid:
        raise ResumeError(f"the socket's peer is pid {cred.pid}, the description says {pid}")
    if stored.file >= 0:
        want = desc.get("file")
        st = os.fstat(stored.file)
        if not isinstance(want, dict) or (want.get("dev"), want.get("ino")) != (
                st.st_dev, st.st_ino):
            raise ResumeError("the stored snapshot file is not the one of the description")
    claims = mapping_claims(specs, stored.uffd, stored.file)
    policy = fcstore.str_field(desc, "policy")
    if policy not in ("crash", "poison"):
        raise ResumeError(f"the description's policy {policy!r} is not crash or poison")
    peer_address = str(desc.get("peer") or "")
    if source == "peer":
        if not is_host_port(peer_address):
            raise ResumeError(f"the description's peer {peer_address!r} is not HOST:PORT")
        handover.check_peer_security(config.peer, peer_address)  # this daemon's config
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise ResumeError(f"Firecracker pid {pid} is gone ({e.strerror})") from None
    try:
        checks = await trio.to_thread.run_sync(handover.verify_import, pid, claims, policy,
                                               True)
        # The checks waited for a thread, and the API already serves: look again.
        registry.check_new_session("import", session_id)
        handover.check_pages(specs, limits, registry.running_pages())
        strategy = strategies.load(fcstore.str_field(desc, "strategy"))
        resident = desc.get("resident") is True
        token = bytes.fromhex(str(desc.get("token") or ""))
        session = FirecrackerSession(
            session_id, "import", token, fcstore.owner(desc), config,
            peer_address=peer_address, strategy=strategy, policy=policy,
            deadline=fcstore.number_field(desc, "deadline"),
            handover=str(desc.get("handover") or ""), listener=None, file_fd=stored.file,
            registry=registry, own_peer=own_peer, use_fdstore=False, source=str(source),
            adopt_present=True, vmm_pid=pid, resumed=True)
        session.attach_regions([
            ImportRegion(i, c.spec.gpa, c.spec.addr, c.spec.size, c.spec.page_size,
                         stored.uffd, "missing", hugetlb=check.hugetlb)
            for i, (c, check) in enumerate(zip(claims, checks, strict=True))])
    except BaseException:
        os.close(pidfd)
        raise
    # From here on the session owns the uffd, the socket and the file; the descriptions
    # have been read (the store keeps its own copies).
    for fd in stored.description_fds:
        os.close(fd)
    session.fds = OwnedFds([stored.uffd])
    session._fc_sock = trio.socket.from_stdlib_socket(socket.socket(fileno=stored.sock))
    session._fc_pidfd = pidfd
    session._specs = specs
    session._resume_resident = resident
    session._handed.set()
    session.handover_state = "accepted"
    with contextlib.suppress(ResumeError):
        session.started = fcstore.number_field(desc, "started")
    if resident:
        for region in session.regions:
            session.pages.set_undone(region.index, 0, region.pages, pagestate.INSTALLED)
        session.reason = str(desc.get("outcome") or "completed")
    with contextlib.suppress(OSError):  # nobody connects to it again
        if session.handover and stat.S_ISSOCK(os.lstat(session.handover).st_mode):
            os.unlink(session.handover)
    return session


__all__ = ["FirecrackerSession", "Prepared", "ResumeError", "parse_mappings", "prepare",
           "resume"]
