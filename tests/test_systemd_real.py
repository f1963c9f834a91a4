"""The Debian package under a real systemd, including restarts in the middle of a migration.

Everything else in the suite plays the service manager (a fake ``NOTIFY_SOCKET``,
hand-set ``LISTEN_FDS``). Here a Debian bookworm container boots with systemd as PID 1
(``systemd-nspawn -b``), the package that ``deploy/build-deb.sh`` builds from this
checkout is installed in it with apt, and the installed, socket-activated service is
the destination of real migrations whose source daemon and source VMM run on the host.

* The container shares the host's network: its daemon's peer link dials the host's
  source daemon (through a throttling fault proxy, so that a restart lands mid-way) on
  loopback, which the shipped config allows in plaintext. Its shipped ports (4460 peer,
  9464 metrics) must therefore be free on the host.
* The destination VMM must run where its daemon is (SO_PEERCRED pids, /proc/<pid>):
  it is the package's own Python VMM stand-in, started inside the container's
  namespaces with ``nsenter -t <container PID 1> -a``. The test talks to the installed
  daemon through the container's API socket, as the host sees it:
  ``/proc/<container PID 1>/root/run/uffdd/vmm.sock``.
* The rootfs (``debootstrap --variant=minbase``, about 40 s from the Debian archive) is
  cached in ``$UFFDD_TEST_CACHE`` (default /var/cache/uffdd-test) and reused while its
  stamp matches; the container runs it with ``--volatile=overlay``, so no run changes it.

Cost on the 2-core development machine (measured 2026-12-04): 60-80 s for the module,
of which 12-22 s build the package, 0.3-0.5 s boot the container (systemd-analyze:
userspace 170 ms), 2 s install the package, and each of the five migrations takes
about 10 s; making the rootfs once adds 40-70 s. The module prints its timings (build,
boot, install, the migrations' pauses during the restarts, total) when it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import assert_byte_exact, require
from uffdd.client import Client, ClientError
from uffdd.lab import harness
from uffdd.lab.faultproxy import FaultProxy
from uffdd.lab.pyvmm import parse_size

pytestmark = pytest.mark.systemd

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("UFFDD_TEST_CACHE", "/var/cache/uffdd-test"))
MIRROR = os.environ.get("UFFDD_TEST_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
#: systemd as PID 1, and the package's dependencies, so that installing it needs no network.
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "libmsgpackc2")
#: Bump to make every cached rootfs stale.
ROOTFS_FORMAT = 1
#: The shipped config's ports, in the host's network namespace (the container shares it).
SHIPPED_PORTS = (4460, 9464)
#: Bytes/s per proxied connection: a 32 MiB guest takes about ten seconds.
RATE = 2 << 20
MEMORY = "32M"
#: What README "Installing on a host" quotes of `systemd-analyze security uffdd.service`.
EXPOSURE = "2.5 OK"
VENV_PYTHON = "/usr/lib/uffdd/venv/bin/python3"
CONTAINER_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- the rootfs, the package, the container ---------------------------------------


def _tools() -> None:
    require(os.geteuid() == 0, "needs root (systemd-nspawn, debootstrap)")
    for tool, package in (("systemd-nspawn", "systemd-container"),
                          ("debootstrap", "debootstrap"), ("nsenter", "util-linux"),
                          ("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper"),
                          ("lintian", "lintian")):
        require(shutil.which(tool) is not None,
                f"{tool} not installed (Debian package {package!r}; deploy/setup.sh installs it)")


def _stamp() -> str:
    return json.dumps({"suite": SUITE, "include": INCLUDE, "format": ROOTFS_FORMAT})


def _rootfs_valid(path: Path) -> bool:
    """The cached rootfs is the one this test makes: stamp, systemd, every package."""
    stamp = path / ".uffdd-test-rootfs"
    if not stamp.exists() or stamp.read_text() != _stamp():
        return False
    if not (path / "usr/lib/systemd/systemd").exists():
        return False
    query = subprocess.run(["dpkg-query", f"--admindir={path}/var/lib/dpkg", "-W",
                            "-f=${db:Status-Status}\n", *INCLUDE],
                           capture_output=True, text=True, timeout=60)
    return query.returncode == 0 and query.stdout.split() == ["installed"] * len(INCLUDE)


def cached_rootfs() -> tuple[Path, float]:
    """The bookworm rootfs, made once per machine; returns (path, seconds spent making it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"rootfs-{SUITE}-{ROOTFS_FORMAT}"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be making it right now
        if _rootfs_valid(path):
            return path, 0.0
        t0 = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)
        work = CACHE / f"{path.name}.new"
        shutil.rmtree(work, ignore_errors=True)
        made = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                               SUITE, str(work), MIRROR], capture_output=True, text=True,
                              timeout=900)
        assert made.returncode == 0, f"debootstrap failed:\n{made.stdout[-3000:]}{made.stderr}"
        (work / ".uffdd-test-rootfs").write_text(_stamp())
        work.rename(path)
        assert _rootfs_valid(path)
        return path, time.monotonic() - t0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Container:
    """A booted container: its nspawn process and its PID 1, as the host sees them."""

    nspawn: subprocess.Popen[bytes]
    leader: int
    log: Path

    @property
    def api_socket(self) -> str:
        """The installed daemon's VMM API socket, reached from the host."""
        return f"/proc/{self.leader}/root/run/uffdd/vmm.sock"

    def command(self, *cmd: str) -> list[str]:
        """``cmd`` inside every namespace of the container, with a clean environment."""
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", CONTAINER_PATH,
                "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 120.0
            ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(*cmd), capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout}" \
                                         f"{done.stderr}"
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str = "uffdd.service") -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)


