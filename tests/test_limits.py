"""Limits against abuse: anything over a limit is refused with a clear error and counted,
while a healthy migration through the same daemon completes byte-exact (issue 6).

Each test starts a migration between two real daemons, abuses one of them while the
migration runs, and checks the refusal (what the abuser got, the refused-requests
metric, the log) and then the migration's byte-for-byte result.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from tests.conftest import Pair, assert_byte_exact, check_frame
from tests.test_security import Daemons, refused_count, session_status
from uffdd import peer, protocol
from uffdd.client import Client, ClientError, MemoryRegion
from uffdd.config import Config
from uffdd.lab import harness


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    ds = Daemons(tmp_path)
    try:
        yield ds
    finally:
        ds.stop_all()


def limited_pair(daemons: Daemons, *, source: str = "", dest: str = "") -> Pair:
    """Two plaintext loopback daemons with extra ``[limits]`` lines; metrics on both."""
    src = daemons.start("source", f"[limits]\n{source}", metrics=True)
    dst = daemons.start("destination", f"[limits]\n{dest}", metrics=True)
    return Pair(daemons.workdir, src, dst)


def healthy(pair: Pair) -> tuple[harness.VmmProcess, harness.VmmProcess, str]:
    """Start a 128 MiB migration and wait until both of its lanes are up."""
    session = f"healthy-{secrets.token_hex(3)}"
    src, dst = pair.start_migration(session=session, memory="128M", dest=["--threads", "2"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with Client(pair.src.api_socket) as c:
            if any(s["session"] == session and s["link"] == "up" for s in c.status()):
                break
        time.sleep(0.02)
    return src, dst, session


def finish(started: tuple[harness.VmmProcess, harness.VmmProcess, str]) -> None:
    src, dst, _session = started
    assert_byte_exact(dst.result(300), src.result(60))


def wait_count(d: harness.DaemonProcess, reason: str, above: float) -> float:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        value = refused_count(d, reason)
        if value > above:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{d.name}: refused{{reason={reason!r}}} stayed at {above}")


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# ---------------------------------------------------------------- VMM API


def test_too_many_sessions(daemons: Daemons) -> None:
    pair = limited_pair(daemons, source="max_sessions = 2\n")
    started = healthy(pair)  # one export session on the source
    before = refused_count(pair.src, "limit")
    mem = os.memfd_create("limit-test", os.MFD_CLOEXEC)
    os.ftruncate(mem, 4096)
    try:
        with Client(pair.src.api_socket) as c:
            region = [MemoryRegion(gpa=0, size=4096, fd=mem)]
            c.export_session("extra-1", secrets.token_bytes(16), region)  # the second: fine
            with pytest.raises(ClientError) as e:
                c.export_session("extra-2", secrets.token_bytes(16), region)
            assert e.value.code == "limit" and "max_sessions" in e.value.message, e.value
            finish(started)
    finally:
        os.close(mem)
    assert refused_count(pair.src, "limit") > before


def test_oversized_api_frame(daemons: Daemons) -> None:
    pair = limited_pair(daemons, dest="max_frame_bytes = 65536\n")
    started = healthy(pair)
    before = refused_count(pair.dst, "frame-too-large")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(pair.dst.api_socket)
        s.sendall(struct.pack(">I", 65537) + b"\x80" * 1024)
        data = read_all(s)
    (length,) = struct.unpack(">I", data[:4])
    reply = check_frame(msgpack.unpackb(data[4 : 4 + length]))
    assert reply["ok"] is False and reply["error"] == "frame-too-large", reply
    assert len(data) == 4 + length  # one error frame, then the connection is closed
    wait_count(pair.dst, "frame-too-large", before)
    finish(started)


_RESOLVER = r"""
import json, mmap, os, socket, struct, sys
import msgpack
from uffdd import protocol
from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address
from uffdd.client import Client, GuestRegion
path, peer_address, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = 1 << 20
ram = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = buffer_address(ram)
ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID | uffd.FEATURE_POISON)
uffd.register(ufd, addr, size, uffd.REGISTER_MODE_MISSING)
client = Client(path, timeout=20)
# The source has no such export: every page stays unobtainable, so each resolve waits.
client.import_session("stuck", os.urandom(16), peer=peer_address, policy="poison",
                      deadline=60.0, regions=[GuestRegion(gpa=0, addr=addr, size=size,
                                                          uffd=ufd)])
sock = client._sock
for i in range(n):
    sock.sendall(protocol.pack({"op": "resolve", "id": 100 + i, "session": "stuck",
                                "vcpu": i, "gpa": i * 4096, "size": 8, "access": "read"}))
