"""A session's end cannot be skipped, and the peer handshake tells nobody which sessions
exist: hostile VMMs and peers against two daemons at the shipped defaults while another
tenant migrates through them (``tests/hostile.py``).

* A destination VMM that lingers after its session failed, with a vCPU thread blocked
  in the kernel on a page, is killed at ``deadline + kill_grace`` after its source was
  lost -- at the shipped values (30 s + 5 s), with no override -- and the daemon then
  holds none of the session's fds. The same holds for a daemon told to stop (SIGTERM)
  during the grace: it kills the VMM before it exits.
* The source daemon gives one answer for "no such session" and "wrong token", refuses
  another protocol version, tells the export's VMM of a wrong token, and the
  destination's final reason says what happened.
* A region mismatch fails both sides, with a reason naming it.
* A refusal by the destination's own daemon is not reported as the source's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.hostile import Tenancy, tenancy  # noqa: F401
from uffdd import peer
from uffdd.client import Client
from uffdd.config import Config
from uffdd.lab import harness

DEFAULTS = Config().session  # the shipped values: no test overrides them
REPO = Path(__file__).resolve().parent.parent
_WAIT = 60.0  # generous: the machine is shared


def _vmm(role: str, workdir: Path, *args: str) -> tuple[harness.VmmProcess, Path]:
    ready = workdir / f"{role}-{secrets.token_hex(3)}.json"
    cmd = [sys.executable, "-m", "tests.hostile_vmms", role, "--ready-file", str(ready), *args]
    proc = harness.start_vmm(cmd, role, workdir, ready,
                             env={"PYTHONPATH": str(REPO)})
    return proc, ready


def _ready(vmm: harness.VmmProcess, ready: Path) -> dict[str, Any]:
    vmm.wait_ready(_WAIT)
    info: dict[str, Any] = json.loads(ready.read_text())
    return info


def _fd_targets(pid: int) -> list[str]:
    targets = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{n}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return targets


def _wait_blocked_on_uffd(pid: int, tid: int) -> None:
    """The kernel says the thread sleeps in handle_userfault (not our word for it)."""
    deadline = time.monotonic() + _WAIT
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            if f.read().strip() == "handle_userfault":
                return
        time.sleep(0.05)
    raise AssertionError(f"thread {tid} of VMM {pid} never blocked on its userfaultfd")


def _session(daemon: harness.DaemonProcess, session: str) -> dict[str, Any]:
    with Client(daemon.api_socket) as c:
        found = [s for s in c.status() if s["session"] == session]
    assert found, f"no session {session} on {daemon.name}"
    return found[-1]


def _wait_state(daemon: harness.DaemonProcess, session: str, states: tuple[str, ...],
                timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = _session(daemon, session)
        if status["state"] in states or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _uffds(daemon: harness.DaemonProcess) -> int:
    return _fd_targets(daemon.proc.pid).count("anon_inode:[userfaultfd]")


def _no_session_fds(t: Tenancy, memfd: str, uffds_before: int) -> None:
    """None of the lingering session's fds is left in the destination daemon: its memfd
    (by name), and its uffd (a uffd's link names no owner, so: as many uffds as before
    the import, while the healthy tenant, which holds the others, is still running)."""
    deadline = time.monotonic() + _WAIT
    while time.monotonic() < deadline and _uffds(t.dst) > uffds_before:
        time.sleep(0.1)
    targets = _fd_targets(t.dst.proc.pid)
    assert not [x for x in targets if memfd in x], targets
    assert _uffds(t.dst) <= uffds_before, targets
    assert t.healthy_in_flight(), "the healthy tenant ended: the uffd count proves nothing"


def _lingering_import(t: Tenancy, dst: harness.DaemonProcess, source: harness.DaemonProcess,
                      vmms: list[harness.VmmProcess], *extra: str
                      ) -> tuple[harness.VmmProcess, dict[str, Any], str]:
    """A source VMM exporting on ``source`` (which is then frozen: nothing arrives), and
    a lingering destination VMM importing from it through ``dst``, its thread blocked."""
    session, token = f"linger-{secrets.token_hex(3)}", secrets.token_hex(16)
    exporter, ready = _vmm("watch-source", t.workdir, "--socket", source.api_socket,
                           "--session", session, "--token", token)
    vmms.append(exporter)
    _ready(exporter, ready)
    os.kill(source.proc.pid, signal.SIGSTOP)  # a host that hangs, then dies
    vmm, ready = _vmm("lingering-dest", t.workdir, "--socket", dst.api_socket, "--session",
                      session, "--token", token, "--peer", source.peer, *extra)
    vmms.append(vmm)
    info = _ready(vmm, ready)
    _wait_blocked_on_uffd(info["pid"], info["tid"])
    held = _fd_targets(dst.proc.pid)
    assert [x for x in held if info["memfd"] in x], f"the daemon never got the memfd: {held}"
    return vmm, info, session


def test_lingering_vmm_killed_at_default_deadline_plus_grace(tenancy: Tenancy) -> None:  # noqa: F811
    """Crash policy at the shipped deadline and kill_grace: the source is lost, the VMM
    lingers with a vCPU blocked on a page; it is killed within deadline + kill_grace +
    1 s of the loss and the daemon keeps none of its fds. A second daemon, told to stop
    during the grace, kills its lingering VMM before it exits."""
    t = tenancy
    lost = [harness.start_daemon(t.workdir, f"lost-source-{i}") for i in range(2)]
    stopping = harness.start_daemon(t.workdir, "stopping-destination")
    vmms: list[harness.VmmProcess] = []
    try:
        uffds_before = _uffds(t.dst)  # the healthy tenant's, throttled: it stays
        vmm, info, session = _lingering_import(t, t.dst, lost[0], vmms)
        vmm2, _info2, session2 = _lingering_import(t, stopping, lost[1], vmms)
        for d in lost:
            os.kill(d.proc.pid, signal.SIGKILL)
        lost_at = time.monotonic()
        bound = DEFAULTS.deadline + DEFAULTS.kill_grace + 1.0
        ended: list[tuple[int, float]] = []  # when the VMM died, watched from a thread
        watcher = threading.Thread(target=lambda: ended.append(
            (vmm.proc.wait(bound + _WAIT), time.monotonic() - lost_at)), daemon=True)
        watcher.start()

        # The stopping daemon: SIGTERM once its session failed, during the kill grace.
        failed = _wait_state(stopping, session2, ("failed",), bound)
        assert failed["state"] == "failed", failed
        stopping.proc.send_signal(signal.SIGTERM)
        code = stopping.proc.wait(DEFAULTS.kill_grace + 15)
        assert code == 0, stopping.log_text()[-3000:]
        assert f"session={session2} VMM pid={_info2['pid']} still running" in \
            stopping.log_text(), f"it exited without the kill:\n{stopping.log_text()[-3000:]}"
        assert vmm2.proc.wait(10) == -signal.SIGKILL

        watcher.join(bound + _WAIT)
        assert ended, f"the lingering VMM is still running:\n{t.dst.log_text()[-4000:]}"
        rc, after = ended[0]
        assert rc == -signal.SIGKILL, rc
        assert after <= bound, (
            f"the lingering VMM was killed {after:.1f}s after the loss, not within {bound:g}s "
            f"(deadline {DEFAULTS.deadline:g}s + kill_grace {DEFAULTS.kill_grace:g}s + 1s)")
        assert "killing it" in t.dst.log_text()
        status = _session(t.dst, session)
        assert status["state"] == "failed", status
        assert "unreachable" in status["reason"] and "cannot reach the source" in \
            status["reason"], status
        _no_session_fds(t, info["memfd"], uffds_before)
        print(f"lingering VMM killed {after:.1f}s after its source was lost "
              f"(bound {bound:g}s)")
    finally:
        for v in vmms:
            if v.proc.poll() is None:
                v.proc.kill()
            v.proc.communicate(timeout=10)
        for d in [*lost, stopping]:
            d.kill()
    assert "Traceback" not in stopping.log_text(), stopping.log_text()[-4000:]


def test_sigterm_is_not_held_by_a_long_kill_grace(tenancy: Tenancy) -> None:  # noqa: F811
    """A daemon configured with a long kill_grace (600 s, on purpose: the one non-default
    value here) that is told to stop while a failed session's VMM lingers: the kill is
    not skipped, it comes by the end of the shutdown grace, and the daemon exits."""
    t = tenancy
    lost = harness.start_daemon(t.workdir, "lost-source")
    stopping = harness.start_daemon(t.workdir, "stopping-destination",
                                    config="[session]\nkill_grace = 600.0\n")
    vmms: list[harness.VmmProcess] = []
    try:
        # A short deadline is the import's own choice (a request field, not config).
        vmm, _info, session = _lingering_import(t, stopping, lost, vmms, "--deadline", "5")
        os.kill(lost.proc.pid, signal.SIGKILL)
        failed = _wait_state(stopping, session, ("failed",), _WAIT)
        assert failed["state"] == "failed", failed
        stopping.proc.send_signal(signal.SIGTERM)
        assert stopping.proc.wait(_WAIT) == 0, stopping.log_text()[-3000:]
        assert vmm.proc.wait(10) == -signal.SIGKILL
        assert "(the daemon is stopping): killing it" in stopping.log_text()
    finally:
        for v in vmms:
            if v.proc.poll() is None:
                v.proc.kill()
            v.proc.communicate(timeout=10)
        for d in (lost, stopping):
            d.kill()
    assert "Traceback" not in stopping.log_text(), stopping.log_text()[-4000:]


# ---------------------------------------------------------------- the handshake


def _auth(port: int, session: str, token: bytes, *, version: int = 1,
          lane: str = "demand") -> dict[str, Any]:
    """One raw handshake, as README §2 specifies it; returns the source's answer."""
    fs = peer.FrameSocket(socket.create_connection(("127.0.0.1", port), timeout=20))
    try:
        hello = fs.recv_header()
        snonce, cnonce = hello["nonce"], os.urandom(16)
        assert isinstance(snonce, bytes)
        msg = b"uffdd/1 client" + snonce + cnonce + session.encode() + b"\0" + lane.encode()
        fs.send({"t": "auth", "v": version, "session": session, "lane": lane, "nonce": cnonce,
                 "mac": hmac.new(token, msg, hashlib.sha256).digest()})
        return dict(fs.recv_header())
    finally:
        fs.close()


