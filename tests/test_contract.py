"""The VMM contract (issue 14): uffdd/schema.py is the one definition, and everything holds to it.

Unit checks of the definition itself (every op, every error code the code can raise, the
README generated from it, the checker catching what it must), then a real daemon asked
the questions whose answers the contract fixes: a request without a usable id, a
zero-length frame, a bad mode. Every frame a daemon sends in any test is checked against
the definition by the autouse fixture in conftest.py; the tests here make sure that
check is not vacuous.
"""

from __future__ import annotations

import ast
import os
import re
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
from uffdd import api, metrics, schema
from uffdd.client import Client, ClientError, MemoryRegion
from uffdd.lab import harness

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the definition


def test_readme_reference_is_generated_from_the_schema() -> None:
    """The README's field tables are exactly ``python -m uffdd.schema`` (regenerate them
    with it after changing the schema)."""
    text = (ROOT / "README.md").read_text()
    assert text.count(schema.BEGIN) == 1 and text.count(schema.END) == 1
    start = text.index(schema.BEGIN)
    end = text.index(schema.END) + len(schema.END) + 1
    assert text[start:end] == schema.reference(), (
        "README wire reference differs from uffdd/schema.py: run `python -m uffdd.schema` "
        "and paste its output between the markers")


def test_every_op_is_defined_once() -> None:
    assert set(api.HANDLERS) == set(schema.REQUESTS) == set(schema.REPLIES)
    for op, fields in schema.REQUESTS.items():
        names = [f.name for f in fields]
        assert len(names) == len(set(names)), op
        assert names[:2] == ["op", "id"], op
        assert all(f.type in schema.TYPES for f in fields), op


