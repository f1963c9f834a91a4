"""Only the right VMM and the right peer ever touch a guest's memory (issue 6).

Real daemons, real VMM processes, real TLS: certificates come from a throwaway CA
made by the test itself (openssl CLI). Refused peers are raw clients that speak the
peer protocol by hand, so the test sees exactly what the daemon sent them; refused
VMMs are real client processes, one of them running under another uid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from tests.conftest import Pair, _check_logs, assert_byte_exact, check_frame, require
from uffdd import peer, tls
from uffdd.client import Client, ClientError
from uffdd.errors import AuthError, PeerUnavailable, ProtocolError
from uffdd.lab import harness, testcerts

# ---------------------------------------------------------------- helpers


class Daemons:
    """Daemons a test started; all must stop cleanly with no traceback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[harness.DaemonProcess] = []

    def start(self, name: str, config: str = "", **kw: object) -> harness.DaemonProcess:
        d = harness.start_daemon(self.workdir, name, config=config or None, **kw)  # type: ignore[arg-type]
        self.started.append(d)
        return d

    def stop_all(self) -> None:
        codes = [d.stop() for d in self.started]
        _check_logs(*self.started)
        assert codes == [0] * len(codes), f"daemons exited with {codes}"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    ds = Daemons(tmp_path)
    try:
        yield ds
    finally:
        ds.stop_all()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, testcerts.CertFiles]:
    """A CA with certificates for source, destination and an intruder, plus another CA."""
    require(testcerts.openssl_available(), "the openssl command is not installed")
    ca = testcerts.make_ca(tmp_path / "pki", "uffdd-test-ca")
    other = testcerts.make_ca(tmp_path / "other-pki", "some-other-ca")
    return {
        "source": testcerts.make_cert(ca, "uffdd-source", alt_names=["127.0.0.1"]),
        "destination": testcerts.make_cert(ca, "uffdd-destination", alt_names=["127.0.0.1"]),
        "intruder": testcerts.make_cert(ca, "uffdd-intruder", alt_names=["127.0.0.1"]),
        "other-ca": testcerts.make_cert(other, "uffdd-destination", alt_names=["127.0.0.1"]),
    }


def tls_pair(daemons: Daemons, pki: dict[str, testcerts.CertFiles], source_extra: str = "",
             dest_extra: str = "") -> Pair:
    """Source and destination daemons that speak mutual TLS and pin each other's name.

    ``dest_extra`` goes into the destination's [peer] table; ``source_extra`` after it."""
    src = daemons.start("source", "[peer]\n" + pki["source"].toml(["uffdd-destination"])
                        + source_extra, metrics=True)
    dst = daemons.start("destination", "[peer]\n" + pki["destination"].toml(["uffdd-source"])
                        + dest_extra)
    return Pair(daemons.workdir, src, dst)


def plain_pair(daemons: Daemons, source_config: str = "", dest_config: str = "") -> Pair:
    src = daemons.start("source", source_config, metrics=True)
    dst = daemons.start("destination", dest_config)
    return Pair(daemons.workdir, src, dst)


def refused_count(d: harness.DaemonProcess, reason: str) -> float:
    """uffdd_refused_requests_total{reason=...} from the daemon's /metrics."""
    url = f"http://127.0.0.1:{d.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(f'uffdd_refused_requests_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no refused series for {reason!r}")


def session_status(d: harness.DaemonProcess, session: str) -> dict[str, object]:
    with Client(d.api_socket, timeout=10) as c:
        found = [s for s in c.status() if s["session"] == session]
    assert found, f"no session {session} on {d.name}"
    return found[0]


def start_source(pair: Pair, session: str, token: str, memory: str = "16M",
                 extra: list[str] | None = None) -> harness.VmmProcess:
    """A source VMM that exports ``session`` and waits (the destination comes later)."""
    ready = pair.workdir / f"{session}.ready"
    vmm = harness.start_vmm(harness.python_vmm(
        "source", "--session", session, "--token", token, "--memory", memory,
        "--backing", "shmem", "--seed", "7", "--socket", pair.src.api_socket,
        "--ready-file", str(ready), *(extra or [])), "source", pair.workdir, ready)
    vmm.wait_ready()
    return vmm


def start_dest(pair: Pair, session: str, token: str, memory: str = "16M",
               extra: list[str] | None = None) -> harness.VmmProcess:
    return harness.start_vmm(harness.python_vmm(
        "dest", "--session", session, "--token", token, "--memory", memory,
        "--backing", "shmem", "--seed", "7", "--socket", pair.dst.api_socket,
        "--peer", pair.src.peer, "--threads", "2", *(extra or [])), "dest", pair.workdir)


