"""``uffdd chaos``: repeated migrations on this machine while faults are injected.

Every run migrates a small guest between two real daemons on loopback, with real
userfaultfd and the Python VMM stand-ins, through :class:`uffdd.lab.faultproxy.FaultProxy`
(throttled, so that a fault lands in the middle of the migration). While it runs, three
faults are injected at spread-out points of its progress, drawn from: a link cut (FIN),
a link reset (RST), a link stall (black hole, found by the stall detector), SIGKILL of
the source daemon, SIGKILL of the destination daemon (both restarted on the same socket
and port, as systemd would), and corrupted payloads. After every fifth run a further
migration loses a VMM to SIGKILL (alternately the destination's and the source's): both
sessions must end, the other VMM must hear of it, and both daemons release their fds.

The destination VMM reads every page and compares it with the source's pattern, so
"pages lost" counts pages that came back wrong or never came; a VMM that does not finish
in time has hung vCPUs. The same :class:`Rig` drives tests/test_reliability.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uffdd.client import Client, ClientError
from uffdd.lab import harness
from uffdd.lab.faultproxy import FaultProxy

# Fast failure detection so that a run lasts seconds: a stalled link is dropped after
# one second without data, reconnects back off to at most half a second.
DAEMON_CONFIG = """\
[peer]
listen = "127.0.0.1:0"
stall_timeout = 1.0
reconnect_max_delay = 0.5
connect_timeout = 2.0
bulk_lanes = 2

[session]
deadline = 60.0
"""

RECOVERABLE_FAULTS = ("cut", "reset", "stall", "kill-source", "kill-dest", "corrupt")
VMM_TIMEOUT = 180.0


@dataclass
class Migration:
    """One migration in progress: its session and its two VMM processes."""

    session: str
    pages: int
    threads: int
    source: harness.VmmProcess
    dest: harness.VmmProcess


class Rig:
    """Two daemons on loopback with a fault proxy between them, restartable."""

    def __init__(self, workdir: Path, *, config: str = DAEMON_CONFIG, rate: int = 0) -> None:
        self.workdir = workdir
        self.config = config
        self.src = self._start("source", 0)
        self.dst = self._start("destination", 0)
        self.proxy = FaultProxy(self.src.peer, lifetime=7200)
        self.proxy.throttle(rate)
        self.logs: list[Path] = []
        self._n = 0

    def _start(self, name: str, port: int) -> harness.DaemonProcess:
        extra = ["--enable-fault-injection"] if name == "source" else []
        return harness.start_daemon(self.workdir, name, config=self.config, extra=extra,
                                    peer_port=port)

    # -- daemons

    def restart(self, which: str) -> None:
        """SIGKILL one daemon and start it again on the same socket (and peer port)."""
        old = self.src if which == "source" else self.dst
        old.kill()
        kept = old.log_path.with_name(f"{old.name}.{len(self.logs)}.log")
        shutil.move(old.log_path, kept)  # the new daemon's "ready" line must be its own
        self.logs.append(kept)
        new = self._start(old.name, old.peer_port if which == "source" else 0)
        if which == "source":
            self.src = new
        else:
            self.dst = new

    def tracebacks(self) -> list[str]:
        """Names of the logs (current and rotated) that contain a Python traceback."""
        paths = [*self.logs, self.src.log_path, self.dst.log_path]
        return [p.name for p in paths
                if p.exists() and "Traceback" in p.read_text(errors="replace")]

    def close(self) -> tuple[int, int]:
        """Stop both daemons (SIGTERM) and the proxy; returns their exit codes."""
        codes = (self.src.stop(), self.dst.stop())
        self.proxy.close()
        return codes

    # -- migrations

    def start_migration(self, *, memory: str = "16M", backing: str = "shmem",
                        mode: str = "missing", threads: int = 4, policy: str | None = None,
                        seed: int | None = None, peer: str | None = None) -> Migration:
        """Start a source VMM (exported), then a destination VMM that reads every page."""
        self._n += 1
        session = f"chaos{self._n}-{secrets.token_hex(3)}"
        seed = self._n if seed is None else seed
        ready = self.workdir / f"{session}.ready"
        common = ["--session", session, "--token", secrets.token_hex(16), "--memory", memory,
                  "--backing", backing, "--seed", str(seed), "--resilient",
                  "--timeout", str(VMM_TIMEOUT)]
        src = harness.start_vmm(harness.python_vmm(
            "source", *common, "--socket", self.src.api_socket, "--ready-file", str(ready)),
            "source", self.workdir, ready)
        src.wait_ready()
        dst_args = [*common, "--socket", self.dst.api_socket, "--peer", peer or self.proxy.address,
                    "--mode", mode, "--threads", str(threads), "--order", "rand"]
        if policy:
            dst_args += ["--policy", policy]
        dst = harness.start_vmm(harness.python_vmm("dest", *dst_args), "dest", self.workdir)
        from uffdd.lab.pyvmm import parse_size
        page = (2 << 20) if backing == "hugetlb" else 4096
        return Migration(session, parse_size(memory) // page, threads, src, dst)

    def inject(self, session: str, timeout: float = 20.0, **fields: Any) -> None:
        """Ask the source daemon to misbehave for ``session`` (lose pages, corrupt frames).

        Right after a source daemon restart the session exists only once the source VMM
        exported it again: an unknown session is asked about again until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                with Client(self.src.api_socket, timeout=10) as c:
                    c.request({"op": "inject", "session": session, **fields})
                return
            except ClientError as e:
                if e.code not in ("unknown-session", "unavailable") or \
                        time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def status(self, which: str, session: str) -> dict[str, Any] | None:
        """The session's status on one daemon (None if that daemon does not know it)."""
        daemon = self.src if which == "source" else self.dst
        try:
            with Client(daemon.api_socket, timeout=5) as c:
                found = c.status(session)
        except ClientError:
            return None
        running = [s for s in found if s.get("state") not in ("completed", "failed", "cancelled")]
        chosen = running or found
        return chosen[-1] if chosen else None

    def wait_installed(self, session: str, pages: int, timeout: float = 30.0) -> bool:
        """Wait until the destination installed ``pages`` pages (or the session ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status("destination", session)
            if st is not None and (st["pages_installed"] >= pages
                                   or st["state"] in ("completed", "failed", "cancelled")):
                return True
            time.sleep(0.05)
        return False


def daemon_fds(daemon: harness.DaemonProcess) -> int:
    """How many fds the daemon process holds now."""
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def held(daemon: harness.DaemonProcess) -> dict[str, str]:
    """The daemon's fds (number -> what it is, with sockets named as tcp/unix)."""
    out: dict[str, str] = {}
    base = f"/proc/{daemon.proc.pid}"
    for fd in os.listdir(f"{base}/fd"):
        try:
            out[fd] = os.readlink(f"{base}/fd/{fd}")
        except OSError:
            continue
    tcp = Path(f"{base}/net/tcp").read_text()
    for fd, what in out.items():
        if what.startswith("socket:["):
            inode = what[8:-1]
            out[fd] = f"tcp {what}" if f" {inode} " in tcp else f"unix {what}"
    return out


