"""uffdd._linux.listenfds: socket activation, for real, in a child process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from uffdd._linux import listenfds

# The child does what a daemon does at start, then proves the socket works by
# accepting one connection. It reports what it found as one JSON line.
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from uffdd._linux.listenfds import ListenFdsError, listen_fds
    try:
        found = listen_fds()
    except ListenFdsError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        sys.exit(3)
    report = {
        "names": {n: len(s) for n, s in found.items()},
        "fds": {n: [x.fileno() for x in s] for n, s in found.items()},
        "cloexec": all(fcntl.fcntl(x.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
                       for s in found.values() for x in s),
        "env": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
    }
    print(json.dumps(report), flush=True)
    for sockets in found.values():
        conn, _ = sockets[0].accept()
        conn.sendall(b"hello")
        conn.close()
    """
)


# Put the inherited fd at 3 and set LISTEN_PID to the pid that will exec Python,
# as systemd does between fork and exec.
def shim(fd: int) -> str:
    """Return the bash script that moves ``fd`` to 3 and execs its arguments."""
    move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
    return move + 'export LISTEN_PID=$$; exec "$@"'


def start_child(sock: socket.socket, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start the child with ``sock`` as fd 3 and ``env`` added to the environment."""
    root = Path(__file__).resolve().parents[1]
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    full_env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen(
        ["bash", "-c", shim(sock.fileno()), "shim", sys.executable, "-c", CHILD],
        env=full_env,
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_unix_socket_named_vmm(tmp_path: Path) -> None:
    path = str(tmp_path / "vmm.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        child = start_child(listener, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "vmm"})
    assert child.stdout is not None
    report = json.loads(child.stdout.readline())
    assert report == {"names": {"vmm": 1}, "fds": {"vmm": [3]}, "cloexec": True, "env": []}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        assert client.recv(16) == b"hello"
    assert child.wait(timeout=10) == 0


def test_tcp_socket_without_names(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        child = start_child(listener, {"LISTEN_FDS": "1"})
    assert child.stdout is not None
    report = json.loads(child.stdout.readline())
    assert report["names"] == {"unknown": 1}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        assert client.recv(16) == b"hello"
    assert child.wait(timeout=10) == 0


def test_vmm_must_be_unix(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        child = start_child(listener, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "vmm"})
    assert child.stdout is not None
    report = json.loads(child.stdout.readline())
    assert "AF_UNIX" in report["error"]
    assert child.wait(timeout=10) == 3


def test_datagram_socket_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "dgram.sock"))
        child = start_child(sock, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "vmm"})
    assert child.stdout is not None
    report = json.loads(child.stdout.readline())
    assert "stream" in report["error"]
    assert child.wait(timeout=10) == 3


def test_not_listening_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "idle.sock"))
        child = start_child(sock, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "vmm"})
    assert child.stdout is not None
    report = json.loads(child.stdout.readline())
    assert "not listening" in report["error"]
    assert child.wait(timeout=10) == 3


def test_other_pid_gets_nothing_and_env_is_unset() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "vmm"}
    assert listenfds.take_fds(environ=env) == {}
    assert env == {}


def test_not_activated() -> None:
    assert listenfds.take_fds(environ={}) == {}


def test_keep_environment_when_asked() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert listenfds.take_fds(environ=env, unset_environment=False) == {}
    assert "LISTEN_PID" in env


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "me", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "many"},
        {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "vmm"},
    ],
)
def test_malformed_environment(env: dict[str, str]) -> None:
    env = {k: v.replace("{pid}", str(os.getpid())) for k, v in env.items()}
    with pytest.raises(listenfds.ListenFdsError):
        listenfds.take_fds(environ=env)
    assert env == {}


def test_fd_store_names_group_fds() -> None:
    # Stored fds come back like sockets, grouped by FDNAME; they need not be sockets.
    base = 900
    pipes = [os.pipe() for _ in range(2)]
    try:
        for i, fd in enumerate([pipes[0][0], pipes[0][1], pipes[1][0]]):
            os.dup2(fd, base + i, inheritable=True)
        env = {
            "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDS": "3",
            "LISTEN_FDNAMES": "uffd-a:uffd-a:memfd-b",
        }
        got = listenfds.take_fds(environ=env, start=base)
        assert got == {"uffd-a": [base, base + 1], "memfd-b": [base + 2]}
        assert all(not os.get_inheritable(fd) for fd in (base, base + 1, base + 2))
        with pytest.raises(listenfds.ListenFdsError, match="not a socket"):
            listenfds.listening_socket("uffd-a", base)
    finally:
        for fd in (base, base + 1, base + 2, *pipes[0], *pipes[1]):
            os.close(fd)


def test_announced_fd_not_open() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    with pytest.raises(listenfds.ListenFdsError, match="not open"):
        listenfds.take_fds(environ=env, start=1000)
