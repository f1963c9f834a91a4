"""Failure policies with real daemons, real userfaultfd and the native VMM stand-in.

``crash``: the source daemon is killed for good mid-migration; the destination VMM gets
``failed`` and, if it lingers, the destination daemon kills it after ``kill_grace``.
``poison``: pages the source cannot serve (fault injection, or the source killed) are
poisoned with UFFDIO_POISON; the thread touching one gets SIGBUS at exactly that page
(or, on the exit path, inject-memory-error), every other page arrives byte-exact and
the session completes with poisoned pages.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.conftest import Pair
from tests.strategy_pkg import vmsim
from uffdd.lab import harness

BUS_ADRERR = 2  # a poisoned page on kernels without CONFIG_MEMORY_FAILURE (these machines)
BUS_MCEERR_AR = 4  # the same on kernels with memory-failure support
INJECTED = -1  # vmsim's mark for an inject-memory-error verdict on the exit path
DEADLINE = "2"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[harness.DaemonProcess, harness.DaemonProcess]]:
    """A source daemon the test may kill, and a destination at the shipped kill grace."""
    src = harness.start_daemon(tmp_path, "source")
    try:
        dst = harness.start_daemon(tmp_path, "destination")
    except BaseException:
        src.kill()
        raise
    try:
        yield src, dst
    finally:
        src.kill()
        assert dst.stop() == 0
        assert "Traceback" not in dst.log_text(), dst.log_text()[-6000:]


def _kill_source_mid_migration(src: harness.DaemonProcess, dst: harness.DaemonProcess,
                               m: vmsim.Migration) -> float:
    status = vmsim.wait_running(dst, m.session, m.dest)
    src.kill(signal.SIGKILL)
    assert int(status["pages_installed"]) < int(status["pages_total"]), status
    return time.monotonic()


def _check_memory_errors(result: dict[str, object], exits: bool) -> list[int]:
    """Every memory error the VMM saw is exactly at the page it touched; returns the pages."""
    errors = result["memory_errors"]
    assert isinstance(errors, list)
    for e in errors:
        assert e["si_gpa"] == e["gpa"], f"memory error at the wrong address: {e}"
        allowed = {BUS_ADRERR, BUS_MCEERR_AR} | ({INJECTED} if exits else set())
        assert e["code"] in allowed, f"unexpected si_code: {e}"
    return sorted(int(e["gpa"]) // vmsim.PAGE for e in errors)


@pytest.mark.parametrize(("exits", "linger"), [(False, True), (True, True), (False, False)],
                         ids=["blocking-lingering", "exits-lingering", "blocking"])
def test_crash_policy_source_killed(daemons: tuple[harness.DaemonProcess,
                                                   harness.DaemonProcess],
                                    tmp_path: Path, exits: bool, linger: bool) -> None:
    src, dst = daemons
    m = vmsim.start(tmp_path, src, dst, backing="anon", memory="256M", dest_args=[
        "--policy", "crash", "--deadline", DEADLINE,
        *(["--exits"] if exits else []), *(["--linger"] if linger else [])])
    try:
        killed_at = _kill_source_mid_migration(src, dst, m)
        rc, lines = vmsim.dest_lines(m.dest)
        ended_after = time.monotonic() - killed_at
    finally:
        m.kill_all()
    context = f"{lines}\n{m.dest.stderr()}\n{dst.log_text()[-3000:]}"
    failed = [x for x in lines if x.get("event") == "failed"]
    crashed = [x for x in lines if x.get("crash")]
    assert failed or crashed, f"the VMM never learnt of the failure: {context}"
    if not exits:  # no resolve in flight: the 'failed' event is how it learns
        assert failed, context
    if linger:
        assert rc == -signal.SIGKILL, f"the lingering VMM was not killed (rc {rc}): {context}"
        assert "killing it" in dst.log_text()
    else:
        assert rc in (1, 2), context
    reason = str((failed or crashed)[0]["reason"])
    assert "unreachable" in reason or "lost" in reason or "unrecoverable" in reason, reason
    print(f"VMM ended {ended_after:.2f}s after the source was killed "
          f"(deadline {DEADLINE}s + the default kill_grace)")


@pytest.mark.parametrize("exits", [False, True], ids=["blocking", "exits"])
def test_poison_policy_lost_pages(pair: Pair, exits: bool) -> None:
    """The source cannot read 5 pages: exactly those are poisoned, the rest is exact."""
    lost = vmsim.pattern_pages(64 << 20, 5, seed=3)
    m = vmsim.start(pair.workdir, pair.src, pair.dst, seed=3, lose=lost, dest_args=[
        "--policy", "poison", "--deadline", "10", *(["--exits"] if exits else [])])
    result = m.dest_result()
    source = m.source_result()
    context = json.dumps(result)
    assert result["exit_status"] == 0, context
    assert result["verified"] is True and result["mismatches"] == 0, context
    assert result["outcome"] == "completed-with-poisoned-pages", context
    assert result["daemon_pages_poisoned"] == len(lost), context
    assert result["poisoned_pages"] == len(lost), context
    assert _check_memory_errors(result, exits) == lost, context
    assert source["event"] == "completed", source
    assert "unrecoverable page" in pair.dst.log_text()


@pytest.mark.parametrize("exits", [False, True], ids=["blocking", "exits"])
def test_poison_policy_source_killed(daemons: tuple[harness.DaemonProcess,
                                                    harness.DaemonProcess],
                                     tmp_path: Path, exits: bool) -> None:
    """The source dies for good: every page still missing is poisoned, the rest exact."""
    src, dst = daemons
    m = vmsim.start(tmp_path, src, dst, backing="anon", memory="256M", dest_args=[
        "--policy", "poison", "--deadline", DEADLINE, *(["--exits"] if exits else [])])
    try:
        _kill_source_mid_migration(src, dst, m)
        result = m.dest_result()
    finally:
        m.kill_all()
    context = json.dumps(result)[:4000]
    assert result["exit_status"] == 0, context
    assert result["verified"] is True and result["mismatches"] == 0, context
    assert result["outcome"] == "completed-with-poisoned-pages", context
    poisoned = int(result["daemon_pages_poisoned"])  # type: ignore[call-overload]
    assert poisoned > 0 and result["poisoned_pages"] == poisoned, context
    _check_memory_errors(result, exits)


@pytest.mark.parametrize("exits", [True, False], ids=["exits", "blocking"])
@pytest.mark.parametrize("policy", ["poison", "crash"])
def test_demo_lost_pages(exits: bool, policy: str) -> None:
    """``uffdd demo --lose-pages N`` shows both policies, on the exit path and without."""
    vmsim.tool()
    args = ["--policy", policy, "--lose-pages", "3", *(["--exits"] if exits else [])]
    proc = subprocess.run([sys.executable, "-m", "uffdd", "demo", "--memory", "64M", "--json",
                           *args], capture_output=True, text=True, timeout=vmsim.HANG_TIMEOUT)
    result = json.loads(proc.stdout)
    assert result["vmm"] == "vmsim", result
    if policy == "poison":
        assert proc.returncode == 0, result
        assert result["outcome"] == "completed-with-poisoned-pages", result
        assert result["pages_poisoned"] == 3 and result["verified"] is True, result
    else:
        assert proc.returncode != 0, result
        assert result["outcome"] == "crashed" and "lost" in str(result["reason"]), result
        assert result["verified"] is False


class _EndedSession:
    """What ``session._Context`` reads of a session whose fault thread has stopped: the
    page request is queued and never answered, as when the session ends under it."""

    def __init__(self, state: str, reason: str, page_state: int) -> None:
        from uffdd.importer import pagestate
        self.session_id, self.policy, self.deadline = "s", "poison", 30.0
        self.state, self.reason, self.finished = state, reason, True
        self.pages = pagestate.PageMap([4])
        self.pages.set(0, 2, page_state)
        self.loop = self
        self._done = trio.Event()
        self._done.set()

    def request_page_threadsafe(self, region: int, page: int, callback: object) -> None:
        pass  # the fault thread is gone: nobody calls back

    def region_of_gpa(self, gpa: int) -> tuple[object, int]:
        return types.SimpleNamespace(index=0), gpa // 4096


@pytest.mark.parametrize(("state", "page_state", "outcome"), [
    ("completed", 2, "installed"), ("completed", 3, "poisoned"), ("failed", 0, "lost")])
async def test_exit_waiting_when_the_session_ends_is_answered_by_the_page(
        state: str, page_state: int, outcome: str) -> None:
    """A vCPU exit still waiting when its session *completes* gets the page's state (the
    page is installed or poisoned by then), never the crash of a lost page: the flake of
    ``test_demo_lost_pages[poison-exits]`` (a crash with reason
    "completed-with-poisoned-pages"). A session that failed under it loses the page,
    saying why the session ended."""
    from uffdd.importer.session import _Context
    s = _EndedSession(state, "completed-with-poisoned-pages" if state == "completed"
                      else "source unreachable", page_state)
    ctx = _Context(s)  # type: ignore[arg-type]
    assert await ctx.make_present(2 * 4096) == outcome
    if outcome == "lost":
        assert ctx.reason == "source unreachable"
    else:
        assert "completed" not in ctx.reason
