"""Memory helpers: memfd mappings with known addresses, process_vm_readv, pidfd signals.

The daemon maps memory fds only to *alias* mappings of its own that are never
registered with a userfaultfd, so touching them can never fault on a uffd.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
import signal
from typing import Final

from uffdd.errors import KernelError, TargetGone

MFD_HUGETLB: Final = 0x0004
MADV_POPULATE_WRITE: Final = 23
HUGE_PAGE_2M: Final = 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)


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
