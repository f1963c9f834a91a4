"""A Firecracker snapshot restore served by uffdd, with the stand-in on real KVM.

``uffdd-testvm firecracker`` (native/testvm/fc_standin.c) does Firecracker's side of
the UFFD handover step by step (issue 17): one private anonymous mapping per region,
the uffd from /dev/userfaultfd with only UFFD_FEATURE_EVENT_REMOVE, MISSING
registration, one sendmsg of the JSON region table with exactly one fd, the socket
kept open. Then its vCPUs read every page while uffdd serves them, and the VMM
compares all of guest RAM byte for byte with the snapshot file.

The orchestrator's side is the test: ``prepare`` on the daemon's API socket, then the
stand-in connects to the handover socket the reply names. Needs /dev/kvm (and hugetlb
pages for the 2 MiB case); under CI=true a missing one fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from uffdd.client import Client
from uffdd.config import Config
from uffdd.lab import harness

pytestmark = pytest.mark.kvm

NATIVE = Path(__file__).resolve().parent.parent / "native"
TESTVM = NATIVE / "build" / "uffdd-testvm"
PAGE = 4096
MIB = 1 << 20
GPA = 0x40000000  # the testvm's guest RAM starts here: page p is at GPA + p * 4096
TIMEOUT = 60.0  # one restore takes well under a second here; this only bounds a hang


@pytest.fixture(scope="module")
def testvm() -> Path:
    require(harness.kvm_usable(), "/dev/kvm is missing or not read-write")
    proc = subprocess.run(["make", "-s", "-C", str(NATIVE), "testvm"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return TESTVM


@pytest.fixture
def handover_dir() -> Iterator[Path]:
    # a short path: a socket path must fit sun_path (108 bytes), pytest's tmp_path may not
    path = Path(tempfile.mkdtemp(prefix="uffdd-fc-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _config(handover_dir: Path) -> str:
    return f'[api]\nhandover_dir = "{handover_dir}"\n'


@contextlib.contextmanager
def _daemon(tmp_path: Path, name: str, config: str,
            extra: list[str] | None = None) -> Iterator[harness.DaemonProcess]:
    d = harness.start_daemon(tmp_path, name, config=config, extra=extra)
    try:
        yield d
    finally:
        code = d.stop()
        assert "Traceback" not in d.log_text(), d.log_text()[-6000:]
        assert code == 0, d.log_text()[-3000:]


@pytest.fixture
def dest(tmp_path: Path, handover_dir: Path) -> Iterator[harness.DaemonProcess]:
    """The destination host's daemon, the one Firecracker hands its uffd to."""
    with _daemon(tmp_path, "destination", _config(handover_dir)) as d:
        yield d


@pytest.fixture
def dest_demand_only(tmp_path: Path, handover_dir: Path) -> Iterator[harness.DaemonProcess]:
    """A destination whose local file source streams nothing: pages arrive only when
    faulted, so a restore is still under way for as long as the test wants."""
    peer = '[peer]\nlisten = "127.0.0.1:0"\nbackground = false\n'
    with _daemon(tmp_path, "destination", peer + _config(handover_dir)) as d:
        yield d


@pytest.fixture
def source(tmp_path: Path) -> Iterator[harness.DaemonProcess]:
    """A source host's daemon exporting the snapshot file (fault injection on)."""
    with _daemon(tmp_path, "source", "", ["--enable-fault-injection"]) as d:
        yield d


