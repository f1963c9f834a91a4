"""The sd_notify(3) datagram protocol, without libsystemd.

systemd passes ``NOTIFY_SOCKET``: a filesystem path, or ``@name`` for the abstract
namespace. A notification is one ``AF_UNIX``/``SOCK_DGRAM`` datagram of
newline-separated ``KEY=VALUE`` fields (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``,
``STOPPING=1``); file descriptors for the fd store ride along as ``SCM_RIGHTS``.

Sends never block: the socket is non-blocking, so a stalled service manager cannot
stall the event loop. A failed send is logged and reported as ``False``, like
``sd_notify()`` returning a negative errno, because a daemon has nothing better to
do than carry on.
"""

from __future__ import annotations

import array
import os
import socket

from uffdd.logs import get_logger

_log = get_logger(__name__)

#: Most fds the kernel accepts in one SCM_RIGHTS message (SCM_MAX_FD).
SCM_MAX_FD = 253
#: Longest FDNAME= systemd accepts (FDNAME_MAX).
FDNAME_MAX = 255
_KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"


def _socket_address() -> str | None:
    """Return the address from ``$NOTIFY_SOCKET`` in socket-module form, or None."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    if path:
        _log.warning("sdnotify.unsupported-socket", notify_socket=path)
    return None


def _encode(fields: tuple[str, ...]) -> bytes:
    """Join ``KEY=VALUE`` fields into one message; refuse fields that would inject others."""
    for field in fields:
        key, sep, _value = field.partition("=")
        if not sep or "\n" in field:
            raise ValueError(f"not a single-line KEY=VALUE field: {field!r}")
        if not key or key.strip(_KEY_CHARS):
            raise ValueError(f"bad field name: {key!r}")
    return "\n".join(fields).encode("utf-8")


def _send(message: bytes, fds: list[int]) -> bool:
    """Send one datagram (with ``fds`` as SCM_RIGHTS) to ``$NOTIFY_SOCKET``."""
    address = _socket_address()
    if address is None:
        return False
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        try:
            sock.sendmsg([message], ancillary, 0, address)
        except OSError as e:
            _log.warning("sdnotify.send-failed", errno=e.errno, error=e.strerror)
            return False
    return True


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=2 sessions"``) to the service manager.

    Returns False when not run under systemd (no ``$NOTIFY_SOCKET``) or when the send
    failed; True when the datagram was sent. Raises ValueError for a malformed field
    (a newline in a value would smuggle in another field).
    """
    if not fields:
        raise ValueError("notify() needs at least one field")
    return _send(_encode(fields), [])


def watchdog_interval() -> float | None:
    """Return the watchdog timeout in seconds, or None if no watchdog is asked of us.

    Reads ``$WATCHDOG_USEC``; if ``$WATCHDOG_PID`` is set it must be our pid. Send
    ``WATCHDOG=1`` every half of the returned interval (sd_watchdog_enabled(3)).
    The variables are left in place.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


def _check_fdname(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid FDNAME= (printable ASCII, no ':')."""
    if not name or len(name) > FDNAME_MAX:
        raise ValueError(f"FDNAME must be 1..{FDNAME_MAX} characters")
    if ":" in name or not all(0x20 < ord(c) < 0x7F for c in name):
        raise ValueError(f"FDNAME must be printable ASCII without ':' or spaces: {name!r}")


def store_fds(name: str, fds: list[int]) -> bool:
    """Keep ``fds`` in the service manager's fd store under ``name`` (FDSTORE=1).

    After a restart systemd passes them back like socket-activated fds, named
    ``name`` in ``$LISTEN_FDNAMES`` (see :mod:`uffdd._linux.listenfds`). Needs
    ``FileDescriptorStoreMax=`` in the unit. More than 253 fds go in several
    datagrams; returns True only if every one was sent. Our copies stay open.
    """
    _check_fdname(name)
    if not fds:
        raise ValueError("store_fds() needs at least one fd")
    message = _encode(("FDSTORE=1", f"FDNAME={name}"))
    ok = True
    for start in range(0, len(fds), SCM_MAX_FD):
        ok = _send(message, fds[start : start + SCM_MAX_FD]) and ok
    return ok


def remove_fds(name: str) -> bool:
    """Drop every fd stored under ``name`` from the fd store (FDSTOREREMOVE=1)."""
    _check_fdname(name)
    return notify("FDSTOREREMOVE=1", f"FDNAME={name}")
