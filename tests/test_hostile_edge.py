"""The daemon's edge against hostile clients, careless integrators and unlucky operators.

The API connection (fds per frame, fds on requests that take none, a share of
connections per client, a VMM that stops reading, clients that vanish mid-request),
the listeners (accept() out of fds), the stop (SIGTERM with a thread stuck in the
kernel), the start (api.socket, bind errors), and the config (ranges, --check-config).

Every hostile client is a real subprocess (``_hostile``); where a daemon serves, the
``tenancy`` fixture runs a healthy 256 MiB migration of another tenant through the
same daemons at the shipped defaults and checks it completed byte-exact, fds back to
idle, RSS bounded and no traceback afterwards. Tests that start or stop daemons on
purpose (bind, SIGTERM, config) run their own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests import hostile
from tests.conftest import require
from tests.hostile import Tenancy, fd_count
from tests.test_refusals import TOKEN, _holds
from uffdd import config, peer
from uffdd.client import Client
from uffdd.daemon import HARD_STOP_STATUS
from uffdd.errors import PeerUnavailable, ProtocolError
from uffdd.lab import harness, testcerts

tenancy = hostile.tenancy  # the fixture, by its name
REPO = Path(__file__).resolve().parent.parent
_PRELUDE = f"""\
import array, json, mmap, os, socket, struct, sys, time
sys.path.insert(0, {str(REPO)!r})
import msgpack
from tests.test_refusals import RawClient
def frame(body):
    data = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(data)) + data
def done(**result):
    print(json.dumps(result), flush=True)
def connect(path):
    while True:  # the listen backlog is full until the daemon accepts: retry
        try:
            return RawClient(path)
        except BlockingIOError:
            time.sleep(0.01)