def client_context(cert: testcerts.CertFiles | None, ca: Path) -> ssl.SSLContext:
    """What a (rogue) peer would use: trusts ``ca``, presents ``cert`` if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.check_hostname = False
    ctx.sslsocket_class = tls.LaneSSLSocket  # FrameSocket sends with sendmsg
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def raw_lane(port: int, ctx: ssl.SSLContext | None) -> peer.FrameSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname="uffdd-source")
    return peer.FrameSocket(sock)


def assert_slots_free(port: int, limit: int) -> None:
    """Exactly ``limit`` connections from here are accepted now: refused peers gave
    their limits.max_connections_per_peer slots back, and exactly once."""
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(limit + 1)]
    answers: list[bytes | None] = []
    try:
        for s in held:
            s.settimeout(0.5)
            try:
                answers.append(s.recv(1))  # b"": closed at once, over the limit
            except TimeoutError:
                answers.append(None)  # accepted: the daemon waits for a TLS hello
            except ConnectionResetError:
                answers.append(b"")
    finally:
        for s in held:
            s.close()
    assert answers.count(None) == limit and answers.count(b"") == 1, answers
    time.sleep(0.3)  # the daemon notices the closes and frees the slots


# ---------------------------------------------------------------- peer link


@pytest.mark.parametrize(("backing", "mode", "lanes"), [
    ("shmem", "missing", 1), ("anon", "missing", 2), ("shmem", "minor", 1)])
def test_migration_over_mutual_tls_is_byte_exact(daemons: Daemons,
                                                 pki: dict[str, testcerts.CertFiles],
                                                 backing: str, mode: str, lanes: int) -> None:
    pair = tls_pair(daemons, pki, dest_extra=f"bulk_lanes = {lanes}\n")
    result, source = pair.migrate(memory="64M", backing=backing, dest=[
        "--mode", mode, "--threads", "4", "--order", "rand"])
    assert_byte_exact(result, source)
    log = pair.src.log_text()
    assert "peer link: mutual TLS" in log, log[-3000:]
    assert "demand lane (mutual TLS)" in log and "bulk lane (mutual TLS)" in log, log[-3000:]


@pytest.mark.parametrize("attack", ["wrong-token", "no-certificate", "other-ca", "wrong-name",
                                    "plaintext"])
def test_bad_peer_is_refused_before_any_page(daemons: Daemons,
                                             pki: dict[str, testcerts.CertFiles],
                                             attack: str) -> None:
    pair = tls_pair(daemons, pki, "[limits]\nmax_connections_per_peer = 3\n")
    session, token = f"s-{secrets.token_hex(3)}", secrets.token_hex(16)
    source = start_source(pair, session, token)
    ca = pki["source"].ca
    good = pki["destination"]
    ctx = {
        "wrong-token": client_context(good, ca),
        "no-certificate": client_context(None, ca),
        "other-ca": client_context(pki["other-ca"], ca),
        "wrong-name": client_context(pki["intruder"], ca),
        "plaintext": None,
    }[attack]
    before = refused_count(pair.src, "peer-auth")
    use_token = secrets.token_bytes(16) if attack == "wrong-token" else bytes.fromhex(token)
    got: list[str] = []
    with pytest.raises((AuthError, PeerUnavailable, ProtocolError, ssl.SSLError, OSError)) as e:
        fs = raw_lane(pair.src.peer_port, ctx)
        try:
            # client_handshake reads 'hello' first: record whether the daemon ever got
            # that far with us (only a right certificate with a wrong token may).
            got.append("connected")
            if ctx is None:  # a plaintext client speaks first; a TLS listener must refuse it
                fs.send({"t": "auth", "v": 1, "session": session, "lane": "demand"})
            peer.client_handshake(fs, session, use_token, "demand")
            got.append("welcome")
            fs.send({"t": "req", "r": 0, "p": 0, "n": 1})
            got.append(str(fs.recv_header()))
        finally:
            fs.close()
    assert "welcome" not in got, got
    if attack in ("wrong-token", "wrong-name"):
        assert "unauthorized" in str(e.value), e.value  # told why, over the TLS channel
    deadline = time.monotonic() + 5
    while refused_count(pair.src, "peer-auth") <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused_count(pair.src, "peer-auth") > before
    status = session_status(pair.src, session)
    assert status["bytes_sent"] == 0 and status["pages_installed"] == 0, status
    assert "refused peer" in pair.src.log_text()
    assert_slots_free(pair.src.peer_port, 3)
    # The source is unharmed: the real destination migrates the session byte-exact.
    dest = start_dest(pair, session, token)
    assert_byte_exact(dest.result(300), source.result(60))


def test_destination_refuses_a_source_from_another_ca(
        daemons: Daemons, pki: dict[str, testcerts.CertFiles]) -> None:
    """The destination checks the source too: its session fails with the reason."""
    src = daemons.start("source", "[peer]\n" + pki["other-ca"].toml())
    dst = daemons.start("destination", "[peer]\n" + pki["destination"].toml(["uffdd-source"]))
    pair = Pair(daemons.workdir, src, dst)
    session, token = f"s-{secrets.token_hex(3)}", secrets.token_hex(16)
    source = start_source(pair, session, token)
    result = start_dest(pair, session, token).result(120)
    assert result["event"] == "failed", result
    assert "certificate" in str(result.get("reason")), result
    assert str(result.get("reason")).startswith("this daemon refused the link"), result
    assert session_status(src, session)["bytes_sent"] == 0
    source.proc.kill()  # its session ends with its connection
    source.proc.wait(10)


def test_peer_of_session_a_cannot_read_b_or_outside_a(daemons: Daemons) -> None:
    """A lane authenticated for A names only A's pages; B's token is B's alone."""
    pair = plain_pair(daemons)
    a, b = f"a-{secrets.token_hex(3)}", f"b-{secrets.token_hex(3)}"
    token_a, token_b = secrets.token_hex(16), secrets.token_hex(16)
    src_a = start_source(pair, a, token_a)  # one region of 4096 pages
    src_b = start_source(pair, b, token_b, extra=["--split", "2"])  # two regions
    before = refused_count(pair.src, "peer-protocol")
    for request in ({"t": "req", "r": 1, "p": 0, "n": 1},  # B has a region 1, A has not
                    {"t": "req", "r": 0, "p": 4096, "n": 1},  # past A's only region
                    {"t": "req", "r": 0, "p": 4095, "n": 2},  # straddles its end
                    {"t": "req", "r": 0, "p": -1, "n": 1}):
        fs = raw_lane(pair.src.peer_port, None)
        try:
            peer.client_handshake(fs, a, bytes.fromhex(token_a), "demand")
            fs.send(request)
            reply = fs.recv_header()
            assert reply.get("t") == "error" and reply.get("code") == "bad-request", reply
            with pytest.raises(PeerUnavailable):
                fs.recv_header()  # and the lane is closed
        finally:
            fs.close()
    assert refused_count(pair.src, "peer-protocol") >= before + 4
    # A's token does not open B.
    fs = raw_lane(pair.src.peer_port, None)
    with pytest.raises(AuthError, match="unauthorized"):
        peer.client_handshake(fs, b, bytes.fromhex(token_a), "demand")
    fs.close()
    assert session_status(pair.src, b)["bytes_sent"] == 0
    # Both sessions carry on: each migrates byte-exact.
    for session, token, vmm, extra in ((a, token_a, src_a, []), (b, token_b, src_b,
                                                                ["--split", "2"])):
        assert_byte_exact(start_dest(pair, session, token, extra=extra).result(300), vmm.result(60))


