"""libuffdd (native/) speaks README, wire protocol §1 exactly.

Builds native/ with make, then runs ``uffdd-codec-probe`` against a fake daemon
written here: every request frame the C library sends is decoded with Python's
msgpack, checked against its definition in uffdd/schema.py (the daemon's own check)
and compared field by field (names, types, fd indices — the fds are memfds whose
names tell which is which), and replies and events encoded with Python's msgpack
are checked against the same definition, fed back and checked as the C side decoded
them. A sample of every event kind, built from the schema, goes through the decoder.

Without a C toolchain (cc, make, pkg-config, msgpack-c) the tests skip, except
under CI=true, where they fail.
"""

from __future__ import annotations

import array
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from uffdd import protocol, schema

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
BUILD = NATIVE / "build"
PROBE = BUILD / "uffdd-codec-probe"
TOKEN = bytes(range(15)) + b"\xff"


def _toolchain_problem() -> str | None:
    for tool in ("make", "cc", "pkg-config"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: build-essential pkg-config libmsgpack-dev)"
    for name in ("msgpack-c", "msgpack"):
        if subprocess.run(["pkg-config", "--exists", name]).returncode == 0:
            return None
    return "msgpack-c not found by pkg-config (Debian: libmsgpack-dev)"


@pytest.fixture(scope="module")
def probe() -> Path:
    problem = _toolchain_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"native toolchain missing under CI: {problem}")
        pytest.skip(problem)
    r = subprocess.run(
        ["make", "-C", str(NATIVE), str(PROBE)], capture_output=True, text=True
    )
    assert r.returncode == 0, f"native build failed:\n{r.stdout}\n{r.stderr}"
    assert "warning:" not in r.stderr, r.stderr
    return PROBE


class FakeDaemon:
    """One listening socket, one accepted connection, frames in and out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.conn: socket.socket | None = None
        self.ops: dict[int, str] = {}  # id -> op of the requests received

    def accept(self) -> None:
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(10)

    def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        assert self.conn is not None
        buf = b""
        while len(buf) < n:
            data, anc, flags, _ = self.conn.recvmsg(
                n - len(buf), socket.CMSG_SPACE(64 * 4)
            )
            assert not flags & socket.MSG_CTRUNC
            if not data:
                raise EOFError("client closed")
            for level, typ, payload in anc:
                assert (level, typ) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                # fds must come with the frame's first byte
                assert buf == b"" and n == 4, "fds arrived after the first byte"
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
            buf += data
        return buf

    def recv(self) -> tuple[dict[str, Any], list[str]]:
        """Next request and the memfd names of the fds that came with it."""
        fds: list[int] = []
        (length,) = struct.unpack(">I", self._recv_exact(4, fds))
        body = self._recv_exact(length, fds)
        names = []
        for fd in fds:
            names.append(os.readlink(f"/proc/self/fd/{fd}").removeprefix("/memfd:").split(" ")[0])
            os.close(fd)
        # strict: one msgpack value, str keys, bin stays bytes
        frame = msgpack.unpackb(body, raw=False, strict_map_key=True)
        assert isinstance(frame, dict)
        assert all(isinstance(k, str) for k in frame)
        assert request_problems(frame) == [], frame
        self.ops[frame["id"]] = frame["op"]
        return frame, names

    def send(self, obj: dict[str, Any], chunk: int | None = None, *,
             conform: bool = True) -> None:
        """Send a reply or event; ``conform`` (the default): it must be one the daemon
        could send, by uffdd/schema.py (False only to test robustness beyond it)."""
        if conform:
            op = self.ops.get(obj["id"]) if isinstance(obj.get("id"), int) else None
            assert schema.check_message(obj, op) == [], obj
        assert self.conn is not None
        body = msgpack.packb(obj, use_bin_type=True)
        data = struct.pack(">I", len(body)) + body
        if chunk is None:
            self.conn.sendall(data)
        else:
            for i in range(0, len(data), chunk):
                self.conn.sendall(data[i : i + chunk])
                time.sleep(0.001)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def shutdown(self) -> None:
        self.close()
        self.listener.close()


def request_problems(frame: dict[str, Any]) -> list[str]:
    """What the daemon would refuse in a request frame by its definition (uffdd.schema):
    the request's fields, then each region's; plus the daemon's own check_request."""
    op = frame.get("op")
    if op not in schema.REQUESTS:
        return [f"unknown op {op!r}"]
    problems = schema.check_fields(frame, schema.REQUESTS[op], op)
    table = schema.IMPORT_REGION if op == "import" else schema.EXPORT_REGION
    for i, region in enumerate(frame.get("regions", [])):
        problems += schema.check_fields(region, table, f"regions[{i}]")
    if not problems:
        protocol.check_request(frame)  # raises RequestError on anything else it refuses
    return problems