"""


def _hostile(body: str, *args: object) -> subprocess.Popen[str]:
    """A hostile client process running ``body`` (with _PRELUDE), args in sys.argv."""
    return subprocess.Popen([sys.executable, "-c", _PRELUDE + textwrap.dedent(body),
                             *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str], timeout: float = 180) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "hostile client ended"
    return line.strip()


def _wait_log(daemon: harness.DaemonProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log_text():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{daemon.log_text()[-3000:]}"
        time.sleep(0.05)


def _refused_total(daemon: harness.DaemonProcess, reason: str) -> float:
    url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'uffdd_refused_requests_total{{reason="{reason}"}}'):
                return float(line.split()[-1])
    return 0.0


# ---------------------------------------------------------------- fds


def test_fds_are_counted_per_frame_not_per_recvmsg(tenancy: Tenancy) -> None:
    """One import frame sent one byte per sendmsg, 64 fds on each byte (19000+ fds in
    all): refused with bad-fds once the frame's fds pass limits.max_fds_per_request,
    every fd closed at once (the daemon never holds more than a few pieces' worth)."""
    dst = tenancy.dst
    proc = _hostile("""
        path, pid = sys.argv[1], int(sys.argv[2])
        c = RawClient(path)
        fd = os.memfd_create("hostile-per-frame")
        os.ftruncate(fd, 1 << 20)
        regions = [{"gpa": 0, "addr": 1 << 30, "size": 1 << 20, "page_size": 4096,
                    "uffd": 0, "mode": "missing"}] * 4
        data = frame({"op": "import", "id": 7, "session": "hostile-frame", "token": b"t" * 16,
                      "peer": "127.0.0.1:1", "regions": regions})
        idle = len(os.listdir(f"/proc/{pid}/fd"))
        peak = idle
        for i in range(len(data)):
            c.send_raw(data[i:i + 1], [fd] * 64)
            peak = max(peak, len(os.listdir(f"/proc/{pid}/fd")))
        done(reply=c.reply(), idle=idle, peak=peak, sent=64 * len(data))
    """, dst.api_socket, dst.proc.pid)
    got = _result(proc)
    reply = got["reply"]
    assert isinstance(reply, dict)
    assert reply["ok"] is False and reply["error"] == "bad-fds", reply
    assert "limits.max_fds_per_request" in str(reply["message"]), reply
    assert isinstance(got["sent"], int) and got["sent"] > 19000
    # Bounded by what a few pieces carry, not by what the frame carried.
    assert isinstance(got["peak"], int) and isinstance(got["idle"], int)
    assert got["peak"] - got["idle"] <= 4 * 64, got
    assert _holds(dst.proc.pid, "hostile-per-frame") == []


def test_fds_on_requests_that_take_none_are_refused_and_closed(tenancy: Tenancy) -> None:
    """status, subscribe, cancel, resolve, populate-failed with fds: bad-fds, every fd
    closed (they were kept for good; resolve would have held them a page deadline)."""
    dst = tenancy.dst
    proc = _hostile("""
        c = RawClient(sys.argv[1])
        fd = os.memfd_create("hostile-no-fds")
        replies = []
        for i, body in enumerate([
                {"op": "status"}, {"op": "subscribe", "session": "x"},
                {"op": "cancel", "session": "x"},
                {"op": "resolve", "session": "x", "vcpu": 0, "gpa": 0, "size": 1,
                 "access": "read"},
                {"op": "populate-failed", "session": "x", "vcpu": 0, "gpa": 0, "errno": 14}]):
            replies.append(c.request({**body, "id": i}, [fd] * 20))
        replies.append(c.request({"op": "status", "id": 99}))  # and the connection goes on
        done(replies=replies)
    """, dst.api_socket)
    replies = _result(proc)["replies"]
    assert isinstance(replies, list)
    for reply in replies[:-1]:
        assert reply["ok"] is False and reply["error"] == "bad-fds", reply
        assert "only import and export take fds" in reply["message"], reply
    assert replies[-1]["ok"] is True and replies[-1]["id"] == 99
    assert _holds(dst.proc.pid, "hostile-no-fds") == []


# ---------------------------------------------------------------- connections


def test_one_client_cannot_take_every_connection(tenancy: Tenancy) -> None:
    """256 idle connections from one process: only limits.max_connections_per_client
    are served; the others read a 'limit' error frame, then the close. Another client
    still gets in, and the refusals are counted."""
    dst = tenancy.dst
    share = config.LimitsConfig().max_connections_per_client
    before = _refused_total(dst, "limit")
    proc = _hostile("""
        path, share = sys.argv[1], int(sys.argv[2])
        clients = [connect(path) for _ in range(256)]
        refused = []
        for c in clients[share:]:
            refused.append(c.recv())
            assert c.recv() is None  # then closed
        served = clients[0].request({"op": "status", "id": 1})["ok"]
        done(refused=refused, served=served, holding=True)
        sys.stdin.readline()
    """, dst.api_socket, share)
    got = json.loads(_line(proc))
    with Client(dst.api_socket) as other:  # another client, while the 256 are held
        other.status()
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(60)
    assert got["served"] is True
    refused = got["refused"]
    assert len(refused) == 256 - share
    for reply in refused:
        assert reply["ok"] is False and reply["error"] == "limit", reply
        assert "limits.max_connections_per_client" in reply["message"], reply
    assert _refused_total(dst, "limit") >= before + 256 - share
    # Logged once for that client, not once per refused connection.
    assert dst.log_text().count("limits.max_connections_per_client") == 1


def test_a_vmm_that_stops_reading_is_dropped(tenancy: Tenancy) -> None:
    """A client subscribed to the healthy tenant's session (it runs as root, so it may
    observe it) floods requests and reads nothing: within limits.send_timeout its
    connection is dropped, and the healthy session goes on (the fixture checks it)."""
    dst = tenancy.dst
    assert tenancy._healthy is not None
    session = tenancy._healthy[2]
    proc = _hostile("""
        path, session, log = sys.argv[1], sys.argv[2], sys.argv[3]
        c = RawClient(path)
        c.send({"op": "subscribe", "id": 0, "session": session})
        c.sock.settimeout(2)
        sent = 0
        try:
            while True:
                c.send({"op": "status", "id": 1})
                sent += 1
        except (TimeoutError, BlockingIOError):
            pass  # both directions are full: the daemon is stuck writing to us
        deadline = time.monotonic() + 120
        while f"dropped VMM connection pid={os.getpid()}" not in open(log).read():
            assert time.monotonic() < deadline, "never dropped"
            time.sleep(0.1)
        c.sock.settimeout(30)
        read = 0
        while True:
            try:
                chunk = c.sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not chunk:
                break
            read += len(chunk)
        done(sent=sent, read=read)
    """, dst.api_socket, session, dst.log_path)
    got = _result(proc)
    assert isinstance(got["sent"], int) and got["sent"] > 0
    assert "limits.send_timeout" in dst.log_text()


# ---------------------------------------------------------------- clients that vanish


def test_a_large_reply_to_a_slow_reader_arrives_whole(tenancy: Tenancy) -> None:
    """A reply far larger than a socket buffer (an error naming a 600 kB op), to a
    client with a small receive buffer that waits before it reads: the daemon's sends
    are partial, and the frame still arrives whole, followed by the next reply."""
    proc = _hostile("""
        c = RawClient(sys.argv[1])
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.sock.sendall(frame({"op": "x" * 600000, "id": 1}))  # sendmsg could go short
        c.sock.sendall(frame({"op": "status", "id": 2}))
        time.sleep(2)  # the daemon's sendmsg calls return short meanwhile
        first, second = c.recv(), c.recv()
        done(first_id=first["id"], error=first["error"], length=len(first["message"]),
             second_id=second["id"], second_ok=second["ok"])
    """, tenancy.dst.api_socket)
    got = _result(proc)
    assert got["first_id"] == 1 and got["error"] == "bad-request", got
    assert isinstance(got["length"], int) and got["length"] > 600000, got
    assert got["second_id"] == 2 and got["second_ok"] is True, got


def test_clients_that_vanish_get_no_internal_error(tenancy: Tenancy) -> None:
    """A truncated frame then a close, a reset before the reply, a header then a
    close: each ends that connection quietly (no traceback, no 'internal error')."""
    dst = tenancy.dst
    proc = _hostile("""
        path = sys.argv[1]
        for _ in range(10):
            c = RawClient(path)  # a frame that says 100 bytes and has 10
            c.send_raw(struct.pack(">I", 100) + b"x" * 10)
            c.close()
            c = RawClient(path)  # a request, then a reset before its reply
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.send({"op": "status", "id": 1})
            c.close()
            c = RawClient(path)  # half a header
            c.send_raw(b"\\x00\\x00")
            c.close()
        c = RawClient(path)
        done(ok=c.request({"op": "status", "id": 2})["ok"])
    """, dst.api_socket)
    assert _result(proc)["ok"] is True
    assert "internal error" not in dst.log_text()


def test_an_oserror_in_a_handler_is_an_error_reply(tenancy: Tenancy) -> None:
    """An import MINOR over a write-sealed memfd: mmapping it writable fails in the
    kernel (EPERM). The VMM gets an error reply, the connection goes on, nothing is
    logged as an internal error."""
    dst = tenancy.dst
    proc = _hostile("""
        from uffdd._linux import uffd
        path = sys.argv[1]
        size = 1 << 20
        fd = os.memfd_create("hostile-sealed", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        ram = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)  # private: the seal allows it
        from uffdd._linux.mem import buffer_address
        addr = buffer_address(ram)
        ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_MINOR_SHMEM
                            | uffd.FEATURE_SIGBUS)
        try:  # a write-sealed shared mapping may not even be registered: the VMM's bug
            uffd.register(ufd, addr, size, uffd.REGISTER_MODE_MINOR)
        except Exception:
            pass
        c = RawClient(path)
        reply = c.request({"op": "import", "id": 3, "session": "hostile-sealed",
                           "token": b"t" * 16, "peer": "127.0.0.1:1",
                           "regions": [{"gpa": 0, "addr": addr, "size": size,
                                        "page_size": 4096, "uffd": 0, "fd": 1,
                                        "mode": "minor"}]}, [ufd, fd])
        done(reply=reply, after=c.request({"op": "status", "id": 4})["ok"])
    """, dst.api_socket)
    got = _result(proc)
    reply = got["reply"]
    assert isinstance(reply, dict) and reply["ok"] is False, reply
    assert got["after"] is True
    assert "internal error" not in dst.log_text()


# ---------------------------------------------------------------- accept out of fds


def test_accept_survives_running_out_of_fds(tenancy: Tenancy) -> None:
    """The destination daemon's RLIMIT_NOFILE lowered to what it holds (prlimit) while
    clients knock on its API socket, peer port and metrics port: accept() fails with
    EMFILE; each listener logs it once, retries, and accepts again once fds are free.
    The daemon stays up and the healthy tenant completes."""
    dst = tenancy.dst
    pid = dst.proc.pid
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    proc = _hostile("""
        path, peer_port, metrics_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        held = [connect(path) for _ in range(20)]
        held += [socket.create_connection(("127.0.0.1", peer_port)) for _ in range(4)]
        held += [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(4)]
        done(holding=len(held))
        sys.stdin.readline()
    """, dst.api_socket, dst.peer_port, dst.metrics_port)
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (fd_count(pid), old[1]))
        json.loads(_line(proc))
        for what in ("VMM API socket", "peer listener", "metrics listener"):
            _wait_log(dst, f"{what}")
        _wait_log(dst, "accept() failed")
        time.sleep(1.0)  # many retries happen in this second: none of them is logged
        text = dst.log_text()
        assert text.count("VMM API socket") >= 1
        for line in [ln for ln in text.splitlines() if "accept() failed" in ln]:
            assert "Too many open files" in line, line
        assert text.count("VMM API socket " + dst.api_socket + ": accept() failed") == 1
        assert dst.proc.poll() is None
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(60)
    _wait_log(dst, "accepting again after")
    with Client(dst.api_socket) as c:
        c.status()


