"""VMMs that misbehave on purpose, for tests/test_hostile_session.py (real processes).

``python -m tests.hostile_vmms lingering-dest ...``: imports guest RAM (a named shmem
memfd, MISSING mode, the daemon's default policy and deadline), starts one thread that
reads page 0 (it blocks in the kernel until the page is installed), reports its pid,
the thread's tid and the memfd's name in the ready file, then never reads its API
connection again and never exits on its own: whatever the daemon says, it lingers,
as a hung or careless VMM would. Only the crash policy's kill ends it.

``python -m tests.hostile_vmms watch-source ...``: exports guest RAM (pyvmm's pattern)
and prints every event but ``progress`` as one JSON line, until the session's final
event: what a source VMM hears.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import signal
import sys
import threading

from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address
from uffdd.client import Client, GuestRegion, MemoryRegion
from uffdd.lab.pyvmm import PAGE, GuestRam, fill

MEMFD_PREFIX = "hostile-guest-"


def _guest_ram(session: str, size: int) -> tuple[int, mmap.mmap, int]:
    fd = os.memfd_create(MEMFD_PREFIX + session, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    ram = mmap.mmap(fd, size, mmap.MAP_SHARED)
    return fd, ram, buffer_address(ram)


def _write_ready(path: str, info: dict[str, object]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, path)  # the test never reads half a file


def lingering_dest(args: argparse.Namespace) -> int:
    fd, ram, address = _guest_ram(args.session, args.memory)
    ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID)
    uffd.register(ufd, address, args.memory, uffd.REGISTER_MODE_MISSING)
    client = Client(args.socket)
    client.import_session(args.session, bytes.fromhex(args.token), peer=args.peer, regions=[
        GuestRegion(gpa=0, addr=address, size=args.memory, uffd=ufd, mode="missing",
                    page_size=PAGE, fd=fd, offset=0)], deadline=args.deadline)
    tids: list[int] = []
    started = threading.Event()

    def vcpu() -> None:
        tids.append(threading.get_native_id())
        started.set()
        buf = ctypes.create_string_buffer(PAGE)
        ctypes.memmove(buf, address, PAGE)  # blocks in handle_userfault; GIL released

    threading.Thread(target=vcpu, daemon=True).start()
    started.wait()
    _write_ready(args.ready_file, {"pid": os.getpid(), "tid": tids[0],
                                   "memfd": MEMFD_PREFIX + args.session})
    while True:  # linger: ignore every event, never exit on our own
        signal.pause()
    del client, ram


def watch_source(args: argparse.Namespace) -> int:
    ram = GuestRam.create(args.memory, "shmem")
    fill(ram, args.seed, [])  # pyvmm's pattern: a pyvmm destination verifies every page
    assert ram.fd is not None
    with Client(args.socket) as client:
        client.export_session(args.session, bytes.fromhex(args.token), [
            MemoryRegion(gpa=0, size=args.memory, page_size=PAGE, fd=ram.fd, offset=0)])
        _write_ready(args.ready_file, {"pid": os.getpid()})
        while True:
            event = client.next_event(timeout=args.timeout)
            if event is None:
                print(json.dumps({"event": "none", "reason": "no event in time"}), flush=True)
                return 2
            if event.get("event") == "progress":
                continue
            print(json.dumps(event, default=repr), flush=True)
            if event.get("event") in ("completed", "failed", "cancelled"):
                return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hostile_vmms")
    p.add_argument("role", choices=("lingering-dest", "watch-source"))
    p.add_argument("--socket", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--token", required=True, help="hex")
    p.add_argument("--peer", default="")
    p.add_argument("--memory", type=int, default=16 << 20)
    p.add_argument("--ready-file", required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline", type=float, default=None,
                   help="the import's deadline (default: the daemon's)")
    args = p.parse_args(argv)
    return lingering_dest(args) if args.role == "lingering-dest" else watch_source(args)


if __name__ == "__main__":
    sys.exit(main())