def test_every_error_code_the_daemon_raises_is_defined() -> None:
    raised: set[str] = set()
    for path in (ROOT / "uffdd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "RequestError" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                raised.add(str(node.args[0].value))
    assert raised, "found no RequestError codes: the scan is broken"
    assert raised <= set(schema.ERRORS), raised - set(schema.ERRORS)
    # Every API refusal reason of the metrics is a code (peer-* are the peer link's).
    api_reasons = {r for r in metrics.REFUSED_REASONS if not r.startswith("peer-")}
    assert api_reasons <= set(schema.ERRORS), api_reasons - set(schema.ERRORS)
    assert "internal" in schema.ERRORS


def test_pending_names_real_fields() -> None:
    """Each relaxed rule names a field of its message (flip it by deleting the line)."""
    for where, name in schema.PENDING:
        fields = schema.STATUS_ENTRY if where == "status" else \
            schema.EVENTS[where.removeprefix("event:")]
        assert name in {f.name for f in fields}, (where, name)


def _status_entry(role: str) -> dict[str, object]:
    entry: dict[str, object] = {
        "session": "s", "role": role, "state": "running", "pages_total": 4,
        "pages_installed": 1, "pages_demand": 1, "pages_background": 0, "pages_zero": 0,
        "pages_poisoned": 0, "poisoned": [], "bytes_received": 0, "bytes_sent": 0,
        "faults": 0, "reconnects": 0, "started": 1.5, "elapsed_seconds": 0.25,
        "demand_latency_p50_us": None, "demand_latency_p99_us": None, "peer": None,
        "link": "up", "reason": None, "loop": "c"}
    if role == "import":
        entry.update(strategy="continue-then-populate", policy="crash", pages_unmapped=0)
    return entry


def test_checker_catches_unknown_missing_mistyped_and_out_of_enum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for role in ("import", "export"):
        reply = {"id": 3, "ok": True, "sessions": [_status_entry(role)]}
        assert schema.check_reply(reply, "status") == []
    entry = _status_entry("import")
    bad = {**entry, "colour": "red", "state": "sleeping", "pages_zero": -1,
           "poisoned": [[4096]]}
    del bad["pages_total"]
    problems = schema.check_status_entry(bad)
    for word in ("unknown field 'colour'", "'state' is 'sleeping'", "'pages_zero' must be uint",
                 "missing field 'pages_total'", "'poisoned' must be ranges"):
        assert any(word in p for p in problems), (word, problems)
    # An import-only field on an export entry is unknown there.
    export = {**_status_entry("export"), "pages_unmapped": 0}
    assert any("import sessions only" in p for p in schema.check_status_entry(export))
    # Replies and events.
    assert schema.check_reply({"id": 1, "ok": True, "session": "s"}, "export") == [
        "reply to 'export': missing field 'pages'"]
    assert schema.check_reply({"id": None, "ok": False, "error": "nope", "message": "m"},
                              None) == ["error reply: field 'error' is 'nope', not one of "
                                        + ", ".join(repr(c) for c in schema.ERRORS)]
    assert schema.check_event({"event": "peer-refused", "session": "s", "refusals": 1}) == [
        "event 'peer-refused': missing field 'reason'"]
    assert schema.check_event({"event": "exploded", "session": "s"})
    # The raw clients' check raises, and records where the autouse fixture looks
    # (pointed elsewhere here, or it would fail this test).
    log = tmp_path / "violations.jsonl"
    monkeypatch.setenv("UFFDD_SCHEMA_LOG", str(log))
    with pytest.raises(schema.SchemaViolation, match="unknown field 'colour'"):
        check_frame({"id": 1, "ok": True, "colour": "red"}, "cancel")
    assert "unknown field 'colour'" in log.read_text()


def test_terminal_events_once_pending_lands() -> None:
    """What the terminal events carry once PENDING is empty (issue 14, agreed)."""
    full = {"event": "completed", "session": "s", "outcome": "completed", "pages_total": 4,
            "pages_installed": 4, "pages_poisoned": 0, "poisoned": [], "pages_unmapped": 0}
    assert schema.check_event(full) == []
    failed = {**{k: v for k, v in full.items() if k != "outcome"}, "event": "failed",
              "reason": "why"}
    assert schema.check_event(failed) == []
    assert schema.check_event({**failed, "event": "cancelled"}) == []
    assert set(schema.TERMINAL_EVENTS) == {"completed", "failed", "cancelled"}


# ---------------------------------------------------------------- a real daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.DaemonProcess]:
    d = harness.start_daemon(tmp_path_factory.mktemp("contract"), "d",
                             extra=["--enable-fault-injection"])
    try:
        yield d
    finally:
        code = d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()[-4000:]
    assert code == 0


def _frames(sock: socket.socket) -> list[dict[str, object]]:
    """Every frame the daemon sends until it closes the connection, each checked."""
    sock.settimeout(20)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    frames = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        frames.append(check_frame(msgpack.unpackb(data[4 : 4 + n])))
        data = data[4 + n :]
    return frames


def _ask(sock: socket.socket, body: bytes) -> dict[str, object]:
    sock.sendall(struct.pack(">I", len(body)) + body)
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    (n,) = struct.unpack(">I", head)
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return check_frame(msgpack.unpackb(data))


@pytest.mark.parametrize(("body", "code"), [
    ({"op": "status"}, "bad-request"),  # no id at all
    ({"op": "status", "id": "seven"}, "bad-request"),
    ({"op": "status", "id": -1}, "bad-request"),
    ({"op": "status", "id": True}, "bad-request"),
    (b"\xc1", "bad-frame"),  # not msgpack: no id can be read
    ([1, 2], "bad-frame"),  # not a map
])
def test_request_without_a_usable_id_gets_id_nil(daemon: harness.DaemonProcess,
                                                 body: object, code: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(daemon.api_socket)
        raw = body if isinstance(body, bytes) else msgpack.packb(body)
        reply = _ask(s, raw)
        assert reply["id"] is None and reply["ok"] is False and reply["error"] == code, reply
        # The connection carries on (the frame boundary was intact).
        assert _ask(s, msgpack.packb({"op": "status", "id": 9}))["id"] == 9


def test_zero_length_frame_closes_the_connection(daemon: harness.DaemonProcess) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(daemon.api_socket)
        s.sendall(struct.pack(">I", 0))
        frames = _frames(s)  # returns at end of stream: the daemon closed it
    assert len(frames) == 1, frames
    assert frames[0]["error"] == "bad-frame" and frames[0]["id"] is None, frames
    assert "empty" in str(frames[0]["message"])


@pytest.mark.parametrize(("region", "words"), [
    ({"mode": "sideways"}, ["mode", "'missing', 'minor'"]),
    ({"mode": "minor"}, ["minor", "'fd'"]),
    ({"mode": 1}, ["mode", "str"]),
])
def test_bad_mode_is_a_bad_request(daemon: harness.DaemonProcess, region: dict[str, object],
                                   words: list[str]) -> None:
    body = {"op": "import", "id": 4, "session": "mode", "token": secrets.token_bytes(16),
            "peer": "127.0.0.1:1",
            "regions": [{"gpa": 0, "addr": 1 << 30, "size": 1 << 20, "page_size": 4096,
                         "uffd": 0, **region}]}
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(daemon.api_socket)
        reply = _ask(s, msgpack.packb(body))
    assert reply["id"] == 4 and reply["error"] == "bad-request", reply
    for word in words:
        assert word in str(reply["message"]), reply


def test_export_status_inject_and_cancel_conform(daemon: harness.DaemonProcess) -> None:
    """The replies of an export's whole life are schema-valid in strict mode (the client
    raises on a violation): export, status, inject, subscribe, cancel, and its end."""
    assert schema.strict(), "the suite must run with UFFDD_STRICT_SCHEMA=1 (conftest.py)"
    mem = os.memfd_create("contract-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mem, 1 << 20)
        with Client(daemon.api_socket, timeout=20) as c:
            pages = c.export_session("contract-1", secrets.token_bytes(16),
                                     [MemoryRegion(gpa=0, size=1 << 20, fd=mem)])
            assert pages == 256
            (entry,) = c.status("contract-1")
            assert schema.check_status_entry(entry) == []
            assert entry["role"] == "export" and entry["pages_total"] == 256
            injected = c.request({"op": "inject", "session": "contract-1", "lose": [1, 2],
                                  "corrupt": 1})
            assert (injected["lost"], injected["corrupt"]) == (2, 1)
            with pytest.raises(ClientError) as e:
                c.request({"op": "inject", "session": "contract-1", "lose": ["x"]})
            assert e.value.code == "bad-request"
            c.subscribe("contract-1")
            c.cancel("contract-1")
            end = c.wait_finished("contract-1", timeout=20)
            assert end["event"] in schema.TERMINAL_EVENTS and end["event"] != "completed"
            (entry,) = c.status("contract-1")
            assert entry["state"] == "cancelled", entry
    finally:
        os.close(mem)


def test_no_file_cites_a_document_that_is_not_in_the_repository() -> None:
    """Every ``*.md`` path named in code, config and docs exists (ARCHITECTURE.md once did
    not)."""
    cited = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
    missing = []
    for top in ("uffdd", "native", "deploy", "docs", "systemd", "tests"):
        for path in (ROOT / top).rglob("*"):
            if not path.is_file() or path.suffix in (".so", ".a", ".o", ".pyc") \
                    or "build" in path.parts \
                    or path.name in ("test_contract.py", "test_layout.py"):  # they name
                # missing documents on purpose, to look for them
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            for name in set(cited.findall(text)):
                if not ((ROOT / name).exists() or (path.parent / name).exists()
                        or name in ("README.md",)):
                    missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_import_before_export_waits_for_the_export(pair: Pair) -> None:
    """An import whose source has no export yet keeps asking until its deadline; the
    export made meanwhile is found, and the migration completes byte-exact."""
    session, token = f"early-{secrets.token_hex(3)}", secrets.token_hex(16)
    common = ["--session", session, "--token", token, "--memory", "16M", "--backing",
              "shmem", "--seed", "7"]
    dst = harness.start_vmm(harness.python_vmm(
        "dest", *common, "--socket", pair.dst.api_socket, "--peer", pair.src.peer),
        "dest", pair.workdir)
    # Wait (bounded) until the source has refused the destination at least once: the
    # import is running, and the export does not exist yet.
    give_up = time.monotonic() + 60
    while "source refused" not in pair.dst.log_text():
        assert dst.proc.poll() is None, dst.stderr()
        assert time.monotonic() < give_up, "the destination never dialled the source"
        time.sleep(0.05)
    with Client(pair.dst.api_socket) as c:
        (entry,) = c.status(session)
        assert entry["state"] == "connecting", entry
    ready = pair.workdir / f"{session}.ready"
    src = harness.start_vmm(harness.python_vmm(
        "source", *common, "--socket", pair.src.api_socket, "--ready-file", str(ready)),
        "source", pair.workdir, ready)
    assert_byte_exact(dst.result(300), src.result(60))


def test_ended_sessions_stay_in_status_and_do_not_count(tmp_path: Path) -> None:
    """With limits.max_sessions = 1, sessions can be made one after another: an ended one
    does not count. status keeps the last 64 that ended (registry.KEEP_FINISHED)."""
    d = harness.start_daemon(tmp_path, "one", config="[limits]\nmax_sessions = 1\n")
    mem = os.memfd_create("contract-ram", os.MFD_CLOEXEC)
    os.ftruncate(mem, 1 << 16)
    try:
        with Client(d.api_socket, timeout=20) as c:
            for i in range(66):
                session = f"ended-{i}"
                give_up = time.monotonic() + 30
                while True:  # the previous one's task may still be releasing it
                    try:
                        c.export_session(session, secrets.token_bytes(16),
                                         [MemoryRegion(gpa=0, size=1 << 16, fd=mem)])
                        break
                    except ClientError as e:
                        assert e.code == "limit" and time.monotonic() < give_up, e
                        time.sleep(0.01)
                with pytest.raises(ClientError) as refused:  # the running one counts
                    c.export_session("one-too-many", secrets.token_bytes(16),
                                     [MemoryRegion(gpa=0, size=1 << 16, fd=mem)])
                assert refused.value.code == "limit"
                c.cancel(session)
                c.wait_finished(session, timeout=20)
            give_up = time.monotonic() + 30
            while len(entries := c.status()) != 64 or entries[-1]["session"] != "ended-65":
                assert time.monotonic() < give_up, [e["session"] for e in entries]
                time.sleep(0.01)
            assert [e["session"] for e in entries] == [f"ended-{i}" for i in range(2, 66)]
            assert {e["state"] for e in entries} == {"cancelled"}
    finally:
        os.close(mem)
        assert d.stop() == 0
    assert "Traceback" not in d.log_text()


def test_shipped_config_starts_as_it_is() -> None:
    """deploy/uffdd.toml, unedited, passes every start-up check of `serve` (its TLS lines
    are commented out; its first lines say what to supply for migrations off this host)."""
    shipped = ROOT / "deploy" / "uffdd.toml"
    head = "\n".join(shipped.read_text().splitlines()[:8])
    assert "without certificates" in head and "certificate" in head, head
    done = subprocess.run([sys.executable, "-m", "uffdd", "serve", "--config", str(shipped),
                           "--check-config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