# ---------------------------------------------------------------- stopping


def test_sigterm_ends_the_daemon_with_a_thread_stuck_in_the_kernel(tmp_path: Path) -> None:
    """A source VMM exports (pid mode) memory, and once the export is ``ok`` guards it
    with its own userfaultfd and never serves it (registered before, the export is
    refused: test_export_of_memory_a_uffd_guards_is_refused): the daemon's bulk thread
    blocks in process_vm_readv, in the kernel, where no cancellation reaches. SIGTERM
    still ends the daemon: after the grace it logs what is still running and exits with
    HARD_STOP_STATUS (it stayed up for good before). No ``tenancy``: the hard stop
    ends every session of the daemon, a healthy tenant's too, on purpose."""
    src = harness.start_daemon(tmp_path, "source")
    vmm = _hostile("""
        from uffdd._linux import uffd
        from uffdd._linux.mem import buffer_address
        size = 1 << 20
        ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE)
        ram = mmap.mmap(-1, size)
        addr = buffer_address(ram)
        c = RawClient(sys.argv[1])
        reply = c.request({"op": "export", "id": 1, "session": "stuck", "token": sys.argv[2],
                           "pid": os.getpid(),
                           "regions": [{"gpa": 0, "size": size, "page_size": 4096,
                                        "addr": addr}]})
        uffd.register(ufd, addr, size, uffd.REGISTER_MODE_MISSING)  # after the check
        done(reply=reply)
        sys.stdin.readline()  # never serves its uffd
    """, src.api_socket, TOKEN.decode())
    lane = None
    try:
        assert json.loads(_line(vmm))["reply"]["ok"] is True
        # The test plays the destination daemon: one bulk lane that asks for the stream.
        lane = peer.FrameSocket(peer.connect(src.peer, 10))
        peer.client_handshake(lane, "stuck", TOKEN, "bulk")
        lane.send({"t": "start", "chunk": 1 << 20})
        _wait_stuck_in(src.proc.pid, syscall=310)  # process_vm_readv on x86_64
        src.proc.send_signal(signal.SIGTERM)
        status = src.proc.wait(60)
    finally:
        if lane is not None:
            lane.close()
        vmm.kill()
        vmm.wait(10)
        src.stop()
    assert status == HARD_STOP_STATUS, src.log_text()[-3000:]
    log = src.log_text()
    assert "still running" in log and "export stuck" in log, log[-3000:]
    assert f"exiting now with status {HARD_STOP_STATUS}" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("mode", ["MISSING", "WP", "MINOR"])
