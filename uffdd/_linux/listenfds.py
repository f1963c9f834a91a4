"""Socket activation and the fd store: the fds systemd hands us at start.

systemd passes fds from ``SD_LISTEN_FDS_START`` (3) on, and says so in the
environment (sd_listen_fds(3)):

* ``LISTEN_PID``: the pid they are meant for; anybody else ignores them;
* ``LISTEN_FDS``: how many;
* ``LISTEN_FDNAMES``: colon-separated names, from ``FileDescriptorName=`` of the
  socket unit (``vmm`` for the VMM API socket) or ``FDNAME=`` of the fd store.

:func:`take_fds` validates that, sets ``FD_CLOEXEC`` on every fd (so VMM helpers we
may spawn do not inherit them) and unsets the variables (so our children do not
think the fds are theirs). :func:`listen_fds` does the same and wraps each fd as a
listening stream socket, checking its type: "whether a socket is a datagram or
stream socket matters a lot" (sd_listen_fds(3)). A daemon that also keeps uffds in
the fd store calls :func:`take_fds` and :func:`listening_socket` per socket name,
because stored uffds and memfds are not sockets.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from collections.abc import MutableMapping

from uffdd.errors import UffddError

SD_LISTEN_FDS_START = 3
_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: Address family each known socket name must have (others: any stream socket).
EXPECTED_FAMILY = {"vmm": socket.AF_UNIX}


class ListenFdsError(UffddError):
    """Raised when systemd's fd hand-over is inconsistent or an fd has the wrong type.

    Raised at start; the unit file and the daemon disagree, so failing is right.
    """


def _parse_count(environ: MutableMapping[str, str]) -> int:
    """Return ``$LISTEN_FDS`` if ``$LISTEN_PID`` is our pid, else 0."""
    pid = environ.get("LISTEN_PID", "")
    if not pid:
        return 0
    if not pid.isdigit():
        raise ListenFdsError(f"LISTEN_PID is not a pid: {pid!r}")
    if int(pid) != os.getpid():
        return 0
    count = environ.get("LISTEN_FDS", "")
    if not count.isdigit():
        raise ListenFdsError(f"LISTEN_FDS is not a count: {count!r}")
    return int(count)


def _parse_names(environ: MutableMapping[str, str], count: int) -> list[str]:
    """Return one name per fd from ``$LISTEN_FDNAMES`` ("unknown" when not given)."""
    value = environ.get("LISTEN_FDNAMES")
    if value is None:
        return ["unknown"] * count
    names = value.split(":") if count else []
    if len(names) != count:
        raise ListenFdsError(f"LISTEN_FDNAMES has {len(names)} names for {count} fds")
    return names


def _set_cloexec(fd: int) -> None:
    """Set FD_CLOEXEC on ``fd``; ListenFdsError if it is not open."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    except OSError as e:
        raise ListenFdsError(f"fd {fd} was announced but is not open: {e.strerror}") from e


def take_fds(
    *,
    unset_environment: bool = True,
    environ: MutableMapping[str, str] | None = None,
    start: int = SD_LISTEN_FDS_START,
) -> dict[str, list[int]]:
    """Return the fds systemd passed us, grouped by name, in order.

    Empty when not socket-activated (no ``$LISTEN_PID``, or another process's).
    ``environ`` (default ``os.environ``) and ``start`` exist for tests. The variables
    are unset (when ``unset_environment``) even if they were for another pid, as
    ``sd_listen_fds(1)`` does. Raises :class:`ListenFdsError` if the variables are
    malformed or an announced fd is not open.
    """
    env = os.environ if environ is None else environ
    try:
        count = _parse_count(env)
        names = _parse_names(env, count)
    finally:
        if unset_environment:
            for key in _ENV:
                env.pop(key, None)
    result: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        fd = start + index
        _set_cloexec(fd)
        result.setdefault(name, []).append(fd)
    return result


def listening_socket(name: str, fd: int) -> socket.socket:
    """Wrap ``fd`` as the listening stream socket named ``name``, checking its type.

    The socket object owns the fd from now on. Raises :class:`ListenFdsError` if
    ``fd`` is not a listening ``SOCK_STREAM`` socket, or (for ``vmm``) not AF_UNIX.
    """
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ListenFdsError(f"fd {fd} named {name!r} is not a socket")
    sock = socket.socket(fileno=fd)
    problem = _socket_problem(name, sock)
    if problem:
        sock.detach()
        raise ListenFdsError(f"fd {fd} named {name!r}: {problem}")
    return sock


def _socket_problem(name: str, sock: socket.socket) -> str | None:
    """Return what is wrong with socket ``sock`` for ``name``, or None."""
    if sock.type != socket.SOCK_STREAM:
        return f"expected a stream socket, got {sock.type!r}"
    family = EXPECTED_FAMILY.get(name)
    if family is not None and sock.family != family:
        return f"expected {family.name}, got {sock.family!r}"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "socket is not listening (Accept=no and a ListenStream= are expected)"
    return None


def listen_fds(*, unset_environment: bool = True) -> dict[str, list[socket.socket]]:
    """Return systemd's socket-activated sockets by name (``{"vmm": [sock]}``).

    Every passed fd must be a listening stream socket (AF_UNIX for ``vmm``);
    otherwise :class:`ListenFdsError`. Empty when not socket-activated.
    """
    fds = take_fds(unset_environment=unset_environment)
    return {name: [listening_socket(name, fd) for fd in group] for name, group in fds.items()}
