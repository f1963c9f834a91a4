"""A careless or hostile VMM for the handover tests: one real process per case.

It builds guest RAM, a userfaultfd and a region table the way a VMM that got the
handover wrong would, sends the ``import`` (or ``export``) itself, and prints one JSON
line: ``{"case": ..., "reply": <the daemon's reply>}``; for the case that must migrate
(``minor-only-holes``) also the byte-for-byte result of touching every page.

Run as ``python -m tests.vmm_handover CASE --socket S --peer HOST:PORT ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import mmap
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address
from uffdd.client import Client, ClientError
from uffdd.lab.pyvmm import PAGE, EventFollower, GuestRam, Toucher

MIB = 1 << 20
FEATURES = uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID
F_ADD_SEALS, F_SEAL_WRITE = 1033, 0x0008
MFD_ALLOW_SEALING = 0x0002
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Setup:
    """What a case hands over: the request's fields and fds, and what to keep alive."""

    regions: list[dict[str, Any]]
    fds: list[int]
    extra: dict[str, Any] = field(default_factory=dict)
    keep: list[object] = field(default_factory=list)
    op: str = "import"


def anon(size: int = MIB) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, buffer_address(m)


def region(addr: int, size: int = MIB, *, mode: str = "missing", uffd_index: int = 0,
           page_size: int = PAGE, **more: int) -> dict[str, Any]:
    return {"gpa": 0, "addr": addr, "size": size, "page_size": page_size, "uffd": uffd_index,
            "mode": mode, **more}


def registered_anon(features: int = FEATURES, *, nonblock: bool = True,
                    mode: int = uffd.REGISTER_MODE_MISSING) -> Setup:
    m, addr = anon()
    ufd = uffd.new_uffd(features, nonblock=nonblock)
    uffd.register(ufd, addr, MIB, mode)
    return Setup([region(addr)], [ufd], keep=[m])


def shmem(size: int = MIB, flags: int = 0) -> tuple[int, mmap.mmap, int]:
    fd = os.memfd_create("hostile-ram", os.MFD_CLOEXEC | flags)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    return fd, m, buffer_address(m)


# ---------------------------------------------------------------- the cases


def blocking() -> Setup:
    """A uffd created without O_NONBLOCK (the fault thread would block in read)."""
    return registered_anon(nonblock=False)


def no_features() -> Setup:
    """UFFDIO_API done with no features at all: discards would go unseen."""
    return registered_anon(0)


def no_poison_feature() -> Setup:
    """policy=poison, but UFFD_FEATURE_POISON was never asked for."""
    s = registered_anon()
    s.extra["policy"] = "poison"
    return s


def no_minor_feature() -> Setup:
    """Minor mode over shmem without UFFD_FEATURE_MINOR_SHMEM."""
    fd, m, addr = shmem()
    ufd = uffd.new_uffd(FEATURES)
    uffd.register(ufd, addr, MIB, uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_MINOR)
    return Setup([region(addr, mode="minor", fd=1)], [ufd, fd], keep=[m])


def event_fork() -> Setup:
    """UFFD_FEATURE_EVENT_FORK: every fork would put a child's uffd into the daemon."""
    return registered_anon(FEATURES | uffd.FEATURE_EVENT_FORK)


def unregistered() -> Setup:
    """A good uffd, but guest RAM was never registered with it."""
    m, addr = anon()
    return Setup([region(addr)], [uffd.new_uffd(FEATURES)], keep=[m])


def other_uffd() -> Setup:
    """RAM registered with one uffd, another one sent."""
    m, addr = anon()
    mine = uffd.new_uffd(FEATURES)
    uffd.register(mine, addr, MIB, uffd.REGISTER_MODE_MISSING)
    return Setup([region(addr)], [uffd.new_uffd(FEATURES)], keep=[m, mine])


def stray_registration() -> Setup:
    """2 MiB registered, only the first MiB imported: faults in the rest would hang."""
    m, addr = anon(2 * MIB)
    ufd = uffd.new_uffd(FEATURES)
    uffd.register(ufd, addr, 2 * MIB, uffd.REGISTER_MODE_MISSING)
    return Setup([region(addr)], [ufd], keep=[m])


def nothing_mapped() -> Setup:
    """The region's address is not mapped at all."""
    m, addr = anon()
    ufd = uffd.new_uffd(FEATURES)
    m.close()
    return Setup([region(addr)], [ufd])