def test_export_of_memory_a_uffd_guards_is_refused(tenancy: Tenancy, mode: str) -> None:
    """An export in pid mode of memory the source VMM registered with a userfaultfd
    (smaps VmFlags um, uw or ui) is refused with bad-region before ok: the daemon's
    process_vm_readv of a page nobody serves would wait in the kernel for ever (only
    the SIGTERM hard stop ended it). A region next to it, not registered, is exported."""
    vmm = _hostile("""
        from uffdd._linux import uffd
        from uffdd._linux.mem import buffer_address
        mode = sys.argv[3]
        size = 1 << 20
        features = {"MISSING": 0, "WP": uffd.FEATURE_PAGEFAULT_FLAG_WP,
                    "MINOR": uffd.FEATURE_MINOR_SHMEM}[mode]
        ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE | features)
        fd = os.memfd_create("hostile-guarded")
        os.ftruncate(fd, 2 * size)
        ram = mmap.mmap(fd, 2 * size)
        addr = buffer_address(ram)
        uffd.register(ufd, addr + size, size, getattr(uffd, "REGISTER_MODE_" + mode))
        c = RawClient(sys.argv[1])
        replies = []
        for i, start in enumerate((addr + size, addr, addr + size // 2)):
            replies.append(c.request({
                "op": "export", "id": i, "session": f"guarded-{i}", "token": sys.argv[2],
                "pid": os.getpid(),
                "regions": [{"gpa": 0, "size": size, "page_size": 4096, "addr": start}]}))
        done(replies=replies)
    """, tenancy.src.api_socket, TOKEN.decode(), mode)
    replies = _result(vmm)["replies"]
    assert isinstance(replies, list)
    flag = {"MISSING": "um", "WP": "uw", "MINOR": "ui"}[mode]
    for reply in (replies[0], replies[2]):  # wholly, then half over the guarded range
        assert reply["ok"] is False and reply["error"] == "bad-region", reply
        assert "registered with a userfaultfd" in reply["message"], reply
        assert f"VmFlags {flag}" in reply["message"], reply
    assert replies[1]["ok"] is True, replies[1]  # the unguarded half is fine
    # Its VMM has exited since: the daemon ended that export (the fixture counts fds).