# ---------------------------------------------------------------- VMM API

# The other-uid client: the system Python with no imports beyond the standard library
# (the venv's interpreter may live under root's home), speaking the API by hand.
_CHILD = r"""
import json, socket, struct, sys
def enc(o):
    if isinstance(o, dict):
        return bytes([0x80 | len(o)]) + b"".join(enc(k) + enc(v) for k, v in o.items())
    if isinstance(o, str):
        b = o.encode()
        return (bytes([0xA0 | len(b)]) if len(b) < 32 else bytes([0xD9, len(b)])) + b
    return bytes([o])  # small ints only
def read(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data
path, session = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(path)
out = {}
for i, name in enumerate(("status", "status-one", "subscribe", "cancel")):
    body = {"op": name.split("-")[0], "id": i + 1}
    if name != "status":
        body["session"] = session
    frame = enc(body)
    try:
        s.sendall(struct.pack(">I", len(frame)) + frame)
    except OSError:
        pass  # the daemon may have closed already; what it sent is still readable
    try:
        (length,) = struct.unpack(">I", read(s, 4))
        out[name] = read(s, length).hex()
    except OSError as e:
        out[name] = "closed: " + str(e)
print(json.dumps(out))
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is private to root).

    Request it before ``daemons``, so the daemons' logs are checked before it goes."""
    require(os.geteuid() == 0, "needs root to run a client under another uid")
    path = Path(tempfile.mkdtemp(prefix="uffdd-sec-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody(socket_path: str, session: str) -> dict[str, dict[str, object]]:
    """Run the client as uid/gid 65534; returns each op's reply (or how it failed)."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    require(python is not None, "no system python3 to run as another uid")
    assert python is not None
    done = subprocess.run([python, "-I", "-S", "-c", _CHILD, socket_path, session],
                          user=65534, group=65534, extra_groups=[], capture_output=True,
                          text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    raw: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return {op: (check_frame(msgpack.unpackb(bytes.fromhex(v)), op.split("-")[0])
                 if not v.startswith("closed") else {"closed": v}) for op, v in raw.items()}


def test_vmm_from_a_disallowed_uid_is_refused(shared_dir: Path, daemons: Daemons) -> None:
    d = harness.start_daemon(shared_dir, "d", config='[api]\nsocket_mode = "0666"\n',
                             metrics=True)
    daemons.started.append(d)
    assert os.stat(d.api_socket).st_mode & 0o777 == 0o666  # the socket lets it connect...
    before = refused_count(d, "unauthorized")
    result = _as_nobody(d.api_socket, "anything")
    # ...and SO_PEERCRED is what refuses it: every request fails, nothing is shown.
    # The daemon's one frame on such a connection is the refusal; then it closes.
    assert result["status"].get("error") == "unauthorized", result
    assert "uid 65534" in str(result["status"].get("message")), result
    for op in ("status-one", "subscribe", "cancel"):
        assert "closed" in result[op], result
    assert refused_count(d, "unauthorized") > before
    assert "refused VMM connection" in d.log_text() and "uid=65534" in d.log_text()


def test_allowed_vmm_sees_and_touches_only_its_own_sessions(shared_dir: Path,
                                                           daemons: Daemons) -> None:
    """uid 65534 may use the daemon, but root's VMM's session is invisible to it."""
    src = harness.start_daemon(shared_dir, "source",
                               config='[api]\nsocket_mode = "0666"\nallowed_uids = [0, 65534]\n')
    dst = harness.start_daemon(shared_dir, "destination")
    daemons.started += [src, dst]
    pair = Pair(shared_dir, src, dst)
    session, token = f"s-{secrets.token_hex(3)}", secrets.token_hex(16)
    vmm = start_source(pair, session, token)
    result = _as_nobody(src.api_socket, session)
    assert result["status"].get("ok") is True and result["status"]["sessions"] == [], result
    # Not even its id: every request naming it gets the answer for a session that does
    # not exist, as the peer handshake does (no oracle for other tenants' session ids).
    for op in ("status-one", "subscribe", "cancel"):
        assert result[op].get("error") == "unknown-session", result
    other = f"no-such-{secrets.token_hex(3)}"
    missing = _as_nobody(src.api_socket, other)
    for op in ("status-one", "subscribe", "cancel"):
        assert (str(result[op]["message"]).replace(session, "ID")
                == str(missing[op]["message"]).replace(other, "ID")), (result, missing)
    assert session_status(src, session)["state"] != "cancelled"
    assert_byte_exact(start_dest(pair, session, token).result(300), vmm.result(60))


def test_second_vmm_cannot_resolve_or_cancel(daemons: Daemons) -> None:
    """Even root: a session is its creating VMM's (pid) to resolve and cancel."""
    pair = plain_pair(daemons)
    session, token = f"s-{secrets.token_hex(3)}", secrets.token_hex(16)
    # The destination imports first: its session waits for the export, so it is
    # certainly running while the second VMM tries.
    dest = start_dest(pair, session, token)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with Client(pair.dst.api_socket) as c:
            if any(s["session"] == session for s in c.status()):
                break
        time.sleep(0.05)
    with Client(pair.dst.api_socket) as other:
        for call in (lambda: other.resolve(session, vcpu=0, gpa=0),
                     lambda: other.cancel(session)):
            with pytest.raises(ClientError) as e:
                call()
            assert e.value.code == "unauthorized", e.value
        other.subscribe(session)  # root is the admin: it may watch, not act
    source = start_source(pair, session, token)
    assert_byte_exact(dest.result(300), source.result(60))


def test_api_socket_owner_group_and_mode(shared_dir: Path, daemons: Daemons) -> None:
    d = harness.start_daemon(shared_dir, "d", config='[api]\nsocket_mode = "0660"\n'
                             'socket_owner = "65534"\nsocket_group = "65534"\n')
    daemons.started.append(d)
    st = os.stat(d.api_socket)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o660)


def test_demo_over_tls_reports_tls_and_verified() -> None:
    require(testcerts.openssl_available(), "the openssl command is not installed")
    done = subprocess.run([sys.executable, "-m", "uffdd", "demo", "--tls", "--json",
                           "--memory", "32M", "--vmm", "python"],
                          capture_output=True, text=True, timeout=300)
    result = json.loads(done.stdout)
    assert result["tls"] is True and result["verified"] is True, result
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- when plaintext is allowed


def _serve_briefly(tmp_path: Path, config: str, listen: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "c.toml"
    path.write_text(config)
    return subprocess.run([sys.executable, "-m", "uffdd", "serve", "--config", str(path),
                           "--api-socket", str(tmp_path / "x.sock"), "--peer-listen", listen,
                           "--metrics-listen", ""], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("config", "words"), [
    ("", ["0.0.0.0:0 is reachable from other hosts", "peer.tls = false"]),
    ("[peer]\ntls = true\n", ["mutual TLS needs peer.ca, peer.cert, peer.key"]),
    ('[peer]\nca = "/nonexistent/ca.pem"\ncert = "/x.pem"\nkey = "/x.key"\n',
     ["peer.ca: cannot load /nonexistent/ca.pem"]),
])
def test_network_facing_daemon_refuses_to_start_without_tls(tmp_path: Path, config: str,
                                                            words: list[str]) -> None:
    done = _serve_briefly(tmp_path, config, "0.0.0.0:0")
    assert done.returncode != 0, done
    for word in words:
        assert word in done.stderr, done.stderr


def test_explicit_plaintext_starts_with_a_warning(daemons: Daemons) -> None:
    d = daemons.start("d", "[peer]\ntls = false\n")
    assert "level=warning" in d.log_text() and "PLAINTEXT (peer.tls = false)" in d.log_text()


def test_loopback_daemon_without_certificates_never_dials_out_in_plaintext(
        daemons: Daemons) -> None:
    """Implicit plaintext is for a daemon confined to loopback: it refuses to send a
    session's traffic to another host unencrypted. The import itself is refused, saying
    why (peer-security), before any ``ok``: the daemon never dials out."""
    pair = plain_pair(daemons)
    session, token = f"s-{secrets.token_hex(3)}", secrets.token_hex(16)
    dest = harness.start_vmm(harness.python_vmm(
        "dest", "--session", session, "--token", token, "--memory", "4M", "--backing",
        "shmem", "--socket", pair.dst.api_socket, "--peer", "192.0.2.1:4460"),
        "dest", pair.workdir)
    assert dest.proc.wait(120) != 0
    assert "peer-security" in dest.stderr() and "192.0.2.1:4460" in dest.stderr(), dest.stderr()
    log = pair.dst.log_text()
    assert "code=peer-security" in log, log[-3000:]
    assert "link up" not in log and "cannot reach source" not in log, log[-3000:]


def test_destination_with_an_untrusted_certificate_fails_clearly(
        daemons: Daemons, pki: dict[str, testcerts.CertFiles]) -> None:
    """The source's verdict on our certificate ends the import with the reason, instead
    of a link that keeps being retried until the page deadline."""
    src = daemons.start("source", "[peer]\n" + pki["source"].toml())
    # It trusts the source's CA, but its own certificate comes from another one.
    mixed = testcerts.CertFiles(pki["source"].ca, pki["other-ca"].cert, pki["other-ca"].key)
    dst = daemons.start("destination", "[peer]\n" + mixed.toml())
    pair = Pair(daemons.workdir, src, dst)
    session, token = f"s-{secrets.token_hex(3)}", secrets.token_hex(16)
    source = start_source(pair, session, token)
    t0 = time.monotonic()
    result = start_dest(pair, session, token).result(120)
    assert result["event"] == "failed", result
    assert time.monotonic() - t0 < 20, "the session kept retrying"
    assert "refused our certificate" in dst.log_text(), dst.log_text()[-3000:]
    assert f"source {src.peer} refused the link" in str(result.get("reason")), result
    assert session_status(src, session)["bytes_sent"] == 0
    source.proc.kill()
    source.proc.wait(10)
