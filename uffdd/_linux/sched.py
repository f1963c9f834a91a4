"""The scheduler's slice for latency-sensitive threads (EEVDF, Linux 6.12 and later).

A demand-path thread sleeps most of the time and, when a fault or a request arrives,
must run at once. On a host whose CPUs are busy (vCPUs, bulk copies), a woken thread
of ordinary weight can wait for the running task's whole slice (about 3 ms here)
before it gets a CPU; the demand path then pays that wait twice per fault (the
destination's fault thread, then the source's demand lane). Raising the thread's
priority would also raise its CPU share, which measurably slowed whole migrations
(README, Performance). EEVDF's per-task slice does the other thing: a short requested
slice gives the thread an early virtual deadline, so it preempts on wake-up, while its
share of the CPU (its weight, its nice value) stays what it was. Set with
``sched_setattr(2)`` (``sched_runtime`` of a SCHED_OTHER thread); no privilege needed.
A kernel without it ignores or refuses the request, which is harmless.
"""

from __future__ import annotations

import ctypes
from typing import Final

_SYS_SCHED_SETATTR: Final = 314  # x86_64
_SYS_SCHED_GETATTR: Final = 315
_SCHED_OTHER: Final = 0
_ATTR_SIZE: Final = 48  # SCHED_ATTR_SIZE_VER0: the fields below

_libc = ctypes.CDLL(None, use_errno=True)


class _SchedAttr(ctypes.Structure):
    _fields_ = (("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64))


def _get() -> _SchedAttr | None:
    attr = _SchedAttr()
    if _libc.syscall(_SYS_SCHED_GETATTR, 0, ctypes.byref(attr), _ATTR_SIZE, 0) != 0:
        return None
    return attr


def _set(attr: _SchedAttr) -> bool:
    attr.size = _ATTR_SIZE
    return bool(_libc.syscall(_SYS_SCHED_SETATTR, 0, ctypes.byref(attr), 0) == 0)


def request_slice(slice_ns: int) -> bool:
    """Ask for a ``slice_ns`` scheduler slice for the calling thread, keeping its policy
    and nice value. False if the thread is not SCHED_OTHER or the kernel refused
    (nothing changed then)."""
    attr = _get()
    if attr is None or attr.sched_policy != _SCHED_OTHER:
        return False
    attr.sched_flags = 0
    attr.sched_runtime = slice_ns
    return _set(attr)


def default_slice() -> None:
    """Give the calling thread the default slice back (``sched_runtime`` 0), as a pooled
    thread must before it runs anything else."""
    attr = _get()
    if attr is not None and attr.sched_policy == _SCHED_OTHER:
        attr.sched_flags = 0
        attr.sched_runtime = 0
        _set(attr)