@pytest.mark.parametrize("have", [
    {"t": "have", "r": 0, "bits": b"\xff" * 3}, {"t": "have", "r": 0, "bits": b"\xff" * 64},
    {"t": "have", "r": 7, "bits": b"\xff" * 32}, {"t": "have", "r": 0, "bits": "x" * 32},
    {"t": "have", "r": -1, "bits": b""}], ids=["short", "long", "region", "str", "negative"])
def test_a_have_bitmap_that_does_not_fit_ends_only_that_lane(
        tenancy: Tenancy, have: dict[str, object]) -> None:
    """A destination (authenticated: it has the token) whose bulk lane sends a ``have``
    bitmap of the wrong length, for a region that does not exist, or of the wrong type:
    the source closes that lane (a protocol error, no traceback), the export stays up,
    and a good lane then gets the pages. The healthy tenant is not touched."""
    vmm = _hostile("""
        size = 1 << 20  # 256 pages: a bitmap of 32 bytes
        fd = os.memfd_create("hostile-have")
        os.ftruncate(fd, size)
        c = RawClient(sys.argv[1])
        reply = c.request({"op": "export", "id": 1, "session": "have", "token": sys.argv[2],
                           "regions": [{"gpa": 0, "size": size, "page_size": 4096,
                                        "fd": 0, "offset": 0}]}, [fd])
        done(reply=reply)
        sys.stdin.readline()
    """, tenancy.src.api_socket, TOKEN.decode())
    try:
        assert json.loads(_line(vmm))["reply"]["ok"] is True
        bad = peer.FrameSocket(peer.connect(tenancy.src.peer, 10))
        try:
            peer.client_handshake(bad, "have", TOKEN, "bulk")
            bad.send(have)
            with pytest.raises((PeerUnavailable, ProtocolError, OSError)):
                bad.recv_header()  # closed by the source, nothing sent
        finally:
            bad.close()
        good = peer.FrameSocket(peer.connect(tenancy.src.peer, 10))
        try:
            peer.client_handshake(good, "have", TOKEN, "bulk")
            good.send({"t": "start", "chunk": 1 << 20})
            assert good.recv_header().get("t") in ("data", "zero"), "no pages on a good lane"
        finally:
            good.close()
    finally:
        vmm.kill()
        vmm.wait(10)