def hole_in_region() -> Setup:
    """Registered RAM with one page unmapped in the middle of the region."""
    s = registered_anon()
    addr = s.regions[0]["addr"]
    assert _libc.munmap(ctypes.c_void_p(addr + 64 * PAGE), PAGE) == 0
    return s


def huge_region() -> Setup:
    """One region claiming 16 TiB over 1 MiB of real memory."""
    s = registered_anon()
    s.regions[0]["size"] = 16 << 40
    return s


def exa_region() -> Setup:
    """A region of ~16 EiB (the whole 64-bit space less a page)."""
    s = registered_anon()
    s.regions[0].update(addr=0, size=(1 << 64) - PAGE)
    return s


def sealed_minor() -> Setup:
    """Minor mode with a memory fd sealed against writes (the daemon writes through it)."""
    s = registered_anon(FEATURES | uffd.FEATURE_MINOR_SHMEM)
    fd = os.memfd_create("hostile-sealed", os.MFD_CLOEXEC | MFD_ALLOW_SEALING)
    os.ftruncate(fd, MIB)
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE)
    s.regions[0].update(mode="minor", fd=1)
    s.fds.append(fd)
    return s


def wrong_memfd() -> Setup:
    """Minor mode naming a memory fd that is not the file mapped at 'addr'."""
    fd, m, addr = shmem()
    ufd = uffd.new_uffd(FEATURES | uffd.FEATURE_MINOR_SHMEM)
    uffd.register(ufd, addr, MIB, uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_MINOR)
    other = os.memfd_create("hostile-other", os.MFD_CLOEXEC)
    os.ftruncate(other, MIB)
    return Setup([region(addr, mode="minor", fd=1)], [ufd, other], keep=[m, fd])


def minor_registered_missing() -> Setup:
    """Mode 'minor' claimed, but the range is registered MISSING only."""
    fd, m, addr = shmem()
    ufd = uffd.new_uffd(FEATURES | uffd.FEATURE_MINOR_SHMEM)
    uffd.register(ufd, addr, MIB, uffd.REGISTER_MODE_MISSING)
    return Setup([region(addr, mode="minor", fd=1)], [ufd, fd], keep=[m])


def write_protect() -> Setup:
    """Registered MISSING|WP: write-protect faults nobody would resolve."""
    return registered_anon(FEATURES | uffd.FEATURE_PAGEFAULT_FLAG_WP,
                           mode=uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_WP)


def _touched(count: int) -> Setup:
    m, addr = anon()
    for page in range(count):  # before registering: the pages are now present, as zeros
        m[page * PAGE] = 0
    ufd = uffd.new_uffd(FEATURES)
    uffd.register(ufd, addr, MIB, uffd.REGISTER_MODE_MISSING)
    return Setup([region(addr)], [ufd], keep=[m])


def present() -> Setup:
    """10 pages touched before the import: a fresh import would never fetch them."""
    return _touched(10)


def present_keep() -> Setup:
    """The same, but the VMM says they are valid (its own precopy)."""
    s = _touched(10)
    s.extra["present"] = "keep"
    return s


def plaintext_peer() -> Setup:
    """A peer off loopback, which this daemon (no TLS, loopback only) will not reach."""
    s = registered_anon()
    s.extra["peer"] = "192.0.2.10:4460"
    return s


def import_many_regions() -> Setup:
    """2000 one-page regions (what fits a frame): bounded before any is looked at."""
    s = registered_anon()
    addr = s.regions[0]["addr"]
    s.regions = [dict(region(addr + i * PAGE, PAGE), gpa=i * PAGE) for i in range(2000)]
    return s


def export_many_regions() -> Setup:
    """20000 tiny regions: without a bound, one mapping and one dup'd fd each."""
    fd = os.memfd_create("hostile-export", os.MFD_CLOEXEC)
    os.ftruncate(fd, 20000 * PAGE)
    regions = [{"gpa": i * PAGE, "size": PAGE, "page_size": PAGE, "fd": 0, "offset": i * PAGE}
               for i in range(20000)]
    return Setup(regions, [fd], op="export")


def export_pid_unmapped() -> Setup:
    """Export with pid: a region with an unmapped page in the middle."""
    m, addr = anon(2 * MIB)
    assert _libc.munmap(ctypes.c_void_p(addr + MIB), PAGE) == 0
    return Setup([{"gpa": 0, "size": 2 * MIB, "page_size": PAGE, "addr": addr}], [],
                 extra={"pid": os.getpid()}, keep=[m], op="export")


