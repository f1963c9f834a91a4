"""Run uffdd daemons and VMMs as local processes: shared by the demo, the benchmarks and
the tests, so that all three start things the same way.

Everything here uses real processes on loopback; nothing is faked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_READY = re.compile(r"ready api=(\S+) peer_port=(\d+) metrics_port=(\d+)")
NATIVE_BUILD = Path(__file__).resolve().parents[2] / "native" / "build"


class HarnessError(RuntimeError):
    """A local daemon or VMM did not start or misbehaved."""


@dataclass
class DaemonProcess:
    """A ``uffdd serve`` child process."""

    name: str
    proc: subprocess.Popen[bytes]
    api_socket: str
    peer_port: int
    metrics_port: int
    log_path: Path
    config_path: Path | None = None
    peer_host: str = "127.0.0.1"  # its own address when it runs in a namespace
    netns: str | None = None  # the network namespace it runs in (uffdd.lab.twohost)

    def metrics_text(self, timeout: float = 5.0) -> str:
        """GET /metrics (from inside its namespace, where it listens, if it has one)."""
        url = f"http://{self.peer_host}:{self.metrics_port}/metrics"

        def get() -> str:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return str(r.read().decode())
        if self.netns is None:
            return get()
        from uffdd.lab.twohost import in_netns
        return in_netns(self.netns, get)

    @property
    def peer(self) -> str:
        return f"{self.peer_host}:{self.peer_port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status (SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_daemon(workdir: Path, name: str, *, config: str | None = None,
                 metrics: bool = False, extra: list[str] | None = None,
                 peer_port: int = 0, env: dict[str, str] | None = None,
                 timeout: float = 20.0, netns: str | None = None,
                 peer_host: str = "127.0.0.1") -> DaemonProcess:
    """Start ``uffdd serve`` on a private socket and an ephemeral port of ``peer_host``
    (loopback, unless it runs in network namespace ``netns`` with an address of its
    own there: see :mod:`uffdd.lab.twohost`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    api = str(workdir / f"{name}.sock")
    log_path = workdir / f"{name}.log"
    prefix = ["ip", "netns", "exec", netns] if netns else []
    cmd = [*prefix, sys.executable, "-m", "uffdd", "serve", "--api-socket", api,
           "--peer-listen", f"{peer_host}:{peer_port}",
           "--metrics-listen", f"{peer_host}:0" if metrics else ""]
    config_path = None
    if config is not None:
        config_path = workdir / f"{name}.toml"
        config_path.write_text(config)
        cmd += ["--config", str(config_path)]
    cmd += extra or []
    child_env = {**os.environ, **(env or {})}
    child_env.pop("NOTIFY_SOCKET", None)
    child_env.pop("LISTEN_FDS", None)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _READY.search(log_path.read_text(errors="replace"))
        if match:
            return DaemonProcess(name, proc, api, int(match.group(2)), int(match.group(3)),
                                 log_path, config_path, peer_host, netns)
        if proc.poll() is not None:
            raise HarnessError(f"daemon {name} exited with {proc.returncode}:\n"
                               + log_path.read_text(errors="replace"))
        time.sleep(0.05)
    proc.kill()
    raise HarnessError(f"daemon {name} did not become ready in {timeout}s")


@dataclass
class VmmProcess:
    """A VMM child process that prints one JSON line when it is done."""

    role: str
    proc: subprocess.Popen[str]
    ready_file: Path | None = None
    stderr_path: Path | None = None
    _stdout: list[str] = field(default_factory=list)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until a source VMM has exported (its ready file exists)."""
        assert self.ready_file is not None
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.role} VMM exited with {self.proc.returncode} "
                                   f"before exporting:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.role} VMM did not export in {timeout}s")
            time.sleep(0.02)

    def result(self, timeout: float = 600.0) -> dict[str, object]:
        """Wait for the VMM and return its JSON line (plus ``exit_status``)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise HarnessError(f"{self.role} VMM did not finish in {timeout}s "
                               "(a hung vCPU?):\n" + self.stderr()) from None
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise HarnessError(f"{self.role} VMM printed no result (exit "
                               f"{self.proc.returncode}):\n{out}\n{self.stderr()}")
        result: dict[str, object] = json.loads(lines[-1])
        result["exit_status"] = self.proc.returncode
        return result

    def stderr(self) -> str:
        if self.stderr_path is None:
            return ""
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def start_vmm(cmd: list[str], role: str, workdir: Path, ready_file: Path | None = None,
              env: dict[str, str] | None = None) -> VmmProcess:
    """Start a VMM process; stderr goes to a file in ``workdir``."""
    stderr_path = workdir / f"{role}-{os.getpid()}-{time.monotonic_ns()}.err"
    err: IO[str]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    return VmmProcess(role, proc, ready_file, stderr_path)


def python_vmm(role: str, *args: str) -> list[str]:
    """Command line of the Python VMM stand-in."""
    return [sys.executable, "-m", "uffdd.lab.pyvmm", role, *args]


def native_tool(name: str) -> Path | None:
    """Path of a native tool built by ``make -C native`` (None if not built)."""
    path = NATIVE_BUILD / name
    if path.exists() and os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    return Path(found) if found else None


def kvm_usable() -> bool:
    """True if /dev/kvm can be opened read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def reserve_hugepages(count: int) -> int:
    """Make sure at least ``count`` 2 MiB pages are free; returns the previous total."""
    path = Path("/proc/sys/vm/nr_hugepages")
    before = int(path.read_text())
    free = _meminfo("HugePages_Free")
    if free < count:
        path.write_text(str(before + count - free))
    return before


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def free_hugepages() -> int:
    return _meminfo("HugePages_Free")


def wait_port_closed(port: int, timeout: float = 5.0) -> None:
    """Wait until nothing listens on loopback ``port`` (a killed daemon released it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.05)