def _wait_stuck_in(pid: int, syscall: int, timeout: float = 60) -> None:
    """Until one thread of ``pid`` sits in system call ``syscall`` (/proc/.../syscall)."""
    require(os.uname().machine == "x86_64", "the system call number is x86_64's")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                text = Path(f"/proc/{pid}/task/{task}/syscall").read_text()
            except OSError:
                continue
            if text.split()[0] == str(syscall):
                return
        time.sleep(0.05)
    raise AssertionError(f"no thread of {pid} entered system call {syscall}")


# ---------------------------------------------------------------- starting


def _serve(tmp_path: Path, *args: str, config_text: str | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "uffdd", "serve", "--metrics-listen", ""]
    if config_text is not None:
        path = tmp_path / "given.toml"
        path.write_text(config_text)
        cmd += ["--config", str(path)]
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "NOTIFY_SOCKET")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_a_live_daemons_socket_is_never_taken(tenancy: Tenancy) -> None:
    """A second daemon on a live daemon's api.socket refuses to start, naming the path,
    and the first stays reachable; on its peer port, the error names the address and
    the cause (it was a raw traceback), and leaves no socket file of its own behind."""
    dst = tenancy.dst
    done = _serve(tenancy.workdir, "--api-socket", dst.api_socket,
                  "--peer-listen", "127.0.0.1:0")
    assert done.returncode != 0
    assert dst.api_socket in done.stderr and "another daemon is serving it" in done.stderr
    with Client(dst.api_socket) as c:
        c.status()
    other = str(tenancy.workdir / "second.sock")
    done = _serve(tenancy.workdir, "--api-socket", other,
                  "--peer-listen", f"127.0.0.1:{dst.peer_port}")
    assert done.returncode == 1, done
    assert f"peer.listen 127.0.0.1:{dst.peer_port}: cannot listen" in done.stderr, done.stderr
    assert "Address already in use" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(other)
    done = _serve(tenancy.workdir, "--api-socket", other, "--peer-listen", "127.0.0.1:0",
                  "--metrics-listen", f"127.0.0.1:{dst.metrics_port}")
    assert done.returncode == 1, done
    assert f"metrics.listen 127.0.0.1:{dst.metrics_port}: cannot listen" in done.stderr
    assert "Traceback" not in done.stderr and not os.path.exists(other)


