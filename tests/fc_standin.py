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
from uffdd._linux.mem import buffer_address, madvise

MAP_NORESERVE = 0x4000
MADV_DONTNEED = 4
_CHUNK = 1 << 20


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _read(address: int, length: int) -> bytes:
    """Read guest memory the way a vCPU does; ctypes.memmove releases the GIL."""
    buf = ctypes.create_string_buffer(length)
    ctypes.memmove(buf, address, length)
    return buf.raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fc_standin")
    p.add_argument("--socket", required=True)
    p.add_argument("--snapshot", required=True)
    p.add_argument("--regions", required=True, help="sizes in bytes, comma separated")
    p.add_argument("--page-size", type=int, default=4096)
    args = p.parse_args(argv)

    sizes = [int(x) for x in args.regions.split(",")]
    maps = [mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
            for size in sizes]
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
    with open(args.snapshot, "rb") as f:
        for addr, size, mapping in zip(addrs, sizes, mappings, strict=True):
            f.seek(int(mapping["offset"]))  # type: ignore[call-overload]
            for at in range(0, size, _CHUNK):
                n = min(_CHUNK, size - at)
                got, want = _read(addr + at, n), f.read(n)
                ps = args.page_size
                mismatched += sum(got[i:i + ps] != want[i:i + ps] for i in range(0, n, ps))
    _say(event="verified", mismatches=mismatched, pages=sum(sizes) // args.page_size)

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
