"""systemd's side of the daemon's service-manager protocol, for tests: the notification
socket with an fd store kept by FDNAME (FDSTORE=1 / FDSTOREREMOVE=1), and a daemon
started as systemd starts one ($NOTIFY_SOCKET, the stored fds from 3 on with
$LISTEN_FDS/$LISTEN_FDNAMES/$LISTEN_PID, and no other fds of the test). Real sockets,
real SCM_RIGHTS, a real ``uffdd serve``; only the manager is ours.
"""

from __future__ import annotations

import array
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from uffdd.lab import harness

# Moves the fds to 3.. and sets LISTEN_PID to its own pid (exec keeps it). Copies go
# above 100 first, so that moving them down never overwrites one not yet moved; dup2
# onto the same number would keep close-on-exec, hence the explicit set. The fds as they
# came in are closed, so the daemon holds the stored fds once, at 3...
_LAUNCHER = ("import fcntl, os, sys\n"
             "fds = [int(x) for x in sys.argv[1].split(',') if x]\n"
             "moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]\n"
             "for i, fd in enumerate(moved):\n"
             "    os.dup2(fd, 3 + i)\n"
             "    os.set_inheritable(3 + i, True)\n"
             "for fd in fds:\n"
             "    if not 3 <= fd < 3 + len(fds):\n"
             "        os.close(fd)\n"
             "if fds:\n"
             "    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),"
             " LISTEN_FDNAMES=sys.argv[2])\n"
             "os.execv(sys.argv[3], sys.argv[3:])\n")


class ServiceManager:
    """The notification socket, and the fd store systemd would keep."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.store: dict[str, list[int]] = {}
        self.removed: list[str] = []

    def drain(self) -> None:
        """Read every datagram so far, keeping FDSTORE=1 fds by FDNAME as systemd does
        (and closing fds sent with anything else)."""
        while True:
            fds = array.array("i")
            try:
                data, anc, _flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                return
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
            fields = dict(f.split("=", 1) for f in data.decode().split("\n") if "=" in f)
            name = fields.get("FDNAME", "")
            if fields.get("FDSTORE") == "1":
                self.store.setdefault(name, []).extend(fds)
            elif fields.get("FDSTOREREMOVE") == "1":
                self.removed.append(name)
                for fd in self.store.pop(name, []):
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)

    def wait_removed(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while name not in self.removed:
            assert time.monotonic() < deadline, f"{name} never left the fd store"
            self.drain()

    def stored(self) -> list[tuple[str, int]]:
        """Every stored fd with its name, as the next daemon would get them."""
        self.drain()
        return [(name, fd) for name, fds in self.store.items() for fd in fds]

    def close(self) -> None:
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.store.clear()
        self.sock.close()


def start_under(manager: ServiceManager, workdir: Path, config: str, log_name: str, *,
                stored: list[tuple[str, int]] | None = None, name: str = "destination",
                peer_port: int = 0) -> harness.DaemonProcess:
    """``uffdd serve`` as systemd starts it, with ``stored`` (default: everything in the
    manager's store) as its inherited fds."""
    if stored is None:
        stored = manager.stored()
    config_path = workdir / f"{name}.toml"
    config_path.write_text(config)
    api = str(workdir / f"{name}.sock")
    log_path = workdir / log_name
    serve = [sys.executable, "-m", "uffdd", "serve", "--api-socket", api,
             "--peer-listen", f"127.0.0.1:{peer_port}", "--metrics-listen", "",
             "--config", str(config_path)]
    env = {**os.environ, "NOTIFY_SOCKET": str(manager.path)}
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    cmd = [sys.executable, "-c", _LAUNCHER, ",".join(str(fd) for _, fd in stored),
           ":".join(n for n, _ in stored), *serve]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                pass_fds=[fd for _, fd in stored], start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"ready api=(\S+) peer_port=(\d+)", log_path.read_text())
        if match:
            return harness.DaemonProcess(name, proc, api, int(match.group(2)), 0, log_path)
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.05)
    raise AssertionError("the daemon did not start:\n" + log_path.read_text())
