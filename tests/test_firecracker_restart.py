"""Firecracker sessions survive a daemon restart (issue 17: "restart with the fd store").

Firecracker hands its uffd over once and never reconnects, so the daemon keeps what it
needs in the service manager's fd store (the uffd, Firecracker's connection, a file
source's snapshot file, a sealed memfd describing the session) and a restarted daemon
resumes the session itself. Real processes throughout: the KVM stand-in
(native/testvm/fc_standin.c), real daemons, and a stand-in for systemd's side of the
protocol (``$NOTIFY_SOCKET`` datagrams with FDSTORE=1 / FDSTOREREMOVE=1, the fds given
back at start with ``$LISTEN_FDS`` / ``$LISTEN_FDNAMES`` / ``$LISTEN_PID``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service_manager import ServiceManager, start_under
from tests.test_firecracker_standin import (
    MIB,
    PAGE,
    TIMEOUT,
    StandIn,
    accepted,
    assert_byte_exact,
    handover_dir,  # noqa: F401 (a fixture)
    testvm,  # noqa: F401 (a fixture)
    wait_event,
    write_snapshot,
)
from uffdd import fcstore
from uffdd._linux import uffd
from uffdd.client import Client
from uffdd.lab import harness
from uffdd.lab.faultproxy import FaultProxy

PREFIX = "uffdd-firecracker-"


def description(manager: ServiceManager, name: str) -> dict[str, Any]:
    """The newest description stored under ``name`` (a sealed memfd)."""
    found = []
    for fd in manager.store[name]:
        if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:uffdd-firecracker"):
            found.append(json.loads(os.pread(fd, 1 << 20, 0)))
    return max(found, key=lambda d: int(d["generation"]))


def held_descriptions(daemon: harness.DaemonProcess) -> int:
    """Description memfds the daemon holds open (read at the resume, then closed)."""
    fd_dir = Path(f"/proc/{daemon.proc.pid}/fd")
    links = []
    for entry in fd_dir.iterdir():
        try:
            links.append(os.readlink(entry))
        except FileNotFoundError:  # closed meanwhile
            continue
    return sum(link.startswith("/memfd:uffdd-firecracker") for link in links)


def stop(daemon: harness.DaemonProcess, how: str) -> None:
    """kill -9 (a crash), or SIGTERM under the service manager (a planned restart)."""
    if how == "kill":
        daemon.kill()
    else:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
        assert "left to the next daemon" in daemon.log_text()
    assert "Traceback" not in daemon.log_text(), daemon.log_text()[-4000:]


def wait_status(client: Client, session: str, key: str, value: object) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        st = client.status(session)[0]
        if st.get(key) == value:
            return dict(st)
        assert time.monotonic() < deadline, st
        time.sleep(0.02)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ServiceManager]:
    m = ServiceManager(tmp_path / "notify")
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[harness.DaemonProcess]]:
    """Every daemon a test starts; each is stopped at the end, and its log is clean."""
    started: list[harness.DaemonProcess] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.kill()
    for d in started:
        assert "Traceback" not in d.log_text(), d.log_text()[-4000:]


def _config(handover: Path, *, background: bool = True) -> str:
    return (f'[api]\nhandover_dir = "{handover}"\n'
            f'[peer]\nlisten = "127.0.0.1:0"\nbackground = {str(background).lower()}\n')


# --------------------------------------------------------------------------- the stored fds


def _memfd(data: bytes, seals: int) -> int:
    fd = os.memfd_create("uffdd-firecracker-session", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_description_is_sealed_and_forgeries_are_refused() -> None:
    """The description memfd cannot be changed once written; stored fds that are not
    what a session stores (no description, an unsealed one, two uffds, another kind
    of file) are refused before anything else is looked at."""
    desc = fcstore.description_memfd({"kind": fcstore.DESCRIPTION_KIND,
                                          "version": 1, "generation": 0})
    ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE)
    ufd2 = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE)
    a, b = socket.socketpair()
    unsealed = _memfd(json.dumps({"kind": fcstore.DESCRIPTION_KIND}).encode(), 0)
    wrong = _memfd(b'{"kind": "something else", "version": 1}',
                   fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    pipe_r, pipe_w = os.pipe()
    try:
        with pytest.raises(OSError):
            os.pwrite(desc, b"x", 0)
        with pytest.raises(OSError):
            os.ftruncate(desc, 0)
        stored = fcstore.classify([desc, ufd, a.fileno()])
        assert stored.uffd == ufd and stored.sock == a.fileno() and stored.file == -1
        assert stored.descriptions[0]["generation"] == 0
        for fds, words in (([ufd, a.fileno()], "lacks"),
                           ([desc, ufd, ufd2, a.fileno()], "two fds of kind uffd"),
                           ([desc, ufd, a.fileno(), pipe_r], "unknown kind"),
                           ([wrong, ufd, a.fileno()], "not a uffdd Firecracker")):
            with pytest.raises(fcstore.ResumeError, match=words):
                fcstore.classify(fds)
        # An unsealed memfd is no description: it counts as a (second) snapshot file.
        stored = fcstore.classify([desc, unsealed, ufd, a.fileno()])
        assert stored.file == unsealed
    finally:
        for fd in (desc, ufd, ufd2, unsealed, wrong, pipe_r, pipe_w):
            os.close(fd)
        a.close()
        b.close()


def test_the_orchestrator_is_the_same_process_or_nobody() -> None:
    """Its pid with its start time: a process that reused the pid is not the owner."""
    me = os.getpid()
    start = fcstore.process_start(me)
    assert start is not None
    assert fcstore.owner({"owner_pid": me, "owner_start": start}) == me
    assert fcstore.owner({"owner_pid": me, "owner_start": start + 1}) == 0
    assert fcstore.owner({"owner_pid": me, "owner_start": None}) == 0


# --------------------------------------------------------------------------- restarts


@pytest.mark.kvm
@pytest.mark.parametrize(("how", "hugetlb"), [
    ("kill", False), ("sigterm", False), pytest.param("kill", True, marks=pytest.mark.hugetlb)])
def test_restart_mid_restore_from_a_local_file(
        testvm: Path, handover_dir: Path, tmp_path: Path,  # noqa: F811
        manager: ServiceManager, daemons: list[harness.DaemonProcess], how: str, hugetlb: bool,
        request: pytest.FixtureRequest) -> None:
    """The daemon stops after the handover, with the guest's vCPUs about to fault (a
    local file source that streams nothing, so no page has arrived): the next daemon
    resumes the session from the fd store, the vCPUs' faults are answered, every byte
    of guest RAM is the snapshot's; then resident, and the store is emptied at the end."""
    if hugetlb:
        request.getfixturevalue("hugepages")
    page = 2 * MIB if hugetlb else PAGE
    config = _config(handover_dir, background=False)
    daemons.append(start_under(manager, tmp_path, config, "destination-1.log"))
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 16 * MIB, seed=3)
    client = Client(daemons[0].api_socket)
    handover = client.prepare("fc-restart", file=str(snap))
    vm = StandIn(testvm, handover, snap, 3, ["--hold", "--wait-go", "--vcpus", "2",
                                             "--regions", "2", *(["--hugetlb"] * hugetlb)],
                 tmp_path)
    try:
        accepted(client, "fc-restart", vm, page)
        assert client.status("fc-restart")[0]["resumed"] is False
        name = PREFIX + "fc-restart"
        manager.drain()
        assert len(manager.store.get(name, [])) == 4, manager.store  # uffd, socket, file, desc
        desc = description(manager, name)
        assert desc["pid"] == vm.proc.pid and desc["source"] == "file"
        assert desc["resident"] is False and len(desc["regions"]) == 2
        stop(daemons[0], how)
        client.close()  # the orchestrator's connection went with the daemon
        vm.send("go")  # the vCPUs fault now, with no daemon to answer
        daemons.append(start_under(manager, tmp_path, config, "destination-2.log"))
        log = daemons[1].log_text()
        assert "session=fc-restart resumed from the fd store" in log, log
        assert held_descriptions(daemons[1]) == 0
        with Client(daemons[1].api_socket) as client:
            client.subscribe("fc-restart")  # the orchestrator follows it again
            ev = wait_event(client, "fc-restart", ("completed", "failed", "cancelled"))
            assert ev["event"] == "completed" and ev["pages_total"] == 16 * MIB // page, ev
            result = vm.line()
            assert result is not None, vm.stderr()
            assert_byte_exact(result, 16 * MIB // PAGE)
            st = wait_status(client, "fc-restart", "resident", True)
            assert st["resumed"] is True and st["state"] == "completed", st
            assert st["vmm_pid"] == vm.proc.pid and st["handover_state"] == "accepted"
            vm.send("balloon 2M:4M")  # resident after the restart: zeros
            late = vm.line()
            assert late is not None and late["zero_pages"] == late["pages"] == 1024, late
            assert late["mismatches"] == late["unreadable"] == 0, late
            vm.send("quit")
            assert vm.wait() == 0, vm.stderr()
            wait_status(client, "fc-restart", "handover_state", "ended")
        manager.wait_removed(name)
    finally:
        vm.kill()
    assert daemons[1].stop() == 0


@pytest.mark.kvm
@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_restart_mid_restore_from_a_source_host_keeps_what_arrived(
        testvm: Path, handover_dir: Path, tmp_path: Path,  # noqa: F811
        manager: ServiceManager, daemons: list[harness.DaemonProcess], how: str) -> None:
    """A remote source, slowed by a proxy so that the restore is under way: kill -9 or
    a service-manager stop of the destination daemon at a quarter of the pages (the
    source hears nothing of it either way); the next one adopts the pages
    present in Firecracker's memory, links to the source again with the token from the
    store, and the guest completes byte-exact."""
    source = harness.start_daemon(tmp_path, "source", config="[peer]\nbackground = true\n")
    daemons.append(source)
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 16 * MIB, seed=9)
    token = secrets.token_bytes(16)
    with FaultProxy(f"127.0.0.1:{source.peer_port}", lifetime=TIMEOUT * 2) as proxy, \
            Client(source.api_socket) as src:
        fd = os.open(snap, os.O_RDONLY | os.O_CLOEXEC)
        try:
            src.request({"op": "export", "session": "fc-remote", "token": token, "regions": [
                {"gpa": 0, "size": 16 * MIB, "page_size": PAGE, "fd": 0, "offset": 0}]}, [fd])
        finally:
            os.close(fd)
        proxy.throttle(MIB)  # per lane and direction: seconds for the whole restore
        config = _config(handover_dir)
        daemons.append(start_under(manager, tmp_path, config, "destination-1.log"))
        client = Client(daemons[1].api_socket)
        handover = client.prepare("fc-remote", peer=proxy.address, token=token)
        vm = StandIn(testvm, handover, snap, 9, ["--hold", "--vcpus", "2"], tmp_path)
        try:
            accepted(client, "fc-remote", vm)
            deadline = time.monotonic() + TIMEOUT
            while client.status("fc-remote")[0]["pages_installed"] < 1024:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            stop(daemons[1], how)
            client.close()
            proxy.throttle(0)
            daemons.append(start_under(manager, tmp_path, config, "destination-2.log"))
            result = vm.line()
            assert result is not None, vm.stderr()
            assert_byte_exact(result, 16 * MIB // PAGE)
            log = daemons[2].log_text()
            assert "session=fc-remote resumed from the fd store" in log, log
            adopted = re.search(r"adopted (\d+) pages already present", log)
            assert adopted and 1024 <= int(adopted.group(1)) < 16 * MIB // PAGE, log
            with Client(daemons[2].api_socket) as client:
                st = wait_status(client, "fc-remote", "resident", True)
                assert st["resumed"] is True and st["source"] == "peer", st
                vm.send("quit")
                assert vm.wait() == 0, vm.stderr()
            assert src.wait_finished("fc-remote", TIMEOUT)["event"] == "completed"
            assert "cancelled" not in source.log_text(), source.log_text()[-3000:]
        finally:
            vm.kill()
    assert daemons[2].stop() == 0


@pytest.mark.kvm
@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_resident_session_resumes_resident_and_a_bad_one_fails_alone(
        testvm: Path, handover_dir: Path, tmp_path: Path,  # noqa: F811
        manager: ServiceManager, daemons: list[harness.DaemonProcess], how: str) -> None:
    """Three resident sessions; while the daemon is down, the second one's regions are
    unregistered (through the stored uffd, so its description no longer matches the
    kernel) and the third Firecracker exits. The restarted daemon resumes the first
    resident (a balloon remove still reads zeros, never snapshot bytes) and fails the
    other two alone, each with its reason."""
    config = _config(handover_dir)
    daemons.append(start_under(manager, tmp_path, config, "destination-1.log"))
    vms: list[StandIn] = []
    try:
        with Client(daemons[0].api_socket) as client:
            for i, session in enumerate(("fc-good", "fc-bad", "fc-gone")):
                snap = write_snapshot(testvm, tmp_path / f"{session}.mem", 8 * MIB, seed=i)
                handover = client.prepare(session, file=str(snap))
                vm = StandIn(testvm, handover, snap, i, ["--hold"], tmp_path)
                vms.append(vm)
                accepted(client, session, vm)
                result = vm.line()
                assert result is not None, vm.stderr()
                assert_byte_exact(result, 8 * MIB // PAGE)
                wait_status(client, session, "resident", True)
        manager.drain()
        assert description(manager, PREFIX + "fc-good")["resident"] is True
        stop(daemons[0], how)
        manager.drain()
        bad = description(manager, PREFIX + "fc-bad")
        bad_uffd = next(fd for fd in manager.store[PREFIX + "fc-bad"]
                        if uffd.is_userfaultfd(fd))
        for region in bad["regions"]:
            uffd.unregister(bad_uffd, region["addr"], region["size"])
        vms[2].kill()  # and the third Firecracker exits meanwhile
        daemons.append(start_under(manager, tmp_path, config, "destination-2.log"))
        log = daemons[1].log_text()
        assert "session=fc-bad cannot resume the Firecracker session" in log, log
        assert "not registered with a userfaultfd" in log, log
        assert re.search(r"session=fc-gone cannot resume the Firecracker session from the "
                         r"fd store: Firecracker pid \d+ is gone", log), log
        manager.wait_removed(PREFIX + "fc-bad")
        manager.wait_removed(PREFIX + "fc-gone")
        assert PREFIX + "fc-good" in manager.store
        with Client(daemons[1].api_socket) as client:
            st = client.status("fc-bad")[0]
            assert st["state"] == "failed" and "not resumed" in st["reason"], st
            assert held_descriptions(daemons[1]) == 0
            client.subscribe("fc-good")  # resident: its 'completed' comes at once
            ev = wait_event(client, "fc-good", ("completed", "failed", "cancelled"))
            assert ev["event"] == "completed", ev
            st = client.status("fc-good")[0]
            assert st["resident"] is True and st["resumed"] is True, st
            assert st["pages_installed"] == st["pages_total"] == 8 * MIB // PAGE, st
            vms[0].send("balloon 0:4M")
            late = vms[0].line()
            assert late is not None and late["zero_pages"] == late["pages"] == 1024, late
            assert late["mismatches"] == late["unreadable"] == 0
            st = client.status("fc-good")[0]
            assert st["resident_faults"] >= 1 and st["resident_removes"] >= 1, st
            vms[0].send("quit")
            assert vms[0].wait() == 0, vms[0].stderr()
            wait_status(client, "fc-good", "handover_state", "ended")
        manager.wait_removed(PREFIX + "fc-good")
    finally:
        for vm in vms:
            vm.kill()
    assert daemons[1].stop() == 0


@pytest.mark.kvm
def test_sigterm_without_a_service_manager_still_cancels(
        testvm: Path, handover_dir: Path, tmp_path: Path,  # noqa: F811
        daemons: list[harness.DaemonProcess]) -> None:
    """No $NOTIFY_SOCKET: nothing is stored, and a stop ends the session (cancelled)."""
    d = harness.start_daemon(tmp_path, "plain", config=_config(handover_dir, background=False))
    daemons.append(d)
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 8 * MIB, seed=4)
    client = Client(d.api_socket)
    vm = StandIn(testvm, client.prepare("fc-plain", file=str(snap)), snap, 4,
                 ["--hold", "--wait-go"], tmp_path)
    try:
        accepted(client, "fc-plain", vm)
        d.proc.send_signal(signal.SIGTERM)
        ev = wait_event(client, "fc-plain", ("cancelled", "failed", "completed"))
        assert ev["event"] == "cancelled", ev
        assert d.proc.wait(TIMEOUT) == 0
        assert "left to the next daemon" not in d.log_text()
    finally:
        vm.kill()
        client.close()
