"""ctypes glue for the destination's C fault loop (native/fastpath/import.c).

FaultLoop (uffdd/importer/faultloop.py) owns the rules; this module only mirrors the C structs
and wraps each C function in a typed method. The C state lives as long as the fault
thread's ``run()`` and is touched only from that thread.
"""

from __future__ import annotations

import ctypes
from typing import Final

from uffdd.metrics import LATENCY_BUCKETS

# Why the C loop returned (FP_Y_* in import.c).
TIMEOUT: Final = 0
WAKE: Final = 1
UFFD: Final = 2
FRAME: Final = 3
DEMAND: Final = 4
INSTALLED: Final = 5
FOLD: Final = 6
ERROR: Final = 7  # a call failed or came back short: io.err_op (E_*), err_errno, ...

# What an ERROR is about (FP_E_* in import.c).
E_READ_UFFD: Final = 1  # read(err_fd) failed with err_errno
E_SHORT_UFFD: Final = 2  # read(err_fd) returned err_bytes, not whole uffd messages
E_EPOLL_WAIT: Final = 3  # epoll_wait failed with err_errno

# io.dirty bits: which accumulators moved since the last fold.
DIRTY_PAGES: Final = 1
DIRTY_FAULTS: Final = 2
DIRTY_LATENCY: Final = 4
DIRTY_LANE: Final = 8

N_BUCKETS: Final = len(LATENCY_BUCKETS) + 1
N_TIDS: Final = 256
N_SAMPLES: Final = 4096
MSG_BATCH: Final = 64
#: The order of FaultLoop's "how was this fault resolved" histogram series.
HOW: Final = ("demand", "inflight", "background")
#: The order of the C fault counters: (mode, access).
FAULT_KINDS: Final = (("missing", "read"), ("missing", "write"), ("minor", "read"),
                      ("minor", "write"))

_u8p = ctypes.POINTER(ctypes.c_uint8)