def write_snapshot(testvm: Path, path: Path, memory: int, seed: int) -> Path:
    proc = subprocess.run([str(testvm), "write-snapshot", "--out", str(path), "--memory",
                           str(memory), "--seed", str(seed)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert path.stat().st_size == memory
    return path


class StandIn:
    """The stand-in as a child process: JSON lines on stdout, commands on stdin."""

    def __init__(self, testvm: Path, handover: str, snapshot: Path, seed: int,
                 args: list[str], workdir: Path) -> None:
        self.stderr_path = workdir / f"firecracker-{time.monotonic_ns()}.err"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [str(testvm), "firecracker", "--handover", handover, "--snapshot",
                 str(snapshot), "--seed", str(seed), "--timeout", str(int(TIMEOUT)), *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def line(self, timeout: float = TIMEOUT) -> dict[str, Any] | None:
        """The next JSON line (None at EOF)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"stand-in printed nothing in {timeout} s:\n{self.stderr()}")
            if self._sel.select(left):
                text = self.proc.stdout.readline()
                if not text:
                    return None
                if text.startswith("{"):
                    out: dict[str, Any] = json.loads(text)
                    return out

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = TIMEOUT) -> int:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._sel.close()


def prepare(client: Client, session: str, **source: Any) -> str:
    """The orchestrator's first call; returns the handover socket path."""
    return client.prepare(session, **source)


def wait_event(client: Client, session: str, kinds: tuple[str, ...],
               timeout: float = TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        ev = client.next_event(max(0.0, deadline - time.monotonic()))
        assert ev is not None, f"no {kinds} event for {session} in {timeout} s"
        if ev.get("session") == session and ev["event"] in kinds:
            return ev


def restore(testvm: Path, dest: harness.DaemonProcess, snapshot: Path, workdir: Path, *,
            seed: int, args: list[str], session: str | None = None, page_size: int = PAGE,
            **source: Any) -> tuple[dict[str, Any], StandIn, Client, str]:
    """Prepare, start the stand-in, wait for its result and the session's completion.

    ``source``: ``file=...`` (the default: the snapshot itself) or ``peer=..., token=...``.
    Returns (result line, the still running stand-in (--hold), the client, session).
    """
    session = session or f"fc-{secrets.token_hex(3)}"
    client = Client(dest.api_socket)
    handover = prepare(client, session, **(source or {"file": str(snapshot)}))
    vm = StandIn(testvm, handover, snapshot, seed, ["--hold", *args], workdir)
    try:
        accepted(client, session, vm, page_size)
        result = vm.line()
        assert result is not None, vm.stderr()
        ev = wait_event(client, session, ("completed", "failed"))
        assert ev["event"] == "completed", (ev, dest.log_text()[-3000:])
    except BaseException:
        vm.kill()
        client.close()
        raise
    return result, vm, client, session


def accepted(client: Client, session: str, vm: StandIn, page_size: int = PAGE) -> None:
    """The daemon took the handover (a refusal fails here, not at the vCPUs' timeout)."""
    first = vm.line()
    assert first is not None and first["event"] == "handover", vm.stderr()
    ev = wait_event(client, session, ("handover", "handover-refused"))
    assert ev["event"] == "handover", ev
    assert ev["pid"] == vm.proc.pid == first["pid"], ev  # SO_PEERCRED
    # the daemon counts pages of the regions' page size, the stand-in 4 KiB pages
    assert ev["regions"] == first["regions"], (ev, first)
    assert ev["pages"] == first["pages"] * PAGE // page_size, (ev, first)


def assert_byte_exact(result: dict[str, Any], pages: int) -> None:
    assert result["verified"] is True, result
    assert result["pages"] == pages
    assert result["host_mismatches"] == 0, result
    assert result["unreadable_pages"] == 0, result
    assert result["guest_mismatches"] == result["expected_guest_mismatches"], result
    assert result["crashed"] is False
    assert result["mce_gpas"] == []
    assert result["uffd_from"] == ("dev" if os.path.exists("/dev/userfaultfd") else "syscall")


def end(vm: StandIn, client: Client, session: str) -> None:
    """Firecracker exits: the resident session ends with its socket's EOF."""
    vm.send("quit")
    assert vm.wait() == 0, vm.stderr()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = client.status()
        mine = [s for s in st if s.get("session") == session]
        if not mine or not mine[0].get("resident"):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"session {session} still resident after Firecracker exited")
    client.close()


# --------------------------------------------------------------------------- restores


@pytest.mark.parametrize(("vcpus", "regions", "order"), [(1, 1, "seq"), (4, 3, "rand")])
def test_restore_is_byte_exact(testvm: Path, dest: harness.DaemonProcess, tmp_path: Path,
                               vcpus: int, regions: int, order: str) -> None:
    """1 and 4 vCPUs, one and several regions: every byte of guest RAM as in the file."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 32 * MIB, seed=vcpus)
    result, vm, client, session = restore(
        testvm, dest, snap, tmp_path, seed=vcpus,
        args=["--vcpus", str(vcpus), "--regions", str(regions), "--order", order])
    try:
        assert_byte_exact(result, 32 * MIB // PAGE)
        assert result["regions"] == regions and result["vcpus"] == vcpus
        st = client.status(session)[0]
        assert st.get("resident") is True, st
        assert st.get("vmm_pid") == vm.proc.pid, st
        end(vm, client, session)
    finally:
        vm.kill()


@pytest.mark.hugetlb
def test_restore_hugetlb_2m(testvm: Path, dest: harness.DaemonProcess, tmp_path: Path,
                            hugepages: None) -> None:
    """MAP_HUGETLB regions: 2 MiB page_size in the handover, 2 MiB installs."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 32 * MIB, seed=7)
    result, vm, client, session = restore(testvm, dest, snap, tmp_path, seed=7,
                                          args=["--vcpus", "4", "--regions", "2", "--hugetlb"],
                                          page_size=2 * MIB)
    try:
        assert_byte_exact(result, 32 * MIB // PAGE)
        assert result["page_size"] == 2 * MIB
        end(vm, client, session)
    finally:
        vm.kill()


@pytest.mark.parametrize("hugetlb", [False, pytest.param(True, marks=pytest.mark.hugetlb)])
def test_balloon_mid_restore_reads_zeros(testvm: Path, dest_demand_only: harness.DaemonProcess,
                                         tmp_path: Path, hugetlb: bool,
                                         request: pytest.FixtureRequest) -> None:
    """MADV_DONTNEED of a range mid-restore, before the guest runs and after the range's
    first page arrived: the guest and the VMM read zeros there, never the snapshot's
    bytes; and a balloon inflation after ``completed`` (the resident state) also reads
    zeros. Without a background stream the restore is surely under way at the drop."""
    dest = dest_demand_only
    if hugetlb:
        request.getfixturevalue("hugepages")
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 16 * MIB, seed=5)
    args = ["--vcpus", "2", "--regions", "2", "--balloon", "6M:4M"]
    result, vm, client, session = restore(testvm, dest, snap, tmp_path, seed=5,
                                          args=args + (["--hugetlb"] if hugetlb else []),
                                          page_size=2 * MIB if hugetlb else PAGE)
    try:
        assert_byte_exact(result, 16 * MIB // PAGE)
        assert result["balloon_pages"] == result["balloon_zero_pages"] == 4 * MIB // PAGE
        assert result["guest_mismatches"] > 0  # the guest did read the ballooned pages
        # the first ballooned page had arrived (it held snapshot bytes) before the drop
        assert result["resident_before_balloon"] >= (2 * MIB if hugetlb else PAGE) // PAGE
        assert result["resident_before_balloon"] < result["pages"] // 2  # mid-restore
        # completed: every page is present; now inflate again, across both regions
        vm.send("balloon 2M:12M")
        late = vm.line()
        assert late is not None and late["event"] == "balloon", vm.stderr()
        assert late["zero_pages"] == late["pages"] == 12 * MIB // PAGE, late
        assert late["mismatches"] == late["unreadable"] == 0
        end(vm, client, session)
    finally:
        vm.kill()


# --------------------------------------------------------------------------- lost pages


def _export_snapshot(source: harness.DaemonProcess, snap: Path, regions: list[tuple[int, int]],
                     token: bytes, lose: list[int]) -> tuple[Client, str]:
    """The source host: export the snapshot file, then make pages unreadable."""
    session = f"fc-{secrets.token_hex(3)}"
    c = Client(source.api_socket)
    fd = os.open(snap, os.O_RDONLY | os.O_CLOEXEC)
    try:
        table = [{"gpa": off, "size": size, "page_size": PAGE, "fd": 0, "offset": off}
                 for off, size in regions]
        c.request({"op": "export", "session": session, "token": token, "regions": table},
                  [fd])
    finally:
        os.close(fd)
    if lose:
        c.request({"op": "inject", "session": session, "lose": lose})
    return c, session


def test_remote_restore_is_byte_exact(testvm: Path, source: harness.DaemonProcess,
                                      dest: harness.DaemonProcess, tmp_path: Path) -> None:
    """The page source is the source host's uffdd exporting the file (over loopback)."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 16 * MIB, seed=11)
    token = secrets.token_bytes(16)
    src, src_session = _export_snapshot(source, snap, [(0, 16 * MIB)], token, [])
    try:
        result, vm, client, session = restore(testvm, dest, snap, tmp_path, seed=11,
                                              args=["--vcpus", "2"], session=src_session,
                                              peer=source.peer, token=token)
        try:
            assert_byte_exact(result, 16 * MIB // PAGE)
            end(vm, client, session)
        finally:
            vm.kill()
        assert src.wait_finished(src_session, TIMEOUT)["event"] == "completed"
    finally:
        src.close()


LOST = 1234  # a page of the 16 MiB snapshot the source cannot read


def test_lost_page_under_crash_kills_firecracker(testvm: Path, source: harness.DaemonProcess,
                                                 dest: harness.DaemonProcess,
                                                 tmp_path: Path) -> None:
    """crash: the session fails and, after the shipped kill_grace, the daemon SIGKILLs
    Firecracker (pid from SO_PEERCRED), whose vCPUs are blocked on the lost page."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 16 * MIB, seed=13)
    token = secrets.token_bytes(16)
    src, session = _export_snapshot(source, snap, [(0, 16 * MIB)], token, [LOST])
    client = Client(dest.api_socket)
    handover = prepare(client, session, peer=source.peer, token=token, policy="crash",
                       deadline=5)
    vm = StandIn(testvm, handover, snap, 13, ["--vcpus", "2"], tmp_path)
    try:
        accepted(client, session, vm)
        ev = wait_event(client, session, ("completed", "failed"))
        failed_at = time.monotonic()
        assert ev["event"] == "failed", ev
        grace = Config().session.kill_grace  # the shipped value
        assert vm.proc.wait(grace + TIMEOUT) == -signal.SIGKILL, vm.stderr()
        waited = time.monotonic() - failed_at
        assert grace - 0.5 <= waited <= grace + 5, (waited, grace)
        assert vm.line() is None  # killed before it could print a verdict
    finally:
        vm.kill()
        client.close()
        src.close()


def test_lost_page_under_poison_is_a_memory_error(testvm: Path, source: harness.DaemonProcess,
                                                  dest: harness.DaemonProcess,
                                                  tmp_path: Path) -> None:
    """poison: the page is installed with UFFDIO_POISON; the guest gets a machine check at
    exactly that page, the VMM cannot read it, every other byte is the snapshot's."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 16 * MIB, seed=17)
    token = secrets.token_bytes(16)
    src, session = _export_snapshot(source, snap, [(0, 16 * MIB)], token, [LOST])
    client = Client(dest.api_socket)
    handover = prepare(client, session, peer=source.peer, token=token, policy="poison",
                       deadline=5)
    vm = StandIn(testvm, handover, snap, 17, ["--vcpus", "1", "--hold"], tmp_path)
    try:
        accepted(client, session, vm)
        result = vm.line()
        assert result is not None, vm.stderr()
        assert result["verified"] is False
        assert result["mce_gpas"] == [GPA + LOST * PAGE], result
        assert result["unreadable_pages"] == 1 and result["first_unreadable"] == LOST, result
        assert result["host_mismatches"] == 0, result
        assert result["crashed"] is False
        ev = wait_event(client, session, ("completed", "failed"))
        assert ev["event"] == "completed", ev
        vm.send("quit")
        assert vm.wait() == 1, vm.stderr()  # 1: not byte-exact, as it should be
    finally:
        vm.kill()
        client.close()
        src.close()


@pytest.mark.slow  # seven restores on fresh daemons: 5-20 s here
def test_bench_scenario_reports_every_run(testvm: Path) -> None:
    """``uffdd bench --scenario firecracker-restore`` restores for real and reports each
    run's latencies and time to all pages; Firecracker's figures only as quoted text."""
    proc = subprocess.run([sys.executable, "-m", "uffdd", "bench", "--quick", "--fc-mib", "8",
                           "--scenario", "firecracker-restore", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout)["scenarios"]["firecracker-restore"]
    assert set(s["uffdd"]) == {"local_stream_only", "local_1vcpu", "local_4vcpu",
                               "remote_stream_only", "remote_4vcpu",
                               "local_1vcpu_demand_only", "local_4vcpu_demand_only"}
    for name, run in s["uffdd"].items():
        assert run["memory_mib"] == 8 and run["all_present_s"] > 0
        if "stream_only" not in name:  # there the guest faults nothing: no latencies
            assert run["daemon_p50_us"] is not None and run["daemon_p99_us"] is not None
    # the guest started after completed: the stream brought every page
    assert s["uffdd"]["local_stream_only"]["pages_demand"] == 0
    # demand only: every page was a fault
    assert s["uffdd"]["local_1vcpu_demand_only"]["pages_demand"] == 8 * MIB // PAGE
    assert "published_reference" not in s  # no peer's figure typed into the bench
