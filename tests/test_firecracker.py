"""Firecracker's UFFD handover (uffdd.firecracker), with real daemons and real processes.

The stand-in (tests/fc_standin.py) does what Firecracker does at a snapshot restore;
the refusals are made by this process with a real userfaultfd over its own memory. The
snapshot memory file is a regular file on disk, as Firecracker writes it.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _check_logs, require
from uffdd import _fastpath
from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address
from uffdd.client import Client, ClientError, MemoryRegion
from uffdd.config import Config
from uffdd.errors import RequestError
from uffdd.firecracker import parse_mappings
from uffdd.lab import harness
from uffdd.lab.pyvmm import PAGE, page_pattern
from uffdd.status import render_status_table

ROOT = Path(__file__).resolve().parent.parent
REGIONS = (4 << 20, 2 << 20)  # two regions, as Firecracker has above 3 GiB of guest RAM
TIMEOUT = 60.0


# ---------------------------------------------------------------- helpers


def write_snapshot(path: Path, size: int, seed: int = 7) -> None:
    """A snapshot memory file: distinct pages, every 11th one zero (pyvmm's pattern)."""
    with open(path, "wb") as f:
        for page in range(size // PAGE):
            f.write(page_pattern(seed, page))


class StandIn:
    """The stand-in process and its JSON lines (each read within a deadline)."""

    def __init__(self, handover: str, snapshot: Path, sizes: tuple[int, ...] = REGIONS,
                 *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fc_standin", "--socket", handover,
             "--snapshot", str(snapshot), "--regions", ",".join(map(str, sizes)), *extra],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        self._buf = b""

    def line(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"the stand-in said nothing for {timeout}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"the stand-in exited ({self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def command(self, text: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self.line()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def next_event(client: Client, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next event of ``kind`` (progress events skipped; any other is a failure)."""
    deadline = time.monotonic() + timeout
    while True:
        event = client.next_event(max(0.0, deadline - time.monotonic()))
        assert event is not None, f"no {kind!r} event within {timeout}s"
        if event["event"] == "progress":
            continue
        assert event["event"] == kind, event
        return event


def wait_status(client: Client, session: str, key: str, value: object,
                timeout: float = TIMEOUT) -> dict[str, Any]:
    """Poll status until ``key`` has ``value`` (a condition with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.status(session)[0]
        if status.get(key) == value:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


@pytest.fixture
def fc_daemon(request: pytest.FixtureRequest, tmp_path: Path
              ) -> Iterator[harness.DaemonProcess]:
    """A daemon with its handover sockets under tmp_path; parametrize it indirectly
    with "python" for the Python fault loop (default: the C one, which must be built)."""
    config = f'[api]\nhandover_dir = "{tmp_path}/ho"\n'
    if getattr(request, "param", "c") == "python":
        config += '[peer]\nfastpath = "off"\n'
    else:
        require(_fastpath.load("auto") is not None,
                "libuffdd_fastpath is not built (make -C native)")
    d = harness.start_daemon(tmp_path, "fc", config=config)
    try:
        yield d
    finally:
        code = d.stop()
    _check_logs(d)
    assert code == 0


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    path = tmp_path / "snapshot.mem"
    write_snapshot(path, sum(REGIONS))
    return path


def prepare(client: Client, session: str, **source: Any) -> str:
    path = client.prepare(session, handover_deadline=30, **source)
    assert path.endswith(f"/{session}.sock") and os.path.exists(path)
    return path


def restore(client: Client, session: str, handover: str, snapshot: Path,
            *extra: str) -> StandIn:
    """The stand-in's handover and a byte-exact restore, up to 'completed'."""
    fc = StandIn(handover, snapshot, REGIONS, *extra)
    page = (2 << 20) if "--hugetlb" in extra else PAGE
    try:
        sent = fc.line()
        event = next_event(client, "handover")
        assert event["pid"] == sent["pid"] and event["regions"] == len(REGIONS)
        verified = fc.line()
        assert verified == {"event": "verified", "mismatches": 0,
                            "pages": sum(REGIONS) // page, "unreadable": []}
        completed = next_event(client, "completed")
        assert completed["pages_total"] == sum(REGIONS) // page
    except BaseException:
        fc.close()
        raise
    return fc


# ---------------------------------------------------------------- the payload


def test_mappings_become_import_regions() -> None:
    payload = json.dumps([
        {"base_host_virt_addr": 0x7F0000000000, "size": 8192, "offset": 0,
         "page_size": 4096, "page_size_kib": 4096, "future_field": [1]},
        {"base_host_virt_addr": 0x7F1000000000, "size": 4096, "offset": 8192,
         "page_size_kib": 4096}]).encode()
    specs = parse_mappings(payload, 256)
    assert [(s.gpa, s.addr, s.size, s.page_size, s.uffd, s.mode) for s in specs] == [
        (0, 0x7F0000000000, 8192, 4096, 0, "missing"),
        (8192, 0x7F1000000000, 4096, 4096, 0, "missing")]
    for bad in (b"[{", b"{}", b"[]", b'[{"size": 4096}]', "[\"\u00e9\"]".encode(),
                b'[{"base_host_virt_addr": 0, "size": 4096, "offset": 1, "page_size": 4096}]'):
        with pytest.raises(RequestError):
            parse_mappings(bad, 256)
    with pytest.raises(RequestError):  # more regions than limits.max_regions_per_request
        parse_mappings(json.dumps([{"base_host_virt_addr": i << 20, "size": 4096,
                                    "offset": i << 20, "page_size": 4096}
                                   for i in range(3)]).encode(), 2)


# ---------------------------------------------------------------- restores


@pytest.mark.parametrize("fc_daemon", ["c", "python"], indirect=True)
def test_local_file_restore_is_byte_exact_and_resident(
        fc_daemon: harness.DaemonProcess, snapshot: Path) -> None:
    with Client(fc_daemon.api_socket) as orchestrator:
        handover = prepare(orchestrator, "fc-local", file=str(snapshot))
        status = orchestrator.status("fc-local")[0]
        assert status["handover_state"] == "waiting" and status["state"] == "connecting"
        assert "fc-local" in render_status_table([status])
        fc = restore(orchestrator, "fc-local", handover, snapshot)
    try:
        # The orchestrator may go once the restore completed: the VM lives on.
        with Client(fc_daemon.api_socket) as client:
            status = wait_status(client, "fc-local", "resident", True)
            assert status["state"] == "completed" and status["source"] == "file"
            assert status["vmm_pid"] == fc.proc.pid
            assert "completed" in render_status_table([status])
            # A balloon inflate and deflate after completion: the range reads as zeros.
            assert fc.command(f"balloon 0 {64 * PAGE} {32 * PAGE}") == {
                "event": "balloon", "zeros": True}
            assert fc.command(f"balloon 1 0 {REGIONS[1]}") == {"event": "balloon",
                                                                "zeros": True}
            status = client.status("fc-local")[0]
            assert status["resident"] is True and status["resident_faults"] >= 1
            assert status["resident_removes"] >= 2
            # The internal export of the file is over, and is no tenant's session to join.
            others = [s for s in client.status() if s["session"] != "fc-local"]
            assert all(s["state"] == "completed" for s in others), others
            # Firecracker's socket reaching EOF ends the resident session.
            assert fc.command("close") == {"event": "closed"}
            status = wait_status(client, "fc-local", "handover_state", "ended")
            assert status["resident"] is False and status["state"] == "completed"
            assert not os.path.exists(handover)
            assert fc.command("exit") == {"event": "exit"}
    finally:
        fc.close()


def test_local_restore_of_hugetlb_guest_ram(fc_daemon: harness.DaemonProcess,
                                             snapshot: Path, hugepages: None) -> None:
    """Firecracker with 2 MiB pages: installs and the resident zero-fill are whole
    huge pages (UFFDIO_COPY of zeros: hugetlb has no UFFDIO_ZEROPAGE)."""
    with Client(fc_daemon.api_socket) as client:
        handover = prepare(client, "fc-huge", file=str(snapshot))
        fc = restore(client, "fc-huge", handover, snapshot, "--hugetlb")
        try:
            wait_status(client, "fc-huge", "resident", True)
            assert fc.command(f"balloon 0 {2 << 20} {2 << 20}") == {"event": "balloon",
                                                                   "zeros": True}
            assert client.status("fc-huge")[0]["resident_faults"] >= 1
            fc.command("exit")
            wait_status(client, "fc-huge", "handover_state", "ended")
        finally:
            fc.close()


def test_remote_restore_from_a_source_daemon_is_byte_exact(tmp_path: Path,
                                                           snapshot: Path) -> None:
    src = harness.start_daemon(tmp_path, "source")
    dst = harness.start_daemon(tmp_path, "dest",
                               config=f'[api]\nhandover_dir = "{tmp_path}/ho"\n')
    try:
        token = secrets.token_bytes(16)
        fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
        offsets = [0, REGIONS[0]]
        with Client(src.api_socket) as source, Client(dst.api_socket) as client:
            source.export_session("fc-remote", token, [
                MemoryRegion(gpa=off, size=size, page_size=PAGE, fd=fd, offset=off)
                for off, size in zip(offsets, REGIONS, strict=True)])
            os.close(fd)
            handover = prepare(client, "fc-remote", peer=src.peer, token=token)
            fc = restore(client, "fc-remote", handover, snapshot)
            try:
                assert source.wait_finished("fc-remote", TIMEOUT)["event"] == "completed"
                status = wait_status(client, "fc-remote", "resident", True)
                assert status["source"] == "peer" and status["peer"] == src.peer
                assert fc.command(f"balloon 0 0 {16 * PAGE}") == {"event": "balloon",
                                                                  "zeros": True}
                fc.command("exit")  # exiting closes the socket: the session ends
                wait_status(client, "fc-remote", "handover_state", "ended")
            finally:
                fc.close()
    finally:
        codes = (src.stop(), dst.stop())
    _check_logs(src, dst)
    assert codes == (0, 0)


@pytest.fixture
def lossy_pair(tmp_path: Path) -> Iterator[tuple[harness.DaemonProcess, harness.DaemonProcess]]:
    """A source daemon with fault injection, a destination at the shipped session config
    (its kill_grace too: the crash test shows that grace is kept, then the kill)."""
    src = harness.start_daemon(tmp_path, "source", extra=["--enable-fault-injection"])
    dst = harness.start_daemon(tmp_path, "dest", config=(
        f'[api]\nhandover_dir = "{tmp_path}/ho"\n'))
    try:
        yield src, dst
    finally:
        codes = (src.stop(), dst.stop())
    _check_logs(src, dst)
    assert codes == (0, 0)


def _export_losing(source: Client, session: str, token: bytes, snapshot: Path,
                   lost_offset: int) -> None:
    fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        source.export_session(session, token, [
            MemoryRegion(gpa=off, size=size, page_size=PAGE, fd=fd, offset=off)
            for off, size in zip((0, REGIONS[0]), REGIONS, strict=True)])
    finally:
        os.close(fd)
    source.request({"op": "inject", "session": session, "lose": [lost_offset // PAGE]})


def test_crash_policy_kills_firecracker_on_a_lost_page(
        lossy_pair: tuple[harness.DaemonProcess, harness.DaemonProcess],
        snapshot: Path) -> None:
    src, dst = lossy_pair
    token = secrets.token_bytes(16)
    with Client(src.api_socket) as source, Client(dst.api_socket) as client:
        _export_losing(source, "fc-crash", token, snapshot, REGIONS[0] + 5 * PAGE)
        handover = prepare(client, "fc-crash", peer=src.peer, token=token, policy="crash")
        fc = StandIn(handover, snapshot)
        try:
            pid = fc.line()["pid"]
            next_event(client, "handover")
            failed = next_event(client, "failed")
            failed_at = time.monotonic()
            assert "lost" in failed["reason"] or "cannot read" in failed["reason"], failed
            grace = Config().session.kill_grace  # the shipped value
            assert fc.proc.wait(grace + TIMEOUT) == -9  # SIGKILL, from the daemon
            waited = time.monotonic() - failed_at
            # the daemon gives a failed VMM its grace to exit on its own, then kills it
            assert grace - 0.5 <= waited <= grace + 5, (waited, grace)
        finally:
            fc.close()
        assert f"VMM pid={pid} still running" in dst.log_text()


def test_poison_policy_poisons_the_lost_page_and_goes_resident(
        lossy_pair: tuple[harness.DaemonProcess, harness.DaemonProcess],
        snapshot: Path) -> None:
    src, dst = lossy_pair
    token = secrets.token_bytes(16)
    lost = REGIONS[0] + 5 * PAGE
    with Client(src.api_socket) as source, Client(dst.api_socket) as client:
        _export_losing(source, "fc-poison", token, snapshot, lost)
        handover = prepare(client, "fc-poison", peer=src.peer, token=token, policy="poison")
        fc = StandIn(handover, snapshot, REGIONS, "--careful")
        try:
            fc.line()
            next_event(client, "handover")
            verified = fc.line()
            assert verified["mismatches"] == 0 and verified["unreadable"] == [lost], verified
            completed = next_event(client, "completed")
            assert completed["pages_poisoned"] == 1
            assert completed["outcome"] == "completed-with-poisoned-pages"
            wait_status(client, "fc-poison", "resident", True)
            fc.command("exit")
            wait_status(client, "fc-poison", "handover_state", "ended")
        finally:
            fc.close()


# ---------------------------------------------------------------- refusals


def _own_uffd(features: int) -> tuple[int, mmap.mmap, int]:
    """A uffd of this process over 4 pages of its own anonymous memory (never touched)."""
    m = mmap.mmap(-1, 4 * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ufd = uffd.new_uffd(features)
    uffd.register(ufd, buffer_address(m), 4 * PAGE, uffd.REGISTER_MODE_MISSING)
    return ufd, m, buffer_address(m)


def _attempt(path: str, payload: bytes, fds: list[int]) -> bytes:
    """Connect, one sendmsg, then read until the daemon closes: what it sent back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds))] if fds else []
        s.sendmsg([payload], anc)
        try:
            return s.recv(1)
        except ConnectionResetError:  # closed with the payload unread: closed all the same
            return b""


def test_refusals_leave_the_session_ready(fc_daemon: harness.DaemonProcess,
                                          snapshot: Path) -> None:
    """Each bad handover is refused (connection closed, an event, a log line) and a
    correct one afterwards restores byte-exact; a second connection is refused too."""
    with Client(fc_daemon.api_socket) as client:
        # The snapshot file sent as an fd: the daemon opens no path for the client.
        fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
        try:
            handover = client.prepare("fc-refusals", fd=fd, handover_deadline=30)
        finally:
            os.close(fd)
        good_uffd, ram, addr = _own_uffd(uffd.FEATURE_EVENT_REMOVE)
        bare_uffd, ram2, addr2 = _own_uffd(0)
        ok_region = {"base_host_virt_addr": addr, "size": 4 * PAGE, "offset": 0,
                     "page_size": PAGE, "page_size_kib": PAGE}
        too_large = {**ok_region, "size": 4 * PAGE, "offset": sum(REGIONS) - 2 * PAGE}
        cases = [
            ("malformed JSON", b'[{"base_host_virt_addr": ', [good_uffd], "not JSON"),
            ("no fd", json.dumps([ok_region]).encode(), [], "0 fds"),
            ("two fds", json.dumps([ok_region]).encode(), [good_uffd, bare_uffd], "2 fds"),
            ("regions larger than the file", json.dumps([too_large]).encode(), [good_uffd],
             "but the file is"),
            ("a uffd without EVENT_REMOVE",
             json.dumps([{**ok_region, "base_host_virt_addr": addr2}]).encode(), [bare_uffd],
             "UFFD_FEATURE_EVENT_REMOVE"),
        ]
        try:
            for what, payload, fds, words in cases:
                assert _attempt(handover, payload, fds) == b"", what
                event = next_event(client, "handover-refused")
                assert words in event["reason"], (what, event)
                assert event["pid"] == os.getpid()
            status = client.status("fc-refusals")[0]
            assert status["handover_state"] == "waiting" and status["handover_refusals"] == 5
        finally:
            for fd in (good_uffd, bare_uffd):
                os.close(fd)
            ram.close()
            ram2.close()
        fc = restore(client, "fc-refusals", handover, snapshot)
        try:
            # A second connection while the session has its Firecracker: refused (logged
            # and counted; no event comes after the terminal 'completed').
            assert _attempt(handover, json.dumps([ok_region]).encode(), []) == b""
            status = wait_status(client, "fc-refusals", "handover_refusals", 6)
            assert status["resident"] is True
        finally:
            fc.close()
        wait_status(client, "fc-refusals", "handover_state", "ended")
    log = fc_daemon.log_text()
    for words in ("not JSON", "0 fds", "2 fds", "but the file is", "EVENT_REMOVE",
                  "second connection"):
        assert log.count(words) == 1, words  # each refusal logged once


def test_no_handover_by_the_deadline_fails_with_the_reason(
        fc_daemon: harness.DaemonProcess, snapshot: Path) -> None:
    with Client(fc_daemon.api_socket) as client:
        reply = client.request({"op": "prepare", "session": "fc-late", "file": str(snapshot),
                                "handover_deadline": 0.5})
        assert _attempt(str(reply["handover"]), b"junk", []) == b""
        next_event(client, "handover-refused")
        failed = next_event(client, "failed")
        assert "no valid Firecracker handover" in failed["reason"]
        assert "0 fds" in failed["reason"]
        assert not os.path.exists(str(reply["handover"]))


def test_prepare_refuses_bad_requests(fc_daemon: harness.DaemonProcess, snapshot: Path,
                                      tmp_path: Path) -> None:
    with Client(fc_daemon.api_socket) as client:
        for body, code in (
            ({"file": str(snapshot), "peer": "127.0.0.1:1"}, "bad-request"),
            ({}, "bad-request"),
            ({"file": "relative.mem"}, "bad-request"),
            ({"file": str(tmp_path / "missing.mem")}, "bad-request"),
            ({"file": str(tmp_path)}, "bad-request"),
            ({"peer": "127.0.0.1:1"}, "bad-request"),  # no token
            ({"file": str(snapshot), "handover_deadline": 0}, "bad-request"),
        ):
            with pytest.raises(ClientError) as e:
                client.request({"op": "prepare", "session": "fc-bad", **body})
            assert e.value.code == code, (body, e.value)
        prepare(client, "fc-twice", file=str(snapshot))
        with pytest.raises(ClientError) as e:
            client.request({"op": "prepare", "session": "fc-twice", "file": str(snapshot)})
        assert e.value.code == "session-exists"


def _prepare_as_nobody(api_socket: str, session: str, path: Path) -> dict[str, Any]:
    """A forked child as uid/gid 65534 sends prepare naming ``path``; its reply or error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                with Client(api_socket) as c:
                    reply: dict[str, Any] = c.request({"op": "prepare", "session": session,
                                                       "file": str(path)})
            except ClientError as e:
                reply = {"error": e.code, "message": e.message}
            os.write(w, json.dumps(reply).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data
    return dict(json.loads(data))


def test_a_client_names_only_files_it_may_read() -> None:
    """The daemon opens 'file' for the client, so it refuses what the client could not
    read itself (it runs as root; the client does not)."""
    require(os.geteuid() == 0, "needs root to run a client under another uid")
    shared = Path(tempfile.mkdtemp(prefix="uffdd-fc-"))
    try:
        shared.chmod(0o755)
        d = harness.start_daemon(shared, "fc", config=(
            f'[api]\nsocket_mode = "0666"\nallowed_uids = [0, 65534]\n'
            f'handover_dir = "{shared}/ho"\n'))
        try:
            private, public = shared / "private.mem", shared / "public.mem"
            for path, mode in ((private, 0o600), (public, 0o644)):
                write_snapshot(path, 4 * PAGE)
                path.chmod(mode)
            refused = _prepare_as_nobody(d.api_socket, "fc-private", private)
            assert refused["error"] == "unauthorized", refused
            assert "may not read" in refused["message"]
            allowed = _prepare_as_nobody(d.api_socket, "fc-public", public)
            assert str(allowed.get("handover", "")).endswith("/fc-public.sock"), allowed
        finally:
            code = d.stop()
        _check_logs(d)
        assert code == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)
