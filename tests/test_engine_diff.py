"""The import side's two engines, the C fault loop and the Python one, driven call for
call through ``FaultLoop.run`` over one script, must end the same.

Each run is a real destination: a VMM child process (this module, ``python -m
tests.test_engine_diff vmm FD``) maps guest RAM (an anonymous region and a memfd one),
writes a few pages before registering them MISSING (present in the kernel, absent to
the daemon: the partially present runs), hands its userfaultfd over with SCM_RIGHTS and
then touches or discards pages when told. It touches from the kernel (a pwrite from
guest RAM into a scratch memfd) so that a poisoned page is an EFAULT, not a SIGBUS.
This process plays the daemon (a FaultLoop in its own thread; it never touches guest
RAM) and the source (it answers the demand lane's requests by hand, and feeds bulk
frames through ``receive_bulk_data`` and ``bulk_put`` as the bulk receivers do).

The script covers demand faults (two waiters on one page), zero answers, demand runs
and bulk chunks over pages already present, discards (MADV_DONTNEED ->
UFFD_EVENT_REMOVE) of installed and absent pages and a fault on a discarded one, bulk
slices, a "lost" answer and pages left unanswered past the deadline (a fault and a
vCPU exit). It compares what each engine ends with: page states and totals, the
verdicts (session events, vCPU-exit outcomes, what each touch read or its errno), the
requests the source saw, the counters, the Prometheus series the loop moves and the
fault-resolution histograms' observation counts per series (which bucket each
observation falls in is a measured time: not compared).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.conftest import fastpath_lib, require
from uffdd import protocol
from uffdd._linux import uffd
from uffdd._linux.mem import Mapping, buffer_address, madvise
from uffdd.errors import KernelError
from uffdd.importer import pagestate
from uffdd.importer.faultloop import FaultLoop, ImportRegion
from uffdd.importer.pagestate import PageMap
from uffdd.metrics import SessionMetrics
from uffdd.peer import FrameSocket, PayloadNative

pytestmark = pytest.mark.usefixtures("no_leaked_fds")

PS = 4096
# Region 0: anonymous (4 MiB: a bulk chunk goes in several slices); 1: a memfd, MISSING
# mode (UFFDIO_COPY, ZEROPAGE); 2: a memfd, MINOR mode (alias write + UFFDIO_CONTINUE).
SIZES = (1024, 64, 64)
MODES = ("missing", "missing", "minor")
# Written by the VMM before it registers: present in the kernel, absent to the daemon.
PRESENT = {0: (100, 103, 600, 601, 900), 1: (5,), 2: (11, 33)}
MADV_DONTNEED = 4
ROOT = Path(__file__).resolve().parent.parent
_WAIT = 20.0  # the longest any one step may take (a bound, never a measured result)
_IDS = itertools.count()


# ------------------------------------------------------------------ the VMM child


def _vmm(fd: int) -> int:
    ctl = socket.socket(fileno=fd)
    anon = mmap.mmap(-1, SIZES[0] * PS, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memfds = [os.memfd_create("guest-ram", os.MFD_CLOEXEC) for _ in SIZES[1:]]
    for fd, n in zip(memfds, SIZES[1:], strict=True):
        os.ftruncate(fd, n * PS)
    maps = [anon, *(mmap.mmap(fd, n * PS, mmap.MAP_SHARED)
                    for fd, n in zip(memfds, SIZES[1:], strict=True))]
    addrs = [buffer_address(m) for m in maps]
    for r, pages in PRESENT.items():
        for p in pages:
            maps[r][p * PS : (p + 1) * PS] = bytes([0xEE]) * PS
    ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID
                        | uffd.FEATURE_POISON | uffd.FEATURE_MINOR_SHMEM)
    for addr, n, mode in zip(addrs, SIZES, MODES, strict=True):
        minor = uffd.REGISTER_MODE_MINOR if mode == "minor" else 0
        uffd.register(ufd, addr, n * PS, uffd.REGISTER_MODE_MISSING | minor)
    # The uffd, and the MINOR region's memfd (the daemon fills it through an alias).
    socket.send_fds(ctl, [json.dumps({"addrs": addrs}).encode() + b"\n"], [ufd, memfds[1]])
    os.close(ufd)
    lock = threading.Lock()

    def reply(msg: dict[str, object]) -> None:
        with lock:
            ctl.sendall(json.dumps(msg).encode() + b"\n")

    def touch(tid: int, r: int, p: int) -> None:
        # The kernel reads the page (a fault it reports to the uffd, blocking this
        # thread); a poisoned page fails the pwrite with EFAULT instead of a SIGBUS.
        # One scratch file per touch: a write holds its file's lock while it faults.
        page = (ctypes.c_char * PS).from_address(addrs[r] + p * PS)
        sink = os.memfd_create("sink", os.MFD_CLOEXEC)
        try:
            os.pwrite(sink, memoryview(page).cast("B"), 0)
            reply({"id": tid, "crc": zlib.crc32(os.pread(sink, PS, 0))})
        except OSError as e:
            reply({"id": tid, "errno": e.errno})
        finally:
            os.close(sink)

    for line in ctl.makefile("r"):
        cmd = json.loads(line)
        if cmd["op"] == "touch":
            threading.Thread(target=touch, args=(cmd["id"], cmd["r"], cmd["p"]),
                             daemon=True).start()
        elif cmd["op"] == "discard":  # returns once the daemon read the REMOVE event
            madvise(addrs[cmd["r"]] + cmd["p"] * PS, cmd["n"] * PS, MADV_DONTNEED)
            reply({"id": cmd["id"], "discarded": True})
        else:
            break
    os._exit(0)


# ------------------------------------------------------------------ the daemon side




def _have_uffd() -> bool:
    try:
        os.close(uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID
                               | uffd.FEATURE_POISON | uffd.FEATURE_MINOR_SHMEM))
    except (OSError, KernelError):
        return False
    return True


def _fill(r: int, p: int) -> int:
    """The byte the source's copy of page (r, p) holds."""
    return 1 + (r * 131 + p) % 251