def schema_sample(fields: tuple[schema.Field, ...], **given: Any) -> dict[str, Any]:
    """A message with every field of ``fields``, each a valid value of its type."""
    out: dict[str, Any] = {}
    for n, f in enumerate(fields):
        value: Any = {"uint": 1000 + n, "float": 0.5, "str": f"{f.name}-text",
                      "token": TOKEN, "bool": True, "list": [], "regions": [],
                      "sessions": [], "ranges": [[0x4000, 8192]]}[f.type]
        out[f.name] = f.values[0] if f.values else value
    out.update(given)
    assert schema.check_message(out) == [], out
    return out


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    d = FakeDaemon(tmp_path / "vmm.sock")
    yield d
    d.shutdown()


def start(probe: Path, daemon: FakeDaemon, scenario: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [str(probe), str(daemon.path), scenario], stdout=subprocess.PIPE, text=True
    )
    daemon.accept()
    return p


def finish(
    p: subprocess.Popen[str], daemon: FakeDaemon, close_first: bool = True
) -> list[dict[str, Any]]:
    if close_first:
        daemon.close()
    out, _ = p.communicate(timeout=10)
    daemon.close()
    assert p.returncode == 0, out
    return [json.loads(line) for line in out.splitlines()]


def test_export_memfd_frame_and_fd_indices(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "export-memfd")
    frame, names = daemon.recv()
    assert names == ["mem-a", "mem-b"]  # each distinct fd sent once
    assert frame == {
        "op": "export",
        "id": 1,
        "session": "vm42-mig7",
        "token": TOKEN,
        "regions": [
            {"gpa": 0, "size": 1 << 20, "page_size": 4096, "fd": 0, "offset": 0},
            {"gpa": 1 << 32, "size": 2 << 20, "page_size": 2 << 20, "fd": 1, "offset": 0},
            {"gpa": 1 << 20, "size": 1 << 20, "page_size": 4096, "fd": 0, "offset": 1 << 20},
        ],
    }
    assert isinstance(frame["token"], bytes)  # msgpack bin, not str
    daemon.send({"id": 1, "ok": True, "session": "vm42-mig7", "pages": 769})
    assert finish(p, daemon) == [{"call": "export", "rc": 0, "pages": 769}]


def test_export_pid_mode_sends_addr_and_no_fds(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "export-pid")
    frame, names = daemon.recv()
    assert names == []
    assert frame == {
        "op": "export",
        "id": 1,
        "session": "vm42.pid",
        "token": TOKEN,
        "pid": 1234,
        "regions": [
            {"gpa": 0, "size": 1 << 20, "page_size": 4096, "addr": 140212345671680},
            {"gpa": 4294967296, "size": 4096, "page_size": 4096, "addr": 0x7F0000000000},
        ],
    }
    daemon.send({"id": 1, "ok": True, "session": "vm42.pid", "pages": 257}, chunk=1)
    assert finish(p, daemon) == [{"call": "export", "rc": 0, "pages": 257}]