buf = b""
while True:
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("daemon closed the connection")
        buf += chunk
    length = struct.unpack(">I", buf[:4])[0]
    frame, buf = msgpack.unpackb(buf[4 : 4 + length]), buf[4 + length :]
    if frame.get("id") is not None and frame["id"] >= 100:
        print(json.dumps(frame), flush=True)
        break
"""


def test_too_many_outstanding_resolve_requests(daemons: Daemons) -> None:
    """A VMM that keeps asking without waiting gets 'limit' for the excess at once."""
    pair = limited_pair(daemons, dest="max_outstanding_requests = 2\n")
    started = healthy(pair)
    before = refused_count(pair.dst, "limit")
    # In a child process: the import belongs to it (its pid), and nothing it asks for
    # can ever touch this test process.
    done = subprocess.run([sys.executable, "-c", _RESOLVER, pair.dst.api_socket,
                           pair.src.peer, "3"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout.strip().splitlines()[-1])
    # The first answer is the third request's refusal: the other two are still waiting.
    assert first["id"] == 102 and first["ok"] is False and first["error"] == "limit", first
    assert "max_outstanding_requests" in first["message"], first
    assert refused_count(pair.dst, "limit") > before
    finish(started)


# ---------------------------------------------------------------- peer link


def test_too_many_connections_from_one_peer(daemons: Daemons) -> None:
    pair = limited_pair(daemons, source="max_connections_per_peer = 4\n")
    started = healthy(pair)  # its demand and bulk lanes hold two of the four
    before = refused_count(pair.src, "limit")
    raws = [socket.create_connection(("127.0.0.1", pair.src.peer_port)) for _ in range(5)]
    try:
        answers = []
        for s in raws:
            s.settimeout(5)
            try:
                answers.append(s.recv(4096))
            except (ConnectionResetError, TimeoutError):
                answers.append(b"")
        greeted = [a for a in answers if a]
        refused = [a for a in answers if not a]
        assert refused, "no connection over the limit was refused"
        assert len(greeted) <= 4, answers
        for a in greeted:  # the accepted ones got the handshake's hello, nothing else
            header = msgpack.unpackb(a[4 : 4 + struct.unpack(">I", a[:4])[0]])
            assert header["t"] == "hello", header
    finally:
        for s in raws:
            s.close()
    assert refused_count(pair.src, "limit") >= before + len(refused)
    assert "limits.max_connections_per_peer" in pair.src.log_text()
    finish(started)


def test_oversized_peer_frame(daemons: Daemons) -> None:
    pair = limited_pair(daemons)
    started = healthy(pair)
    before = refused_count(pair.src, "peer-protocol")
    with socket.create_connection(("127.0.0.1", pair.src.peer_port)) as s:
        fs = peer.FrameSocket(s)
        assert fs.recv_header()["t"] == "hello"
        s.sendall(struct.pack(">I", 0x7FFFFFFF) + b"x" * 64)
        assert read_all(s) == b""  # closed, nothing sent
    wait_count(pair.src, "peer-protocol", before)
    assert "out of bounds" in pair.src.log_text()
    finish(started)


def test_slow_handshakes_are_cut_off(daemons: Daemons) -> None:
    """An idle client, one that trickles a byte at a time, and one that hangs up at
    once: each is dropped within limits.handshake_timeout (the shipped value), and the
    daemon carries on."""
    timeout = Config().limits.handshake_timeout
    pair = limited_pair(daemons)
    started = healthy(pair)
    before = refused_count(pair.src, "peer-protocol")
    # Connected and closed before the handshake: must not hurt the daemon (it used to
    # take it down: the peer task's PeerUnavailable reached the root nursery).
    socket.create_connection(("127.0.0.1", pair.src.peer_port)).close()
    idle = socket.create_connection(("127.0.0.1", pair.src.peer_port))
    trickle = socket.create_connection(("127.0.0.1", pair.src.peer_port))
    try:
        t0 = time.monotonic()
        frame = protocol.pack_peer({"t": "auth", "v": 1, "session": "x" * 40, "lane": "demand"})
        for byte in frame[:16]:  # each read completes well within the timeout...
            try:
                trickle.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(timeout / 4)
        # cut off, though no single read waited the timeout
        assert time.monotonic() - t0 < timeout + 4 * timeout / 4  # an uncut one: 4x
        # ...but the handshake as a whole did not: both are closed by now.
        for s in (idle, trickle):
            data = read_all(s, timeout=5)
            header = msgpack.unpackb(data[4 : 4 + struct.unpack(">I", data[:4])[0]])
            assert header["t"] == "hello" and len(data) == 4 + struct.unpack(">I", data[:4])[0]
    finally:
        idle.close()
        trickle.close()
    wait_count(pair.src, "peer-protocol", before + 2)
    assert "limits.handshake_timeout" in pair.src.log_text()
    assert session_status(pair.src, started[2])["state"] in ("running", "completed")
    finish(started)