def test_only_a_stale_socket_is_removed(tmp_path: Path) -> None:
    """A regular file or a directory at api.socket: refused, naming it, left as it was.
    A stale socket (nobody listens): replaced, and the daemon starts.
    No tenancy: each case starts a daemon of its own on purpose."""
    path = tmp_path / "source.sock"
    path.write_text("the operator's notes\n")
    done = _serve(tmp_path, "--api-socket", str(path), "--peer-listen", "127.0.0.1:0")
    assert done.returncode != 0
    assert str(path) in done.stderr and "not a socket (a regular file)" in done.stderr
    assert path.read_text() == "the operator's notes\n"
    path.unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what a killed daemon leaves
    daemon = harness.start_daemon(tmp_path, "source")
    try:
        with Client(daemon.api_socket) as c:
            c.status()
        assert "removing the stale socket" in daemon.log_text()
    finally:
        assert daemon.stop() == 0


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("text", "key"), [
    ("[limits]\nmax_sessions = -1\n", "limits.max_sessions"),
    ("[limits]\nmax_frame_bytes = 0\n", "limits.max_frame_bytes"),
    ("[session]\ndeadline = -5\n", "session.deadline"),
    ("[limits]\nhandshake_timeout = 0\n", "limits.handshake_timeout"),
    ("[session]\nkill_grace = 1e309\n", "session.kill_grace"),
    ("[session]\ndeadline = nan\n", "session.deadline"),
    ("[peer]\nconnect_timeout = inf\n", "peer.connect_timeout"),
    ("[limits]\nmax_fds_per_request = 254\n", "limits.max_fds_per_request"),
    ("[limits]\nmax_connections_per_client = 0\n", "limits.max_connections_per_client"),
    ("[limits]\nsend_timeout = -1\n", "limits.send_timeout"),
    ("[api]\nallowed_uids = [0, -1]\n", "api.allowed_uids"),
    ("[peer]\nspin_us = -50\n", "peer.spin_us"),
    ("[peer]\ndemand_slice_us = 100001\n", "peer.demand_slice_us"),
    ("[peer]\nlisten = \"127.0.0.1:65536\"\n", "peer.listen"),
])
def test_out_of_range_config_is_refused(tmp_path: Path, text: str, key: str) -> None:
    """--check-config and serve refuse, naming the file, the key and the range.
    No tenancy: the daemon must refuse to start."""
    for args in (["--check-config"], []):
        done = _serve(tmp_path, "--api-socket", str(tmp_path / "x.sock"),
                      "--peer-listen", "127.0.0.1:0", *args, config_text=text)
        assert done.returncode == 2, done
        assert "given.toml" in done.stderr and key in done.stderr, done.stderr
        if key != "peer.listen":
            assert "out of range: must be in" in done.stderr, done.stderr


def test_every_numeric_key_has_a_range() -> None:
    """A numeric key without a row in config.RANGES would go unchecked; the defaults
    are all in range.
    No tenancy: no daemon."""
    numeric = []
    for section in dataclasses.fields(config.Config):
        default = getattr(config.Config(), section.name)
        for f in dataclasses.fields(default):
            value = getattr(default, f.name)
            items = value if isinstance(value, list) else [value]
            if f.type in ("int", "float", "list[int]") or any(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in items):
                numeric.append(f"{section.name}.{f.name}")
    missing = [key for key in numeric if key not in config.RANGES]
    assert not missing, f"no range in config.RANGES for {missing}"
    config.check_ranges(config.Config(), "defaults")


