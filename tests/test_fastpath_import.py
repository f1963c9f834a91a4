"""The destination's C fault loop (native/fastpath/import.c) against the Python one.

The same stream of demand-lane frames, hostile ones included, goes into a FaultLoop
running the C loop and into one running the Python loop, each over a real socket and
a real userfaultfd registered on memory of this process that nothing here touches
(the ioctls install into it; reading it would fault). Both must end with the same
page states and the same verdict (the session's failure and its reason, or none),
and every page marked installed must really be present (pagemap). Both run through
``FaultLoop.run``; tests/test_engine_diff.py drives them over faults, discards, bulk
and deadlines too, and compares their counters and metrics.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import socket
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import fastpath_lib
from uffdd import protocol
from uffdd._linux import uffd
from uffdd.importer import fastimport, pagestate
from uffdd.importer.faultloop import FaultLoop, ImportRegion
from uffdd.importer.pagestate import PageMap
from uffdd.metrics import SessionMetrics

PS = 4096
SIZES = (64, 16)  # pages per region
_IDS = itertools.count()

pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("no_leaked_fds")]




class Guest:
    """Two anonymous regions registered MISSING on one uffd; never touched here."""

    def __init__(self) -> None:
        self.fd = uffd.new_uffd(uffd.FEATURE_THREAD_ID)
        self.maps = [mmap.mmap(-1, n * PS) for n in SIZES]
        self.addrs = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self.maps]
        for addr, n in zip(self.addrs, SIZES, strict=True):
            uffd.register(self.fd, addr, n * PS, uffd.REGISTER_MODE_MISSING)

    def present(self, region: int) -> list[bool]:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            data = os.pread(f.fileno(), SIZES[region] * 8, self.addrs[region] // PS * 8)
        return [bool(data[i * 8 + 7] & 0x80) for i in range(SIZES[region])]

    def close(self) -> None:
        os.close(self.fd)  # unregisters everything
        for m in self.maps:
            m.close()


def _loop(guest: Guest) -> FaultLoop:
    regions = [ImportRegion(i, i << 32, guest.addrs[i], n * PS, PS, guest.fd, "missing")
               for i, n in enumerate(SIZES)]
    return FaultLoop(regions, PageMap(list(SIZES)), notify=lambda kind, data: None,
                     metrics=SessionMetrics(f"fast-{next(_IDS)}", "import"),
                     deadline=30.0, policy="poison", integrity=True)


Result = tuple[list[bytes], str | None, list[list[bool]], tuple[int, ...]]


def _run(stream: bytes, fast: bool) -> Result:
    """Feed ``stream`` to a demand lane of a loop running ``run()`` in its thread; return
    (page states, the failure's reason or None, pages present, counters)."""
    guest = Guest()
    loop = _loop(guest)
    loop.fastpath = fastpath_lib() if fast else None
    events: list[tuple[str, object]] = []
    loop.notify = lambda kind, data: events.append((kind, data))
    a, b = socket.socketpair()
    # The whole stream is queued before the loop runs, so both engines find the same
    # bytes at their first read: how much each has received when a bad frame ends the
    # lane (bytes_demand) must not depend on how the stream happened to arrive.
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(1 << 20, 2 * len(stream)))
    b.sendall(stream)
    b.shutdown(socket.SHUT_WR)
    thread = threading.Thread(target=loop.run)
    loop.attach_demand_threadsafe(a)  # the loop owns it from here
    thread.start()
    try:
        give_up = time.monotonic() + 20
        while not any(kind in ("link-lost", "failed") for kind, _ in events):
            assert time.monotonic() < give_up, "the demand lane never ended"
            time.sleep(0.001)
    finally:
        loop.stop_threadsafe()
        thread.join(20)
        b.close()
    assert not thread.is_alive()
    failed = [str(data) for kind, data in events if kind == "failed"]
    states = [bytes(row) for row in loop.pages.states]
    present = [guest.present(i) for i in range(len(SIZES))]
    guest.close()
    loop.metrics.close()
    c = loop.counters
    counters = (c.pages_demand, c.pages_background, c.pages_zero, c.faults, c.bytes_demand,
                loop.pages.installed, loop.pages.done)
    return states, (failed[0] if failed else None), present, counters


def _frame(kind: str, r: int, p: int, n: int, fill: int, crc_ok: bool) -> bytes:
    if kind == "zero":
        return protocol.pack_peer({"t": "zero", "r": r, "p": p, "n": n})
    if kind == "bogus":
        return protocol.pack_peer({"t": "data", "r": r, "p": p, "n": n, "zr": [[0, 1]]})
    payload = bytes([fill]) * (max(n, 0) * PS)
    crc = zlib.crc32(payload) ^ (0 if crc_ok else 1)
    return protocol.pack_peer({"t": "data", "r": r, "p": p, "n": n, "len": len(payload),
                               "crc": crc}) + payload


frames = st.lists(st.builds(
    _frame, st.sampled_from(["data", "data", "zero", "bogus"]), st.integers(0, 2),
    st.integers(0, 70), st.integers(0, 4), st.integers(1, 255),
    st.sampled_from([True, True, True, False])), max_size=8)
junk = st.one_of(st.just(b""), st.binary(max_size=12),
                 st.just(b"\x00\x00\x00\x00"), st.just(b"\xff\xff\xff\xff\x80"))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(frames, junk)
def test_c_and_python_loops_agree(stream: list[bytes], tail: bytes) -> None:
    data = b"".join(stream) + tail
    c_states, c_error, c_present, c_counters = _run(data, fast=True)
    py_states, py_error, _, py_counters = _run(data, fast=False)
    assert (c_states, c_error, c_counters) == (py_states, py_error, py_counters)
    for row, present in zip(c_states, c_present, strict=True):
        for state, here in zip(row, present, strict=True):
            if state == pagestate.INSTALLED:
                assert here, "a page marked installed is not present"
            elif state == pagestate.ABSENT:
                assert not here, "a page the loop never installed is present"


def test_demand_replies_install_and_account() -> None:
    """Two plain data frames and a zero frame: installed, counted, folded into totals."""
    stream = (_frame("data", 0, 3, 2, 7, True) + _frame("zero", 1, 0, 4, 0, True)
              + _frame("data", 1, 15, 1, 9, True))
    states, error, present, _ = _run(stream, fast=True)
    assert error is None
    assert [i for i, s in enumerate(states[0]) if s == pagestate.INSTALLED] == [3, 4]
    assert [i for i, s in enumerate(states[1]) if s == pagestate.INSTALLED] == [0, 1, 2, 3, 15]
    assert present[0][3] and present[0][4] and not present[0][5]


def test_io_mirror_matches_c() -> None:
    lib = fastpath_lib()
    fastimport._declare(lib)
    assert lib.fp_imp_io_size() == ctypes.sizeof(fastimport.ImportIo)



