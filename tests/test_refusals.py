"""Bad input gets a clear error, loses nothing, and never disturbs other sessions.

A raw client speaks the VMM API by hand (so it can send what no client library would)
to a real daemon while a real migration runs through the same daemon.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from tests.conftest import Pair, check_frame
from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address


class RawClient:
    """A VMM API client that sends arbitrary bytes and fds."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.buf = b""
        self.ops: dict[int, str] = {}  # id -> op of requests sent, to check their replies

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
            else []
        self.sock.sendmsg([data], anc)

    def send(self, body: object, fds: list[int] | None = None) -> None:
        if isinstance(body, dict) and isinstance(body.get("id"), int) \
                and isinstance(body.get("op"), str):
            self.ops[body["id"]] = body["op"]
        data = msgpack.packb(body, use_bin_type=True)
        self.send_raw(struct.pack(">I", len(data)) + data, fds)

    def recv(self) -> dict[str, object] | None:
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        n = struct.unpack(">I", self.buf[:4])[0]
        body = msgpack.unpackb(self.buf[4 : 4 + n])
        self.buf = self.buf[4 + n :]
        op = self.ops.pop(body["id"], None) if isinstance(body.get("id"), int) else None
        return check_frame(body, op)  # the daemon's frames match uffdd/schema.py

    def reply(self) -> dict[str, object]:
        """The next reply, skipping events."""
        while True:
            msg = self.recv()
            assert msg is not None, "daemon closed the connection instead of replying"
            if "event" not in msg:
                return msg

    def request(self, body: dict[str, object], fds: list[int] | None = None
                ) -> dict[str, object]:
        self.send(body, fds)
        return self.reply()


def _refused(reply: dict[str, object], code: str, *words: str) -> None:
    assert reply["ok"] is False, reply
    assert reply["error"] == code, reply
    message = str(reply["message"])
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def _still_serving(client: RawClient) -> None:
    reply = client.request({"op": "status", "id": 999})
    assert reply["ok"] is True and reply["id"] == 999, reply


TOKEN = b"0123456789abcdef"


def _memfd(size: int = 1 << 20) -> int:
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _export(regions: list[dict[str, object]], session: str = "bad") -> dict[str, object]:
    return {"op": "export", "id": 1, "session": session, "token": TOKEN, "regions": regions}