def _source_page(r: int, p: int) -> bytes:
    return bytes([_fill(r, p)]) * PS


class Rig:
    """One destination: the VMM child, a FaultLoop running in its thread, the source."""

    def __init__(self, fast: bool) -> None:
        self.fast = fast
        lib = fastpath_lib() if fast else None
        ctl, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_engine_diff", "vmm", str(child.fileno())],
            pass_fds=[child.fileno()], cwd=ROOT)
        child.close()
        self.ctl = ctl
        ctl.settimeout(_WAIT)
        msg, fds, _flags, _addr = socket.recv_fds(ctl, 4096, 2)
        if len(fds) != 2:  # it could not make one (a capability), or it broke (a bug)
            self.proc.wait(_WAIT)
            require(_have_uffd(), "userfaultfd is not available to this user")
            pytest.fail(f"the VMM child sent no userfaultfd (exit {self.proc.returncode})")
        self.uffd, self.memfd = fds
        self._lines = msg.split(b"\n", 1)[1]
        addrs = json.loads(msg.split(b"\n", 1)[0])["addrs"]
        self.alias = Mapping(self.memfd, SIZES[2] * PS, writable=True)
        regions = [ImportRegion(i, i << 32, addrs[i], n * PS, PS, self.uffd, mode,
                                alias=self.alias if mode == "minor" else None)
                   for i, (n, mode) in enumerate(zip(SIZES, MODES, strict=True))]
        self.pages = PageMap(list(SIZES))
        self.events: list[tuple[str, object]] = []
        self.session = f"diff-{next(_IDS)}"
        self.loop = FaultLoop(regions, self.pages, notify=self._notify,
                              metrics=SessionMetrics(self.session, "import"),
                              deadline=60.0, policy="poison", integrity=True)
        self.loop.vmm_pid = self.proc.pid
        self.loop.fastpath = lib
        self.native = PayloadNative(lib) if lib is not None else None
        lane = self._new_source()
        self.requests: list[tuple[int, int, int]] = []
        self.outcomes: list[tuple[str, str]] = []
        self.touches: dict[int, dict[str, object]] = {}
        self._ids = itertools.count()
        self.before = _metrics(self.session)
        self.thread = threading.Thread(target=self.loop.run, name="fault-thread")
        self.loop.attach_demand_threadsafe(lane)  # the loop owns it from here
        self.thread.start()

    def _new_source(self) -> socket.socket:
        src, lane = socket.socketpair()
        self.src = FrameSocket(src)
        src.settimeout(_WAIT)
        return lane

    def reconnect(self) -> None:
        """The source drops the demand lane; once the loop saw it, a new lane."""
        self.src.close()
        _until("the loop sees the lane end", lambda: bool(self.events))
        self.loop.attach_demand_threadsafe(self._new_source())

    def _notify(self, kind: str, data: object) -> None:
        self.events.append((kind, data))

    # -- the VMM

    def _send(self, **cmd: object) -> int:
        tid = next(self._ids)
        self.ctl.sendall(json.dumps({"id": tid, **cmd}).encode() + b"\n")
        return tid

    def _reply(self, tid: int) -> dict[str, object]:
        while tid not in self.touches:
            while b"\n" not in self._lines:
                data = self.ctl.recv(65536)
                if not data:
                    pytest.fail("the VMM child went away")
                self._lines += data
            line, self._lines = self._lines.split(b"\n", 1)
            msg = json.loads(line)
            self.touches[msg.pop("id")] = msg
        return self.touches[tid]

    def touch(self, r: int, p: int) -> int:
        return self._send(op="touch", r=r, p=p)

    def touched(self, tid: int) -> dict[str, object]:
        return self._reply(tid)

    def discard(self, r: int, p: int, n: int) -> None:
        self._reply(self._send(op="discard", r=r, p=p, n=n))

    # -- the source

    def expect_request(self) -> tuple[int, int, int]:
        header = self.src.recv_header()
        assert header.get("t") == "req", header
        req = (protocol.peer_int(header, "r"), protocol.peer_int(header, "p"),
               protocol.peer_int(header, "n"))
        self.requests.append(req)
        return req

    def answer_data(self, r: int, p: int, n: int, corrupt: bool = False) -> None:
        payload = b"".join(_source_page(r, q) for q in range(p, p + n))
        self.src.send({"t": "data", "r": r, "p": p, "n": n, "len": len(payload),
                       "crc": zlib.crc32(payload) ^ int(corrupt)}, payload)

    def answer(self, header: dict[str, object]) -> None:
        self.src.send(header)

    def bulk(self, r: int, p: int, n: int, holes: list[tuple[int, int]]) -> None:
        """One bulk data frame through a real lane, received as a bulk receiver does."""
        skip = {p + off + i for off, k in holes for i in range(k)}
        payload = b"".join(_source_page(r, q) for q in range(p, p + n) if q not in skip)
        header = {"t": "data", "r": r, "p": p, "n": n, "len": len(payload),
                  "crc": zlib.crc32(payload), "zr": [list(h) for h in holes]}
        tx, rx = socket.socketpair()
        released = threading.Event()
        sender = threading.Thread(target=lambda: FrameSocket(tx).send(header, payload))
        sender.start()
        try:
            fs = FrameSocket(rx)
            got = fs.recv_header()
            buf = bytearray(n * PS)
            chunk = self.loop.receive_bulk_data(fs, got, buf, lambda _b: released.set(),
                                                self.native)
            self.loop.bulk_put(chunk)
            sender.join(_WAIT)
            assert released.wait(_WAIT), "the fault thread never finished the bulk chunk"
        finally:
            tx.close()
            rx.close()

    def bulk_frame(self, header: dict[str, object]) -> None:
        self.loop.bulk_put(header)

    def exit_for(self, r: int, p: int) -> None:
        """A vCPU exit asks for the page (KVM memory-fault exits)."""
        self.loop.request_page_threadsafe(r, p, lambda o, why: self.outcomes.append((o, why)))

    # -- the end

    def finish(self) -> dict[str, Any]:
        self.loop.stop_threadsafe()
        self.thread.join(_WAIT)
        assert not self.thread.is_alive(), "the fault thread did not stop"
        c = self.loop.counters
        return {
            "states": [bytes(row) for row in self.pages.states],
            "totals": (self.pages.done, self.pages.installed, self.pages.poisoned,
                       self.pages.discarded, self.pages.unmapped),
            "events": self.events,
            "outcomes": self.outcomes,
            "touches": self.touches,
            "requests": self.requests,
            "counters": {"demand": c.pages_demand, "background": c.pages_background,
                         "zero": c.pages_zero, "faults": c.faults,
                         "bytes_demand": c.bytes_demand, "wakes": c.wakes,
                         "latency_samples": len(c.latencies_us)},
            "metrics": _delta(self.before, _metrics(self.session)),
        }

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.stop_threadsafe()
            self.thread.join(_WAIT)
        self.alias.close()
        os.close(self.memfd)
        os.close(self.uffd)  # the child's blocked threads (if any) are let go
        with contextlib.suppress(OSError):
            self.ctl.sendall(b'{"op": "exit"}\n')
        try:
            self.proc.wait(_WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.ctl.close()
            self.src.close()
            self.loop.metrics.close()


# Timing values, not counts: never compared (which bucket an observation lands in is
# one too: only a histogram series' observation count is).
_TIMING = ("_sum", "_created", "blocked_seconds_total", "timestamp_seconds")


def _metrics(session: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every uffdd sample that counts something, daemon-wide or this session's."""
    out = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            if not s.name.startswith("uffdd_") or s.name.endswith(_TIMING):
                continue
            if s.name.endswith("_bucket") and s.labels.get("le") != "+Inf":
                continue
            labels = dict(s.labels)
            if labels.pop("session", session) != session:
                continue
            labels.pop("thread", None)
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def _delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items())
            if v != before.get(k, 0.0)}


