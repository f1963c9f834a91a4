"""The events a VMM hears, and the counters both roles report, against two real daemons.

The test process is both VMMs here: it exports a memfd filled with a pattern through
the source daemon, and imports it through the destination daemon with a userfaultfd of
its own that nobody touches, so every page arrives by the background stream (and, in
the poison case, two of them never do). What it checks is the README's contract:

* each subscriber gets each event once, and one terminal event, last, with nothing
  after it, even when it subscribes again on the connection that created the session;
* a late ``subscribe`` to an ended session replays the very same terminal event;
* ``cancel`` ends a session with a ``cancelled`` event, not ``failed``, and no
  ``progress`` comes after the reply to the ``cancel``;
* at ``completed`` the source's counters are the destination's, poisoned pages and
  their gpas included, in the events and in ``status``;
* an export's status says which daemon imports it and that the link is up.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
from typing import Any

import pytest

from tests.conftest import Pair
from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address
from uffdd.client import Client, GuestRegion, MemoryRegion
from uffdd.lab.pyvmm import PAGE

MIB = 1 << 20
TERMINAL = ("completed", "failed", "cancelled")
COUNTERS = ("pages_total", "pages_installed", "pages_demand", "pages_background",
            "pages_zero", "pages_poisoned", "poisoned")
_WAIT = 120.0


class Source:
    """A memfd with a pattern (and some zero pages), exported through ``socket``."""

    def __init__(self, socket: str, session: str, token: bytes, size: int) -> None:
        self.fd = os.memfd_create("events-src", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        with mmap.mmap(self.fd, size, mmap.MAP_SHARED) as ram:
            for page in range(size // PAGE):
                if page % 7:  # every 7th page stays zero: zero markers and bulk holes
                    ram[page * PAGE : page * PAGE + 8] = page.to_bytes(8, "little")
        self.client = Client(socket)
        self.client.export_session(session, token, [
            MemoryRegion(gpa=0, size=size, page_size=PAGE, fd=self.fd, offset=0)])

    def close(self) -> None:
        self.client.close()
        os.close(self.fd)


class Dest:
    """Guest RAM registered with a userfaultfd; the test process never touches it."""

    def __init__(self, socket: str, size: int, *, poison: bool = False) -> None:
        self.size = size
        self.ram = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = buffer_address(self.ram)
        features = uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID
        if poison:
            features |= uffd.FEATURE_POISON
        self.ufd = uffd.new_uffd(features)
        uffd.register(self.ufd, self.addr, size, uffd.REGISTER_MODE_MISSING)
        self.client = Client(socket)

    def start(self, session: str, token: bytes, peer: str, **kw: Any) -> int:
        return self.client.import_session(session, token, peer=peer, regions=[
            GuestRegion(gpa=0, addr=self.addr, size=self.size, uffd=self.ufd, mode="missing",
                        page_size=PAGE)], **kw)

    def close(self) -> None:
        self.client.close()
        os.close(self.ufd)
        self.ram.close()


def events_until_quiet(client: Client, session: str, *, quiet: float = 1.5
                       ) -> list[dict[str, Any]]:
    """Every event of ``session`` until its terminal one, then whatever arrives within
    ``quiet`` seconds more (which must be nothing)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + _WAIT
    while not any(e["event"] in TERMINAL for e in events):
        event = client.next_event(max(0.0, deadline - time.monotonic()))
        assert event is not None, f"no terminal event in {_WAIT}s: {events[-3:]}"
        if event.get("session") == session:
            events.append(event)
    while (event := client.next_event(quiet)) is not None:
        if event.get("session") == session:
            events.append(event)
    return events


def one_terminal(events: list[dict[str, Any]]) -> dict[str, Any]:
    terminal = [e for e in events if e["event"] in TERMINAL]
    assert len(terminal) == 1, f"terminal events: {terminal}"
    assert events[-1] is terminal[0], f"events after the terminal one: {events[-3:]}"
    return terminal[0]


def status_of(socket: str, session: str) -> dict[str, Any]:
    with Client(socket) as c:
        (entry,) = c.status(session)
        return entry


def ids() -> tuple[str, bytes]:
    return f"ev-{secrets.token_hex(3)}", secrets.token_bytes(16)


