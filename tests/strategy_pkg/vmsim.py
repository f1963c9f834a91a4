"""Migrations with the native VMM stand-in (uffdd-vmsim) between two real daemons.

Shared by tests/test_strategies.py and tests/test_policies.py. Everything is a real
process: the daemons, the source VMM and the destination VMM with its userfaultfd.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require
from uffdd.client import Client
from uffdd.lab import harness

# A hang shows up as this timeout, never as a timing threshold.
HANG_TIMEOUT = 120.0
PAGE = 4096


def tool() -> Path:
    """The built uffdd-vmsim (fails under CI when missing, skips otherwise)."""
    path = harness.native_tool("uffdd-vmsim")
    require(path is not None, "native/build/uffdd-vmsim is not built (make -C native)")
    assert path is not None
    return path


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def pattern_pages(memory: int, count: int, seed: int) -> list[int]:
    """``count`` 4 KiB page numbers spread over RAM that hold data (not zero pages)."""
    pages = memory // PAGE
    step = pages // (count + 1)
    out = []
    for i in range(1, count + 1):
        p = i * step + seed % 7
        while p % 11 == 5:  # the pattern's zero pages: keep to pages with data
            p += 1
        out.append(p)
    return out


@dataclass
class Migration:
    """A running vmsim migration."""

    session: str
    source: harness.VmmProcess
    dest: harness.VmmProcess
    t0: float

    def dest_result(self, timeout: float = HANG_TIMEOUT) -> dict[str, object]:
        return self.dest.result(timeout)

    def source_result(self, timeout: float = HANG_TIMEOUT) -> dict[str, object]:
        return self.source.result(timeout)

    def kill_all(self) -> None:
        for p in (self.source.proc, self.dest.proc):
            if p.poll() is None:
                p.kill()
                p.wait(10)


def start(workdir: Path, src: harness.DaemonProcess, dst: harness.DaemonProcess, *,
          memory: str = "64M", backing: str = "shmem", seed: int = 1, threads: int = 4,
          lose: list[int] | None = None, dest_args: list[str] | None = None) -> Migration:
    """Start a vmsim source (exported) and destination; ``lose``: pages the source fails."""
    vmsim = tool()
    session = f"v{secrets.token_hex(4)}"
    token = secrets.token_hex(16)
    ready = workdir / f"{session}.ready"
    common = ["--session", session, "--token", token, "--memory", memory, "--backing", backing,
              "--seed", str(seed), "--timeout", str(int(HANG_TIMEOUT))]
    source = harness.start_vmm([str(vmsim), "source", *common, "--socket", src.api_socket,
                                "--threads", "2", "--ready-file", str(ready)],
                               "source", workdir, ready)
    source.wait_ready()
    if lose:
        with Client(src.api_socket) as c:
            c.request({"op": "inject", "session": session, "lose": lose})
    t0 = time.monotonic()
    dest = harness.start_vmm([str(vmsim), "dest", *common, "--socket", dst.api_socket,
                              "--peer", src.peer, "--threads", str(threads), "--order", "rand",
                              *(dest_args or [])], "dest", workdir)
    return Migration(session, source, dest, t0)


def wait_running(dst: harness.DaemonProcess, session: str, dest: harness.VmmProcess) -> dict[
        str, object]:
    """Poll the destination daemon until the session's link is up; returns its status."""
    deadline = time.monotonic() + HANG_TIMEOUT
    with Client(dst.api_socket, timeout=10) as c:
        while time.monotonic() < deadline:
            found = [s for s in c.status() if s.get("session") == session]
            if found and found[0].get("state") != "connecting":
                return found[0]
            assert dest.proc.poll() is None, f"dest VMM ended early: {dest.stderr()}"
            time.sleep(0.005)
    raise AssertionError(f"session {session} never started running")


def dest_lines(dest: harness.VmmProcess, timeout: float = HANG_TIMEOUT) -> tuple[
        int, list[dict[str, object]]]:
    """Wait for the dest VMM to end; return its exit status and every JSON line it printed."""
    try:
        out, _ = dest.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dest.proc.kill()
        out, _ = dest.proc.communicate()
        raise AssertionError(f"dest VMM hung:\n{out}\n{dest.stderr()}") from None
    return dest.proc.returncode, [json.loads(x) for x in out.splitlines() if x.startswith("{")]