def memfd_mappings(daemon: harness.DaemonProcess) -> int:
    """Mappings of memory fds (guest RAM) in the daemon's address space."""
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
    return sum(1 for line in maps.splitlines() if "/memfd:" in line)


def wait_released(daemon: harness.DaemonProcess, before: dict[str, str], maps_before: int,
                  timeout: float = 15.0) -> str:
    """Wait until the daemon holds no fd or mapping it did not hold before; "" when it
    does not, else what it still holds."""
    deadline = time.monotonic() + timeout
    while True:
        now = held(daemon)
        extra = sorted(what for fd, what in now.items() if before.get(fd) != what)
        maps = memfd_mappings(daemon)
        if (not extra and maps <= maps_before) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not extra and maps <= maps_before:
        return ""
    return f"still holds {extra} and {maps - maps_before} more memfd mappings"


def apply_fault(rig: Rig, kind: str, m: Migration, stall_seconds: float = 2.5) -> None:
    """Inject one recoverable fault into a running migration."""
    if kind == "cut":
        rig.proxy.cut()
    elif kind == "reset":
        rig.proxy.reset()
    elif kind == "stall":
        rig.proxy.stall(stall_seconds)
        time.sleep(stall_seconds)
    elif kind == "kill-source":
        rig.restart("source")
    elif kind == "kill-dest":
        rig.restart("destination")
    elif kind == "corrupt":
        rig.inject(m.session, corrupt=3)
    else:
        raise ValueError(f"unknown fault {kind!r}")


@dataclass
class RunResult:
    """One line of the chaos output."""

    run: int
    faults: list[str]
    pages: int
    faults_mid_migration: int
    pages_verified: int
    pages_lost: int
    hung_vcpus: int
    seconds: float
    error: str | None = None