def _until(what: str, pred: Callable[[], bool]) -> None:
    give_up = time.monotonic() + _WAIT
    while not pred():
        if time.monotonic() > give_up:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.002)


def _state(rig: Rig, r: int, p: int) -> int:
    return rig.pages.get(r, p)


def _ok(rig: Rig, tid: int, r: int, p: int) -> None:
    got = rig.touched(tid)
    assert got == {"crc": zlib.crc32(_source_page(r, p))}, (r, p, got)


ZERO_CRC = zlib.crc32(bytes(PS))


def script(rig: Rig) -> dict[str, Any]:
    """The one sequence of calls both engines get; each step waits for its effect."""
    # Two threads fault on one page: one request; one answer wakes both.
    t1 = rig.touch(0, 10)
    assert rig.expect_request() == (0, 10, 1)
    t2 = rig.touch(0, 10)
    _until("the second fault on page 10 is read", lambda: rig.loop.counters.faults >= 2)
    rig.answer_data(0, 10, 1)
    _ok(rig, t1, 0, 10)
    _ok(rig, t2, 0, 10)
    # A zero answer on the memfd region.
    t3 = rig.touch(1, 3)
    assert rig.expect_request() == (1, 3, 1)
    rig.answer({"t": "zero", "r": 1, "p": 3, "n": 1})
    assert rig.touched(t3) == {"crc": ZERO_CRC}
    # Demand answers whose run holds pages already present (partial UFFDIO_COPY and
    # UFFDIO_ZEROPAGE): the present pages keep what the VMM wrote.
    t4 = rig.touch(0, 101)
    assert rig.expect_request() == (0, 101, 1)
    rig.answer_data(0, 98, 8)  # 100 and 103 are present
    _ok(rig, t4, 0, 101)
    t5 = rig.touch(1, 6)
    assert rig.expect_request() == (1, 6, 1)
    rig.answer({"t": "zero", "r": 1, "p": 4, "n": 4})  # 5 is present
    assert rig.touched(t5) == {"crc": ZERO_CRC}
    # Discards: an installed page, then a fault there (it reads as zeros, not source
    # data); a range never filled.
    rig.discard(0, 10, 1)
    _until("page 10 is discarded", lambda: _state(rig, 0, 10) == pagestate.DISCARDED)
    t6 = rig.touch(0, 10)
    assert rig.touched(t6) == {"crc": ZERO_CRC}
    rig.discard(0, 200, 16)
    _until("pages 200..215 are discarded",
           lambda: all(_state(rig, 0, p) == pagestate.DISCARDED for p in range(200, 216)))
    # A corrupt answer is asked for again; a lane lost with a page outstanding: the page
    # is asked for again on the next lane.
    t = rig.touch(0, 50)
    assert rig.expect_request() == (0, 50, 1)
    rig.answer_data(0, 50, 1, corrupt=True)
    assert rig.expect_request() == (0, 50, 1)
    rig.answer_data(0, 50, 1)
    _ok(rig, t, 0, 50)
    t = rig.touch(0, 60)
    assert rig.expect_request() == (0, 60, 1)
    rig.reconnect()
    assert rig.expect_request() == (0, 60, 1)
    rig.answer_data(0, 60, 1)
    _ok(rig, t, 0, 60)
    # MINOR mode: a demand run over a present page (a partial UFFDIO_CONTINUE), then a
    # discard there: the page cache keeps the data, so the fault after it is a minor
    # one, CONTINUE'd with what the page holds.
    t = rig.touch(2, 12)
    assert rig.expect_request() == (2, 12, 1)
    rig.answer_data(2, 10, 4)  # 11 is present
    _ok(rig, t, 2, 12)
    rig.discard(2, 12, 1)
    _until("page 2/12 is discarded", lambda: _state(rig, 2, 12) == pagestate.DISCARDED)
    t = rig.touch(2, 12)
    _ok(rig, t, 2, 12)
    rig.bulk(2, 0, SIZES[2], [(50, 4)])
    # One bulk chunk over all of region 0, with holes, present, installed and discarded
    # pages inside: several slices in either engine.
    rig.bulk(0, 0, SIZES[0], [(300, 20), (1000, 24)])
    # A "lost" answer: the page is poisoned, the touch fails.
    t7 = rig.touch(1, 30)
    assert rig.expect_request() == (1, 30, 1)
    rig.answer({"t": "lost", "r": 1, "p": 30, "n": 1, "reason": "source cannot read it"})
    assert rig.touched(t7) == {"errno": errno.EFAULT}
    # Past the deadline: a faulting thread's page and a vCPU exit's page, never answered.
    t8 = rig.touch(1, 21)
    assert rig.expect_request() == (1, 21, 1)
    rig.exit_for(1, 20)
    assert rig.expect_request() == (1, 20, 1)
    rig.loop.deadline = 0.2  # read by the fault thread on its next check
    assert rig.touched(t8) == {"errno": errno.EFAULT}
    _until("the vCPU exit's verdict", lambda: bool(rig.outcomes))
    rig.loop.deadline = 60.0
    # The rest of region 1 in one bulk chunk: the session completes.
    rig.bulk(1, 0, SIZES[1], [(40, 8)])
    _until("the session completes", lambda: len(rig.events) == 2)
    return rig.finish()


