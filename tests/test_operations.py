"""Operations against real daemons: /metrics over HTTP, `uffdd status`, sd_notify, and
socket activation, each with the daemon as a separate process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import Pair, assert_byte_exact
from uffdd.lab import harness


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    out = 0.0
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            out += value
    return out


def test_metrics_before_any_session(tmp_path: Path) -> None:
    d = harness.start_daemon(tmp_path, "lonely", metrics=True)
    try:
        s = scrape(d.metrics_port)
    finally:
        assert d.stop() == 0
    families = {key.partition("{")[0] for key in s}
    for name in ("uffdd_build_info", "uffdd_faults_total", "uffdd_pages_installed_total",
                 "uffdd_fault_resolution_seconds_count", "uffdd_sessions",
                 "uffdd_refused_requests_total", "uffdd_peer_received_bytes_total",
                 "uffdd_unrecoverable_pages_total", "uffdd_verdicts_total"):
        assert name in families, f"{name} not exported in advance"
    assert total(s, "uffdd_faults_total") == 0
    assert total(s, "uffdd_pages_installed_total", method="copy") == 0


def test_metrics_match_a_real_migration(pair: Pair) -> None:
    port = pair.dst.metrics_port
    src, dst = pair.start_migration(memory="256M", backing="anon", dest=["--threads", "4"])
    for _ in range(500):  # the destination VMM imports a moment after it starts
        during = scrape(port)
        if total(during, "uffdd_sessions", role="import", state="running"):
            break
        time.sleep(0.02)
    assert total(during, "uffdd_sessions", role="import", state="running") == 1
    assert [k for k in during if k.startswith("uffdd_session_pages{")], "no per-session series"
    result, source = dst.result(300), src.result(60)
    assert_byte_exact(result, source)
    after = scrape(port)
    pages = 65536
    installed = sum(total(after, "uffdd_pages_installed_total", method=m)
                    for m in ("copy", "zeropage", "continue"))
    assert installed == pages
    assert total(after, "uffdd_pages_installed_total", method="poison") == 0
    faults = total(after, "uffdd_faults_total", mode="missing") + \
        total(after, "uffdd_faults_total", mode="minor")
    assert faults > 0
    assert total(after, "uffdd_fault_resolution_seconds_count") == faults
    received = total(after, "uffdd_peer_received_bytes_total")
    assert received > 0
    with_status = _status_json(pair.dst.api_socket)
    session = with_status["sessions"][0]
    assert session["pages_demand"] + session["pages_background"] == session["pages_total"]
    # Per-session series are gone once the session ended.
    assert not [k for k in after if k.startswith("uffdd_session_pages{")]


def _status_json(api: str) -> dict[str, list[dict[str, object]]]:
    out = subprocess.run([sys.executable, "-m", "uffdd", "status", "--api-socket", api,
                          "--json"], check=True, capture_output=True, text=True, timeout=30)
    parsed: dict[str, list[dict[str, object]]] = json.loads(out.stdout)
    return parsed


def test_status_shows_a_migration_in_flight(tmp_path: Path) -> None:
    # Without the background stream pages only come on demand, so one thread touching
    # 256 MiB keeps the migration in flight long enough to look at.
    src_d = harness.start_daemon(tmp_path, "source", config="[peer]\nbackground = false\n")
    dst_d = harness.start_daemon(tmp_path, "destination")
    try:
        pair = Pair(tmp_path, src_d, dst_d)
        src, dst = pair.start_migration(memory="256M", backing="shmem",
                                        dest=["--threads", "1", "--order", "seq"])
        seen = None
        for _ in range(200):
            sessions = _status_json(dst_d.api_socket)["sessions"]
            if sessions and sessions[0]["state"] == "running" and \
                    0 < int(str(sessions[0]["pages_installed"])) < 65536:
                seen = sessions[0]
                break
            time.sleep(0.05)
        assert seen is not None, "never saw the migration in flight"
        assert seen["role"] == "import" and seen["link"] == "up"
        assert seen["loop"] == "c", "the C fault loop (make -C native) is not in use"
        assert seen["peer"] == src_d.peer
        table = subprocess.run([sys.executable, "-m", "uffdd", "status", "--api-socket",
                                dst_d.api_socket], check=True, capture_output=True, text=True,
                               timeout=30).stdout
        assert seen["session"] in table and "running" in table and "%" in table
        assert_byte_exact(dst.result(300), src.result(60))
    finally:
        assert (src_d.stop(), dst_d.stop()) == (0, 0)


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    return sock, path


def test_sd_notify_ready_status_watchdog(tmp_path: Path) -> None:
    notify, path = _notify_socket(tmp_path)
    api = str(tmp_path / "api.sock")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "uffdd", "serve", "--api-socket", api,
                             "--peer-listen", "127.0.0.1:0", "--metrics-listen", ""],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    messages: list[str] = []
    try:
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert os.path.exists(api)
        proc.terminate()
        while not any("STOPPING=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    ready = [m for m in messages if "READY=1" in m]
    assert ready, messages
    assert messages.index(ready[0]) < next(i for i, m in enumerate(messages)
                                      if "WATCHDOG=1" in m)
    assert any(re.search(r"STATUS=\d+ sessions", m) for m in messages), messages


def test_socket_activation(tmp_path: Path) -> None:
    """The daemon serves the API on a socket it did not bind (LISTEN_FDS/LISTEN_PID)."""
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    # LISTEN_PID must be the daemon's own pid: set it in the child just before exec.
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
                "LISTEN_FDNAMES='vmm'); os.execv(sys.executable, [sys.executable, '-m', "
                "'uffdd', 'serve', '--api-socket', sys.argv[2], '--peer-listen', "
                "'127.0.0.1:0', '--metrics-listen', ''])")
    unused = str(tmp_path / "not-bound-by-us.sock")
    log = tmp_path / "activated.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno()), unused],
                                pass_fds=[listener.fileno()], stdout=out, stderr=out)
    listener.close()
    try:
        deadline = time.monotonic() + 20
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "socket-activated" in log.read_text(), log.read_text()
        out = subprocess.run([sys.executable, "-m", "uffdd", "status", "--api-socket", path,
                              "--json"], check=True, capture_output=True, text=True, timeout=30)
        assert json.loads(out.stdout) == {"sessions": []}
        assert not os.path.exists(unused), "the daemon bound its own socket as well"
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