def _holds(pid: int, *markers: str) -> list[str]:
    """The daemon's fds whose targets contain any marker (our memfd name, pipe inode)."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if any(m in target for m in markers):
            found.append(target)
    return found


@pytest.fixture
def running(pair: Pair):  # type: ignore[no-untyped-def]
    """A healthy 256 MiB migration in flight through both daemons while the test runs."""
    src, dst = pair.start_migration(memory="256M", backing="shmem", dest=["--threads", "2"])
    yield pair
    result = dst.result(300)
    source = src.result(60)
    assert result["verified"] is True and source["event"] == "completed", (result, source)


def test_malformed_frames(running: Pair) -> None:
    c = RawClient(running.dst.api_socket)
    bad = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    c.send_raw(struct.pack(">I", len(bad)) + bad)
    _refused(c.reply(), "bad-frame", "msgpack")
    _still_serving(c)
    c.send([1, 2, 3])
    _refused(c.reply(), "bad-frame", "map")
    c.send({1: "x"})
    _refused(c.reply(), "bad-frame")
    _still_serving(c)
    c.send_raw(struct.pack(">I", 1 << 30))
    _refused(c.reply(), "frame-too-large", "limit")
    assert c.recv() is None, "the connection must close after an oversized length"
    c2 = RawClient(running.dst.api_socket)
    c2.send_raw(struct.pack(">I", 0))
    _refused(c2.reply(), "bad-frame", "empty")
    c2.close()
    c.close()


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"op": "launch", "id": 1}, "bad-request", ["unknown op"]),
    ({"id": 1}, "bad-request", ["op"]),
    ({"op": "status", "id": "one"}, "bad-request", ["'id'", "int"]),
    ({"op": "status", "id": 1, "colour": "red"}, "bad-request", ["unknown field", "colour"]),
    ({"op": "subscribe", "id": 1}, "bad-request", ["missing field", "session"]),
    ({"op": "subscribe", "id": 1, "session": 7}, "bad-request", ["session", "str"]),
    ({"op": "subscribe", "id": 1, "session": "a b"}, "bad-request", ["session id"]),
    ({"op": "export", "id": 1, "session": "x", "token": b"short", "regions": []},
     "bad-request", ["token", "16 to 64"]),
    ({"op": "resolve", "id": 1, "session": "x", "vcpu": -1, "size": 8, "access": "read"},
     "bad-request", ["negative"]),
])
def test_bad_requests(running: Pair, body: dict[str, object], code: str,
                      words: list[str]) -> None:
    c = RawClient(running.dst.api_socket)
    _refused(c.request(body), code, *words)
    _still_serving(c)
    c.close()


def test_unknown_session(running: Pair) -> None:
    c = RawClient(running.dst.api_socket)
    for op in ("subscribe", "cancel"):
        _refused(c.request({"op": op, "id": 1, "session": "nope"}), "unknown-session", "nope")
    _refused(c.request({"op": "status", "id": 1, "session": "nope"}), "unknown-session")
    _refused(c.request({"op": "resolve", "id": 1, "session": "nope", "vcpu": 0, "gpa": 0,
                        "size": 8, "access": "read"}), "unknown-session")
    c.close()


def test_wrong_fds(running: Pair) -> None:
    pid = running.dst.proc.pid
    c = RawClient(running.dst.api_socket)
    mem = _memfd()
    r, w = os.pipe()
    pipe = f"pipe:[{os.fstat(r).st_ino}]"
    region = {"gpa": 0, "size": 1 << 20, "page_size": 4096, "fd": 0}
    # An fd that is not a memory file.
    _refused(c.request(_export([region]), [r]), "bad-fds", "memory file")
    # An fd that came but is not referenced.
    _refused(c.request(_export([region]), [mem, w]), "bad-fds", "referenced")
    # A reference to an fd that did not come.
    _refused(c.request(_export([{**region, "fd": 3}]), [mem]), "bad-fds", "only 1 fds")
    # A "uffd" that is a memfd.
    imp = {"op": "import", "id": 2, "session": "bad", "token": TOKEN, "peer": "127.0.0.1:1",
           "regions": [{"gpa": 0, "addr": 1 << 30, "size": 1 << 20, "page_size": 4096,
                        "uffd": 0, "mode": "missing"}]}
    _refused(c.request(imp, [mem]), "bad-fds", "not a userfaultfd")
    # More fds than the daemon accepts in one frame.
    _refused(c.request(_export([region]), [mem] * 80), "bad-fds")
    _still_serving(c)
    c.close()
    os.close(r)
    os.close(w)
    assert _holds(pid, "test-ram", pipe) == [], "the daemon kept fds of refused requests"


def test_uffd_without_api_handshake(running: Pair) -> None:
    libc = __import__("ctypes").CDLL(None, use_errno=True)
    raw = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    assert raw >= 0
    c = RawClient(running.dst.api_socket)
    imp = {"op": "import", "id": 2, "session": "noapi", "token": TOKEN, "peer": "127.0.0.1:1",
           "regions": [{"gpa": 0, "addr": 1 << 30, "size": 1 << 20, "page_size": 4096,
                        "uffd": 0, "mode": "missing"}]}
    _refused(c.request(imp, [raw]), "bad-fds", "UFFDIO_API")
    c.close()
    os.close(raw)


@pytest.mark.parametrize(("regions", "words"), [
    ([{"gpa": 100, "size": 4096, "page_size": 4096, "fd": 0}], ["gpa", "aligned"]),
    ([{"gpa": 0, "size": 0, "page_size": 4096, "fd": 0}], ["size"]),
    ([{"gpa": 0, "size": 4096, "page_size": 1234, "fd": 0}], ["page_size"]),
    ([{"gpa": 0, "size": 8192, "page_size": 4096, "fd": 0},
      {"gpa": 4096, "size": 4096, "page_size": 4096, "fd": 0, "offset": 8192}], ["overlap"]),
    ([{"gpa": 0, "size": 2 << 20, "page_size": 4096, "fd": 0}], ["memory fd is"]),
    ([{"gpa": 0, "size": 4096, "page_size": 4096, "fd": 0, "offset": 1 << 20}], ["ends at"]),
])
def test_bad_regions(running: Pair, regions: list[dict[str, object]], words: list[str]) -> None:
    c = RawClient(running.dst.api_socket)
    mem = _memfd()
    _refused(c.request(_export(regions), [mem]), "bad-region", *words)
    os.close(mem)
    c.close()


def test_minor_mode_needs_the_memory_fd(running: Pair) -> None:
    ufd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE)
    ram = mmap.mmap(-1, 1 << 20)
    c = RawClient(running.dst.api_socket)
    imp = {"op": "import", "id": 2, "session": "minor", "token": TOKEN, "peer": "127.0.0.1:1",
           "regions": [{"gpa": 0, "addr": buffer_address(ram), "size": 1 << 20,
                        "page_size": 4096, "uffd": 0, "mode": "minor"}]}
    # A malformed request (issue 14: was bad-region): nothing about the memory is wrong.
    _refused(c.request(imp, [ufd]), "bad-request", "minor", "fd")
    c.close()
    os.close(ufd)


def test_session_exists(running: Pair) -> None:
    c = RawClient(running.src.api_socket)
    mem = _memfd()
    region = {"gpa": 0, "size": 1 << 20, "page_size": 4096, "fd": 0}
    assert c.request(_export([region], "dup"), [mem])["ok"] is True
    _refused(c.request(_export([region], "dup"), [mem]), "session-exists", "dup")
    c.close()
    os.close(mem)


def _serve_with_config(tmp_path: Path, text: str | None, *, readable: bool = True
                       ) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bad.toml"
    if text is not None:
        path.write_text(text)
        if not readable:
            path.chmod(0)
    cmd = [sys.executable, "-m", "uffdd", "serve", "--config", str(path),
           "--api-socket", str(tmp_path / "x.sock"), "--check-config"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("text", "words"), [
    ("[api]\nsokcet = '/tmp/x'\n", ["api.sokcet", "unknown key"]),
    ("[peer]\nbulk_lanes = 'two'\n", ["peer.bulk_lanes", "int"]),
    ("[nonsense]\n", ["nonsense"]),
    ("[session]\npolicy = 'explode'\n", ["session.policy"]),
    ("[peer]\nfastpath = 'maybe'\n", ["peer.fastpath", "auto, on, off"]),
    ("[api\n", ["not valid TOML"]),
    (None, ["cannot read"]),
])
def test_bad_config_is_refused_at_start(tmp_path: Path, text: str | None,
                                        words: list[str]) -> None:
    done = _serve_with_config(tmp_path, text)
    assert done.returncode == 2, done
    assert "bad.toml" in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_fastpath_on_without_the_library_is_refused(tmp_path: Path) -> None:
    """[peer] fastpath = "on" and no libuffdd_fastpath: a start-up error naming where
    it looked; "auto" starts and runs the Python loops."""
    path = tmp_path / "fast.toml"
    cmd = [sys.executable, "-m", "uffdd", "serve", "--config", str(path),
           "--api-socket", str(tmp_path / "x.sock"), "--peer-listen", "127.0.0.1:0",
           "--check-config"]  # loopback: --check-config applies the plaintext rule too
    env = {**os.environ, "UFFDD_FASTPATH_LIB": str(tmp_path / "missing.so")}
    path.write_text("[peer]\nfastpath = 'on'\n")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done
    assert "peer.fastpath" in done.stderr and "missing.so" in done.stderr, done.stderr
    path.write_text("[peer]\nfastpath = 'auto'\nlisten = '127.0.0.1:0'\n")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr


def test_check_config_applies_the_start_up_checks(tmp_path: Path) -> None:
    """--check-config refuses what the daemon would refuse at start: plaintext on a
    non-loopback address, TLS files that cannot be loaded."""
    done = _serve_with_config(tmp_path, "[peer]\nlisten = '0.0.0.0:4460'\n")
    assert done.returncode == 2, done
    assert "set peer.ca, peer.cert and peer.key" in done.stderr, done.stderr
    done = _serve_with_config(tmp_path, "[peer]\nca = '/nonexistent/ca.pem'\n"
                              "cert = '/nonexistent/c.pem'\nkey = '/nonexistent/k.pem'\n")
    assert done.returncode == 2, done
    assert "/nonexistent/ca.pem" in done.stderr, done.stderr


def test_good_config_is_accepted(tmp_path: Path) -> None:
    """The shipped config passes --check-config, which loads the TLS files it names:
    they are pointed at throwaway certificates (the shipped paths exist only on a host
    that was set up)."""
    from uffdd.lab import testcerts
    shipped = Path(__file__).resolve().parent.parent / "deploy" / "uffdd.toml"
    certs = testcerts.make_pair(tmp_path / "pki")[0]
    text = shipped.read_text()
    for old, new in (("/etc/uffdd/tls/ca.pem", certs.ca), ("/etc/uffdd/tls/uffdd.pem",
                     certs.cert), ("/etc/uffdd/tls/uffdd.key", certs.key)):
        assert old in text, old
        text = text.replace(old, str(new))
    config = tmp_path / "uffdd.toml"
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "uffdd", "serve", "--config", str(config),
                           "--check-config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
