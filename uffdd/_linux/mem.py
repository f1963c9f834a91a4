"""Memory helpers: memfd mappings with known addresses, process_vm_readv/writev, pidfd signals.

The daemon maps memory fds only to *alias* mappings of its own that are never
registered with a userfaultfd, so touching them can never fault on a uffd. A store
through an alias can still fault another way: the VMM owns the file and may shrink it
(ftruncate), and a hugetlb file may find its pool empty. That fault is a SIGBUS, which
would kill the daemon and every tenant's session with it, so the daemon never stores
into an alias directly: ``tenant_write`` / ``tenant_zero`` copy with process_vm_writev
to our own pid, which turns the fault into an error (EFAULT) for that one session.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import mmap
import os
import signal
from typing import Final

from uffdd.errors import KernelError, TargetGone

MFD_HUGETLB: Final = 0x0004
MADV_DONTNEED: Final = 4
MADV_POPULATE_WRITE: Final = 23
HUGE_PAGE_2M: Final = 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


class _IoVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = (
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
)
_process_vm_readv.restype = ctypes.c_ssize_t

_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.argtypes = _process_vm_readv.argtypes
_process_vm_writev.restype = ctypes.c_ssize_t

_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def buffer_address(buf: bytearray | mmap.mmap) -> int:
    """The address of a writable buffer's first byte (kept alive by the caller)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Mapping:
    """An mmap of a memory fd in the daemon, with its address known.

    ``writable`` alias mappings are used to fill MINOR-mode pages before
    UFFDIO_CONTINUE; read-only ones serve pages on the export side.
    """

    def __init__(self, fd: int, length: int, offset: int = 0, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.map = mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset)
        self.length = length
        # Not owned (the session closes it after unmapping): only to say, when a write
        # fails, how long the file is now.
        self.fd = fd
        self.offset = offset
        self.view = memoryview(self.map)
        # ctypes cannot take the address of a read-only buffer; readers use ``view``.
        self.address = buffer_address(self.map) if writable else 0

    def close(self) -> None:
        """Unmap; idempotent.

        Slices of ``view`` handed to a lane thread can outlive it inside a traceback
        cycle; collect those first. If one is still alive the mapping is unmapped when
        it goes (the mmap object owns it), so closing never fails.
        """
        if not self.length:
            return
        self.length = 0
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            gc.collect()
            with contextlib.suppress(BufferError):
                self.map.close()


class TenantMemoryFault(KernelError):
    """A write into a tenant's memory fd failed (EFAULT: the file no longer backs the
    address, e.g. the VMM shrank it; ENOMEM). ``done`` bytes were written before it."""

    def __init__(self, err: int, done: int, detail: str = "") -> None:
        super().__init__("process_vm_writev", err, f"{os.strerror(err)} after {done} bytes")
        self.done = done
        self.detail = detail or str(self)  # what the session's failure reason says


_ZERO_CHUNK: Final = 64 << 10
_ZEROS = bytearray(_ZERO_CHUNK)  # never written: the zeros tenant_zero copies from
_ZEROS_ADDR: Final = buffer_address(_ZEROS)
_ZERO_IOV: Final = 256  # local iovecs per call (16 MiB of zeros)


def _write_own(local: ctypes.Array[_IoVec], nlocal: int, dst: int, length: int) -> int:
    """process_vm_writev of ``local`` to our own ``dst``; returns bytes written (a
    partial copy stops at the address that faulted). Raises TenantMemoryFault."""
    remote = _IoVec(dst, length)
    n = _process_vm_writev(os.getpid(), local, nlocal, ctypes.byref(remote), 1, 0)
    if n < 0:
        raise TenantMemoryFault(ctypes.get_errno(), 0)
    return int(n)


def tenant_write(dst: int, src: int, length: int) -> None:
    """Copy ``length`` bytes from ``src`` to ``dst`` in one of our alias mappings of a
    tenant's memory fd; never a SIGBUS (module doc). Raises TenantMemoryFault."""
    done = 0
    while done < length:
        local = (_IoVec * 1)(_IoVec(src + done, length - done))
        try:
            n = _write_own(local, 1, dst + done, length - done)
        except TenantMemoryFault as e:
            raise TenantMemoryFault(e.errno, done) from None
        if n == 0:
            raise TenantMemoryFault(errno.EIO, done)
        done += n


def tenant_zero(dst: int, length: int) -> None:
    """Write ``length`` zero bytes at ``dst`` (an alias address), like tenant_write."""
    done = 0
    while done < length:
        part = min(length - done, _ZERO_CHUNK * _ZERO_IOV)
        pieces = (part + _ZERO_CHUNK - 1) // _ZERO_CHUNK
        local = (_IoVec * pieces)(*[_IoVec(_ZEROS_ADDR, min(_ZERO_CHUNK, part - i * _ZERO_CHUNK))
                                    for i in range(pieces)])
        try:
            n = _write_own(local, pieces, dst + done, part)
        except TenantMemoryFault as e:
            raise TenantMemoryFault(e.errno, done) from None
        if n == 0:
            raise TenantMemoryFault(errno.EIO, done)
        done += n  # a partial copy: the next call starts at the page that stopped it


def process_read(pid: int, remote: int, local: int, length: int) -> None:
    """process_vm_readv ``length`` bytes at ``remote`` in ``pid`` into ``local``.

    Raises TargetGone if the process is gone, KernelError on a short or failed read.
    """
    liov = _IoVec(local, length)
    riov = _IoVec(remote, length)
    n = _process_vm_readv(pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        if err == 3:  # ESRCH
            raise TargetGone("process_vm_readv", err, f"process {pid} is gone")
        raise KernelError("process_vm_readv", err, os.strerror(err))
    if n != length:
        raise KernelError("process_vm_readv", 5, f"short read {n} of {length} bytes")


def madvise(address: int, length: int, advice: int) -> None:
    """madvise on this process's own memory (VMM side: MADV_POPULATE_WRITE)."""
    if _madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise KernelError("madvise", err, os.strerror(err))


def give_back(buf: bytearray) -> None:
    """Return the whole pages inside ``buf`` to the kernel now (MADV_DONTNEED: they read
    as zeros again), whoever still holds a reference to ``buf``. For a large scratch
    buffer whose last user is done: a view of it kept alive by a traceback cycle would
    otherwise keep all of it resident until a garbage collection, in an idle daemon for
    good."""
    if not buf:
        return
    start = buffer_address(buf)
    first = -(-start // _PAGE) * _PAGE
    last = (start + len(buf)) // _PAGE * _PAGE
    if last > first:
        madvise(first, last - first, MADV_DONTNEED)


def pidfd_kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal ``pid`` through a pidfd (no pid-reuse race after open). False if gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def is_hugetlb_fd(fd: int) -> bool:
    """True if ``fd`` is a hugetlbfs file (memfd_create with MFD_HUGETLB)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return "hugetlb" in target or os.fstatvfs(fd).f_bsize >= HUGE_PAGE_2M
