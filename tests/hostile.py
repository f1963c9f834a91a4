"""What every hostile-tenant test shares: two real daemons at the shipped defaults, a
healthy migration of another tenant in flight through both, and the after-check.

A test takes the ``tenancy`` fixture, does its one hostile thing against
``tenancy.src`` / ``tenancy.dst`` while the healthy tenant migrates, and asserts what
the hostile client got. The fixture then checks, for both daemons:

* the healthy tenant's migration completed byte-exact;
* the daemon's open fds are back to what they were before either tenant started
  (``/proc/PID/fd``; waited for up to ``_SETTLE`` seconds, sessions end asynchronously);
* its resident memory is bounded: at most ``RSS_SLACK`` above its idle size before the
  test (the healthy migration's buffers are freed when it ends, so anything above
  that is what the hostile case left behind);
* no traceback in its log, and it is still running and answering ``status``.

The healthy tenant's link runs through a throttled fault proxy (``HEALTHY_RATE`` bytes a
second per connection), so it is certainly still in flight while the test body runs:
the fixture checks that it had not finished when the body returned, then lifts the
throttle and waits for it to complete.

The daemons run with no config at all (the shipped defaults) except what a pair of
loopback test daemons must have: a private API socket and ephemeral ports.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Pair, _check_logs, assert_byte_exact
from uffdd.client import Client
from uffdd.lab import harness
from uffdd.lab.faultproxy import FaultProxy

RSS_SLACK = 64 << 20
HEALTHY_RATE = 2 << 20
_SETTLE = 15.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class _Idle:
    fds: int
    rss: int


@dataclass
class Tenancy:
    """Two daemons, a healthy tenant migrating through them, and the hostile test's view."""

    pair: Pair
    idle: dict[str, _Idle] = field(default_factory=dict)
    _healthy: tuple[harness.VmmProcess, harness.VmmProcess, str] | None = None
    _proxy: FaultProxy | None = None

    @property
    def src(self) -> harness.DaemonProcess:
        return self.pair.src

    @property
    def dst(self) -> harness.DaemonProcess:
        return self.pair.dst

    @property
    def workdir(self) -> Path:
        return self.pair.workdir

    def daemons(self) -> list[harness.DaemonProcess]:
        return [self.pair.src, self.pair.dst]

    def start_healthy(self, memory: str = "256M") -> None:
        """The other tenant: a migration that must complete byte-exact whatever happens."""
        for d in self.daemons():
            self.idle[d.name] = _Idle(fd_count(d.proc.pid), rss_bytes(d.proc.pid))
        session = f"healthy-{secrets.token_hex(3)}"
        self._proxy = FaultProxy(self.src.peer, lifetime=900)
        self._proxy.throttle(HEALTHY_RATE)
        src, dst = self.pair.start_migration(
            session=session, memory=memory,
            dest=["--threads", "2", "--peer", self._proxy.address])
        self._healthy = (src, dst, session)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # both lanes up: the tenant is really in flight
            with Client(self.src.api_socket) as c:
                if any(s["session"] == session and s["link"] == "up" for s in c.status()):
                    return
            time.sleep(0.02)
        raise AssertionError("the healthy tenant's link never came up")

    def healthy_status(self) -> dict[str, object]:
        """The healthy tenant's import as the destination reports it."""
        assert self._healthy is not None
        with Client(self.dst.api_socket) as c:
            found = [s for s in c.status() if s["session"] == self._healthy[2]
                     and s["role"] == "import"]
        assert found, "the destination no longer knows the healthy tenant's session"
        return found[0]

    def healthy_in_flight(self) -> bool:
        """True while the healthy tenant's import is still running on the destination."""
        return self.healthy_status()["state"] == "running"

    def finish_healthy(self) -> None:
        """Lift the throttle and check the healthy tenant completed byte-exact."""
        assert self._healthy is not None and self._proxy is not None
        src, dst, _session = self._healthy
        self._healthy = None
        self._proxy.throttle(0)
        try:
            assert_byte_exact(dst.result(300), src.result(60))
        finally:
            self._proxy.close()

    def assert_clean(self) -> None:
        """Fds back to idle, RSS bounded, still serving, no traceback: for both daemons."""
        for d in self.daemons():
            assert d.proc.poll() is None, f"daemon {d.name} died:\n{d.log_text()[-4000:]}"
            want = self.idle[d.name]
            deadline = time.monotonic() + _SETTLE
            while fd_count(d.proc.pid) > want.fds and time.monotonic() < deadline:
                time.sleep(0.1)
            held = sorted(os.readlink(f"/proc/{d.proc.pid}/fd/{n}")
                          for n in os.listdir(f"/proc/{d.proc.pid}/fd"))
            assert fd_count(d.proc.pid) <= want.fds, (
                f"daemon {d.name} holds {len(held)} fds, {want.fds} when idle: {held}")
            rss = rss_bytes(d.proc.pid)
            assert rss <= want.rss + RSS_SLACK, (
                f"daemon {d.name} RSS {rss >> 20} MiB, {want.rss >> 20} MiB when idle")
            with Client(d.api_socket) as c:
                c.status()
        _check_logs(*self.daemons())


def run_tenancy(tmp_path: Path, *, config: str | None = None,
                loop: str = "c") -> Iterator[Tenancy]:
    """Start the two daemons (``config``: the other engine, never a limit), the healthy
    tenant, hand the rig to the test, then check everything the module docstring says."""
    src = harness.start_daemon(tmp_path, "source", config=config)
    dst = harness.start_daemon(tmp_path, "destination", metrics=True, config=config)
    t = Tenancy(Pair(tmp_path, src, dst, loop))
    try:
        t.start_healthy()
        yield t
        healthy = t.healthy_status()
        assert healthy["state"] == "running", (
            f"the healthy tenant was not in flight during the test: {healthy}\n"
            f"{dst.log_text()[-3000:]}")
        t.finish_healthy()
        t.assert_clean()
    finally:
        codes = (src.stop(), dst.stop())
    assert codes == (0, 0), f"daemons exited with {codes}"


@pytest.fixture
def tenancy(tmp_path: Path) -> Iterator[Tenancy]:
    """Daemons at the shipped defaults with a healthy tenant in flight; checked after."""
    yield from run_tenancy(tmp_path)