def test_import_frame_dedups_fds_and_sends_options(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "import")
    frame, names = daemon.recv()
    assert names == ["uffd-a", "mem-a", "uffd-b"]
    assert frame == {
        "op": "import",
        "id": 1,
        "session": "vm42-mig7",
        "token": TOKEN,
        "peer": "127.0.0.1:4460",
        "strategy": "no-uffd-wait",
        "policy": "poison",
        "deadline": 2.5,
        "regions": [
            {"gpa": 0, "addr": 0x7F0000000000, "size": 1 << 20, "page_size": 4096,
             "uffd": 0, "mode": "missing"},
            {"gpa": 1 << 20, "addr": 0x7F0000100000, "size": 1 << 20, "page_size": 4096,
             "uffd": 0, "mode": "minor", "fd": 1, "offset": 4096},
            {"gpa": 1 << 32, "addr": 0x7F1000000000, "size": 2 << 20, "page_size": 2 << 20,
             "uffd": 2, "mode": "missing", "fd": 1, "offset": 8192},
        ],
    }
    assert isinstance(frame["deadline"], float)
    daemon.send({"id": 1, "ok": True, "session": "vm42-mig7", "pages": 513})
    assert finish(p, daemon) == [{"call": "import", "rc": 0, "pages": 513}]


def test_import_defaults_leave_options_out(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "import-defaults")
    frame, names = daemon.recv()
    assert names == ["uffd-a"]
    assert frame == {
        "op": "import", "id": 1, "session": "s", "token": TOKEN, "peer": "[::1]:4460",
        "regions": [{"gpa": 0, "addr": 0x7F0000000000, "size": 8192, "page_size": 4096,
                     "uffd": 0, "mode": "missing"}],
    }
    daemon.send({"id": 1, "ok": True, "session": "s", "pages": 2})
    assert finish(p, daemon) == [{"call": "import", "rc": 0, "pages": 2}]


def test_daemon_error_reply_maps_to_code(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "import-defaults")
    daemon.recv()
    daemon.send({"id": 1, "ok": False, "error": "bad-region",
                 "message": "region 0 overlaps region 1"})
    [res] = finish(p, daemon)
    assert res["rc"] == -1 and res["code"] == 104 and res["name"] == "bad-region"
    assert res["message"] == "bad-region: region 0 overlaps region 1"


@pytest.mark.parametrize("id_field", [{}, {"id": None}])
def test_unauthorized_frame_without_id(
    probe: Path, daemon: FakeDaemon, id_field: dict[str, Any]
) -> None:
    """The daemon refuses a connection with one error frame whose id is absent or nil."""
    p = start(probe, daemon, "cancel")
    daemon.recv()
    # The daemon sends "id": nil (schema); no id at all is robustness beyond it.
    daemon.send({**id_field, "ok": False, "error": "unauthorized",
                 "message": "uid 1000 not allowed"}, conform="id" in id_field)
    [res] = finish(p, daemon)
    assert res["name"] == "unauthorized" and res["code"] == 107