def _events(vmm: harness.VmmProcess) -> list[dict[str, Any]]:
    out, _ = vmm.proc.communicate(timeout=_WAIT)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_handshake_one_answer_version_and_wrong_token(tenancy: Tenancy) -> None:  # noqa: F811
    """No oracle, the version checked, and both sides told of a wrong token."""
    t = tenancy
    session, token = f"tok-{secrets.token_hex(3)}", secrets.token_hex(16)
    source, ready = _vmm("watch-source", t.workdir, "--socket", t.src.api_socket,
                         "--session", session, "--token", token)
    _ready(source, ready)
    port = t.src.peer_port
    unknown = _auth(port, f"nosuch-{secrets.token_hex(3)}", bytes.fromhex(token))
    wrong = _auth(port, session, secrets.token_bytes(16))
    assert unknown == wrong, (unknown, wrong)  # one answer: which ids exist is not told
    assert unknown == {"t": "error", "code": "unauthorized",
                       "message": "unknown session or wrong token"}, unknown
    future = _auth(port, session, bytes.fromhex(token), version=2)  # a valid MAC
    assert future.get("t") == "error" and future.get("code") == "bad-version", future
    for bad in ("", "x" * 200, "bad id"):  # malformed: refused as such, before any lookup
        assert _auth(port, bad, b"k" * 16).get("code") == "bad-request"
    assert _auth(port, session, bytes.fromhex(token), lane="sideways").get("code") == \
        "bad-request"
    assert _session(t.src, session)["state"] == "connecting"  # no lane was attached

    # A destination with the wrong token: it retries (it cannot tell "not yet
    # exported" from "wrong token") until its deadline, then says what happened.
    dest = harness.start_vmm(harness.python_vmm(
        "dest", "--socket", t.dst.api_socket, "--peer", t.src.peer, "--session", session,
        "--token", secrets.token_hex(16), "--memory", str(16 << 20)), "dest", t.workdir)
    result = dest.result(DEFAULTS.deadline + _WAIT)
    assert result["event"] == "failed", result
    reason = str(result["reason"])
    assert reason.startswith("source refused: unknown session or wrong token"), result
    # The source VMM heard of it, and its export is still there for the right token.
    status = _session(t.src, session)
    assert status["state"] == "connecting" and status["bytes_sent"] == 0, status
    right = harness.start_vmm(harness.python_vmm(
        "dest", "--socket", t.dst.api_socket, "--peer", t.src.peer, "--session", session,
        "--token", token, "--memory", str(16 << 20)), "dest", t.workdir)
    assert right.result(_WAIT * 3)["verified"] is True
    events = _events(source)
    refused = [e for e in events if e["event"] == "peer-refused"]
    assert refused and "wrong token" in refused[0]["reason"], events
    assert refused[-1]["refusals"] >= 2, refused  # every retry counted, events rate-limited
    assert events[-1]["event"] == "completed", events
    assert "wrong token for export session" in t.src.log_text()