def _drive(fast: bool, body: Callable[[Rig], dict[str, Any]] = script) -> dict[str, Any]:
    rig = Rig(fast)
    try:
        return body(rig)
    finally:
        rig.close()


def _differences(c: dict[str, Any], py: dict[str, Any]) -> list[str]:
    """What differs, one line each (for a dict, only its differing items)."""
    out = []
    for key in c:
        a, b = c[key], py[key]
        if a == b:
            continue
        if key == "states":
            for r, (ra, rb) in enumerate(zip(a, b, strict=True)):
                pages = [p for p in range(len(ra)) if ra[p] != rb[p]]
                out.append(f"states: region {r} pages {pages[:16]}: C "
                           f"{[ra[p] for p in pages[:16]]}, Python {[rb[p] for p in pages[:16]]}")
        elif isinstance(a, dict):
            for k in sorted(set(a) | set(b), key=repr):
                if a.get(k) != b.get(k):
                    out.append(f"{key}: {k}: C {a.get(k)}, Python {b.get(k)}")
        else:
            out.append(f"{key}: C {a}, Python {b}")
    return out


def test_engines_agree_call_for_call() -> None:
    c = _drive(fast=True)
    py = _drive(fast=False)
    assert c.keys() == py.keys()
    differences = _differences(c, py)
    assert not differences, "the engines differ:\n" + "\n".join(differences)
    # And what they agree on is right: the totals are the states' (C writes the state
    # bytes in place; PageMap.installed_in_place brings its totals along) ...
    every = b"".join(c["states"])
    done = sum(every.count(st) for st in (pagestate.INSTALLED, pagestate.POISONED,
                                          pagestate.DISCARDED, pagestate.UNMAPPED))
    assert c["totals"] == (done, every.count(pagestate.INSTALLED),
                           every.count(pagestate.POISONED), every.count(pagestate.DISCARDED),
                           every.count(pagestate.UNMAPPED))
    assert done == sum(SIZES)
    assert c["events"] == [("link-lost", "source closed the demand lane"), ("complete", None)]
    assert c["outcomes"] == [("poisoned", "source did not answer within the session deadline")]
    assert c["totals"][2] == 3  # 1,30 lost; 1,20 and 1,21 past the deadline