def _container_init(nspawn: int) -> int:
    """The child of nspawn that is PID 1 of its own namespace and runs systemd, or 0.

    nspawn has a short-lived helper child first; only the container's init has NSpid
    ending in 1, and it is ready to be entered once it has exec'd systemd."""
    children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
    for child in children:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{child}/status").read_text()
            nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
            if nspid.split()[-1] == "1" and \
                    Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                return int(child)
    return 0


def boot(rootfs: Path, deb_dir: Path, log: Path) -> Container:
    """Boot ``rootfs`` with systemd as PID 1 until ``is-system-running`` says running."""
    name = f"uffdd-test-{os.getpid()}"
    cmd = ["systemd-nspawn", "-D", str(rootfs), "--register=no", "--keep-unit", "-b",
           "-M", name, "--volatile=overlay", "--console=pipe",
           # The unit's bounding set keeps CAP_IPC_LOCK, which nspawn leaves out by default.
           "--capability=CAP_IPC_LOCK",
           f"--bind-ro={deb_dir}:/mnt/deb"]
    with open(log, "wb") as out:
        nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    leader = 0
    while not leader:
        assert nspawn.poll() is None, f"systemd-nspawn exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no container init:\n{log.read_text()}"
        leader = _container_init(nspawn.pid)
        time.sleep(0.05)
    c = Container(nspawn, leader, log)
    state = ""
    while state not in ("running", "degraded"):
        assert time.monotonic() < deadline, f"the container did not boot ({state}):\n" \
                                            + log.read_text()[-3000:]
        state = c.run("systemctl", "is-system-running", "--wait", check=False,
                      timeout=60).stdout.strip()
        time.sleep(0.1)
    failed = c.run("systemctl", "--failed", "--no-legend", "--plain").stdout
    assert state == "running", f"units failed at boot:\n{failed}"
    return c


def shut_down(c: Container) -> None:
    """Halt the container (SIGTERM to nspawn); kill its PID 1 if it does not stop."""
    if c.nspawn.poll() is None:
        c.nspawn.send_signal(signal.SIGTERM)
        try:
            c.nspawn.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.leader, signal.SIGKILL)  # ends every process of its pid namespace
            c.nspawn.kill()
            c.nspawn.wait(10)


