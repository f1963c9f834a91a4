"""A VMM stand-in in Python: the source and destination processes of tests and the demo.

It plays a VMM honestly: it owns guest RAM (anonymous, shmem memfd or hugetlb memfd),
creates and registers the userfaultfd itself, and talks to uffdd only through
:mod:`uffdd.client`. Touching threads read guest pages with ``ctypes.memmove``, which
releases the GIL, so a thread blocked in the kernel on an absent page does not stop the
others (and this process is never the one that handles its own faults).

Run as ``python -m uffdd.lab.pyvmm source|dest ...``; prints one JSON line with the result.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import random
import sys
import threading
import time
from dataclasses import dataclass

from uffdd._linux import uffd
from uffdd._linux.mem import MFD_HUGETLB, buffer_address, madvise
from uffdd.client import Client, GuestRegion, MemoryRegion

PAGE = 4096
MADV_DONTNEED = 4
MADV_REMOVE = 9


def page_pattern(seed: int, page: int) -> bytes:
    """Content of 4 KiB guest page ``page``: every 11th page is zero, the rest unique."""
    if page % 11 == 5:
        return bytes(PAGE)
    digest = hashlib.blake2b(f"{seed}:{page}".encode(), digest_size=64).digest()
    return digest * (PAGE // 64)


@dataclass
class GuestRam:
    """Guest RAM of the stand-in: a mapping, its address, and the memfd if any."""

    size: int
    backing: str
    map: mmap.mmap
    address: int
    fd: int | None
    page_size: int

    @classmethod
    def create(cls, size: int, backing: str) -> GuestRam:
        page_size = (2 << 20) if backing == "hugetlb" else PAGE
        if backing == "anon":
            m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            return cls(size, backing, m, buffer_address(m), None, page_size)
        flags = MFD_HUGETLB if backing == "hugetlb" else 0
        fd = os.memfd_create(f"guest-ram-{backing}", flags | os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
        return cls(size, backing, m, buffer_address(m), fd, page_size)


def fill(ram: GuestRam, seed: int, holes: list[tuple[int, int]]) -> None:
    """Write the seeded pattern (skipping page ranges in ``holes``, which stay untouched)."""
    skip: set[int] = set()
    for first, count in holes:
        skip.update(range(first, first + count))
    for page in range(ram.size // PAGE):
        if page in skip:
            continue
        data = page_pattern(seed, page)
        if any(data):
            ram.map[page * PAGE : (page + 1) * PAGE] = data


def ram_hash(ram: GuestRam) -> str:
    return hashlib.blake2b(memoryview(ram.map), digest_size=16).hexdigest()


def run_source(args: argparse.Namespace) -> int:
    ram = GuestRam.create(args.memory, args.backing)
    fill(ram, args.seed, _holes(args.holes))
    digest = ram_hash(ram)
    layout = region_layout(ram, args.split)
    with Client(args.socket, resilient=args.resilient) as client:
        if ram.fd is None:
            regions = [MemoryRegion(gpa=gpa, size=size, page_size=ram.page_size,
                                    addr=ram.address + off) for gpa, off, size in layout]
            pages = client.export_session(args.session, bytes.fromhex(args.token), regions,
                                          pid=os.getpid())
        else:
            regions = [MemoryRegion(gpa=gpa, size=size, page_size=ram.page_size, fd=ram.fd,
                                    offset=off) for gpa, off, size in layout]
            pages = client.export_session(args.session, bytes.fromhex(args.token), regions)
        _ready(args)
        event = client.wait_finished(args.session, timeout=args.timeout)
    print(json.dumps({"role": "source", "pages": pages, "hash": digest,
                      "event": event["event"], "reason": event.get("reason")}), flush=True)
    return 0 if event["event"] == "completed" else 1


def _holes(spec: str | None) -> list[tuple[int, int]]:
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        first, _, count = item.partition("+")
        out.append((int(first), int(count or 1)))
    return out


def _ready(args: argparse.Namespace) -> None:
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write("ready\n")


class Toucher:
    """Threads that read every guest page once and compare it with the pattern."""

    def __init__(self, ram: GuestRam, seed: int, threads: int, order: str,
                 zero_pages: set[int]) -> None:
        self.ram = ram
        self.seed = seed
        self.threads = threads
        self.order = order
        self.zero_pages = zero_pages
        self.mismatches: list[int] = []
        self.latencies: list[float] = []
        self._lock = threading.Lock()

    def run(self) -> float:
        pages = list(range(self.ram.size // PAGE))
        slices = [pages[i :: self.threads] for i in range(self.threads)]
        workers = [threading.Thread(target=self._touch, args=(s, i)) for i, s in enumerate(slices)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.monotonic() - t0

    def _touch(self, pages: list[int], index: int) -> None:
        if self.order == "rand":
            random.Random(self.seed * 1000 + index).shuffle(pages)
        buf = ctypes.create_string_buffer(PAGE)
        lat: list[float] = []
        bad: list[int] = []
        for page in pages:
            t = time.perf_counter()
            ctypes.memmove(buf, self.ram.address + page * PAGE, PAGE)  # may block: GIL released
            lat.append(time.perf_counter() - t)
            want = bytes(PAGE) if page in self.zero_pages else page_pattern(self.seed, page)
            if buf.raw != want:
                bad.append(page)
        with self._lock:
            self.latencies.extend(lat)
            self.mismatches.extend(bad)


def run_dest(args: argparse.Namespace) -> int:
    ram = GuestRam.create(args.memory, args.backing)
    ufd = uffd.new_uffd(dest_features(args.backing, args.mode, args.policy))
    mode = uffd.REGISTER_MODE_MISSING
    if args.mode == "minor":
        mode |= uffd.REGISTER_MODE_MINOR
    uffd.register(ufd, ram.address, ram.size, mode)
    regions = _dest_regions(ram, ufd, args)
    t0 = time.monotonic()
    with Client(args.socket, resilient=args.resilient) as client:
        client.import_session(args.session, bytes.fromhex(args.token), peer=args.peer,
                              regions=regions, policy=args.policy)
        follower = EventFollower(client, args.session, ufd, ram, args.timeout)
        follower.start()
        zero_pages = _discard(ram, args.discard)
        for first, count in _holes(args.holes):  # never written on the source: zeros
            zero_pages.update(range(first, first + count))
        toucher = Toucher(ram, args.seed, args.threads, args.order, zero_pages)
        touch_seconds = toucher.run()
        follower.join()
        event = follower.event
    seconds = time.monotonic() - t0
    lat = sorted(toucher.latencies)
    result = {
        "role": "dest", "verified": not toucher.mismatches and event["event"] == "completed",
        "pages": ram.size // PAGE, "mismatches": len(toucher.mismatches),
        "first_mismatches": toucher.mismatches[:5], "threads": args.threads,
        "event": event["event"], "outcome": event.get("outcome"), "reason": event.get("reason"),
        "hash": ram_hash(ram) if not zero_pages else None,
        "seconds": round(seconds, 3), "touch_seconds": round(touch_seconds, 3),
        "fault_latency_p50_us": _pct(lat, 0.50), "fault_latency_p99_us": _pct(lat, 0.99),
    }
    print(json.dumps(result), flush=True)
    return 0 if result["verified"] else 1


def dest_features(backing: str, mode: str, policy: str | None) -> int:
    """UFFDIO_API features of the destination's uffd: what the daemon checks for."""
    features = uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID
    if mode == "minor":
        features |= uffd.FEATURE_MINOR_HUGETLBFS if backing == "hugetlb" else \
            uffd.FEATURE_MINOR_SHMEM
    if policy == "poison":
        features |= uffd.FEATURE_POISON
    return features