def test_region_mismatch_fails_both_sides(tenancy: Tenancy) -> None:  # noqa: F811
    """Only the destination can judge it; both sessions fail with a reason naming it."""
    t = tenancy
    session, token = f"shape-{secrets.token_hex(3)}", secrets.token_hex(16)
    source, ready = _vmm("watch-source", t.workdir, "--socket", t.src.api_socket,
                         "--session", session, "--token", token, "--memory", str(16 << 20))
    _ready(source, ready)
    dest = harness.start_vmm(harness.python_vmm(
        "dest", "--socket", t.dst.api_socket, "--peer", t.src.peer, "--session", session,
        "--token", token, "--memory", str(32 << 20)), "dest", t.workdir)
    result = dest.result(_WAIT)
    assert result["event"] == "failed", result
    assert str(result["reason"]).startswith("region mismatch: the source exports 1 region"), \
        result
    events = _events(source)
    assert events and events[-1]["event"] == "failed", events
    reason = events[-1]["reason"]
    assert reason.startswith("the destination refused the session: region mismatch"), events
    assert "size 0x1000000" in reason and "size 0x2000000" in reason, reason
    assert _session(t.src, session)["state"] == "failed"


def test_own_daemon_refusal_is_not_a_source_refusal(tenancy: Tenancy) -> None:  # noqa: F811
    """Plaintext to a non-loopback source is refused by the destination's own daemon,
    and what the VMM hears says so (an error reply, or the session's failure)."""
    t = tenancy
    dest = harness.start_vmm(harness.python_vmm(
        "dest", "--socket", t.dst.api_socket, "--peer", "192.0.2.1:4460",  # TEST-NET-1
        "--session", f"plain-{secrets.token_hex(3)}", "--token", secrets.token_hex(16),
        "--memory", str(16 << 20)), "dest", t.workdir)
    try:
        told = str(dest.result(_WAIT)["reason"])  # refused in the link: the failed event
        assert told.startswith("this daemon refused the link to the source 192.0.2.1:4460"), \
            told
    except harness.HarnessError:  # refused before the reply: the import's error
        told = dest.stderr()
    assert "plaintext" in told and "source refused" not in told, told
