"""What the SIGBUS-proof alias write costs on the MINOR bulk path (not a test).

    .venv/bin/python tests/bench_tenant_write.py [MiB] [rounds]

Fills a MINOR-registered shmem region the way the destination's bulk install does:
each slice is written into the daemon-side alias of the memfd, then UFFDIO_CONTINUE'd
into the (VMM-side) registered mapping. Every round starts from an empty file (the hole
punched), so each slice allocates its pages, as in a migration. Compares, in the same
run, alternating rounds: a plain memmove (the old way, which a shrunk memfd turns into
a SIGBUS) against process_vm_writev to our own pid, from Python (mem.tenant_write) and
from C (uffdd_fp_tenant_write, what import.c calls).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import statistics
import sys
import time

from uffdd import _fastpath
from uffdd._linux import mem, uffd

FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def main() -> None:
    size = int(sys.argv[1] if len(sys.argv) > 1 else 256) << 20
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    lib = _fastpath.load("on")
    assert lib is not None
    c_write = lib.uffdd_fp_tenant_write
    c_write.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                        ctypes.POINTER(ctypes.c_size_t))
    c_write.restype = ctypes.c_int
    done = ctypes.c_size_t()
    fd = os.memfd_create("bench", 0)
    os.ftruncate(fd, size)
    alias = mem.Mapping(fd, size, writable=True)
    vmm = mmap.mmap(fd, size, mmap.MAP_SHARED)
    vaddr = mem.buffer_address(vmm)
    ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE)
    uffd.register(ufd, vaddr, size, uffd.REGISTER_MODE_MINOR | uffd.REGISTER_MODE_MISSING)
    src = bytearray(os.urandom(2 << 20))
    saddr = mem.buffer_address(src)
    libc = ctypes.CDLL(None, use_errno=True)

    def memmove(dst: int, n: int) -> None:
        ctypes.memmove(dst, saddr, n)

    def py_pvw(dst: int, n: int) -> None:
        mem.tenant_write(dst, saddr, n)

    def c_pvw(dst: int, n: int) -> None:
        if c_write(dst, saddr, n, ctypes.byref(done)):
            raise OSError("uffdd_fp_tenant_write")

    ways = {"memmove (old)": memmove, "process_vm_writev (Python)": py_pvw,
            "process_vm_writev (C)": c_pvw}
    for slice_bytes in (256 << 10, 2 << 20):
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(rounds):
            for name, write in ways.items():
                if libc.fallocate(fd, FALLOC_PUNCH, ctypes.c_long(0), ctypes.c_long(size)):
                    raise OSError(ctypes.get_errno(), "fallocate")
                t = time.perf_counter()
                for off in range(0, size, slice_bytes):
                    write(alias.address + off, slice_bytes)
                    uffd.continue_(ufd, vaddr + off, slice_bytes)
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["memmove (old)"])
        print(f"slice {slice_bytes >> 10} KiB, {size >> 20} MiB per round, {rounds} rounds:")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:28s} {size / med / 1e9:6.2f} GB/s  x{med / base:.2f} of memmove")


if __name__ == "__main__":
    main()