def _copies(metrics: dict[Any, float], method: str) -> float:
    return metrics.get(("uffdd_pages_installed_total", (("method", method),)), 0.0)


@pytest.mark.parametrize("fast", [True, False], ids=["c", "python"])
def test_partial_copy_counts_the_pages_installed(fast: bool) -> None:
    """A demand answer of 8 pages, 2 of them already present: 6 copies, 2 present,
    8 pages installed; a zero answer of 4 pages, 1 present: 3 zero pages."""

    def body(rig: Rig) -> dict[str, Any]:
        tid = rig.touch(0, 101)
        assert rig.expect_request() == (0, 101, 1)
        rig.answer_data(0, 98, 8)
        _ok(rig, tid, 0, 101)
        tid = rig.touch(1, 6)
        assert rig.expect_request() == (1, 6, 1)
        rig.answer({"t": "zero", "r": 1, "p": 4, "n": 4})
        assert rig.touched(tid) == {"crc": ZERO_CRC}
        return rig.finish()

    got = _drive(fast, body)
    assert _copies(got["metrics"], "copy") == 6
    assert _copies(got["metrics"], "zeropage") == 3
    assert got["counters"]["zero"] == 3
    assert got["counters"]["demand"] == 12  # every page of both runs is installed now
    assert got["totals"][1] == 12




if __name__ == "__main__" and sys.argv[1:2] == ["vmm"]:
    sys.exit(_vmm(int(sys.argv[2])))