def test_resolve_frames_verdicts_and_queued_events(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "resolve")
    frame, names = daemon.recv()
    assert names == []
    assert frame == {"op": "resolve", "id": 1, "session": "vm42-mig7", "vcpu": 3,
                     "gpa": 0x1000, "size": 8, "access": "write", "flags": 0}
    # an event arrives before the reply, in the same segment: it must be queued
    progress = {"event": "progress", "session": "vm42-mig7", "pages_total": 10,
                "pages_installed": 4, "pages_demand": 1, "pages_background": 3,
                "pages_zero": 0, "pages_poisoned": 0}
    assert schema.check_event(progress) == []
    body1 = msgpack.packb(progress)
    body2 = msgpack.packb({"id": 1, "ok": True, "verdict": "populate", "addr": 0x7F0000001000,
                           "gpa": 0x1000, "size": 4096, "reason": None})
    assert daemon.conn is not None
    both = struct.pack(">I", len(body1)) + body1 + struct.pack(">I", len(body2)) + body2
    daemon.conn.sendall(both)
    frame, _ = daemon.recv()
    assert frame == {"op": "resolve", "id": 2, "session": "vm42-mig7", "vcpu": 0,
                     "addr": 0x7F0000002000, "size": 1, "access": "exec", "flags": 5}
    daemon.send({"event": "completed", "session": "vm42-mig7", "pages_total": 10,
                 "pages_installed": 9, "pages_poisoned": 1, "poisoned": [[0x2000, 4096]],
                 "outcome": "completed-with-poisoned-pages"})
    daemon.send({"id": 2, "ok": True, "verdict": "crash", "addr": 0, "gpa": 0x2000,
                 "size": 4096, "reason": "page 2 lost: source gone"})
    out = finish(p, daemon, close_first=False)
    assert out == [
        {"call": "resolve", "rc": 0, "verdict": "populate", "addr": 0x7F0000001000,
         "gpa": 0x1000, "size": 4096, "reason": ""},
        {"call": "resolve", "rc": 0, "verdict": "crash", "addr": 0, "gpa": 0x2000,
         "size": 4096, "reason": "page 2 lost: source gone"},
        {"call": "pending", "rc": 0, "pending": 2},
        {"call": "event", "event": "progress", "session": "vm42-mig7", "pages_total": 10,
         "pages_installed": 4, "pages_poisoned": 0, "outcome": "", "reason": ""},
        {"call": "event", "event": "completed", "session": "vm42-mig7", "pages_total": 10,
         "pages_installed": 9, "pages_poisoned": 1,
         "outcome": "completed-with-poisoned-pages", "reason": ""},
        {"call": "next_event", "rc": 0, "timeout": True},
    ]


def test_populate_failed_frame(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "populate-failed")
    frame, _ = daemon.recv()
    assert frame == {"op": "populate-failed", "id": 1, "session": "vm42-mig7", "vcpu": 1,
                     "gpa": 0x2000, "errno": 14}
    daemon.send({"id": 1, "ok": True, "verdict": "inject-memory-error", "addr": 0,
                 "gpa": 0x2000, "size": 4096, "reason": "EHWPOISON"})
    assert finish(p, daemon) == [
        {"call": "populate-failed", "rc": 0, "verdict": "inject-memory-error", "addr": 0,
         "gpa": 0x2000, "size": 4096, "reason": "EHWPOISON"}]


def test_subscribe_then_events_until_close(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "subscribe")
    frame, _ = daemon.recv()
    assert frame == {"op": "subscribe", "id": 1, "session": "vm42-mig7"}
    daemon.send({"id": 1, "ok": True})
    # A kind from a later release: not in the schema, and skipped.
    daemon.send({"event": "some-future-event", "session": "vm42-mig7"}, conform=False)
    daemon.send({"event": "failed", "session": "vm42-mig7", "reason": "peer gone",
                 "pages_total": 0, "pages_installed": 0, "pages_poisoned": 0,
                 "poisoned": []}, chunk=3)
    time.sleep(0.1)
    out = finish(p, daemon)  # closes the connection: next_event reports it
    assert out[0] == {"call": "subscribe", "rc": 0}
    assert out[1] == {"call": "event", "event": "failed", "session": "vm42-mig7",
                      "pages_total": 0, "pages_installed": 0, "pages_poisoned": 0,
                      "outcome": "", "reason": "peer gone"}
    assert out[2]["call"] == "next_event" and out[2]["name"] == "closed"
    assert len(out) == 3