def export_pid_unreadable() -> Setup:
    """Export with pid: a region with a page the process cannot read (PROT_NONE)."""
    m, addr = anon(2 * MIB)
    assert _libc.mprotect(ctypes.c_void_p(addr + MIB), PAGE, 0) == 0  # PROT_NONE
    return Setup([{"gpa": 0, "size": 2 * MIB, "page_size": PAGE, "addr": addr}], [],
                 extra={"pid": os.getpid()}, keep=[m], op="export")


def export_huge() -> Setup:
    """Export with pid claiming 16 TiB."""
    m, addr = anon()
    return Setup([{"gpa": 0, "size": 16 << 40, "page_size": PAGE, "addr": addr}], [],
                 extra={"pid": os.getpid()}, keep=[m], op="export")


def half_registered() -> Setup:
    """The region table is right, but the uffd is registered over its first half only:
    faults in the second half would reach nobody."""
    m, addr = anon()
    ufd = uffd.new_uffd(FEATURES)
    uffd.register(ufd, addr, MIB // 2, uffd.REGISTER_MODE_MISSING)
    return Setup([region(addr)], [ufd], keep=[m])


def minor_memfd_too_small() -> Setup:
    """Minor mode: the memory fd is half the region (the daemon would write past its end)."""
    fd, m, addr = shmem()
    ufd = uffd.new_uffd(FEATURES | uffd.FEATURE_MINOR_SHMEM)
    uffd.register(ufd, addr, MIB, uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_MINOR)
    small = os.memfd_create("hostile-small", os.MFD_CLOEXEC)
    os.ftruncate(small, MIB // 2)
    return Setup([region(addr, mode="minor", fd=1)], [ufd, small], keep=[m, fd])


def export_memfd_too_small() -> Setup:
    """Export of a region larger than its memory fd (every page past the end is lost)."""
    fd = os.memfd_create("hostile-export-small", os.MFD_CLOEXEC)
    os.ftruncate(fd, MIB // 2)
    return Setup([{"gpa": 0, "size": MIB, "page_size": PAGE, "fd": 0, "offset": 0}], [fd],
                 op="export")


def export_memfd_offset_past_end() -> Setup:
    """Export whose offset puts the region past the end of a memory fd of its size."""
    fd = os.memfd_create("hostile-export-offset", os.MFD_CLOEXEC)
    os.ftruncate(fd, MIB)
    return Setup([{"gpa": 0, "size": MIB, "page_size": PAGE, "fd": 0, "offset": MIB // 2}],
                 [fd], op="export")


CASES: dict[str, Callable[[], Setup]] = {
    "half-registered": half_registered,
    "minor-memfd-too-small": minor_memfd_too_small,
    "export-memfd-too-small": export_memfd_too_small,
    "export-memfd-offset-past-end": export_memfd_offset_past_end,
    "blocking": blocking,
    "no-features": no_features,
    "no-poison-feature": no_poison_feature,
    "no-minor-feature": no_minor_feature,
    "event-fork": event_fork,
    "unregistered": unregistered,
    "other-uffd": other_uffd,
    "stray-registration": stray_registration,
    "nothing-mapped": nothing_mapped,
    "hole-in-region": hole_in_region,
    "huge-region": huge_region,
    "exa-region": exa_region,
    "sealed-minor": sealed_minor,
    "wrong-memfd": wrong_memfd,
    "minor-registered-missing": minor_registered_missing,
    "write-protect": write_protect,
    "present": present,
    "present-keep": present_keep,
    "plaintext-peer": plaintext_peer,
    "import-many-regions": import_many_regions,
    "export-many-regions": export_many_regions,
    "export-pid-unmapped": export_pid_unmapped,
    "export-pid-unreadable": export_pid_unreadable,
    "export-huge": export_huge,
}


def send(args: argparse.Namespace, s: Setup) -> dict[str, Any]:
    body: dict[str, Any] = {"op": s.op, "session": args.session,
                            "token": bytes.fromhex(args.token), "regions": s.regions}
    if s.op == "import":
        body["peer"] = args.peer
    body.update(s.extra)
    with Client(args.socket, timeout=60) as client:
        try:
            reply = client.request(body, s.fds)
        except ClientError as e:
            return {"ok": False, "error": e.code, "message": e.message}
        if reply.get("ok") and s.op == "import":
            client.cancel(args.session)  # accepted: a refused source would fail it anyway
        return reply


def minor_only_holes(args: argparse.Namespace) -> dict[str, Any]:
    """MINOR-only registration over a memfd never preallocated: every page must arrive."""
    ram = GuestRam.create(args.memory, args.backing)
    assert ram.fd is not None
    minor = uffd.FEATURE_MINOR_HUGETLBFS if args.backing == "hugetlb" else \
        uffd.FEATURE_MINOR_SHMEM
    ufd = uffd.new_uffd(FEATURES | minor)
    uffd.register(ufd, ram.address, ram.size, uffd.REGISTER_MODE_MINOR)
    table = [region(ram.address, ram.size, mode="minor", fd=1, page_size=ram.page_size)]
    with Client(args.socket, timeout=60) as client:
        try:
            reply = client.request({"op": "import", "session": args.session,
                                    "token": bytes.fromhex(args.token), "peer": args.peer,
                                    "regions": table}, [ufd, ram.fd])
        except ClientError as e:
            return {"reply": {"ok": False, "error": e.code, "message": e.message}}
        follower = EventFollower(client, args.session, ufd, ram, 300)
        follower.start()
        toucher = Toucher(ram, args.seed, 4, "rand", set())
        toucher.run()
        follower.join()
    return {"reply": reply, "mismatches": len(toucher.mismatches),
            "first_mismatches": toucher.mismatches[:5], "event": follower.event["event"],
            "pages": ram.size // PAGE}


def daemon_pages(args: argparse.Namespace) -> dict[str, Any]:
    """Two exports of 256 pages each, the first still running when the second comes."""
    m, addr = anon()
    table = [{"gpa": 0, "size": MIB, "page_size": PAGE, "addr": addr}]
    replies = []
    with Client(args.socket, timeout=60) as one, Client(args.socket, timeout=60) as two:
        for client, session in ((one, "pages-one"), (two, "pages-two")):
            try:
                replies.append(client.request({"op": "export", "session": session,
                                               "token": bytes.fromhex(args.token),
                                               "pid": os.getpid(), "regions": table}))
            except ClientError as e:
                replies.append({"ok": False, "error": e.code, "message": e.message})
    m.close()
    return {"first": replies[0], "reply": replies[1]}


def shared_uffd(args: argparse.Namespace) -> dict[str, Any]:
    """Two imports, one uffd: the first imports RAM block A; once it is ok, the VMM
    registers block B with the same uffd and imports B as another session. Two fault
    threads would then read one uffd, each taking faults the other's session owns."""
    a, addr_a = anon()
    b, addr_b = anon()
    ufd = uffd.new_uffd(FEATURES)
    uffd.register(ufd, addr_a, MIB, uffd.REGISTER_MODE_MISSING)
    replies = []
    with Client(args.socket, timeout=60) as one, Client(args.socket, timeout=60) as two:
        for client, session, addr in ((one, "shared-a", addr_a), (two, "shared-b", addr_b)):
            if session == "shared-b":
                uffd.register(ufd, addr_b, MIB, uffd.REGISTER_MODE_MISSING)
            try:
                replies.append(client.request({
                    "op": "import", "session": session, "token": bytes.fromhex(args.token),
                    "peer": args.peer, "regions": [region(addr)]}, [ufd]))
            except ClientError as e:
                replies.append({"ok": False, "error": e.code, "message": e.message})
        for session, reply in zip(("shared-a", "shared-b"), replies, strict=True):
            if reply.get("ok"):
                with contextlib.suppress(ClientError):
                    one.cancel(session)
    a.close()  # the guest RAM lives until both requests are answered
    b.close()
    return {"first": replies[0], "reply": replies[1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vmm_handover", description=__doc__)
    p.add_argument("case", choices=[*CASES, "minor-only-holes", "daemon-pages",
                                    "shared-uffd"])
    p.add_argument("--socket", required=True)
    p.add_argument("--peer", default="127.0.0.1:1")
    p.add_argument("--session", default="hostile")
    p.add_argument("--token", default="00" * 16)
    p.add_argument("--memory", type=int, default=64 * MIB)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backing", choices=("shmem", "hugetlb"), default="shmem")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    if args.case == "minor-only-holes":
        out = minor_only_holes(args)
    elif args.case == "daemon-pages":
        out = daemon_pages(args)
    elif args.case == "shared-uffd":
        out = shared_uffd(args)
    else:
        out = {"reply": send(args, CASES[args.case]())}
    out.update(case=args.case, seconds=round(time.monotonic() - t0, 3))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
