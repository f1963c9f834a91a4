"""Faults during postcopy, with real daemons, real VMM processes and real userfaultfd.

Each test runs a migration through a throttled fault proxy (uffdd.faultproxy) so that a
fault lands in its middle, breaks something, and then requires what every migration
test requires: the destination VMM read every page and found it byte-exact against the
source (its threads all finished, so none is still blocked), and both daemons' logs
are free of tracebacks. Hung vCPUs show up as a VMM that does not finish within a
generous timeout (no timing thresholds).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffdd import chaos

RATE = 2 << 20  # bytes/s per proxied connection: 16 MiB takes a few seconds


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[chaos.Rig]:
    r = chaos.Rig(tmp_path, rate=RATE)
    try:
        yield r
    finally:
        codes = r.close()
    assert not r.tracebacks(), f"daemon logs with a traceback: {r.tracebacks()}"
    assert codes == (0, 0), f"daemons exited with {codes}"


def _byte_exact(m: chaos.Migration) -> None:
    d = m.dest.result(chaos.VMM_TIMEOUT + 30)
    s = m.source.result(60)
    assert d["verified"] is True and d["mismatches"] == 0, d
    assert d["event"] == "completed" and s["event"] == "completed", (d, s)
    assert d["hash"] == s["hash"], (d, s)


def _dest_log(rig: chaos.Rig) -> str:
    return "".join(p.read_text(errors="replace") for p in [*rig.logs, rig.dst.log_path]
                   if p.name.startswith("destination") and p.exists())


@pytest.mark.parametrize("fault", ["cut", "reset", "stall"])
def test_link_fault_resumes_without_losing_a_page(rig: chaos.Rig, fault: str) -> None:
    """Cut, reset or black-hole the link twice; two bulk lanes reconnect each time."""
    m = rig.start_migration(memory="16M", mode="missing")
    for fraction in (0.2, 0.5):
        assert rig.wait_installed(m.session, int(m.pages * fraction))
        chaos.apply_fault(rig, fault, m)
    _byte_exact(m)
    log = _dest_log(rig)
    assert log.count("link up to") >= 2, "the link never came back"
    if fault == "stall":
        assert "link stalled" in log


def test_minor_mode_link_reset(rig: chaos.Rig) -> None:
    m = rig.start_migration(memory="16M", mode="minor")
    assert rig.wait_installed(m.session, m.pages // 3)
    chaos.apply_fault(rig, "reset", m)
    _byte_exact(m)


def test_source_daemon_restart(rig: chaos.Rig) -> None:
    """SIGKILL the source daemon: the source VMM re-exports, the destination reconnects."""
    m = rig.start_migration(memory="16M")
    assert rig.wait_installed(m.session, m.pages // 4)
    rig.restart("source")
    _byte_exact(m)
    assert rig.status("source", m.session)["state"] == "completed"  # type: ignore[index]


@pytest.mark.parametrize(("backing", "mode"),
                         [("shmem", "missing"), ("shmem", "minor"), ("anon", "missing")])
def test_destination_daemon_restart_with_blocked_threads(rig: chaos.Rig, backing: str,
                                                         mode: str) -> None:
    """SIGKILL the destination daemon while VMM threads wait in the kernel.

    The link is stalled first, so the threads' fault messages were read by the daemon
    that dies and nothing they wait for can arrive: only the new daemon's wake (after it
    adopted the present pages from the VMM's pagemap) gets them going again.
    """
    m = rig.start_migration(memory="16M", backing=backing, mode=mode)
    assert rig.wait_installed(m.session, m.pages // 4)
    rig.proxy.stall(3.0)
    time.sleep(0.5)
    assert m.dest.proc.poll() is None
    rig.restart("destination")
    _byte_exact(m)
    assert "adopted" in rig.dst.log_text(), "the new daemon did not learn the present pages"


def test_corrupt_payloads_are_fetched_again(rig: chaos.Rig) -> None:
    m = rig.start_migration(memory="16M")
    rig.inject(m.session, corrupt=8)
    _byte_exact(m)
    assert "checksum mismatch" in _dest_log(rig)


def test_corrupt_every_time_makes_the_page_unrecoverable(rig: chaos.Rig) -> None:
    """Every payload corrupt: after three refetches the policy (crash) ends the VM.

    No corrupt page is ever installed: the VMM is told the migration failed and stops
    (pyvmm exits with status 3) instead of reading wrong data, and nothing hangs.
    """
    rig.proxy.throttle(0)
    m = rig.start_migration(memory="4M", policy="crash")
    rig.inject(m.session, corrupt=1 << 30)
    d = m.dest.result(chaos.VMM_TIMEOUT)
    assert d["event"] == "failed" and d["exit_status"] == 3, d
    assert "integrity check failed" in str(d["reason"]), d
    assert m.source.proc.wait(30) is not None
    st = rig.status("destination", m.session)
    assert st is not None and st["state"] == "failed"


def test_vmm_death_releases_everything(rig: chaos.Rig) -> None:
    """A destination VMM SIGKILLed mid-migration: both sessions end, fds come back."""
    warm = rig.start_migration(memory="4M")  # the daemons' steady-state fds (threads, pools)
    _byte_exact(warm)
    ok, detail = chaos.vmm_death(rig, "16M")
    assert ok, detail
