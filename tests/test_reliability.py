"""Faults during postcopy, with real daemons, real VMM processes and real userfaultfd.

Each test runs a migration through a throttled fault proxy (uffdd.lab.faultproxy) so that a
fault lands in its middle, breaks something, and then requires what every migration
test requires: the destination VMM read every page and found it byte-exact against the
source (its threads all finished, so none is still blocked), and both daemons' logs
are free of tracebacks. Hung vCPUs show up as a VMM that does not finish within a
generous timeout (no timing thresholds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import chaos_rig
from tests.service_manager import ServiceManager, start_under
from uffdd.lab import chaos

RATE = 2 << 20  # bytes/s per proxied connection: 16 MiB takes a few seconds


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[chaos.Rig]:
    with chaos_rig(tmp_path, rate=RATE) as r:
        yield r


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
    # Each link that went down is logged once, whichever lane saw it first (the other
    # lanes end because the session closes them: no line of their own).
    ups = log.count("link up to")
    assert ups - 1 <= log.count("link lost") <= ups, log
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


@pytest.mark.parametrize("mode", ["missing", "minor"])
def test_destination_daemon_restart_hugetlb(rig: chaos.Rig, hugepages: None, mode: str) -> None:
    m = rig.start_migration(memory="32M", backing="hugetlb", mode=mode)
    assert rig.wait_installed(m.session, m.pages // 4)
    rig.proxy.stall(3.0)
    time.sleep(0.5)
    rig.restart("destination")
    _byte_exact(m)


def test_link_gone_past_the_deadline_applies_the_policy(tmp_path: Path) -> None:
    """The link never comes back: past the deadline the crash policy stops the VM
    (the VMM hears 'failed' and exits) instead of leaving its threads blocked."""
    r = chaos.Rig(tmp_path, rate=RATE,
                  config=chaos.DAEMON_CONFIG.replace("deadline = 60.0", "deadline = 3.0"))
    try:
        m = r.start_migration(memory="16M", policy="crash")
        assert r.wait_installed(m.session, m.pages // 4)
        r.proxy.refuse(600)
        r.proxy.reset()
        d = m.dest.result(chaos.VMM_TIMEOUT)
        assert d["event"] == "failed" and d["exit_status"] == 3, d
        # Either the link's deadline or that of a page asked for just before the reset
        # (through the throttled proxy, replies lag) fires first: both are the deadline.
        assert "session deadline" in str(d["reason"]), d
        m.source.proc.kill()  # nobody can reach it to say so: its orchestrator stops it
        m.source.proc.wait(10)
    finally:
        codes = r.close()
    assert not r.tracebacks() and codes == (0, 0), (r.tracebacks(), codes)


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


def test_source_vmm_death_tells_the_destination(rig: chaos.Rig) -> None:
    """A source VMM SIGKILLed mid-migration: the source cancels its export and says so
    on the demand lane, so the destination fails at once (not at its deadline)."""
    ok, detail = chaos.vmm_death(rig, "16M", which="source")
    assert ok, detail
    assert "the source cancelled the session" in detail, detail


def test_fd_store_keeps_session_fds_across_a_restart(rig: chaos.Rig, tmp_path: Path) -> None:
    """Under systemd: the import's fds go to the fd store, come back to the restarted
    daemon (which logs them and keeps them until the VMM re-imports), and leave the store
    when the session ends."""
    manager = ServiceManager(tmp_path / "notify")
    rig.dst.stop()
    rig.dst = start_under(manager, tmp_path, chaos.DAEMON_CONFIG, "destination-1.log",
                          stored=[])
    m = rig.start_migration(memory="16M", mode="minor")
    assert rig.wait_installed(m.session, m.pages // 4)
    manager.drain()
    name = "uffdd-import-" + m.session
    assert len(manager.store.get(name, [])) == 2, manager.store  # the uffd and the memfd
    rig.dst.kill()
    rig.logs.append(rig.dst.log_path)
    stored = [(name, fd) for fd in manager.store[name]]
    rig.dst = start_under(manager, tmp_path, chaos.DAEMON_CONFIG, "destination-2.log",
                          stored=stored)
    _byte_exact(m)
    log = rig.dst.log_text()
    assert f"session={m.session} the fd store gave back 2 fds" in log, log
    assert "closing the 2 fds the fd store gave back" in log, log
    deadline = time.monotonic() + 10
    while name not in manager.removed and time.monotonic() < deadline:
        manager.drain()
    assert name in manager.removed, "the session's fds were never removed from the store"
    for fds in manager.store.values():
        for fd in fds:
            os.close(fd)


def test_sigterm_under_a_service_manager_leaves_the_migration_to_the_next_daemon(
        rig: chaos.Rig, tmp_path: Path) -> None:
    """A planned restart (systemctl restart, a package upgrade) is a SIGTERM: under a
    service manager the daemon exits without ending its sessions, so the VMM is not told
    the migration failed, nothing tells the source, the import's fds stay in the fd
    store, and the restarted daemon carries on. (tests/test_systemd_real.py does this
    under a real systemd.)"""
    manager = ServiceManager(tmp_path / "notify")
    rig.dst.stop()
    rig.dst = start_under(manager, tmp_path, chaos.DAEMON_CONFIG, "destination-1.log",
                          stored=[])
    m = rig.start_migration(memory="16M", mode="missing")
    assert rig.wait_installed(m.session, m.pages // 4)
    assert rig.dst.stop() == 0  # SIGTERM
    rig.logs.append(rig.dst.log_path)
    manager.drain()
    name = "uffdd-import-" + m.session
    assert name not in manager.removed, "a planned stop emptied the session's fd store"
    assert "left to the next daemon" in rig.dst.log_text()
    stored = [(name, fd) for fd in manager.store[name]]
    rig.dst = start_under(manager, tmp_path, chaos.DAEMON_CONFIG, "destination-2.log",
                          stored=stored)
    _byte_exact(m)
    assert f"session={m.session} the fd store gave back 2 fds" in rig.dst.log_text()
    for fds in manager.store.values():
        for fd in fds:
            os.close(fd)


def test_sigterm_of_the_source_under_a_service_manager_keeps_the_migration(
        rig: chaos.Rig, tmp_path: Path) -> None:
    """The same planned restart on the source host: the export is left to the next
    daemon (no 'cancel' frame, no 'failed' event), the source VMM exports again to it,
    and the destination's link comes back."""
    manager = ServiceManager(tmp_path / "notify")
    port = rig.src.peer_port
    rig.src.stop()
    rig.src = start_under(manager, tmp_path, chaos.DAEMON_CONFIG, "source-1.log", stored=[],
                         name="source", peer_port=port)
    m = rig.start_migration(memory="16M", mode="missing")
    assert rig.wait_installed(m.session, m.pages // 4)
    assert rig.src.stop() == 0  # SIGTERM
    rig.logs.append(rig.src.log_path)
    first = rig.src
    rig.src = start_under(manager, tmp_path, chaos.DAEMON_CONFIG, "source-2.log", stored=[],
                         name="source", peer_port=port)
    _byte_exact(m)
    assert "the source cancelled" not in _dest_log(rig)
    assert "left to the next daemon" in first.log_text()
