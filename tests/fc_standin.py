"""A Firecracker stand-in in Python for tests/test_firecracker.py (a real process).

It does what Firecracker does at a snapshot restore with a UFFD memory backend:
guest RAM is one anonymous private mapping per region (MAP_NORESERVE); the userfaultfd
is made with O_CLOEXEC | O_NONBLOCK and UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE; every
region is registered MISSING; it connects to the handover socket and makes ONE sendmsg:
the JSON array of GuestRegionUffdMapping and the uffd as SCM_RIGHTS. It keeps the
socket open and never reads or writes it again.

Then it reads every page (as a guest would, blocking in the kernel until the daemon
installs it), compares guest RAM with the snapshot file, prints one JSON line, and
obeys commands on stdin, one per line, answering each with one JSON line:

- ``balloon R OFF LEN``: madvise(MADV_DONTNEED) of region R's bytes [OFF, OFF+LEN), as a
  balloon inflate does, then read them again (a deflate): are they all zeros?
- ``close``: close the handover socket (Firecracker exiting closes it too);
- ``exit``: exit.

``python -m tests.fc_standin --socket S --snapshot F --regions 4194304,2097152``
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import socket
import sys

from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address, madvise, process_read
from uffdd.errors import KernelError

MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
MADV_DONTNEED = 4
_CHUNK = 1 << 20


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _read(address: int, length: int) -> bytes:
    """Read guest memory the way a vCPU does; ctypes.memmove releases the GIL."""
    buf = ctypes.create_string_buffer(length)
    ctypes.memmove(buf, address, length)
    return buf.raw


def _read_careful(address: int, length: int, page_size: int) -> tuple[bytes, list[int]]:
    """Read guest memory with process_vm_readv of this very process: it waits for an
    absent page like a vCPU does, but a poisoned page is an error instead of SIGBUS.
    Returns the bytes (zeros for unreadable pages) and the unreadable pages' offsets."""
    buf = ctypes.create_string_buffer(length)
    try:
        process_read(os.getpid(), address, ctypes.addressof(buf), length)
        return buf.raw, []
    except KernelError:
        pass
    bad = []
    for at in range(0, length, page_size):
        try:
            process_read(os.getpid(), address + at, ctypes.addressof(buf) + at, page_size)
        except KernelError:
            bad.append(at)
    return buf.raw, bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fc_standin")
    p.add_argument("--socket", required=True)
    p.add_argument("--snapshot", required=True)
    p.add_argument("--regions", required=True, help="sizes in bytes, comma separated")
    p.add_argument("--page-size", type=int, default=4096)
    p.add_argument("--hugetlb", action="store_true",
                   help="guest RAM in 2 MiB hugetlb pages (Firecracker's huge_pages: 2M)")
    p.add_argument("--careful", action="store_true",
                   help="read with process_vm_readv: a poisoned page is reported, not fatal")
    args = p.parse_args(argv)

    sizes = [int(x) for x in args.regions.split(",")]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    if args.hugetlb:
        flags |= MAP_HUGETLB
        args.page_size = 2 << 20
    maps = [mmap.mmap(-1, size, flags) for size in sizes]
    addrs = [buffer_address(m) for m in maps]
    ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE)  # O_CLOEXEC | O_NONBLOCK, UFFDIO_API
    mappings = []
    offset = 0
    for addr, size in zip(addrs, sizes, strict=True):
        uffd.register(ufd, addr, size, uffd.REGISTER_MODE_MISSING)
        mappings.append({"base_host_virt_addr": addr, "size": size, "offset": offset,
                         "page_size": args.page_size, "page_size_kib": args.page_size})
        offset += size
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    payload = json.dumps(mappings).encode()
    sent = sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     ufd.to_bytes(4, sys.byteorder, signed=True))])
    assert sent == len(payload)
    _say(event="sent", pid=os.getpid(), mappings=mappings)

    mismatched = 0
    unreadable: list[int] = []  # snapshot file offsets of the pages that could not be read
    ps = args.page_size
    with open(args.snapshot, "rb") as f:
        for addr, size, mapping in zip(addrs, sizes, mappings, strict=True):
            base = int(mapping["offset"])  # type: ignore[call-overload]
            f.seek(base)
            for at in range(0, size, _CHUNK):
                n = min(_CHUNK, size - at)
                bad: list[int] = []
                if args.careful:
                    got, bad = _read_careful(addr + at, n, ps)
                else:
                    got = _read(addr + at, n)
                want = f.read(n)
                unreadable += [base + at + b for b in bad]
                mismatched += sum(got[i:i + ps] != want[i:i + ps] for i in range(0, n, ps)
                                  if i not in bad)
    _say(event="verified", mismatches=mismatched, pages=sum(sizes) // ps,
         unreadable=unreadable)

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "balloon":
            region, off, length = (int(w) for w in words[1:4])
            madvise(addrs[region] + off, length, MADV_DONTNEED)
            data = _read(addrs[region] + off, length)
            _say(event="balloon", zeros=data == bytes(length))
        elif words[0] == "close":
            sock.close()
            _say(event="closed")
        elif words[0] == "exit":
            _say(event="exit")
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
