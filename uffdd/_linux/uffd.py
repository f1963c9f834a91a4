"""userfaultfd: struct mirrors, ioctl numbers, and one function per ioctl.

Debian's kernel headers are older than the kernels we run on, so every constant is
defined here from the uAPI (include/uapi/linux/userfaultfd.h). Each ioctl has its errno
policy written as data (``_ERRNO_POLICY``); callers never see a bare ``OSError``.

Nothing in this module touches registered memory: the ioctls act on the address space
of the process that created the userfaultfd (the VMM), and the source buffers handed to
``copy`` live in the daemon's own, unregistered memory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from uffdd.errors import AlreadyPresent, KernelError, RangeGone, Retry, TargetGone

UFFD_API: Final = 0xAA

# Features (uffdio_api.features).
FEATURE_PAGEFAULT_FLAG_WP: Final = 1 << 0
FEATURE_EVENT_FORK: Final = 1 << 1
FEATURE_EVENT_REMAP: Final = 1 << 2
FEATURE_EVENT_REMOVE: Final = 1 << 3
FEATURE_MISSING_HUGETLBFS: Final = 1 << 4
FEATURE_MISSING_SHMEM: Final = 1 << 5
FEATURE_EVENT_UNMAP: Final = 1 << 6
FEATURE_SIGBUS: Final = 1 << 7
FEATURE_THREAD_ID: Final = 1 << 8
FEATURE_MINOR_HUGETLBFS: Final = 1 << 9
FEATURE_MINOR_SHMEM: Final = 1 << 10
FEATURE_EXACT_ADDRESS: Final = 1 << 11
FEATURE_WP_HUGETLBFS_SHMEM: Final = 1 << 12
FEATURE_WP_UNPOPULATED: Final = 1 << 13
FEATURE_POISON: Final = 1 << 14
FEATURE_WP_ASYNC: Final = 1 << 15
FEATURE_MOVE: Final = 1 << 16
_FEATURE_INITIALIZED: Final = 1 << 31  # kernel-internal: UFFDIO_API has been done

# Register modes.
REGISTER_MODE_MISSING: Final = 1 << 0
REGISTER_MODE_WP: Final = 1 << 1
REGISTER_MODE_MINOR: Final = 1 << 2

# Events (uffd_msg.event).
EVENT_PAGEFAULT: Final = 0x12
EVENT_FORK: Final = 0x13
EVENT_REMAP: Final = 0x14
EVENT_REMOVE: Final = 0x15
EVENT_UNMAP: Final = 0x16

# uffd_msg.arg.pagefault.flags
PAGEFAULT_FLAG_WRITE: Final = 1 << 0
PAGEFAULT_FLAG_WP: Final = 1 << 1
PAGEFAULT_FLAG_MINOR: Final = 1 << 2

# Ioctl modes.
COPY_MODE_DONTWAKE: Final = 1 << 0
ZEROPAGE_MODE_DONTWAKE: Final = 1 << 0
CONTINUE_MODE_DONTWAKE: Final = 1 << 0
POISON_MODE_DONTWAKE: Final = 1 << 0

# Bits of uffdio_register.ioctls (one per _UFFDIO_* number).
_NR_REGISTER, _NR_UNREGISTER, _NR_WAKE, _NR_COPY, _NR_ZEROPAGE = 0x00, 0x01, 0x02, 0x03, 0x04
_NR_WRITEPROTECT, _NR_CONTINUE, _NR_POISON, _NR_API = 0x06, 0x07, 0x08, 0x3F


class UffdioApi(ctypes.Structure):
    """``struct uffdio_api { __u64 api; __u64 features; __u64 ioctls; };``"""

    _fields_ = (
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    )


class UffdioRange(ctypes.Structure):
    """``struct uffdio_range { __u64 start; __u64 len; };``"""

    _fields_ = (("start", ctypes.c_uint64), ("len", ctypes.c_uint64))


class UffdioRegister(ctypes.Structure):
    """``struct uffdio_register { struct uffdio_range range; __u64 mode; __u64 ioctls; };``"""

    _fields_ = (("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64))


class UffdioCopy(ctypes.Structure):
    """``struct uffdio_copy { __u64 dst; __u64 src; __u64 len; __u64 mode; __s64 copy; };``"""

    _fields_ = (
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    )


class UffdioRangeOp(ctypes.Structure):
    """The shape shared by zeropage, continue and poison.

    ``struct uffdio_zeropage { struct uffdio_range range; __u64 mode; __s64 zeropage; };``
    ``struct uffdio_continue { struct uffdio_range range; __u64 mode; __s64 mapped; };``
    ``struct uffdio_poison { struct uffdio_range range; __u64 mode; __s64 updated; };``
    """

    _fields_ = (("range", UffdioRange), ("mode", ctypes.c_uint64), ("result", ctypes.c_int64))


class UffdMsg(ctypes.Structure):
    """``struct uffd_msg`` (32 bytes), with the pagefault/remove/remap union flattened.

    ::

        struct uffd_msg {
            __u8 event; __u8 reserved1; __u16 reserved2; __u32 reserved3;
            union {
                struct { __u64 flags; __u64 address; union { __u32 ptid; } feat; } pagefault;
                struct { __u32 ufd; } fork;
                struct { __u64 from; __u64 to; __u64 len; } remap;
                struct { __u64 start; __u64 end; } remove;
                struct { __u64 reserved1, reserved2, reserved3; } reserved;
            } arg;
        } __packed;
    """

    _pack_ = 1
    _fields_ = (
        ("event", ctypes.c_uint8),
        ("reserved1", ctypes.c_uint8),
        ("reserved2", ctypes.c_uint16),
        ("reserved3", ctypes.c_uint32),
        ("arg0", ctypes.c_uint64),
        ("arg1", ctypes.c_uint64),
        ("arg2", ctypes.c_uint64),
    )


MSG_SIZE: Final = ctypes.sizeof(UffdMsg)


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFD_API << 8) | nr


_IOR, _IOWR = 2, 3
UFFDIO_API: Final = _ioc(_IOWR, _NR_API, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER: Final = _ioc(_IOWR, _NR_REGISTER, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER: Final = _ioc(_IOR, _NR_UNREGISTER, ctypes.sizeof(UffdioRange))
UFFDIO_WAKE: Final = _ioc(_IOR, _NR_WAKE, ctypes.sizeof(UffdioRange))
UFFDIO_COPY: Final = _ioc(_IOWR, _NR_COPY, ctypes.sizeof(UffdioCopy))
UFFDIO_ZEROPAGE: Final = _ioc(_IOWR, _NR_ZEROPAGE, ctypes.sizeof(UffdioRangeOp))
UFFDIO_CONTINUE: Final = _ioc(_IOWR, _NR_CONTINUE, ctypes.sizeof(UffdioRangeOp))
UFFDIO_POISON: Final = _ioc(_IOWR, _NR_POISON, ctypes.sizeof(UffdioRangeOp))

IOCTL_BIT_WAKE: Final = 1 << _NR_WAKE
IOCTL_BIT_COPY: Final = 1 << _NR_COPY
IOCTL_BIT_ZEROPAGE: Final = 1 << _NR_ZEROPAGE
IOCTL_BIT_CONTINUE: Final = 1 << _NR_CONTINUE
IOCTL_BIT_POISON: Final = 1 << _NR_POISON

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int

# What each errno of an install means, written as data (see module docstring).
_InstallError = Callable[[str, int, int], KernelError]
_ERRNO_POLICY: Final[dict[int, _InstallError]] = {
    errno.EEXIST: AlreadyPresent,
    errno.EAGAIN: Retry,
    errno.ESRCH: lambda op, e, done: TargetGone(op, e, "the VMM's address space is gone"),
    errno.ENOSPC: lambda op, e, done: TargetGone(op, e, "the VMM's address space is gone"),
    errno.ENOENT: lambda op, e, done: RangeGone(op, e, "range no longer registered"),
}


def _install_error(op: str, err: int, done: int) -> KernelError:
    make = _ERRNO_POLICY.get(err)
    if make is not None:
        return make(op, err, done)
    return KernelError(op, err, os.strerror(err))


def _call(fd: int, request: int, arg: ctypes.Structure) -> int:
    """Run one ioctl; return 0 or the errno (never raise: the caller applies its policy)."""
    if _ioctl(fd, request, ctypes.byref(arg)) == 0:
        return 0
    return ctypes.get_errno()


def api(fd: int, features: int) -> UffdioApi:
    """UFFDIO_API handshake; returns what the kernel granted. Raises KernelError."""
    arg = UffdioApi(api=UFFD_API, features=features)
    err = _call(fd, UFFDIO_API, arg)
    if err:
        raise KernelError("UFFDIO_API", err, os.strerror(err))
    return arg


def register(fd: int, start: int, length: int, mode: int) -> int:
    """UFFDIO_REGISTER a range; returns the ioctl bitmask the kernel allows there."""
    arg = UffdioRegister(range=UffdioRange(start, length), mode=mode)
    err = _call(fd, UFFDIO_REGISTER, arg)
    if err:
        raise KernelError("UFFDIO_REGISTER", err, os.strerror(err))
    return int(arg.ioctls)


def unregister(fd: int, start: int, length: int) -> None:
    """UFFDIO_UNREGISTER a range."""
    err = _call(fd, UFFDIO_UNREGISTER, UffdioRange(start, length))
    if err:
        raise KernelError("UFFDIO_UNREGISTER", err, os.strerror(err))


def wake(fd: int, start: int, length: int) -> None:
    """UFFDIO_WAKE threads waiting on a range whose pages are already present."""
    err = _call(fd, UFFDIO_WAKE, UffdioRange(start, length))
    if err:
        raise _install_error("UFFDIO_WAKE", err, 0)


def copy(fd: int, dst: int, src: int, length: int, *, wake: bool = True) -> None:
    """UFFDIO_COPY ``length`` bytes from daemon address ``src`` to VMM address ``dst``.

    Raises AlreadyPresent/Retry (with ``done`` bytes), TargetGone, RangeGone, KernelError.
    """
    arg = UffdioCopy(dst=dst, src=src, len=length, mode=0 if wake else COPY_MODE_DONTWAKE)
    err = _call(fd, UFFDIO_COPY, arg)
    if err:
        raise _install_error("UFFDIO_COPY", err, max(0, int(arg.copy)))


def _range_op(name: str, request: int, fd: int, start: int, length: int, mode: int) -> None:
    arg = UffdioRangeOp(range=UffdioRange(start, length), mode=mode)
    err = _call(fd, request, arg)
    if err:
        raise _install_error(name, err, max(0, int(arg.result)))


def zeropage(fd: int, start: int, length: int, *, wake: bool = True) -> None:
    """UFFDIO_ZEROPAGE: map zero pages over a missing range (MISSING mode)."""
    mode = 0 if wake else ZEROPAGE_MODE_DONTWAKE
    _range_op("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE, fd, start, length, mode)


def continue_(fd: int, start: int, length: int, *, wake: bool = True) -> None:
    """UFFDIO_CONTINUE: map the page-cache pages already there (MINOR mode)."""
    mode = 0 if wake else CONTINUE_MODE_DONTWAKE
    _range_op("UFFDIO_CONTINUE", UFFDIO_CONTINUE, fd, start, length, mode)


def poison(fd: int, start: int, length: int, *, wake: bool = True) -> None:
    """UFFDIO_POISON: mark a range so an access raises a memory error (SIGBUS)."""
    mode = 0 if wake else POISON_MODE_DONTWAKE
    _range_op("UFFDIO_POISON", UFFDIO_POISON, fd, start, length, mode)


@dataclass(frozen=True, slots=True)
class PageFault:
    """A UFFD_EVENT_PAGEFAULT: ``address`` as reported, ``flags``, faulting thread id."""

    address: int
    flags: int
    thread_id: int

    @property
    def write(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_WRITE)

    @property
    def minor(self) -> bool:
        return bool(self.flags & PAGEFAULT_FLAG_MINOR)


@dataclass(frozen=True, slots=True)
class Remove:
    """UFFD_EVENT_REMOVE (madvise DONTNEED/REMOVE) or UFFD_EVENT_UNMAP: [start, end)."""

    start: int
    end: int
    unmapped: bool


@dataclass(frozen=True, slots=True)
class Remap:
    """UFFD_EVENT_REMAP (mremap): ``length`` bytes moved from ``old`` to ``new``."""

    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """An event this daemon did not ask for (``event`` is the raw code)."""

    event: int


Event = PageFault | Remove | Remap | Unknown


def decode(buf: bytes | bytearray | memoryview, count: int) -> list[Event]:
    """Decode ``count`` uffd_msg structs from the start of ``buf``."""
    events: list[Event] = []
    for i in range(count):
        msg = UffdMsg.from_buffer_copy(buf, i * MSG_SIZE)
        if msg.event == EVENT_PAGEFAULT:
            events.append(PageFault(msg.arg1, msg.arg0, msg.arg2 & 0xFFFFFFFF))
        elif msg.event in (EVENT_REMOVE, EVENT_UNMAP):
            events.append(Remove(msg.arg0, msg.arg1, msg.event == EVENT_UNMAP))
        elif msg.event == EVENT_REMAP:
            events.append(Remap(msg.arg0, msg.arg1, msg.arg2))
        else:
            events.append(Unknown(msg.event))
    return events


class IncompleteMessage(KernelError):
    """A read of the uffd returned a partial uffd_msg: the stream lost alignment."""


def read_events(fd: int, buf: bytearray) -> list[Event]:
    """Read as many uffd_msg as fit in ``buf`` without blocking; [] when none are queued.

    A short read is fatal for the fd (we no longer know where the next message starts).
    """
    try:
        n = os.readv(fd, [buf])
    except BlockingIOError:
        return []
    except InterruptedError:
        return []
    if n % MSG_SIZE:
        raise IncompleteMessage("read(uffd)", errno.EIO, f"{n} bytes is not whole messages")
    return decode(buf, n // MSG_SIZE)


def new_uffd(features: int, *, nonblock: bool = True) -> int:
    """Create a userfaultfd and do the UFFDIO_API handshake (used by VMMs and tests).

    Tries userfaultfd(2) first and /dev/userfaultfd second.
    """
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    fd = _libc.syscall(_SYS_USERFAULTFD, flags)
    if fd < 0:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        try:
            fd = _dev_ioctl_create(dev, flags)
        finally:
            os.close(dev)
    try:
        api(fd, features)
    except BaseException:
        os.close(fd)
        raise
    return int(fd)


_SYS_USERFAULTFD: Final = 323  # x86_64
_USERFAULTFD_IOC_NEW: Final = (0 << 30) | (0 << 16) | (UFFD_API << 8) | 0x00


def _dev_ioctl_create(dev: int, flags: int) -> int:
    fd = _libc.ioctl(dev, _USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags))
    if fd < 0:
        err = ctypes.get_errno()
        raise KernelError("USERFAULTFD_IOC_NEW", err, os.strerror(err))
    return int(fd)


def granted_features(fd: int) -> int:
    """The features the UFFDIO_API handshake granted on ``fd`` (from /proc fdinfo).

    The handshake can be done only once per fd, so a received uffd is checked this way.
    Raises KernelError when ``fd`` is not an initialised userfaultfd.
    """
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            text = info.read()
    except OSError as e:
        raise KernelError("fdinfo", e.errno or errno.EBADF, "cannot read fdinfo") from None
    features = parse_fdinfo_api(text)
    if features is None:
        raise KernelError("fdinfo", errno.EINVAL, "not an initialised userfaultfd")
    return features


def parse_fdinfo_api(text: str) -> int | None:
    """The granted features of a uffd's fdinfo text, or None before UFFDIO_API.

    The line is ``API:\t<api>:<features>:<ioctls>`` in hex. The kernel marks a completed
    handshake with a private feature bit (0x80000000), which is not a feature.
    """
    for line in text.splitlines():
        if not line.startswith("API:"):
            continue
        parts = line.partition(":")[2].strip().split(":")
        if len(parts) != 3:
            return None
        try:
            value = int(parts[1], 16)
        except ValueError:
            return None
        return value & ~_FEATURE_INITIALIZED if value & _FEATURE_INITIALIZED else None
    return None


def is_nonblocking(fd: int) -> bool:
    """True if ``fd``'s open file description has O_NONBLOCK.

    A received fd shares the description with the VMM's copy, so this is what the VMM
    set when it created the uffd (and what a read by the fault thread will do).
    """
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def is_userfaultfd(fd: int) -> bool:
    """True if ``fd`` is a userfaultfd (its /proc fdinfo names the anon inode)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return target == "anon_inode:[userfaultfd]"
