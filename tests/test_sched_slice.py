"""The demand threads' scheduler slice, as the kernel reports it (README, config
``peer.demand_slice_us``).

Two real daemons; the test process exports a memfd and imports it with a userfaultfd
that nobody touches, with the background stream off, so the session stays up with its
threads running. ``/proc/<daemon>/task/<tid>/sched`` then says which slice each thread
has: the destination's fault loop (``run``) and the source's demand lane have the short
one, every other thread (the bulk lanes, the Trio threads) the kernel's default; at
the shipped config (``demand_slice_us = 0``) nobody has a custom one.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from tests.test_events import Dest, Source
from uffdd._linux import sched
from uffdd.lab import harness

MIB = 1 << 20


def _default_slice_ns() -> int:
    sched.default_slice()
    return _slice_of("thread-self")


def _slice_of(task: str) -> int:
    for line in Path(f"/proc/{task}/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    raise AssertionError(f"no se.slice in /proc/{task}/sched (kernel without EEVDF?)")


def _threads(pid: int) -> dict[str, list[int]]:
    """Each thread name of process ``pid`` with the slices (ns) of the threads so named."""
    out: dict[str, list[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out.setdefault(name, []).append(_slice_of(f"{pid}/task/{tid}"))
        except FileNotFoundError:  # a thread that just ended
            continue
    return out


def _wait_for(pid: int, names: tuple[str, ...]) -> dict[str, list[int]]:
    deadline = time.monotonic() + 30
    while True:
        threads = _threads(pid)
        if all(n in threads for n in names) or time.monotonic() > deadline:
            return threads
        time.sleep(0.05)


@pytest.mark.parametrize("slice_us", [100, None])  # None: the shipped default
def test_demand_threads_have_the_configured_slice(tmp_path: Path, slice_us: int | None
                                                  ) -> None:
    default = _default_slice_ns()
    assert default != 100_000, "the kernel's default slice is the one under test"
    config = "[peer]\nbackground = false\n"
    if slice_us is not None:
        config += f"demand_slice_us = {slice_us}\n"
    src = harness.start_daemon(tmp_path, "source", config=config)
    dst = harness.start_daemon(tmp_path, "destination", config=config)
    session, token = f"sl-{secrets.token_hex(3)}", secrets.token_bytes(16)
    source = Source(src.api_socket, session, token, 4 * MIB)
    dest = Dest(dst.api_socket, 4 * MIB)
    try:
        dest.start(session, token, f"127.0.0.1:{src.peer_port}")
        fault_loop = _wait_for(dst.proc.pid, ("run", "receive_bulk"))
        demand_lane = _wait_for(src.proc.pid, ("demand_lane", "serve_bulk"))
    finally:
        dest.close()
        source.close()
        codes = (src.stop(), dst.stop())
    assert codes == (0, 0)
    want = slice_us * 1000 if slice_us else default
    assert fault_loop.get("run") == [want], fault_loop
    assert demand_lane.get("demand_lane") == [want], demand_lane
    # the bulk threads and everything else keep the kernel's default
    for threads in (fault_loop, demand_lane):
        others = [s for name, slices in threads.items() if name not in ("run", "demand_lane")
                  for s in slices]
        assert others and set(others) == {default}, threads
