"""What every listener of the daemon shares: binding with errors an operator can act
on, and an accept loop that survives running out of fds.

A daemon that serves many tenants runs out of fds when one of them misbehaves (or
the host does). ``accept()`` then fails with EMFILE/ENFILE while the connection stays
queued: retrying at once would spin, and raising would take every listener and session
down with the root nursery. :class:`Acceptor` waits a short, growing backoff instead,
logs the condition once when it starts and once when it ends, and counts it.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import socket

import trio

from uffdd.config import join_host_port
from uffdd.errors import ConfigError

log = logging.getLogger("uffdd.listeners")

#: accept() errors that mean "no resources now": wait and retry, never fail.
_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors about one connection that died in the queue: skip it.
_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET})
_BACKOFF_FIRST = 0.01
_BACKOFF_MAX = 0.5
_REPORT_EVERY = 60.0  # seconds between two reports of running out of fds


class Acceptor:
    """``accept()`` on one listener, retrying with backoff while fds are exhausted."""

    def __init__(self, listener: trio.socket.SocketType, what: str) -> None:
        self.listener = listener
        self.what = what
        self.starved_since: float | None = None
        self.episodes = 0  # times accept() started failing for want of fds
        self._logged_at: float | None = None  # when an episode was last reported
        self._reported = False  # this episode was logged (so its end is too)
        self._unreported = 0  # episodes since the last report

    async def accept(self) -> tuple[trio.socket.SocketType, object]:
        delay = _BACKOFF_FIRST
        while True:
            try:
                sock, addr = await self.listener.accept()
            except OSError as e:
                if e.errno in _GONE:
                    continue
                if e.errno not in _STARVED:
                    raise
                self._starved(e)
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            self._recovered()
            return sock, addr

    def _starved(self, e: OSError) -> None:
        if self.starved_since is not None:
            return  # one episode, however many attempts
        now = trio.current_time()
        self.starved_since = now
        self.episodes += 1
        # Under pressure fds come and go, and accept() flaps between failing and not:
        # one report per _REPORT_EVERY, with the episodes in between counted.
        if self._logged_at is not None and now - self._logged_at < _REPORT_EVERY:
            self._unreported += 1
            return
        also = (f" ({self._unreported} more times since the last report)"
                if self._unreported else "")
        log.error("%s: accept() failed: %s%s; new connections wait until fds are free "
                  "(retrying every %gs at most)", self.what, os.strerror(e.errno or 0), also,
                  _BACKOFF_MAX)
        self._logged_at = now
        self._reported = True
        self._unreported = 0

    def _recovered(self) -> None:
        if self.starved_since is None:
            return
        waited = trio.current_time() - self.starved_since
        self.starved_since = None
        if self._reported:
            log.warning("%s: accepting again after %.1fs without free fds", self.what, waited)
        self._reported = False


def bind_error(what: str, address: str, e: OSError) -> ConfigError:
    """A bind failure as a start-up error naming the listener, its address and the cause."""
    cause = e.strerror or str(e)
    hint = ""
    if e.errno == errno.EADDRINUSE:
        hint = ": another process (another uffdd?) listens there; stop it or choose " \
               "another address"
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = ": this user may not bind there"
    elif e.errno == errno.EADDRNOTAVAIL:
        hint = ": no interface of this host has that address"
    return ConfigError(f"{what} {address}: cannot listen: {cause}{hint}")


def tcp_listener(what: str, host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (stdlib, non-blocking) or a ConfigError saying why."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise bind_error(what, join_host_port(host, port), e) from None
    sock.setblocking(False)
    return sock


def chown_socket(path: str, owner: str, group: str) -> None:
    """Give a socket the configured api.socket_owner / api.socket_group (names or
    numbers): the API socket and every Firecracker handover socket."""
    if not owner and not group:
        return
    try:
        uid = -1 if not owner else int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        gid = -1 if not group else int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as e:
        raise ConfigError(f"api.socket_owner / api.socket_group: no such user or group {e}"
                          ) from None
    os.chown(path, uid, gid)
