"""SCM_RIGHTS and SO_PEERCRED over Unix sockets, checked the careful way.

Receiving fds sizes the control buffer with CMSG_SPACE, refuses a truncated control
message (MSG_CTRUNC: an fd we never saw would leave us off by one), and closes every
fd it received when anything is wrong.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from dataclasses import dataclass

from uffdd.errors import ProtocolError

_INT_SIZE = array.array("i").itemsize


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The credentials of the process at the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def fd_control_space(max_fds: int) -> int:
    """The ancillary buffer size that holds ``max_fds`` fds."""
    return socket.CMSG_SPACE(max_fds * _INT_SIZE)


def parse_fds(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """Take the fds out of recvmsg's ancillary data; close them all on any problem."""
    fds: list[int] = []
    unexpected = False
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - (len(data) % _INT_SIZE)
            fds.extend(array.array("i", data[:usable]))
        else:
            unexpected = True
    if msg_flags & socket.MSG_CTRUNC:
        close_all(fds)
        raise ProtocolError("too many file descriptors in one message (control data truncated)")
    if unexpected:
        close_all(fds)
        raise ProtocolError("unexpected ancillary data (only SCM_RIGHTS is accepted)")
    return fds


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send ``data`` with ``fds`` attached to its first byte (one sendmsg, then the rest)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def close_all(fds: list[int]) -> None:
    """Close every fd in ``fds``, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