class ImportIo(ctypes.Structure):
    """struct fp_imp_io: what the C loop and Python exchange between calls."""

    _fields_ = [
        ("rx", ctypes.c_void_p),
        ("rx_cap", ctypes.c_uint64),
        ("rx_start", ctypes.c_uint64),
        ("rx_end", ctypes.c_uint64),
        ("msg_fd", ctypes.c_int32),
        ("nmsgs", ctypes.c_int32),
        ("msgs", ctypes.c_uint8 * (MSG_BATCH * 32)),
        ("demand_mask", ctypes.c_uint32),
        ("demand_errno", ctypes.c_int32),
        ("y_region", ctypes.c_uint64),
        ("y_page", ctypes.c_uint64),
        ("y_count", ctypes.c_uint64),
        ("want_installed", ctypes.c_int32),
        ("remaining", ctypes.c_uint64),
        ("integrity", ctypes.c_int32),
        ("spin_s", ctypes.c_double),
        ("dirty", ctypes.c_uint32),
        ("installed_delta", ctypes.c_uint64),
        ("faults", ctypes.c_uint64 * 4),
        ("copy_pages", ctypes.c_uint64),
        ("continue_pages", ctypes.c_uint64),
        ("zero_pages", ctypes.c_uint64),
        ("demand_pages", ctypes.c_uint64),
        ("bytes_demand", ctypes.c_uint64),
        ("hist", (ctypes.c_uint64 * N_BUCKETS) * len(HOW)),
        ("hist_sum", ctypes.c_double * len(HOW)),
        ("ntids", ctypes.c_uint32),
        ("tids", ctypes.c_int32 * N_TIDS),
        ("tid_seconds", ctypes.c_double * N_TIDS),
        ("nsamples", ctypes.c_uint32),
        ("samples_us", ctypes.c_float * N_SAMPLES),
        ("last_progress", ctypes.c_double),
        ("active_at", ctypes.c_double),
        ("err_op", ctypes.c_int32),
        ("err_errno", ctypes.c_int32),
        ("err_fd", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("err_bytes", ctypes.c_int64),
    ]


_declared: set[int] = set()


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of every import-side function (once per library)."""
    if id(lib) in _declared:
        return
    vp, u32, u64, i32, dbl = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64,
                              ctypes.c_int, ctypes.c_double)
    sig = {
        "fp_imp_new": (vp, [i32, i32, i32, ctypes.POINTER(ctypes.c_double)]),
        "fp_imp_free": (None, [vp]),
        "fp_imp_io": (ctypes.POINTER(ImportIo), [vp]),
        "fp_imp_io_size": (u64, []),
        "fp_imp_region": (None, [vp, i32, u64, u64, u64, i32, u64, i32, vp]),
        "fp_imp_region_moved": (None, [vp, i32, u64]),
        "fp_imp_set_demand": (i32, [vp, i32]),
        "fp_imp_request": (i32, [vp, u32, u64, dbl]),
        "fp_imp_fault": (i32, [vp, u32, u64, i32, dbl]),
        "fp_imp_installed": (i32, [vp, u32, u64, u64, i32]),
        "fp_imp_install": (u64, [vp, u32, u64, u64, vp, i32, u64, ctypes.POINTER(i32),
                                 ctypes.POINTER(u64)]),
        "fp_imp_forget": (None, [vp, u32, u64, u64]),
        "fp_imp_outstanding": (u64, [vp]),
        "fp_imp_asked": (dbl, [vp, u32, u64]),
        "fp_imp_expired": (i32, [vp, dbl, ctypes.POINTER(u32), ctypes.POINTER(u64), i32,
                                 ctypes.POINTER(dbl)]),
        "fp_imp_outbox": (u64, [vp, vp, u64]),
        "fp_imp_run": (i32, [vp, dbl]),
        "fp_imp_gate_enter": (None, [vp]),
        "fp_imp_gate_pass": (None, [vp]),
        "fp_imp_gate_close": (None, [vp]),
        "fp_imp_claim": (ctypes.c_int64, [vp, u32, u64, u64, vp]),
    }
    for name, (restype, argtypes) in sig.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    if lib.fp_imp_io_size() != ctypes.sizeof(ImportIo):  # a mirror out of date: a bug
        raise RuntimeError(f"struct fp_imp_io is {lib.fp_imp_io_size()} bytes in C, "
                           f"{ctypes.sizeof(ImportIo)} in uffdd/importer/fastimport.py")
    _declared.add(id(lib))


class CImport:
    """One session's C fault-loop state (see import.c for what each call does)."""

    def __init__(self, lib: ctypes.CDLL, epfd: int, wakefd: int, nregions: int) -> None:
        _declare(lib)
        self._lib = lib
        bounds = (ctypes.c_double * len(LATENCY_BUCKETS))(*LATENCY_BUCKETS)
        handle = lib.fp_imp_new(epfd, wakefd, nregions, bounds)
        if not handle:
            raise MemoryError("fp_imp_new")
        self._h: int = handle
        self.io: ImportIo = lib.fp_imp_io(self._h).contents
        self._expired_r = (ctypes.c_uint32 * 1024)()
        self._expired_p = (ctypes.c_uint64 * 1024)()
        self._err = ctypes.c_int()
        self._done = ctypes.c_uint64()

    def close(self) -> None:
        if self._h:
            self._lib.fp_imp_free(self._h)
            self._h = 0

    def region(self, index: int, addr: int, size: int, page_size: int, uffd: int,
               alias: int, hugetlb: bool, states_addr: int) -> None:
        self._lib.fp_imp_region(self._h, index, addr, size, page_size, uffd, alias,
                                int(hugetlb), states_addr)

    def region_moved(self, index: int, addr: int) -> None:
        self._lib.fp_imp_region_moved(self._h, index, addr)

    def set_demand(self, fd: int) -> None:
        if self._lib.fp_imp_set_demand(self._h, fd) < 0:
            raise MemoryError("fp_imp_set_demand")

    def request(self, region: int, page: int, asked: float) -> None:
        if self._lib.fp_imp_request(self._h, region, page, asked) < 0:
            raise MemoryError("fp_imp_request")

    def fault(self, region: int, page: int, tid: int, seen: float) -> None:
        if self._lib.fp_imp_fault(self._h, region, page, tid, seen) < 0:
            raise MemoryError("fp_imp_fault")

    def installed(self, region: int, page: int, count: int, demand: bool) -> None:
        self._lib.fp_imp_installed(self._h, region, page, count, int(demand))

    def install(self, region: int, page: int, count: int, src: int, demand: bool,
                slice_pages: int = 0) -> tuple[int, int, int]:
        """Install data for every installable page of the run: (stopped at, errno, pages).

        With ``slice_pages``, it may stop early (errno 0) when a fault is waiting."""
        stopped = self._lib.fp_imp_install(self._h, region, page, count, src, int(demand),
                                           slice_pages, ctypes.byref(self._err),
                                           ctypes.byref(self._done))
        return int(stopped), self._err.value, int(self._done.value)

    def forget(self, region: int, page: int, count: int) -> None:
        """Drop outstanding pages [page, page+count) of ``region``; count 0: every page."""
        self._lib.fp_imp_forget(self._h, region, page, count)

    def outstanding(self) -> int:
        return int(self._lib.fp_imp_outstanding(self._h))

    def asked(self, region: int, page: int) -> float | None:
        t = float(self._lib.fp_imp_asked(self._h, region, page))
        return None if t < 0 else t

    def expired(self, before: float) -> tuple[float | None, list[tuple[int, int]]]:
        """The oldest asked time, and (up to 1024) pages asked for before ``before``."""
        oldest = ctypes.c_double()
        n = self._lib.fp_imp_expired(self._h, before, self._expired_r, self._expired_p,
                                     len(self._expired_r), ctypes.byref(oldest))
        pages = [(int(self._expired_r[i]), int(self._expired_p[i])) for i in range(n)]
        return (None if oldest.value < 0 else oldest.value), pages

    def outbox(self) -> bytes:
        buf = ctypes.create_string_buffer(1 << 20)
        n = self._lib.fp_imp_outbox(self._h, buf, len(buf))
        return buf.raw[:n]

    def run(self, timeout: float) -> int:
        return int(self._lib.fp_imp_run(self._h, timeout))

    # The gate (import.c): the fault thread holds it while it runs; bulk receivers
    # claim pages under it (zero-copy receive).

    def gate_enter(self) -> None:
        self._lib.fp_imp_gate_enter(self._h)

    def gate_pass(self) -> None:
        self._lib.fp_imp_gate_pass(self._h)

    def gate_close(self) -> None:
        self._lib.fp_imp_gate_close(self._h)

    def claim(self, region: int, page: int, count: int) -> bytes | None:
        """From a bulk receiver thread: claim the run's absent or requested pages
        (RECEIVING); one byte per page, 1 where claimed. None: the gate is closed."""
        mask = ctypes.create_string_buffer(count)
        if self._lib.fp_imp_claim(self._h, region, page, count, mask) < 0:
            return None
        return mask.raw