@dataclass
class Summary:
    """The chaos run's totals (``--json`` prints this)."""

    migrations: int = 0
    faults_injected: int = 0
    faults_mid_migration: int = 0
    pages_verified: int = 0
    pages_lost: int = 0
    hung_vcpus: int = 0
    vmm_deaths: int = 0
    vmm_deaths_cleaned: int = 0
    failed_runs: int = 0
    seconds: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    tracebacks: list[str] = field(default_factory=list)


def finish(m: Migration) -> tuple[int, int, int, str | None]:
    """Wait for a migration; returns (pages verified, pages lost, hung vCPUs, error)."""
    try:
        d = m.dest.result(VMM_TIMEOUT + 30)
    except harness.HarnessError as e:
        m.source.proc.kill()
        return 0, m.pages, m.threads, f"destination hung: {str(e)[:200]}"
    try:
        s = m.source.result(60)
    except harness.HarnessError as e:
        s = {"event": "failed", "reason": str(e)[:200]}
    if d.get("verified") is True and d.get("hash") == s.get("hash"):
        return m.pages, 0, 0, None
    mismatches = d.get("mismatches")
    lost = int(mismatches) if isinstance(mismatches, int) and mismatches else m.pages
    return 0, lost, 0, f"dest={d.get('event')} {d.get('reason')} source={s.get('event')}"


def one_run(rig: Rig, run: int, rng: random.Random, memory: str) -> RunResult:
    """One migration with three faults at 15%, 40% and 65% of its pages."""
    faults = rng.sample(RECOVERABLE_FAULTS, 3)
    t0 = time.monotonic()
    m = rig.start_migration(memory=memory, mode=rng.choice(("missing", "minor")), seed=run)
    landed = 0
    for i, kind in enumerate(faults):
        rig.wait_installed(m.session, int(m.pages * (0.15 + 0.25 * i)))
        landed += _still_migrating(rig, m)
        apply_fault(rig, kind, m)
    verified, lost, hung, error = finish(m)
    return RunResult(run, faults, m.pages, landed, verified, lost, hung,
                     round(time.monotonic() - t0, 2), error)


def _still_migrating(rig: Rig, m: Migration) -> bool:
    """True if a fault injected now lands in the middle of the migration."""
    st = rig.status("destination", m.session)
    return m.dest.proc.poll() is None and (st is None or st["state"] in ("connecting", "running"))


