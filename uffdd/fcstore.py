"""What a Firecracker session keeps in the service manager's fd store, and how a
restarted daemon reads it back (uffdd.firecracker.resume uses it).

Firecracker hands its uffd over once and never reconnects, so the store holds, under
``FDNAME=uffdd-firecracker-<session>``: the uffd, Firecracker's connection socket, a
file source's snapshot file, and one or more descriptions: memfds sealed against every
change of their bytes, each a JSON object with a ``generation`` (the newest wins). The
store keeps no order, so the fds are told apart by what they are. Nothing here trusts
what it reads: every field is type-checked here, and everything that the kernel can
confirm is checked again against the kernel by ``resume``.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Final

from uffdd import protocol
from uffdd._linux import uffd

DESCRIPTION_KIND: Final = "uffdd-firecracker-session"
DESCRIPTION_VERSION: Final = 1
DESCRIPTION_MAX: Final = 1 << 20
_SEALS: Final = (fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)


def description_memfd(desc: protocol.Message) -> int:
    """The description as JSON in a memfd sealed against every change of its bytes."""
    data = json.dumps(desc, separators=(",", ":")).encode()
    fd = os.memfd_create("uffdd-firecracker-session", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/<pid>/stat field 22), or None:
    with the pid it names one process, not whichever reuses the number later."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def owner(desc: protocol.Message) -> int:
    """The preparing orchestrator, if that very process still runs: it may observe and
    cancel the session again. Otherwise 0: only the admin may (a process that reused
    the pid is not the orchestrator)."""
    pid = int_field(desc, "owner_pid")
    start = desc.get("owner_start")
    if start is None or process_start(pid) != start:
        return 0
    return pid


class ResumeError(Exception):
    """A stored Firecracker session that does not validate: it is not resumed."""


@dataclass
class Stored:
    uffd: int = -1
    sock: int = -1
    file: int = -1
    descriptions: list[protocol.Message] = field(default_factory=list)
    description_fds: list[int] = field(default_factory=list)  # read: closed after use


def classify(fds: list[int]) -> Stored:
    """Tell the stored fds apart by what they are (the store keeps no order)."""
    found = Stored()
    for fd in fds:
        st = os.fstat(fd)
        if stat.S_ISSOCK(st.st_mode):
            kind = "sock"
        elif uffd.is_userfaultfd(fd):
            kind = "uffd"
        elif stat.S_ISREG(st.st_mode) and _seals(fd) & _SEALS == _SEALS:
            found.descriptions.append(_read_description(fd, st.st_size))
            found.description_fds.append(fd)
            continue
        elif stat.S_ISREG(st.st_mode):
            kind = "file"
        else:
            raise ResumeError(f"an fd of unknown kind (mode {st.st_mode:#o}) was stored")
        if getattr(found, kind) >= 0:
            raise ResumeError(f"two fds of kind {kind} were stored")
        setattr(found, kind, fd)
    if found.uffd < 0 or found.sock < 0 or not found.descriptions:
        raise ResumeError("the store lacks the uffd, Firecracker's socket or the "
                          "description")
    return found


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return 0


def _read_description(fd: int, size: int) -> protocol.Message:
    if not 0 < size <= DESCRIPTION_MAX:
        raise ResumeError(f"the description is {size} bytes")
    data = os.pread(fd, size, 0)
    try:
        desc = json.loads(data)
    except ValueError as e:
        raise ResumeError(f"the description is not JSON: {e}") from None
    if not isinstance(desc, dict) or desc.get("kind") != DESCRIPTION_KIND:
        raise ResumeError("the description is not a uffdd Firecracker session's")
    if desc.get("version") != DESCRIPTION_VERSION:
        raise ResumeError(f"description version {desc.get('version')!r}, this daemon "
                          f"reads {DESCRIPTION_VERSION}")
    return desc


def int_field(desc: protocol.Message, name: str) -> int:
    value = desc.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ResumeError(f"the description's {name!r} is missing or not an integer")
    return value


def str_field(desc: protocol.Message, name: str) -> str:
    value = desc.get(name)
    if not isinstance(value, str):
        raise ResumeError(f"the description's {name!r} is missing or not a string")
    return value


def number_field(desc: protocol.Message, name: str) -> float:
    value = desc.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ResumeError(f"the description's {name!r} is missing or not a number")
    return float(value)


def generation(desc: protocol.Message) -> int:
    value = desc.get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else -1