def test_reply_timeout_drops_late_reply_by_id(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "timeout")
    f1, _ = daemon.recv()
    assert f1["id"] == 1
    f2, _ = daemon.recv()  # sent after the first timed out (200 ms)
    assert f2["id"] == 2 and f2["access"] == "read"
    daemon.send({"id": 1, "ok": True, "verdict": "resume", "addr": 1, "gpa": 1, "size": 1,
                 "reason": None})
    daemon.send({"id": 2, "ok": True, "verdict": "resume", "addr": 2, "gpa": 0x3000,
                 "size": 4, "reason": None})
    out = finish(p, daemon)
    assert out[0]["name"] == "timeout"
    assert out[1] == {"call": "resolve", "rc": 0, "verdict": "resume", "addr": 2,
                      "gpa": 0x3000, "size": 4, "reason": ""}


def test_bad_arguments_never_reach_the_daemon(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "invalid")
    frame, _ = daemon.recv()
    assert frame == {"op": "cancel", "id": 1, "session": "vm42-mig7"}
    daemon.send({"id": 1, "ok": True})
    out = finish(p, daemon)
    assert [o["name"] for o in out[:3]] == ["invalid"] * 3
    assert out[3] == {"call": "cancel", "rc": 0}


def test_protocol_violation_is_an_error_not_a_crash(probe: Path, daemon: FakeDaemon) -> None:
    p = start(probe, daemon, "cancel")
    daemon.recv()
    assert daemon.conn is not None
    body = msgpack.packb([1, 2, 3])  # not a map (nothing the schema allows)
    daemon.conn.sendall(struct.pack(">I", len(body)) + body)
    [res] = finish(p, daemon)
    assert res["name"] == "protocol"


def test_native_make_check(probe: Path) -> None:
    """`make -C native check`: the whole native tree builds without a warning and
    the C tests pass (pattern vectors; vmsim end to end against a fake uffdd,
    which needs userfaultfd, i.e. root here)."""
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("the vmsim end-to-end test needs root for userfaultfd")
    r = subprocess.run(
        ["make", "-C", str(NATIVE), "all", "check"], capture_output=True, text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert "warning:" not in r.stderr, r.stderr
    assert "test_vmsim:" in r.stdout and " 0 failed" in r.stdout, r.stdout


def test_decoder_takes_a_schema_sample_of_every_event(probe: Path,
                                                      daemon: FakeDaemon) -> None:
    """Each event kind of uffdd/schema.py, every field present, as the daemon may send it:
    libuffdd decodes the kinds it knows (every terminal one) and skips the others."""
    p = start(probe, daemon, "subscribe")
    daemon.recv()
    daemon.send({"id": 1, "ok": True})
    sent = []
    for kind, fields in schema.EVENTS.items():
        event = schema_sample(fields, event=kind, session="vm42-mig7")
        daemon.send(event)
        sent.append(event)
    out = finish(p, daemon)
    assert out[0] == {"call": "subscribe", "rc": 0}
    decoded = [o for o in out if o["call"] == "event"]
    known = [e for e in sent if e["event"] in ("progress", *schema.TERMINAL_EVENTS)]
    assert {e["event"] for e in known} == {"progress", "completed", "failed", "cancelled"}
    assert decoded == [
        {"call": "event", "event": e["event"], "session": "vm42-mig7",
         "pages_total": e["pages_total"], "pages_installed": e["pages_installed"],
         "pages_poisoned": e["pages_poisoned"], "outcome": e.get("outcome", ""),
         "reason": e.get("reason", "")} for e in known]
    assert out[-1]["call"] == "next_event" and out[-1]["name"] == "closed"


def test_every_request_libuffdd_sends_is_defined() -> None:
    """Every op libuffdd's encoder can send is a request of uffdd/schema.py, and the
    scenarios above send (and check) each of them."""
    source = (NATIVE / "lib" / "client.c").read_text()
    ops = set(re.findall(r'pack_kv_str\(&pk, "op", "([a-z-]+)"\)', source))
    ops |= set(re.findall(r'simple_request\(c, "([a-z-]+)"', source))
    assert ops == {"export", "import", "resolve", "populate-failed", "subscribe", "cancel"}
    assert ops <= set(schema.REQUESTS)