def vmm_death(rig: Rig, memory: str, which: str = "dest") -> tuple[bool, str]:
    """Kill one VMM mid-migration: both sessions end and release everything.

    The daemon whose VMM died cancels its session (the VMM's connection closed) and
    tells the other side with a 'cancel' frame on the demand lane; the other daemon
    ends its session too and its VMM gets a terminal event: 'failed' for the destination
    VMM (it stops the guest, with exit status 3), 'cancelled' for the source VMM.
    Neither daemon may keep an fd or a guest-RAM mapping it did not hold before.
    """
    before = {d.name: (held(d), memfd_mappings(d)) for d in (rig.dst, rig.src)}
    m = rig.start_migration(memory=memory)
    rig.wait_installed(m.session, m.pages // 5)
    victim, survivor = (m.dest, m.source) if which == "dest" else (m.source, m.dest)
    victim.proc.kill()
    victim.proc.wait(10)
    try:
        told = survivor.result(60)
    except harness.HarnessError as e:
        told = {"event": "hung", "reason": str(e)[:200]}
    leaks = {d.name: wait_released(d, *before[d.name]) for d in (rig.dst, rig.src)}
    dst_st = rig.status("destination", m.session) or {}
    src_st = rig.status("source", m.session) or {}
    told_st = src_st if which == "dest" else dst_st
    ok = (not any(leaks.values()) and dst_st.get("state") in ("cancelled", "failed")
          and src_st.get("state") in ("cancelled", "failed")
          and told.get("event") in ("failed", "cancelled")
          # The daemon may see the VMM's connection close first (a cancel) or its fault
          # loop see the VMM gone (a failure): the other side is told which it was.
          and any(why in str(told_st.get("reason"))
                  for why in ("cancelled the session", "session failed")))
    leaked = "; ".join(f"{k} {v}" for k, v in leaks.items() if v) or "nothing leaked"
    return ok, (f"{leaked}; dest session {dst_st.get('state')}, source session "
                f"{src_st.get('state')}; {'source' if which == 'dest' else 'destination'} "
                f"told: {told_st.get('reason')}")


def run_chaos(runs: int, *, memory: str = "16M", rate: int = 3 << 20, seed: int = 1,
              workdir: Path | None = None, out: Any = None, as_json: bool = False) -> Summary:
    """Run ``runs`` migrations under faults; print one line each; return the totals."""
    rng = random.Random(seed)
    summary = Summary()
    t0 = time.monotonic()
    own = workdir is None
    base = Path(tempfile.mkdtemp(prefix="uffdd-chaos-")) if workdir is None else workdir
    rig = Rig(base, rate=rate)
    try:
        for run in range(1, runs + 1):
            try:
                r = one_run(rig, run, rng, memory)
            except (harness.HarnessError, ClientError, OSError) as e:
                r = RunResult(run, [], 0, 0, 0, 0, 0, 0.0, f"run could not be set up: {e}")
            _account(summary, r)
            _say(out, as_json, f"run {run:3d}: faults {','.join(r.faults):34s} "
                 f"({r.faults_mid_migration} mid-migration) "
                 f"pages {r.pages_verified}/{r.pages} verified, lost {r.pages_lost}, "
                 f"hung vCPUs {r.hung_vcpus}, {r.seconds:.1f}s"
                 + (f"  ERROR {r.error}" if r.error else ""))
            if run % 5 == 0:  # alternately the destination's VMM and the source's
                ok, detail = vmm_death(rig, memory, "dest" if run % 10 else "source")
                summary.vmm_deaths += 1
                summary.vmm_deaths_cleaned += ok
                summary.faults_injected += 1
                summary.faults["kill-vmm"] = summary.faults.get("kill-vmm", 0) + 1
                _say(out, as_json, f"VMM death after run {run}: {'clean' if ok else 'NOT CLEAN'}"
                     f" ({detail})")
    finally:
        rig.close()
        summary.tracebacks = rig.tracebacks()
        if own and not summary.tracebacks and not summary.failed_runs:
            shutil.rmtree(base, ignore_errors=True)
    summary.seconds = round(time.monotonic() - t0, 1)
    return summary


def _account(summary: Summary, r: RunResult) -> None:
    summary.migrations += 1 if r.faults else 0
    summary.faults_injected += len(r.faults)
    summary.faults_mid_migration += r.faults_mid_migration
    for kind in r.faults:
        summary.faults[kind] = summary.faults.get(kind, 0) + 1
    summary.pages_verified += r.pages_verified
    summary.pages_lost += r.pages_lost
    summary.hung_vcpus += r.hung_vcpus
    summary.failed_runs += r.error is not None


def _say(out: Any, as_json: bool, line: str) -> None:
    if out is not None and not as_json:
        print(line, file=out, flush=True)


def render_summary(s: Summary) -> str:
    """The human-readable final summary."""
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s.faults.items()))
    return (f"migrations: {s.migrations}\nfaults injected: {s.faults_injected} ({kinds}), "
            f"{s.faults_mid_migration} of the migrations' faults mid-migration\n"
            f"pages verified: {s.pages_verified}\npages lost: {s.pages_lost}\n"
            f"hung vCPUs: {s.hung_vcpus}\nVMM deaths cleaned up: {s.vmm_deaths_cleaned}"
            f"/{s.vmm_deaths}\nfailed runs: {s.failed_runs}\n"
            f"daemon tracebacks: {len(s.tracebacks)}\nseconds: {s.seconds}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``uffdd chaos`` options."""
    p.add_argument("--runs", type=int, default=30, help="migrations to run (default 30)")
    p.add_argument("--memory", default="16M", help="guest RAM per migration (default 16M)")
    p.add_argument("--rate", type=int, default=3 << 20,
                   help="proxy throttle per connection in bytes/s (default 3 MiB/s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    p.add_argument("--workdir", help="keep sockets and logs here (default: a temp dir, "
                   "removed after a clean run)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``uffdd chaos``; exit status 0 only with nothing lost or hung."""
    import sys
    workdir = Path(args.workdir) if args.workdir else None
    summary = run_chaos(args.runs, memory=args.memory, rate=args.rate, seed=args.seed,
                        workdir=workdir, out=sys.stdout, as_json=args.json)
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        print(render_summary(summary))
    clean = (summary.pages_lost == 0 and summary.hung_vcpus == 0 and not summary.failed_runs
             and summary.vmm_deaths_cleaned == summary.vmm_deaths and not summary.tracebacks)
    return 0 if clean else 1
