"""The daemon: one nursery tree that owns every listener, session and helper task.

``serve()`` opens the root nursery, binds the VMM API socket (or takes it from systemd's
socket activation), the peer listener and the metrics endpoint, then reports READY=1.
Sessions run in the root nursery, each in its own nursery (see ``uffdd.session``); the
services (listeners, VMM API connections, peer handshakes) in one nested inside it. On
SIGTERM/SIGINT the daemon cancels its sessions (their VMMs get a ``cancelled`` event),
waits for them to end within a grace deadline, and exits within a bounded time; except
on SIGTERM under a service manager ($NOTIFY_SOCKET), where a stop is a restart or an
upgrade far more often than the end of the host's migrations: the sessions are left
to the next daemon (the VMMs re-attach through the socket unit, an import's fds are in
the fd store), as after a crash, instead of failing every migration in flight. Firecracker
never re-attaches: the next daemon resumes its sessions itself, from the fd store, before
it reports READY=1 (``_resume_firecracker``).

Size: about 650 lines: the nursery tree and its signals are a third of it; the rest is
binding the sockets (the API socket's claim, systemd's fds), the peer handshake's
admission (``PeerSlots``, ``_PeerLane``) and preflight. The peer admission is the next
piece to move out, next to ``listeners``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import threading
import time
from collections.abc import Callable
from functools import partial

import trio

from uffdd import __version__, _fastpath, firecracker, listeners, metrics, peer, protocol, tls
from uffdd._linux import scm, sdnotify
from uffdd._linux.listenfds import listening_socket, take_fds
from uffdd.api import Connection
from uffdd.config import Config, check_peer_security, split_host_port
from uffdd.errors import (
    AuthError,
    ConfigError,
    PeerUnavailable,
    ProtocolError,
    RequestError,
    UffddError,
)
from uffdd.listeners import Acceptor, bind_error, tcp_listener
from uffdd.registry import Registry
from uffdd.session import (
    SessionBase,
    firecracker_fdstore_name,
    stored_firecracker,
    stored_sessions,
)

log = logging.getLogger("uffdd.daemon")

# Handshakes (TLS + token) of not yet authenticated peers run in threads of their own
# limiter: a flood of them from many addresses must not take the data path's threads.
_HANDSHAKE_THREADS = trio.CapacityLimiter(64)
#: On SIGTERM, sessions get this long to end (their VMMs told why) before every task
#: is cancelled.
_SHUTDOWN_GRACE = 5.0
#: After the grace, cancelled tasks get this long to unwind. A thread stuck in the
#: kernel (a read of a blocking fd, process_vm_readv on memory that faults into a uffd
#: nobody serves) cannot be cancelled: then the daemon logs what is still running and
#: exits at once with HARD_STOP_STATUS. SIGTERM -> exit within the sum (10 s), always.
_CANCEL_GRACE = 5.0
HARD_STOP_STATUS = 70  # EX_SOFTWARE: "did not stop cleanly", distinct from 0, 1 and 2


def preflight(config: Config, source: str = "<config>") -> None:
    """Every check ``serve`` makes before it binds anything; ``--check-config`` too.

    The config file's own checks (types, ranges, strategy, fastpath) ran when it was
    loaded; these are the ones on the final configuration and on the files it names.
    """
    check_peer_security(config.peer, source)  # plaintext only if allowed
    tls.check_contexts(config.peer)  # CA, cert and key load, and the key matches the cert
    if tls.tls_enabled(config.peer):
        _check_certificate_dates(config.peer.cert)


def _check_certificate_dates(path: str) -> None:
    """Our own certificate is valid now: an expired one would fail every handshake."""
    try:
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (OSError, ssl.SSLError, AttributeError):
        return  # loaded fine by the TLS context above; dates unknown to this Python
    now = time.time()
    not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
    not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    if now < not_before:
        raise ConfigError(f"peer.cert {path}: not valid before {decoded['notBefore']} "
                          "(check the clock, or the certificate)")
    if now > not_after:
        raise ConfigError(f"peer.cert {path}: expired on {decoded['notAfter']}: "
                          "install a renewed certificate")


class Daemon:
    """Holds the configuration and the session registry; ``serve`` runs it.

    It is the :class:`uffdd.api.Host` of its VMM API connections.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sessions = Registry(config.limits.max_sessions)
        self._nursery: trio.Nursery | None = None  # services: listeners, connections
        self._sessions_nursery: trio.Nursery | None = None  # sessions: outlives services
        self.api_path = config.api.socket
        self.peer_port = 0
        self.metrics_port = 0
        self.connections = 0
        self.client_connections: dict[int, int] = {}  # pid -> open API connections
        self.client_in_flight: dict[int, int] = {}  # pid -> resolve requests in flight
        self._refusing: set[int] = set()  # pids told "limit" since they last were below it
        self._logged_refusals: set[tuple[int, str]] = set()  # (pid, why) logged once
        self.stored_fds: dict[str, list[int]] = {}  # session id -> fds from the fd store
        self.stored_firecracker: dict[str, list[int]] = {}  # the same, of Firecracker sessions
        self.peer_slots = PeerSlots(config.limits.max_connections_per_peer)

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "daemon is not serving"
        return self._nursery

    # -- sessions

    async def start_session(self, session: SessionBase, owner: Connection) -> None:
        """Register a session, subscribe its creator and run it in the root nursery."""
        self.sessions.add(session)
        session.subscribers.append(owner.event_sink())
        owner.owned.append(session)
        assert self._sessions_nursery is not None, "daemon is not serving"
        await self._sessions_nursery.start(self._run_session, session)

    async def _run_session(self, session: SessionBase, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await session.run(task_status=task_status)
        except Exception as e:  # session.run handles its own; this is its start or cleanup
            log.exception("session=%s role=%s failed with an internal error", session.session_id,
                          session.role)
            session.set_state("failed", f"internal error: {e!r}")
        finally:
            if not session.finished:
                session.set_state("cancelled", "daemon shutting down")
            self.sessions.finish(session)

    # -- serving

    async def serve(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Run until cancelled or signalled. Calls ``task_status.started(self)`` when ready."""
        preflight(self.config, "peer link")
        self._log_peer_security()
        log.info("%s", _fastpath.describe(self.config.peer.fastpath))
        # Everything is bound before the nursery opens: a bind error is one clear
        # ConfigError for the command line, not a traceback out of an exception group.
        api_sock, api_bound = self._api_socket()
        try:
            peer_sock = self._peer_socket()
            metrics_sock = self._metrics_socket()
        except BaseException:
            api_sock.close()
            if api_bound:  # ours, just made: leave nothing behind
                with contextlib.suppress(OSError):
                    os.unlink(self.api_path)
            raise
        # Two nurseries, nested by lifetime: sessions outlive the services (listeners,
        # VMM API connections, peer handshakes, signals, watchdog) that start them, so a
        # stop cancels the services and leaves each session's shielded cleanup to run.
        async with trio.open_nursery() as sessions:
            self._sessions_nursery = sessions
            async with trio.open_nursery() as services:
                self._nursery = services
                services.start_soon(self._serve_api, api_sock)
                services.start_soon(self._serve_peer, peer_sock)
                if metrics_sock is not None:
                    self.metrics_port = await services.start(metrics.serve_metrics_on,
                                                             metrics_sock)
                services.start_soon(self._signals, sessions.cancel_scope)
                services.start_soon(self._watchdog)
                await self._resume_firecracker()
                log.info("uffdd %s ready api=%s peer_port=%d metrics_port=%d", __version__,
                         self.api_path, self.peer_port, self.metrics_port)
                task_status.started(self)
                sdnotify.notify("READY=1", "STATUS=0 sessions")
        sdnotify.notify("STOPPING=1")

    async def _resume_firecracker(self) -> None:
        """Resume the Firecracker sessions of the previous daemon from the fd store.

        Firecracker hands its uffd over once and never reconnects, so the daemon itself
        takes them back (uffdd.firecracker.resume). One that does not validate fails
        alone: logged, its fds closed and dropped from the store, a failed entry in
        status; the others resume.
        """
        stored, self.stored_firecracker = self.stored_firecracker, {}
        assert self._sessions_nursery is not None
        for session_id, fds in stored.items():
            def own_peer() -> str:
                return firecracker.own_peer_address(self.config, self.peer_port)
            try:
                session = await firecracker.resume(self.config, self.sessions, session_id,
                                                   fds, own_peer)
            except (firecracker.ResumeError, RequestError, UffddError, OSError, ValueError,
                    TypeError, KeyError) as e:
                reason = e.message if isinstance(e, RequestError) else str(e)
                log.error("session=%s cannot resume the Firecracker session from the fd "
                          "store: %s (its %d fds closed)", session_id, reason, len(fds))
                scm.close_all(fds)
                sdnotify.remove_fds(firecracker_fdstore_name(session_id))
                self._failed_resume(session_id, reason)
                continue
            self.sessions.add(session)
            await self._sessions_nursery.start(self._run_session, session)

    def _failed_resume(self, session_id: str, reason: str) -> None:
        """A failed entry among the finished sessions, so that status says why."""
        session = firecracker.FirecrackerSession(session_id, "import", b"", 0, self.config,
                                                 use_fdstore=False, resumed=True,
                                                 handover_state="ended")
        session.set_state("failed", f"not resumed after the daemon restart: {reason}")
        session.metrics.close()
        self.sessions.finish(session)

    def _api_socket(self) -> tuple[trio.socket.SocketType, bool]:
        """The listening VMM API socket, and whether we bound it (not socket activation)."""
        handed = take_fds()  # the API socket, and session fds from the fd store
        self.stored_firecracker = stored_firecracker(handed)
        self.stored_fds = stored_sessions(handed)
        activated = [listening_socket("vmm", fd) for fd in handed.get("vmm", [])]
        if activated:
            log.info("using the socket-activated VMM API socket")
            std = activated[0]
            for extra in activated[1:]:  # one API socket: more would be held for nothing
                log.warning("closing an extra socket-activated VMM API socket %s",
                            extra.getsockname())
                extra.close()
            self.api_path = str(std.getsockname())
            return trio.socket.from_stdlib_socket(std), False
        path = self.api_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        _claim_api_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no window in which the socket is world-accessible
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise bind_error("api.socket", path, e) from None
        finally:
            os.umask(old_umask)
        try:
            os.chmod(path, int(self.config.api.socket_mode, 8))
            listeners.chown_socket(path, self.config.api.socket_owner, self.config.api.socket_group)
            sock.listen(128)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        sock.setblocking(False)
        return trio.socket.from_stdlib_socket(sock), True

    def _log_peer_security(self) -> None:
        """Say at start how the peer link is protected; plaintext by choice is a warning."""
        how = tls.describe(self.config.peer)
        if self.config.peer.tls is False:
            log.warning("peer link: %s", how)
        else:
            log.info("peer link: %s", how)

    def _peer_socket(self) -> trio.socket.SocketType:
        host, port = split_host_port(self.config.peer.listen)
        sock = tcp_listener("peer.listen", host, port)
        self.peer_port = sock.getsockname()[1]
        return trio.socket.from_stdlib_socket(sock)

    def _metrics_socket(self) -> socket.socket | None:
        if not self.config.metrics.listen:
            return None
        host, port = split_host_port(self.config.metrics.listen)
        return tcp_listener("metrics.listen", host, port)

    async def _serve_api(self, listener: trio.socket.SocketType) -> None:
        acceptor = Acceptor(listener, f"VMM API socket {self.api_path}")
        with listener:
            while True:
                sock, _ = await acceptor.accept()
                try:
                    cred = scm.peer_cred(sock)  # type: ignore[arg-type]
                except OSError:  # gone already
                    sock.close()
                    continue
                refusal = self._connection_refusal(cred)
                if refusal is not None:
                    _refuse_connection(sock, refusal)
                    continue
                self.connections += 1
                self.client_connections[cred.pid] = self.client_connections.get(cred.pid, 0) + 1
                self.nursery.start_soon(self._connection, sock, cred)

    def first_refusal(self, pid: int, why: str) -> bool:
        """True the first time ``pid`` is refused for ``why``: log it then, not per attempt."""
        key = (pid, why)
        if key in self._logged_refusals:
            return False
        if len(self._logged_refusals) >= 4096:  # pids are reused: forget, stay bounded
            self._logged_refusals.clear()
        self._logged_refusals.add(key)
        return True

    def _connection_refusal(self, cred: scm.PeerCred) -> str | None:
        """Why a new API connection of this client is refused, or None.

        The share is per process (SO_PEERCRED pid), not per uid: all VMMs of a host
        often run as one uid, so a share per uid would let one tenant take every
        other tenant's connections. max_connections bounds them all.
        """
        limits = self.config.limits
        if self.connections >= limits.max_connections:
            message = (f"the daemon already serves {limits.max_connections} VMM connections "
                       "(limits.max_connections)")
        elif self.client_connections.get(cred.pid, 0) >= limits.max_connections_per_client:
            message = (f"pid {cred.pid} already has {limits.max_connections_per_client} "
                       "connections open (limits.max_connections_per_client)")
        else:
            self._refusing.discard(cred.pid)
            return None
        metrics.refused("limit")
        if cred.pid not in self._refusing:  # once per client, not per attempt
            self._refusing.add(cred.pid)
            log.warning("refused VMM connection pid=%d uid=%d: %s", cred.pid, cred.uid, message)
        return message

    async def _connection(self, sock: trio.socket.SocketType, cred: scm.PeerCred) -> None:
        try:
            await Connection(self, sock, cred).run()
        except Exception:  # a bug in one connection must not take the daemon down
            log.exception("VMM API connection failed with an internal error")
        finally:
            self.connections -= 1
            left = self.client_connections.get(cred.pid, 0) - 1
            if left > 0:
                self.client_connections[cred.pid] = left
            else:
                self.client_connections.pop(cred.pid, None)

    async def _serve_peer(self, listener: trio.socket.SocketType) -> None:
        acceptor = Acceptor(listener, f"peer listener port {self.peer_port}")
        with listener:
            while True:
                sock, addr = await acceptor.accept()
                host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
                if not self.peer_slots.acquire(host):
                    # Refused before TLS: nothing is read from or written to it.
                    metrics.refused("limit")
                    log.warning("refused peer %s: already %d connections from %s "
                                "(limits.max_connections_per_peer)", addr,
                                self.peer_slots.limit, host)
                    sock.close()
                    continue
                self.nursery.start_soon(self._peer_connection, sock, addr, host)

    async def _peer_connection(self, tsock: trio.socket.SocketType, addr: object,
                               host: str) -> None:
        """TLS and the session handshake in a thread, within limits.handshake_timeout."""
        sock = socket.socket(fileno=tsock.detach())
        sock.setblocking(True)
        timeout = self.config.limits.handshake_timeout
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The slot is given back once: by the lane when it closes, or here on refusal.
        release = _once(partial(self.peer_slots.release, host))
        # A second descriptor of the same socket: shutting it down wakes the handshake
        # thread when the whole handshake (not just one read) took too long.
        try:
            guard = sock.dup()
        except OSError as e:  # out of fds: this connection fails, not the daemon
            release()
            _refused_peer(addr, e)
            sock.close()
            return
        make = partial(_PeerLane, release=release)
        try:
            with trio.move_on_after(timeout) as deadline:
                fs, session_id, lane = await trio.to_thread.run_sync(
                    partial(peer.accept_lane, sock, self.config.peer, self._lookup_export, make),
                    limiter=_HANDSHAKE_THREADS, abandon_on_cancel=True)
            if deadline.cancelled_caught:
                guard.shutdown(socket.SHUT_RDWR)
                raise PeerUnavailable(f"no handshake within {timeout:g}s "
                                      "(limits.handshake_timeout)")
        except (ssl.SSLError, AuthError, ProtocolError, PeerUnavailable, OSError) as e:
            release()
            _refused_peer(addr, e)
            sock.close()
            exports = self.sessions.exports
            if isinstance(e, peer.WrongToken) and (export := exports.get(e.session)):
                export.peer_refused(addr, e.lane)  # its VMM hears of it (README, Security)
            return
        finally:
            guard.close()
        session = self.sessions.exports.get(session_id)
        # Ended while the handshake ran in its thread (its nursery is closed by now, or
        # about to be): the lane has no session to serve.
        if session is None or session.finished or session.handed_over:
            fs.close()
            return
        fs.sock.settimeout(None)
        if isinstance(fs, _PeerLane):
            fs.bind(f"session={session_id} peer {addr} {lane} lane", session.shapes)
        log.info("session=%s peer %s attached a %s lane%s", session_id, addr, lane,
                 " (mutual TLS)" if isinstance(fs.sock, ssl.SSLSocket) else "")
        session.attach_lane(lane, fs)

    def _lookup_export(self, session_id: str) -> tuple[bytes, list[peer.RegionShape]] | None:
        session = self.sessions.exports.get(session_id)
        if session is None or session.finished:
            return None
        return session.token, session.shapes

    # -- process integration

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                _arm_hard_stop(self, _SHUTDOWN_GRACE + _CANCEL_GRACE)
                sdnotify.notify("STOPPING=1")
                if signum == signal.SIGTERM and os.environ.get("NOTIFY_SOCKET"):
                    for session in self.sessions.running():
                        session.hand_over()  # a session that already failed still ends
                        session.hurry_cleanup(trio.current_time() + _SHUTDOWN_GRACE)
                    scope.cancel()
                    return
                for session in self.sessions.running():
                    session.set_state("cancelled", "daemon shutting down")
                    # A failed session's kill of its lingering VMM is not skipped, but
                    # it comes by the end of the grace: SIGTERM stays bounded.
                    session.hurry_cleanup(trio.current_time() + _SHUTDOWN_GRACE)
                with trio.move_on_after(_SHUTDOWN_GRACE):  # their final events go out
                    await self.sessions.wait_empty()
                scope.cancel()
                return

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself, so a stalled loop gets restarted."""
        interval = sdnotify.watchdog_interval()
        while True:
            await trio.sleep(interval / 2 if interval else 5.0)
            if interval:
                sdnotify.notify("WATCHDOG=1", f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        imports, exports = len(self.sessions.imports), len(self.sessions.exports)
        return f"{imports + exports} sessions ({imports} import, {exports} export)"


def _arm_hard_stop(daemon: Daemon, after: float) -> None:
    """Exit the process ``after`` seconds from now whatever its threads are doing.

    A thread blocked in the kernel cannot be cancelled, and Trio waits for it; this
    thread does not wait for anyone. It says what was still running, then exits.
    """
    def stop() -> None:
        time.sleep(after)
        sessions = [f"{s.role} {s.session_id} ({s.state})"
                    for s in daemon.sessions.running()]
        threads = [t.name for t in threading.enumerate()
                   if t is not threading.current_thread() and t is not threading.main_thread()]
        log.error("still running %gs after the stop signal: sessions %s, threads %s; "
                  "exiting now with status %d", after, sessions or "none", threads or "none",
                  HARD_STOP_STATUS)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(HARD_STOP_STATUS)

    threading.Thread(target=stop, name="uffdd-hard-stop", daemon=True).start()


def _claim_api_path(path: str) -> None:
    """Make room for the API socket: remove a stale socket there, and nothing else.

    A live daemon's socket (a connect succeeds) or any file that is not a socket is
    the operator's to deal with: refused, naming the path.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"api.socket {path}: exists and is not a socket ({_file_kind(st)}); "
                          "refusing to replace it: remove it or choose another api.socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: a stale socket of a daemon that died
        log.info("api.socket %s: removing the stale socket of a previous daemon", path)
        os.unlink(path)
        return
    except OSError as e:
        raise ConfigError(f"api.socket {path}: cannot tell whether a daemon still serves it "
                          f"({e.strerror or e}); refusing to replace it") from None
    finally:
        probe.close()
    raise ConfigError(f"api.socket {path}: another daemon is serving it (a connect "
                      "succeeded); stop it first or choose another api.socket")


def _file_kind(st: os.stat_result) -> str:
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO")):
        if test(st.st_mode):
            return kind
    return "a special file"


def _refuse_connection(sock: trio.socket.SocketType, message: str) -> None:
    """An error frame the client can read, then close; never waits (a fresh socket's
    buffer is empty, and a client whose buffer is full learns it from the close)."""
    with contextlib.suppress(OSError):
        os.write(sock.fileno(), protocol.pack(protocol.error_reply(None, "limit", message)))
    sock.close()


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` wrapped to run at most once, from any thread."""
    lock = threading.Lock()
    done = False

    def call() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        fn()

    return call


class PeerSlots:
    """Connections per peer address (limits.max_connections_per_peer); thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    def acquire(self, host: str) -> bool:
        with self._lock:
            if self._count.get(host, 0) >= self.limit:
                return False
            self._count[host] = self._count.get(host, 0) + 1
            return True

    def release(self, host: str) -> None:
        with self._lock:
            left = self._count.get(host, 0) - 1
            if left > 0:
                self._count[host] = left
            else:
                self._count.pop(host, None)


class _PeerLane(peer.FrameSocket):
    """A lane accepted from a peer: it gives its connection slot back when it closes
    (once), and once bound to a session it refuses any demand request for pages
    outside that session's regions -- a lane can only ever name its own session's
    pages, and this check sits at the daemon's edge, before the exporter reads memory.
    """

    def __init__(self, sock: socket.socket, *, release: Callable[[], None]) -> None:
        super().__init__(sock)
        self._release = release
        self.region_pages: list[int] | None = None  # pages per region, once bound
        self.label = ""

    def bind(self, label: str, shapes: list[peer.RegionShape]) -> None:
        """Limit this lane's requests to the regions of the session it authenticated for."""
        self.label = label
        self.region_pages = [size // page_size for _gpa, size, page_size in shapes]

    def recv_header(self) -> protocol.Message:
        header = super().recv_header()
        if self.region_pages is not None and header.get("t") == "req":
            self._check_request(header)
        return header

    def _check_request(self, header: protocol.Message) -> None:
        """protocol.check_req against the session this lane authenticated for.

        A bad request gets an error reply and ends the lane; it is logged once, by the
        session whose lane it ended (``ExportSession._serve_lane``), not here.
        """
        assert self.region_pages is not None
        try:
            protocol.check_req(header, self.region_pages)
            return
        except ProtocolError as e:
            message = str(e)
        metrics.refused("peer-protocol")
        with contextlib.suppress(PeerUnavailable):
            self.send({"t": "error", "code": "bad-request", "message": message})
        raise ProtocolError(f"{message} (refused on {self.label})")

    def close(self) -> None:
        super().close()
        self._release()


def _refused_peer(addr: object, e: BaseException) -> None:
    """Count and log a refused peer connection with a reason an operator can act on."""
    if isinstance(e, ssl.SSLError | AuthError):
        metrics.refused("peer-auth")
    else:
        metrics.refused("peer-protocol")
    if isinstance(e, ssl.SSLError):
        reason = f"TLS handshake failed: {e.reason or e}"
    else:
        reason = str(e) or type(e).__name__
    log.warning("refused peer %s: %s", addr, reason)


class DaemonFailed(UffddError):
    """The daemon stopped on an error after it was ready (a bug: logged with its trace)."""


async def run_daemon(config: Config) -> None:
    """Entry point for ``uffdd serve``."""
    daemon = Daemon(config)
    try:
        await daemon.serve()
    except Exception as e:
        if daemon._nursery is None:
            raise  # did not start: the cause is for the command line to print
        log.critical("the daemon stopped on an unexpected error", exc_info=True)
        raise DaemonFailed(f"stopped on an unexpected error after start: {e!r}") from None
