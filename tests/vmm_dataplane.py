"""Hostile (and careless) VMMs for tests/test_hostile_dataplane.py: real processes.

Each subcommand plays one VMM that does something to the guest memory it handed over,
then prints one JSON line with what it saw. They are honest where the handover checks
look (a non-blocking uffd with EVENT_REMOVE, registered over exactly the regions named),
so that what they test is the data plane, not the handover.

    dest-shrink    import a MINOR-mode memfd, then ftruncate it (the daemon writes it)
    source-shrink  export a memfd, then ftruncate it (the daemon reads it)
    dest-unmap     import, then munmap the second half of guest RAM
    discard-exit   MINOR mode: discard pages (MADV_DONTNEED / MADV_REMOVE), then report
                   vCPU exits on them; the page cache says what they must read as

Run as ``python tests/vmm_dataplane.py CMD --socket ... --session ... --token ...``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
from pathlib import Path

from uffdd._linux import uffd
from uffdd._linux.mem import MFD_HUGETLB, buffer_address, madvise
from uffdd.client import Client, GuestRegion, MemoryRegion
from uffdd.lab import pyvmm

PAGE = 4096
MADV_DONTNEED = 4
MADV_REMOVE = 9
_libc = ctypes.CDLL(None, use_errno=True)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def _memfd(size: int, *, hugetlb: bool = False, sealing: bool = False) -> int:
    flags = os.MFD_CLOEXEC | (MFD_HUGETLB if hugetlb else 0)
    flags |= os.MFD_ALLOW_SEALING if sealing else 0
    fd = os.memfd_create("guest-ram", flags)
    os.ftruncate(fd, size)
    return fd


def _uffd(addr: int, size: int, mode: int, extra: int = 0) -> int:
    ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID | extra)
    uffd.register(ufd, addr, size, mode)
    return ufd


def _ready(args: argparse.Namespace) -> None:
    if args.ready_file:
        Path(args.ready_file).write_text("ready\n")


def _finish(client: Client, args: argparse.Namespace, **fields: object) -> int:
    event = client.wait_finished(args.session, timeout=args.timeout)
    print(json.dumps({"event": event["event"], "reason": event.get("reason"),
                      "outcome": event.get("outcome"),
                      "pages_unmapped": event.get("pages_unmapped"), **fields}), flush=True)
    return 0


def dest_shrink(args: argparse.Namespace) -> int:
    """MINOR mode, then the memfd is cut to ``--shrink-to`` bytes right after 'ok'."""
    hugetlb = args.backing == "hugetlb"
    page_size = (2 << 20) if hugetlb else PAGE
    fd = _memfd(args.memory, hugetlb=hugetlb)
    ram = mmap.mmap(fd, args.memory, mmap.MAP_SHARED)
    addr = buffer_address(ram)
    ufd = _uffd(addr, args.memory, uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_MINOR,
                pyvmm.dest_features(args.backing, "minor", None))
    region = GuestRegion(gpa=0, addr=addr, size=args.memory, uffd=ufd, mode="minor",
                         page_size=page_size, fd=fd, offset=0)
    with Client(args.socket) as client:
        client.import_session(args.session, bytes.fromhex(args.token), peer=args.peer,
                              regions=[region])
        os.ftruncate(fd, args.shrink_to)  # guest RAM is never touched here after this
        _ready(args)
        return _finish(client, args)


def source_shrink(args: argparse.Namespace) -> int:
    """Export a memfd filled with the pattern, then cut it to half (if the seal allows)."""
    fd = _memfd(args.memory, sealing=args.sealing)
    ram = mmap.mmap(fd, args.memory, mmap.MAP_SHARED)
    ram_obj = pyvmm.GuestRam(args.memory, "shmem", ram, buffer_address(ram), fd, PAGE)
    pyvmm.fill(ram_obj, args.seed, [])
    digest = pyvmm.ram_hash(ram_obj)
    with Client(args.socket) as client:
        client.export_session(args.session, bytes.fromhex(args.token),
                              [MemoryRegion(gpa=0, size=args.memory, page_size=PAGE, fd=fd,
                                            offset=0)])
        try:
            os.ftruncate(fd, args.memory // 2)
            shrunk = "shrunk"
        except PermissionError:  # the daemon sealed it against shrinking (F_SEAL_SHRINK)
            shrunk = "refused"
        _ready(args)
        return _finish(client, args, shrink=shrunk, hash=digest)


def dest_unmap(args: argparse.Namespace) -> int:
    """Import, munmap the second half, then read the first half and compare it."""
    ram = pyvmm.GuestRam.create(args.memory, args.backing)
    mode = uffd.REGISTER_MODE_MISSING
    ufd = _uffd(ram.address, ram.size, mode, pyvmm.dest_features(args.backing, "missing",
                                                                 args.policy))
    region = GuestRegion(gpa=0, addr=ram.address, size=ram.size, uffd=ufd, mode="missing",
                         page_size=PAGE, fd=ram.fd, offset=0)
    half = ram.size // 2
    with Client(args.socket) as client:
        client.import_session(args.session, bytes.fromhex(args.token), peer=args.peer,
                              regions=[region], policy=args.policy, deadline=args.deadline)
        if _libc.munmap(ram.address + half, half) != 0:
            raise OSError(ctypes.get_errno(), "munmap")
        _ready(args)
        bad = 0
        if args.touch:
            buf = ctypes.create_string_buffer(PAGE)
            for page in range(half // PAGE):  # blocks on each absent page: demand faults
                ctypes.memmove(buf, ram.address + page * PAGE, PAGE)
                bad += buf.raw != pyvmm.page_pattern(args.seed, page)
        event = client.wait_finished(args.session, timeout=args.timeout)
        uffd.unregister(ufd, ram.address, half)
    print(json.dumps({"event": event["event"], "reason": event.get("reason"),
                      "outcome": event.get("outcome"), "pages_unmapped":
                      event.get("pages_unmapped"), "pages_total": event.get("pages_total"),
                      "mismatches": bad}), flush=True)
    return 0


def discard_exit(args: argparse.Namespace) -> int:
    """MINOR mode, no source: the guest wrote two pages, dropped them from its mapping
    (one with MADV_DONTNEED: the page cache keeps the data; one with MADV_REMOVE: gone),
    then its vCPUs exit on them. Prints what each page holds after the verdicts."""
    fd = _memfd(args.memory)
    ram = mmap.mmap(fd, args.memory, mmap.MAP_SHARED)  # the guest's mapping: registered
    addr = buffer_address(ram)
    plain = mmap.mmap(fd, args.memory, mmap.MAP_SHARED)  # the VMM's own view of the file
    ufd = _uffd(addr, args.memory, uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_MINOR,
                uffd.FEATURE_SIGBUS | uffd.FEATURE_MINOR_SHMEM)
    kept, removed = 10, 20
    data = {p: pyvmm.page_pattern(99, p) for p in (kept, removed)}
    region = GuestRegion(gpa=0, addr=addr, size=args.memory, uffd=ufd, mode="minor",
                         page_size=PAGE, fd=fd, offset=0)
    with Client(args.socket) as client:
        client.import_session(args.session, bytes.fromhex(args.token), peer=args.peer,
                              regions=[region])
        for p, content in data.items():
            plain[p * PAGE : (p + 1) * PAGE] = content  # the guest's own writes
        madvise(addr + kept * PAGE, PAGE, MADV_DONTNEED)  # returns once the daemon read it
        madvise(addr + removed * PAGE, PAGE, MADV_REMOVE)
        verdicts = [client.resolve(args.session, vcpu=0, gpa=p * PAGE)["verdict"]
                    for p in (kept, removed)]
        result = {"verdicts": verdicts,
                  "kept_intact": plain[kept * PAGE : (kept + 1) * PAGE] == data[kept],
                  "kept_zeroed": plain[kept * PAGE : (kept + 1) * PAGE] == bytes(PAGE),
                  "removed_zeroed": plain[removed * PAGE : (removed + 1) * PAGE] == bytes(PAGE)}
        client.cancel(args.session)
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("cmd", choices=("dest-shrink", "source-shrink", "dest-unmap", "discard-exit"))
    p.add_argument("--socket", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--peer", default="")
    p.add_argument("--memory", type=pyvmm.parse_size, default=64 << 20)
    p.add_argument("--backing", choices=("anon", "shmem", "hugetlb"), default="shmem")
    p.add_argument("--shrink-to", type=int, default=0)
    p.add_argument("--sealing", action="store_true")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--policy", choices=("crash", "poison"), default=None)
    p.add_argument("--deadline", type=float, default=None)
    p.add_argument("--touch", action="store_true")
    p.add_argument("--ready-file")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    run = {"dest-shrink": dest_shrink, "source-shrink": source_shrink,
           "dest-unmap": dest_unmap, "discard-exit": discard_exit}[args.cmd]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
