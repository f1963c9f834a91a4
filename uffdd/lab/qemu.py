"""QEMU as a peer VMM for the bench: one VM process, its QMP monitor and its serial port.

Used by ``uffdd bench --scenario versus-qemu`` (uffdd/lab/versus_qemu.py) to run QEMU's
own postcopy migration of the guest program native/guest/ (uffdd-guest.elf) on this
machine. Every socket is read by a thread that stamps each message with the host's wall
clock, so QMP event timestamps (QEMU's wall clock) and serial lines can be compared.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, Any]


class QemuError(RuntimeError):
    """QEMU did not start, answered a command with an error, or timed out."""


def qemu_binary() -> str | None:
    """``qemu-system-x86_64`` on PATH (Debian: qemu-system-x86), or None."""
    return shutil.which("qemu-system-x86_64")


def _connect_unix(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if proc.poll() is not None:
                raise QemuError(f"QEMU exited with {proc.returncode} before {path.name} "
                                "was up") from None
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU's {path.name} did not appear in time") from None
            time.sleep(0.02)


class _Lines:
    """A thread that reads newline-terminated text from a socket, each with its time."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            now = time.time()
            if not data:
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                return
            buf += data
            *complete, buf = buf.split(b"\n")
            if complete:
                with self.cond:
                    self.lines.extend((now, c.decode(errors="replace").rstrip("\r"))
                                      for c in complete)
                    self.cond.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float,
                 start: int = 0) -> tuple[int, float, str]:
        """The first line at index >= start that ``match`` accepts: (index, time, text)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    t, text = self.lines[i]
                    if match(text):
                        return i, t, text
                    i += 1
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise QemuError("no matching line" + (" (closed)" if self.closed else
                                                         f" in {timeout:.0f} s"))
                self.cond.wait(left)

    def text(self) -> str:
        with self.cond:
            return "\n".join(t for _, t in self.lines)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Qmp:
    """A QMP monitor: synchronous commands; events kept with QEMU's timestamps."""

    def __init__(self, sock: socket.socket) -> None:
        self.lines = _Lines(sock, "qmp")
        self.sock = sock
        self._next = 0
        self._id = 0
        self.lines.wait_for(lambda t: '"QMP"' in t, 20)
        self._next = len(self.lines.lines)
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: Message | None = None,
                timeout: float = 30.0) -> Any:
        self._id += 1
        ident = f"c{self._id}"
        msg: Message = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        _, _, text = self.lines.wait_for(lambda t: f'"id": "{ident}"' in t, timeout)
        reply: Message = json.loads(text)
        if "error" in reply:
            raise QemuError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def events(self, name: str) -> list[Message]:
        out = []
        with self.lines.cond:
            snapshot = list(self.lines.lines)
        for _, text in snapshot:
            if '"event"' in text:
                msg: Message = json.loads(text)
                if msg.get("event") == name:
                    out.append(msg)
        return out

    def wait_event(self, name: str, timeout: float,
                   data: Callable[[Message], bool] = lambda d: True) -> tuple[float, Message]:
        """The first event ``name`` whose data ``data`` accepts: (QEMU's timestamp, data)."""

        def match(text: str) -> bool:
            if '"event"' not in text:
                return False
            msg = json.loads(text)
            return bool(msg.get("event") == name and data(msg.get("data") or {}))

        _, _, text = self.lines.wait_for(match, timeout)
        msg: Message = json.loads(text)
        ts = msg.get("timestamp") or {}
        return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6, msg

    def close(self) -> None:
        self.lines.close()


@dataclass
class QemuVm:
    """One ``qemu-system-x86_64`` process with its QMP monitor and COM1 on sockets."""

    name: str
    proc: subprocess.Popen[bytes]
    qmp: Qmp
    serial: _Lines
    log_path: Path

    @classmethod
    def start(cls, workdir: Path, name: str, *, kernel: Path, append: str, memory: int,
              vcpus: int, incoming: bool, timeout: float = 60.0,
              prefix: Sequence[str] = ()) -> QemuVm:
        """Start the guest (paused with -S, or waiting with -incoming defer); ``prefix``
        runs it through another program, e.g. into a network namespace (``ip netns exec
        NS``, which execs QEMU, so the process is QEMU's). QMP and COM1 are Unix
        sockets in the filesystem, which a network namespace does not separate."""
        binary = qemu_binary()
        if binary is None:
            raise QemuError("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
        qmp_path = workdir / f"{name}.qmp"
        serial_path = workdir / f"{name}.serial"
        log_path = workdir / f"{name}.qemu.log"
        # microvm boots in well under a second (qboot, no PCI); pc's SeaBIOS takes
        # seconds under the emulator. Its COM1 is the ISA serial at 0x3f8.
        cmd = [*prefix, binary, "-accel", "kvm", "-M", "microvm", "-m", f"{memory >> 20}M",
               "-smp", str(vcpus), "-nodefaults", "-no-user-config", "-display", "none",
               "-kernel", str(kernel), "-append", append,
               "-chardev", f"socket,id=com1,path={serial_path},server=on,wait=off",
               "-serial", "chardev:com1",
               "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
               "-qmp", f"unix:{qmp_path},server=on,wait=off",
               # thread names ("CPU 0/KVM", "live_migration", "postcopy/...") for
               # bench --thread-profile; names only, no behaviour
               "-name", f"{name},debug-threads=on"]
        cmd += ["-incoming", "defer"] if incoming else ["-S"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            qmp = Qmp(_connect_unix(qmp_path, proc, deadline))
            serial = _Lines(_connect_unix(serial_path, proc, deadline), "serial")
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise
        return cls(name, proc, qmp, serial, log_path)

    def send_serial(self, data: bytes) -> None:
        self.serial.sock.sendall(data)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise QemuError(f"QEMU {self.name} did not exit in {timeout:.0f} s") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(QemuError, OSError):
                self.qmp.execute("quit", timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.qmp.close()
        self.serial.close()


__all__ = ["QemuError", "QemuVm", "Qmp", "qemu_binary"]