def region_layout(ram: GuestRam, split: int) -> list[tuple[int, int, int]]:
    """(gpa, offset in RAM, size) of each region: ``split`` regions with 1 GiB gpa holes."""
    step = ram.size // max(1, split)
    if step % ram.page_size:
        raise SystemExit(f"--split {split} does not divide RAM into whole pages")
    return [(i * (step + (1 << 30)), i * step, step) for i in range(max(1, split))]


class EventFollower(threading.Thread):
    """Waits for the session's end; on ``completed`` unregisters guest RAM at once.

    This is what a VMM must do: once the daemon is done it stops reading the uffd, so a
    fault after that (say, on a page the guest discarded) must be served by the kernel.
    UFFDIO_UNREGISTER also wakes any thread already waiting on the range.
    """

    def __init__(self, client: Client, session: str, ufd: int, ram: GuestRam,
                 timeout: float) -> None:
        super().__init__(daemon=True)
        self.client, self.session, self.ufd, self.ram, self.timeout = (
            client, session, ufd, ram, timeout)
        self.event: dict[str, object] = {"event": "failed", "reason": "no event"}

    def run(self) -> None:
        try:
            self.event = self.client.wait_finished(self.session, timeout=self.timeout)
        except Exception as e:  # the daemon is gone or timed out: the VM cannot go on
            self.event = {"event": "failed", "reason": str(e)}
        if self.event["event"] != "completed":
            # A failed migration: stop the VM now (never let the guest read wrong data).
            print(json.dumps({"role": "dest", "verified": False, "event": "failed",
                              "outcome": "crashed", "reason": self.event.get("reason")}),
                  flush=True)
            os._exit(3)
        uffd.unregister(self.ufd, self.ram.address, self.ram.size)
        os.close(self.ufd)


def _dest_regions(ram: GuestRam, ufd: int, args: argparse.Namespace) -> list[GuestRegion]:
    return [GuestRegion(gpa=gpa, addr=ram.address + off, size=size, uffd=ufd, mode=args.mode,
                        page_size=ram.page_size, fd=ram.fd, offset=off if ram.fd is not None else 0)
            for gpa, off, size in region_layout(ram, args.split)]


def _discard(ram: GuestRam, spec: str | None) -> set[int]:
    """Discard page ranges the way a VMM does (balloon): they must come back as zeros."""
    pages: set[int] = set()
    for first, count in _holes(spec):
        advice = MADV_DONTNEED if ram.fd is None else MADV_REMOVE
        madvise(ram.address + first * PAGE, count * PAGE, advice)  # releases the GIL
        pages.update(range(first, first + count))
    return pages


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1e6, 1)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uffdd.lab.pyvmm", description=__doc__)
    p.add_argument("role", choices=("source", "dest"))
    p.add_argument("--socket", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--token", required=True, help="hex")
    p.add_argument("--memory", type=parse_size, default=64 << 20)
    p.add_argument("--backing", choices=("anon", "shmem", "hugetlb"), default="shmem")
    p.add_argument("--mode", choices=("missing", "minor"), default="missing")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--order", choices=("seq", "rand"), default="rand")
    p.add_argument("--peer", default="")
    p.add_argument("--policy", choices=("crash", "poison"), default=None)
    p.add_argument("--holes", help="page ranges the source never writes (the destination "
                   "expects zeros), e.g. 10+5,100+1")
    p.add_argument("--discard", help="dest: page ranges discarded before touching")
    p.add_argument("--split", type=int, default=1,
                   help="describe RAM as N regions (gpa holes between)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--ready-file")
    p.add_argument("--resilient", action="store_true",
                   help="survive daemon restarts: reconnect and hand the session over again")
    args = p.parse_args(argv)
    return run_source(args) if args.role == "source" else run_dest(args)


if __name__ == "__main__":
    sys.exit(main())