@dataclass
class Rig:
    """The container with the package installed, and the host's source daemon."""

    c: Container
    deb: Path
    src: harness.DaemonProcess
    proxy: FaultProxy
    workdir: Path
    timings: dict[str, float] = field(default_factory=dict)
    n: int = 0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
        ) -> Iterator[Rig]:
    _tools()
    for port in SHIPPED_PORTS:
        # Under CI a busy port is a failure, not a reason to skip (require).
        require(_port_free(port), f"port {port} of the shipped config is in use on this host "
                "(the container shares the host's network)")
    t_start = time.monotonic()
    workdir = tmp_path_factory.mktemp("systemd")
    deb_dir = workdir / "deb"
    t0 = time.monotonic()
    built = subprocess.run([str(ROOT / "deploy" / "build-deb.sh"), str(deb_dir)],
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"build-deb.sh failed:\n{built.stdout}{built.stderr}"
    deb = Path(built.stdout.strip().splitlines()[-1])
    assert deb.name.startswith("uffdd_") and deb.name.endswith("_amd64.deb"), deb
    timings = {"package build": time.monotonic() - t0}
    rootfs, made = cached_rootfs()
    timings["rootfs debootstrap (0: cached)"] = made
    t0 = time.monotonic()
    c = boot(rootfs, deb_dir, workdir / "nspawn.log")
    timings["container boot"] = time.monotonic() - t0
    src = proxy = None
    try:
        t0 = time.monotonic()
        c.run("apt-get", "install", "-y", "--no-install-recommends", f"/mnt/deb/{deb.name}")
        timings["package install"] = time.monotonic() - t0
        src = harness.start_daemon(workdir, "source")
        proxy = FaultProxy(src.peer, lifetime=3600)
        proxy.throttle(RATE)
        r = Rig(c, deb, src, proxy, workdir, timings)
        yield r
        journal = c.journal()
        assert "Traceback" not in journal, journal[-4000:]
    finally:
        if proxy is not None:
            proxy.close()
        if src is not None:
            src.stop()
        shut_down(c)
        timings["whole module"] = time.monotonic() - t_start
        _report(request, timings)


def _report(request: pytest.FixtureRequest, timings: dict[str, float]) -> None:
    """Print the timings past pytest's output capture (the test states its cost)."""
    lines = [f"real systemd: {what}: {seconds:.2f} s" for what, seconds in timings.items()]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


# --- migrations --------------------------------------------------------------------


@dataclass
class Migration:
    session: str
    pages: int
    source: harness.VmmProcess
    dest: harness.VmmProcess


def start_migration(r: Rig, mode: str) -> Migration:
    """A host source VMM exports; the container's VMM imports through the installed service."""
    r.n += 1
    session = f"sd{r.n}-{secrets.token_hex(3)}"
    ready = r.workdir / f"{session}.ready"
    common = ["--session", session, "--token", secrets.token_hex(16), "--memory", MEMORY,
              "--backing", "shmem", "--seed", str(r.n), "--resilient", "--timeout", "180"]
    src = harness.start_vmm(harness.python_vmm(
        "source", *common, "--socket", r.src.api_socket, "--ready-file", str(ready)),
        "source", r.workdir, ready)
    src.wait_ready()
    dst = harness.start_vmm(r.c.command(
        VENV_PYTHON, "-m", "uffdd.lab.pyvmm", "dest", *common, "--socket", "/run/uffdd/vmm.sock",
        "--peer", r.proxy.address, "--mode", mode, "--threads", "4", "--order", "rand"),
        "dest", r.workdir)
    return Migration(session, parse_size(MEMORY) // 4096, src, dst)


def dest_status(r: Rig, session: str) -> dict[str, object] | None:
    """The session on the installed daemon (None while no daemon answers or knows it)."""
    try:
        with Client(r.c.api_socket, timeout=5) as client:
            found = client.status(session)
    except ClientError:
        return None
    return found[-1] if found else None


def wait_installed(r: Rig, m: Migration, pages: int) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while True:
        st = dest_status(r, m.session)
        if st is not None and st["state"] == "running" and int(str(st["pages_installed"])) >= pages:
            return st
        assert time.monotonic() < deadline, f"the migration never reached {pages} pages: {st}"
        assert m.dest.proc.poll() is None, m.dest.stderr()
        time.sleep(0.05)


def finish(m: Migration) -> None:
    d = m.dest.result(240)
    s = m.source.result(60)
    assert_byte_exact(d, s)


def restart_mid_migration(r: Rig, how: list[str], mode: str, label: str) -> str:
    """Run a migration, do ``how`` to the service in its middle; it completes byte-exact.

    Returns the journal of the restarted daemon. The pause is the time from ``how`` to
    the restarted daemon running the session again (the VMM re-imported).
    """
    m = start_migration(r, mode)
    wait_installed(r, m, m.pages // 4)
    before = r.c.show("uffdd.service", "MainPID", "NRestarts", "NFileDescriptorStore",
                      "FileDescriptorStoreMax", "InvocationID")
    assert before["FileDescriptorStoreMax"] == "512", before
    # The session's uffd and memfd are in the fd store.
    assert before["NFileDescriptorStore"] == "2", before
    t0 = time.monotonic()
    r.c.run(*how, timeout=120)

    def new_daemon() -> bool:
        now = r.c.show("uffdd.service", "MainPID", "ActiveState")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

    r.c.wait_for("a new daemon", new_daemon)
    while True:
        st = dest_status(r, m.session)
        if st is not None and st["state"] in ("running", "completed"):
            break
        assert time.monotonic() - t0 < 60, f"the session did not come back: {st}"
        time.sleep(0.05)
    r.timings[f"pause during {label}"] = time.monotonic() - t0
    after = r.c.show("uffdd.service", "InvocationID", "NRestarts")
    assert after["InvocationID"] != before["InvocationID"], (before, after)
    finish(m)
    # The session's fds leave the store when it ends.
    r.c.wait_for("the fd store to empty",
                 lambda: r.c.show("uffdd.service", "NFileDescriptorStore")
                 ["NFileDescriptorStore"] == "0", timeout=30)
    journal = r.c.run("journalctl", "-u", "uffdd.service", "--no-pager", "-o", "cat",
                      f"_SYSTEMD_INVOCATION_ID={after['InvocationID']}").stdout
    assert f"session={m.session} the fd store gave back 2 fds" in journal, journal
    return journal


# --- the tests, in the order an operator meets them -----------------------------------


def test_package_is_lintian_clean(rig: Rig) -> None:
    """Every tag lintian still finds is overridden in the package, with its reason."""
    out = subprocess.run(["lintian", "--pedantic", "--info", str(rig.deb)],
                         capture_output=True, text=True, timeout=300)
    tags = [line for line in out.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert tags == [], "\n".join(tags)


def test_install_enables_the_socket(rig: Rig) -> None:
    c = rig.c
    assert c.run("systemctl", "is-active", "uffdd.socket").stdout.strip() == "active"
    assert c.run("systemctl", "is-enabled", "uffdd.socket").stdout.strip() == "enabled"
    # Socket-activated: nothing has connected yet.
    assert c.run("systemctl", "is-active", "uffdd.service", check=False).stdout.strip() \
        == "inactive"
    conffiles = c.run("dpkg-query", "-W", "-f=${Conffiles}", "uffdd").stdout
    assert "/etc/uffdd/uffdd.toml" in conffiles, conffiles
    for path in ("/usr/bin/uffdd", "/usr/lib/uffdd/libuffdd_fastpath.so",
                 "/usr/include/uffdd.h", "/usr/lib/x86_64-linux-gnu/libuffdd.so.0",
                 "/usr/lib/x86_64-linux-gnu/libuffdd.a",
                 "/usr/lib/x86_64-linux-gnu/pkgconfig/uffdd.pc"):
        c.run("test", "-e", path)
    version = c.run("uffdd", "--version").stdout
    assert "0.1.0" in version, version


def test_socket_activation_ready_status_and_watchdog(rig: Rig) -> None:
    c = rig.c
    out = c.run("uffdd", "status").stdout  # the first connection starts the daemon
    assert "no sessions" in out, out
    assert c.run("systemctl", "is-active", "uffdd.service").stdout.strip() == "active"
    started = c.show("uffdd.service", "WatchdogTimestampMonotonic", "StatusText")
    assert started["StatusText"].startswith("0 sessions"), started  # READY=1 came with it
    # WATCHDOG=1 (with a STATUS= line) every WatchdogSec/2 = 5 s, from the event loop.
    c.wait_for("a watchdog ping", lambda: c.show("uffdd.service", "WatchdogTimestampMonotonic")
               ["WatchdogTimestampMonotonic"] != started["WatchdogTimestampMonotonic"],
               timeout=20)
    now = c.show("uffdd.service", "StatusText", "WatchdogTimestamp", "WatchdogUSec")
    assert now["StatusText"] == "0 sessions (0 import, 0 export)", now
    assert now["WatchdogTimestamp"], now
    assert now["WatchdogUSec"] == "10s", now
    journal = c.journal()
    assert "using the socket-activated VMM API socket" in journal, journal
    assert "peer link: plaintext on loopback only" in journal, journal


def test_killed_mid_migration_restarts_with_the_fd_store(rig: Rig) -> None:
    journal = restart_mid_migration(rig, ["systemctl", "kill", "-s", "KILL", "uffdd.service"],
                                    "missing", "systemctl kill -s KILL")
    # The installed daemon found its C loops without hints: the library is mapped.
    pid = rig.c.show("uffdd.service", "MainPID")["MainPID"]
    maps = rig.c.run("cat", f"/proc/{pid}/maps").stdout
    assert "/usr/lib/uffdd/libuffdd_fastpath.so" in maps, "the C loops are not loaded"
    assert rig.c.show("uffdd.service", "NRestarts")["NRestarts"] == "1"
    assert "using the socket-activated VMM API socket" in journal


def test_planned_restart_mid_migration(rig: Rig) -> None:
    journal = restart_mid_migration(rig, ["systemctl", "restart", "uffdd.service"], "minor",
                                    "systemctl restart")
    assert "using the socket-activated VMM API socket" in journal


def test_package_upgrade_mid_migration(rig: Rig) -> None:
    """apt reinstalling the package (prerm upgrade, postinst configure <old version>)
    restarts the daemon onto the new files; the migration in flight completes."""
    restart_mid_migration(rig, ["apt-get", "install", "-y", "--reinstall",
                                f"/mnt/deb/{rig.deb.name}"], "missing", "package upgrade")
    assert rig.c.run("systemctl", "is-active", "uffdd.socket").stdout.strip() == "active"


def test_status_and_metrics_of_the_installed_service(rig: Rig) -> None:
    m = start_migration(rig, "missing")
    wait_installed(rig, m, 1)
    table = rig.c.run("uffdd", "status").stdout
    assert m.session in table, table
    status = json.loads(rig.c.run("uffdd", "status", "--json", "--session", m.session).stdout)
    assert [s["session"] for s in status["sessions"]] == [m.session], status
    # The shipped config serves /metrics on 127.0.0.1:9464 (the host's loopback too).
    with urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert 'uffdd_build_info{version="0.1.0"} 1.0' in text, text[:3000]
    assert re.search(r'^uffdd_sessions\{role="import",state="running"\} 1\.0$', text,
                     re.MULTILINE), text[:6000]
    finish(m)


def test_systemd_analyze_security_exposure(rig: Rig) -> None:
    out = rig.c.run("systemd-analyze", "security", "--no-pager", "uffdd.service",
                    check=False).stdout
    match = re.search(r"Overall exposure level for uffdd\.service: (\S+ \S+)", out)
    assert match is not None, out
    assert match.group(1) == EXPOSURE, out


def test_remove_stops_and_purge_removes_the_config(rig: Rig) -> None:
    c = rig.c
    c.run("apt-get", "remove", "-y", "uffdd")
    for unit in ("uffdd.socket", "uffdd.service"):
        assert c.run("systemctl", "is-active", unit, check=False).stdout.strip() == "inactive"
    c.run("test", "-e", "/etc/uffdd/uffdd.toml")  # remove keeps the conffile
    c.run("test", "!", "-e", "/usr/bin/uffdd")
    c.run("apt-get", "purge", "-y", "uffdd")
    c.run("test", "!", "-e", "/etc/uffdd")
    c.run("test", "!", "-e", "/etc/systemd/system/sockets.target.wants/uffdd.socket")
    left = c.run("sh", "-c", "ls -A /usr/lib/uffdd 2>/dev/null || true").stdout
    assert left == "", f"left behind in /usr/lib/uffdd: {left}"
