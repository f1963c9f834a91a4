"""Destination VMMs for tests/test_zero_copy.py (MINOR mode, shmem memfd): real processes.

    dest-write     threads read every page in random order (demand faults racing the
                   bulk stream), compare it with the source's pattern and at once
                   overwrite it with the guest's own bytes; after the session completed,
                   every page must still hold what the guest wrote (a bulk copy landing
                   after CONTINUE would show as the source's pattern)
    dest-shrink    import, then ftruncate the memfd to a quarter once the file
                   ``--shrink-when`` exists (the test makes it once zero-copy bulk
                   receive is under way), and report the session's end

Prints one JSON line. Run as ``python tests/vmm_zero_copy.py CMD --socket ...``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

from uffdd._linux import uffd
from uffdd.client import Client, GuestRegion
from uffdd.lab import pyvmm

PAGE = 4096


def _guest_bytes(page: int) -> bytes:
    """What the guest writes into ``page`` (never the source's pattern, never zeros)."""
    return (b"guest-%09d-" % page) * (PAGE // 16)  # 16 bytes a time


def _import(args: argparse.Namespace, client: Client) -> pyvmm.GuestRam:
    ram = pyvmm.GuestRam.create(args.memory, "shmem")
    ufd = uffd.new_uffd(pyvmm.dest_features("shmem", "minor", None))
    uffd.register(ufd, ram.address, ram.size,
                  uffd.REGISTER_MODE_MISSING | uffd.REGISTER_MODE_MINOR)
    region = GuestRegion(gpa=0, addr=ram.address, size=ram.size, uffd=ufd, mode="minor",
                         page_size=PAGE, fd=ram.fd, offset=0)
    client.import_session(args.session, bytes.fromhex(args.token), peer=args.peer,
                          regions=[region])
    args.ufd = ufd
    return ram


def dest_write(args: argparse.Namespace) -> int:
    with Client(args.socket) as client:
        ram = _import(args, client)
        follower = pyvmm.EventFollower(client, args.session, args.ufd, ram, args.timeout)
        follower.start()
        pages = list(range(ram.size // PAGE))
        bad: list[int] = []
        lock = threading.Lock()

        def touch(mine: list[int], index: int) -> None:
            random.Random(args.seed * 1000 + index).shuffle(mine)
            buf = ctypes.create_string_buffer(PAGE)
            wrong = []
            for page in mine:
                at = ram.address + page * PAGE
                ctypes.memmove(buf, at, PAGE)  # may fault: the GIL is released
                if buf.raw != pyvmm.page_pattern(args.seed, page):
                    wrong.append(page)
                ctypes.memmove(at, _guest_bytes(page), PAGE)  # the guest's own write
            with lock:
                bad.extend(wrong)

        workers = [threading.Thread(target=touch, args=(pages[i :: args.threads], i))
                   for i in range(args.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        follower.join()
    # The session completed (else the follower exited the process): nothing may have
    # written guest RAM since the guest did.
    lost = [p for p in pages
            if ram.map[p * PAGE : (p + 1) * PAGE] != _guest_bytes(p)]
    print(json.dumps({"event": follower.event["event"], "read_mismatches": len(bad),
                      "first_read_mismatches": sorted(bad)[:5], "writes_lost": len(lost),
                      "first_writes_lost": lost[:5]}), flush=True)
    return 0


def dest_shrink(args: argparse.Namespace) -> int:
    with Client(args.socket) as client:
        ram = _import(args, client)
        flag = Path(args.shrink_when)
        give_up = time.monotonic() + args.timeout
        while not flag.exists() and time.monotonic() < give_up:
            time.sleep(0.01)
        assert ram.fd is not None
        os.ftruncate(ram.fd, ram.size // 4)  # guest RAM is never touched after this
        event = client.wait_finished(args.session, timeout=args.timeout)
    print(json.dumps({"event": event["event"], "reason": event.get("reason"),
                      "flag_seen": flag.exists()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("cmd", choices=("dest-write", "dest-shrink"))
    p.add_argument("--socket", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--memory", type=pyvmm.parse_size, default=16 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--shrink-when", default="")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    return {"dest-write": dest_write, "dest-shrink": dest_shrink}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
