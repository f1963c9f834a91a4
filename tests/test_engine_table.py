"""The outstanding-request table behind ``engine.ImportEngine``: the Python engine's
dicts and the C engine's hash table (import.c), driven call for call, must agree.

Pure table logic: no uffd, no ioctl. The calls are the ones FaultLoop makes of an
engine outside ``run()`` and ``install()`` (which need a real destination:
tests/test_engine_diff.py drives those): faults, requests, installs made by FaultLoop's
slow paths, discards and poisonings (``forget``), a lost link and a new one
(``set_demand``: every outstanding page asked for again), and the deadline scan
(``expired``). Each step keeps FaultLoop's preconditions (a fault or a request only on a
page not done; ``installed`` only on pages not done; ``forget`` only once the pages are
done: a REQUESTED page the table forgot is a state FaultLoop never makes, and there the
engines differ: C's fault notes it as asked at time 0). Compared after every step: page
states and totals, the table (``outstanding``, ``asked``, ``expired``), the counters and
the fault-resolution histograms' observation counts per series; at the end, the
requests a new lane gets.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import fastpath_lib
from tests.test_engine_diff import _delta, _metrics
from uffdd import protocol
from uffdd.importer import pagestate
from uffdd.importer.cengine import CEngine
from uffdd.importer.engine import Counters, ImportEngine, ImportRegion, PyEngine
from uffdd.importer.pagestate import PageMap
from uffdd.metrics import SessionMetrics

pytestmark = pytest.mark.usefixtures("no_leaked_fds")

PS = 4096
SIZES = (16, 8)
_IDS = itertools.count()
_T0 = time.monotonic() - 100.0  # every asked/seen time is in the past (waits > 0)




class Side:
    """One engine with its own page map, counters and metrics."""

    def __init__(self, fast: bool) -> None:
        self.session = f"table-{next(_IDS)}"
        self.pages = PageMap(list(SIZES))
        self.counters = Counters()
        self.metrics = SessionMetrics(self.session, "import")
        self.ep = select.epoll()
        self.wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.rx = bytearray(1 << 16)
        # Only this side's own calls move these: the resolution histograms are
        # daemon-wide, so each step's delta is taken around that step alone.
        self.moved: dict[Any, float] = {}
        # Addresses and a uffd number that are never used: no call here reaches the kernel.
        regions = [ImportRegion(i, i << 32, (i + 1) << 32, n * PS, PS, -1, "missing")
                   for i, n in enumerate(SIZES)]
        self.engine: ImportEngine
        if fast:
            self.engine = CEngine(fastpath_lib(), self.ep.fileno(), self.wakefd, regions,
                                  self.pages, self.rx, True, 0.0, self.counters,
                                  self.metrics, lambda _p, _a: None)
        else:
            self.engine = PyEngine(self.pages, self.counters, self.metrics, self.ep,
                                   self.wakefd, set())

    def state(self) -> dict[str, Any]:
        e = self.engine
        keys = [(r, p) for r, n in enumerate(SIZES) for p in range(n)]
        return {
            "states": [bytes(row) for row in self.pages.states],
            "totals": (self.pages.done, self.pages.installed, self.pages.poisoned,
                       self.pages.discarded),
            "outstanding": e.outstanding(),
            "asked": {k: e.asked(*k) for k in keys if e.asked(*k) is not None},
            "expired": sorted(e.expired(_T0 + 50.0)),
            "counters": (self.counters.pages_demand, len(self.counters.latencies_us)),
            "metrics": {k: v for k, v in sorted(self.moved.items()) if v},
        }

    def step(self, op: tuple[Any, ...]) -> None:
        before = _metrics(self.session)
        _step(self, op)
        for k, v in _delta(before, _metrics(self.session)).items():
            self.moved[k] = self.moved.get(k, 0.0) + v

    def close(self) -> None:
        self.engine.close()
        self.metrics.close()
        self.ep.close()
        os.close(self.wakefd)


def _undone(side: Side, r: int, p: int, n: int) -> bool:
    return all(side.pages.get(r, q) <= pagestate.REQUESTED for q in range(p, p + n))


def _step(side: Side, op: tuple[Any, ...]) -> None:
    """One FaultLoop call, if its precondition holds on this side (both sides hold the
    same states whenever they agree, so they skip the same steps)."""
    kind, r, p, n, t, tid, demand = op
    p = min(p, SIZES[r] - 1)
    n = min(n, SIZES[r] - p)
    e = side.engine
    if kind == "fault" and _undone(side, r, p, 1):
        e.fault(r, p, tid, _T0 + t)
    elif kind == "request" and _undone(side, r, p, 1):
        e.request(r, p, _T0 + t)
    elif kind == "installed" and _undone(side, r, p, n):
        e.installed(r, p, n, demand)
    elif kind == "discard":  # FaultLoop._discard: the states, then the table
        for q in range(p, p + n):
            side.pages.set(r, q, pagestate.DISCARDED)
        e.forget(r, p, n)
    elif kind == "poison" and _undone(side, r, p, 1):  # FaultLoop._poison
        side.pages.set(r, p, pagestate.POISONED)
        e.forget(r, p, 1)
    elif kind == "give-up":  # FaultLoop._give_up_remaining: every page left poisoned
        for row, size in enumerate(SIZES):
            side.pages.set_undone(row, 0, size, pagestate.POISONED)
        e.forget(0, 0, 0)


ops = st.lists(st.tuples(
    st.sampled_from(["fault", "fault", "fault", "request", "installed", "installed",
                     "discard", "poison", "give-up"]),
    # few pages: the steps meet on the same ones often
    st.integers(0, len(SIZES) - 1), st.integers(0, 5), st.integers(1, 3),
    st.integers(0, 99), st.integers(1, 3), st.booleans()), max_size=30)


def _requests(side: Side) -> list[tuple[int, int, int]]:
    """The requests a new demand lane gets: every outstanding page, once."""
    a, b = socket.socketpair()
    try:
        side.engine.set_demand(a)
        unsent = side.engine.outbox()
        side.engine.set_demand(None)
    finally:
        a.close()
        b.close()
    out, pos = [], 0
    while pos < len(unsent):
        (hlen,) = protocol.LENGTH.unpack_from(unsent, pos)
        header = protocol.unpack_peer_header(memoryview(unsent)[pos + 4 : pos + 4 + hlen])
        assert header.get("t") == "req", header
        out.append((protocol.peer_int(header, "r"), protocol.peer_int(header, "p"),
                    protocol.peer_int(header, "n")))
        pos += 4 + hlen
    return sorted(out)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_the_engines_tables_agree(script: list[tuple[Any, ...]]) -> None:
    c, py = Side(fast=True), Side(fast=False)
    try:
        for i, op in enumerate(script):
            c.step(op)
            py.step(op)
            assert c.state() == py.state(), f"after step {i}: {op}"
        requests = _requests(py)
        assert _requests(c) == requests
        assert requests == sorted((r, p, 1) for r, p in py.state()["asked"])
    finally:
        c.close()
        py.close()


def test_a_table_with_waiters_resolves_them_once() -> None:
    """Two threads on one page, then its install: one request, two latency samples
    (the first "demand", the second "inflight"); a page asked again after a forget is
    asked anew."""
    for fast in (True, False):
        side = Side(fast)
        try:
            e = side.engine
            e.fault(0, 3, 1, _T0 + 1)
            e.fault(0, 3, 2, _T0 + 2)
            assert (e.outstanding(), e.asked(0, 3)) == (1, _T0 + 1)
            assert side.pages.get(0, 3) == pagestate.REQUESTED
            side.step(("installed", 0, 3, 1, 0, 0, True))
            assert (e.outstanding(), e.asked(0, 3)) == (0, None)
            assert side.pages.get(0, 3) == pagestate.INSTALLED
            got = side.state()
            assert got["counters"] == (1, 2)
            counts = {dict(k[1]).get("resolved_by"): v for k, v in got["metrics"].items()
                      if k[0] == "uffdd_fault_resolution_seconds_count"}
            assert counts == {"demand": 1, "inflight": 1}, got["metrics"]
            e.request(1, 5, _T0 + 3)
            e.forget(1, 0, 8)
            assert e.outstanding() == 0
            e.request(1, 5, _T0 + 4)
            assert e.asked(1, 5) == _T0 + 4
        finally:
            side.close()