@pytest.mark.parametrize("pair", ["c", "python"], indirect=True)
def test_events_once_terminal_last_replayed_whole_and_roles_agree(pair: Pair) -> None:
    session, token = ids()
    src = Source(pair.src.api_socket, session, token, 8 * MIB)
    dst = Dest(pair.dst.api_socket, 8 * MIB)
    try:
        dst.start(session, token, pair.src.peer)
        dst.client.subscribe(session)  # the creator is subscribed already: still once
        dst.client.subscribe(session)
        events = events_until_quiet(dst.client, session)
        final = one_terminal(events)
        assert final["event"] == "completed" and final["outcome"] == "completed", final
        assert final["pages_installed"] == final["pages_total"] == 2048, final
        assert final["pages_poisoned"] == 0 and final["poisoned"] == [], final
        progress = [e for e in events if e["event"] == "progress"]
        installed = [e["pages_installed"] for e in progress]
        assert installed == sorted(installed), f"progress went backwards: {installed}"

        source_events = events_until_quiet(src.client, session)
        source_final = one_terminal(source_events)
        assert source_final["event"] == "completed", source_final
        for key in ("pages_total", "pages_installed", "pages_poisoned", "poisoned"):
            assert source_final[key] == final[key], (key, source_final, final)

        with Client(pair.dst.api_socket) as late:  # a late subscriber: the same event
            late.subscribe(session)
            assert one_terminal(events_until_quiet(late, session)) == final
        with Client(pair.src.api_socket) as late:
            late.subscribe(session)
            assert one_terminal(events_until_quiet(late, session)) == source_final

        imp, exp = status_of(pair.dst.api_socket, session), status_of(pair.src.api_socket,
                                                                       session)
        for key in COUNTERS:
            assert imp[key] == exp[key], (key, imp, exp)
        assert imp["pages_zero"] == 2048 // 7 + 1, imp  # pages 0, 7, 14, ...: all zero
        assert imp["pages_demand"] + imp["pages_background"] == imp["pages_installed"], imp
        assert exp["peer"] and exp["peer"] != "", exp  # the importing daemon's address
        assert "strategy" not in exp and "policy" not in exp, exp
        assert imp["strategy"] and imp["policy"] == "crash", imp
    finally:
        dst.close()
        src.close()


def test_cancel_is_its_own_outcome_and_nothing_follows(pair: Pair) -> None:
    session, token = ids()
    dst = Dest(pair.dst.api_socket, 4 * MIB)
    try:
        dst.start(session, token, pair.src.peer)  # no export yet: it waits, connecting
        time.sleep(1.2)  # at least one progress event goes out before the cancel
        dst.client.cancel(session)
        after = events_until_quiet(dst.client, session)
        final = one_terminal(after)
        assert final["event"] == "cancelled", after
        assert final["reason"], final
        assert final["pages_total"] == 1024 and final["pages_installed"] == 0, final
        # Events queued before the reply came first (the client kept them); none after.
        tail = after[after.index(final):]
        assert [e["event"] for e in tail] == ["cancelled"], tail
        assert status_of(pair.dst.api_socket, session)["state"] == "cancelled"
        with Client(pair.dst.api_socket) as late:
            late.subscribe(session)
            assert one_terminal(events_until_quiet(late, session)) == final
    finally:
        dst.close()


def test_poisoned_pages_named_by_gpa_on_both_roles(pair: Pair) -> None:
    session, token = ids()
    src = Source(pair.src.api_socket, session, token, 4 * MIB)
    dst = Dest(pair.dst.api_socket, 4 * MIB, poison=True)
    try:
        src.client.request({"op": "inject", "session": session, "lose": [5, 6, 300]})
        dst.start(session, token, pair.src.peer, policy="poison")
        final = one_terminal(events_until_quiet(dst.client, session))
        assert final["event"] == "completed", final
        assert final["outcome"] == "completed-with-poisoned-pages", final
        assert final["pages_poisoned"] == 3, final
        assert final["poisoned"] == [[5 * PAGE, 2 * PAGE], [300 * PAGE, PAGE]], final
        source_final = one_terminal(events_until_quiet(src.client, session))
        assert source_final["outcome"] == "completed-with-poisoned-pages", source_final
        assert source_final["poisoned"] == final["poisoned"], source_final
        assert source_final["pages_poisoned"] == 3, source_final
        exp = status_of(pair.src.api_socket, session)
        imp = status_of(pair.dst.api_socket, session)
        assert exp["poisoned"] == imp["poisoned"] == final["poisoned"], (exp, imp)
    finally:
        dst.close()
        src.close()