def test_check_config_runs_the_checks_serve_runs(tmp_path: Path) -> None:
    """Configs serve refuses are refused by --check-config with the same message:
    a certificate with another's key, a garbage key, plaintext on 0.0.0.0.
    No tenancy: no daemon serves."""
    require(testcerts.openssl_available(), "needs the openssl command")
    source, destination = testcerts.make_pair(tmp_path / "pki")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    cases = {
        "mismatch": (f'[peer]\nca = "{source.ca}"\ncert = "{source.cert}"\n'
                     f'key = "{destination.key}"\n', "peer.cert / peer.key"),
        "garbage": (f'[peer]\nca = "{source.ca}"\ncert = "{source.cert}"\nkey = "{garbage}"\n',
                    "peer.cert / peer.key"),
        "plaintext": ('[peer]\nlisten = "0.0.0.0:0"\n', "reachable from other hosts"),
    }
    for name, (text, words) in cases.items():
        listen = [] if name == "plaintext" else ["--peer-listen", "127.0.0.1:0"]
        checked = _serve(tmp_path, "--api-socket", str(tmp_path / "x.sock"), *listen,
                         "--check-config", config_text=text)
        assert checked.returncode == 2, (name, checked)
        assert words in checked.stderr, (name, checked.stderr)
        served = _serve(tmp_path, "--api-socket", str(tmp_path / "x.sock"), *listen,
                        config_text=text)
        assert served.returncode != 0 and words in served.stderr, (name, served.stderr)
    good = f'[peer]\nca = "{source.ca}"\ncert = "{source.cert}"\nkey = "{source.key}"\n'
    assert _serve(tmp_path, "--api-socket", str(tmp_path / "x.sock"), "--peer-listen",
                  "127.0.0.1:0", "--check-config", config_text=good).returncode == 0


def test_certificate_dates_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our certificate (valid for two days from now) is refused by the preflight that
    serve and --check-config share, once the clock is past its end or before its start
    (the daemon's clock is moved; openssl 3.0 cannot issue an expired certificate).
    No tenancy: the preflight alone."""
    require(testcerts.openssl_available(), "needs the openssl command")
    from uffdd import daemon
    from uffdd.errors import ConfigError
    source = testcerts.make_pair(tmp_path / "pki")[0]
    cfg = config.from_dict({"peer": {"ca": str(source.ca), "cert": str(source.cert),
                                     "key": str(source.key), "listen": "127.0.0.1:0"}})
    daemon.preflight(cfg)  # valid now
    now = time.time()
    for shift, words in ((3 * 86400, "expired on"), (-86400, "not valid before")):
        monkeypatch.setattr(daemon.time, "time", lambda shift=shift: now + shift)
        with pytest.raises(ConfigError, match=words) as e:
            daemon.preflight(cfg)
        assert str(source.cert) in str(e.value)


def test_subscribing_again_and_again_lists_a_connection_once(tenancy: Tenancy) -> None:
    """A VMM subscribes 500 times to its own export: its session lists the connection
    once (each subscribe used to add a subscriber), so its final event comes once."""
    src = tenancy.src
    proc = _hostile("""
        c = RawClient(sys.argv[1])
        fd = os.memfd_create("hostile-subs")
        os.ftruncate(fd, 1 << 20)
        reply = c.request({"op": "export", "id": 1, "session": "hostile-subs",
                           "token": b"s" * 16,
                           "regions": [{"gpa": 0, "size": 1 << 20, "page_size": 4096,
                                        "fd": 0}]}, [fd])
        assert reply["ok"], reply
        for i in range(500):
            assert c.request({"op": "subscribe", "id": 10 + i, "session": "hostile-subs"})["ok"]
        c.send({"op": "cancel", "id": 2, "session": "hostile-subs"})
        finals = 0
        while not finals:  # the cancel's reply and the final event, in either order
            finals += c.recv().get("event") in ("failed", "completed", "cancelled")
        c.send({"op": "status", "id": 3})
        while True:  # anything queued for us before this reply is here by now
            msg = c.recv()
            if msg.get("id") == 3 and "event" not in msg:
                break
            finals += msg.get("event") in ("failed", "completed", "cancelled")
        done(finals=finals)
    """, src.api_socket)
    assert _result(proc)["finals"] == 1
