"""End to end on real KVM: uffdd-testvm (native/testvm) migrated between two daemons.

The source VM fills its RAM in the guest, hashes it and exports it through
libuffdd to one daemon; the destination VM imports through a second daemon,
its vCPUs read every page while the pages arrive (blocking on userfaultfd, or
with ``--exits`` through the vCPU-exit path), and at the end it hashes its RAM
and compares with the source's hash.

Needs /dev/kvm. Without it these tests skip, except under CI (``CI=true``),
where a missing /dev/kvm is a failure: CI machines are meant to have KVM.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from uffdd.lab import harness

pytestmark = pytest.mark.kvm

REPO = Path(__file__).resolve().parent.parent
NATIVE = REPO / "native"
TESTVM = NATIVE / "build" / "uffdd-testvm"
MIB = 1 << 20
MEMORY = "256M"
TIMEOUT = 120.0  # seconds for one VMM run; the runs below take a few seconds


def _require_kvm() -> None:
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return
    reason = "/dev/kvm is missing or not accessible: the KVM test VMM cannot run"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: KVM is required here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def testvm() -> Path:
    """Build native/ (libuffdd and uffdd-testvm) once per module."""
    _require_kvm()
    if shutil.which("make") is None:
        pytest.fail("make is not installed (Debian: build-essential)")
    proc = subprocess.run(
        ["make", "-C", str(NATIVE), "testvm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"make -C native testvm failed:\n{proc.stdout}\n{proc.stderr}"
    assert TESTVM.exists()
    return TESTVM


def _run_json(cmd: list[str], timeout: float = TIMEOUT) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON from {cmd}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


# ---------------------------------------------------------------------------
# The VM alone (no daemon): proves the guest, the checks and both fault paths.


def test_selftest_fill_and_verify(testvm: Path) -> None:
    rc, out, err = _run_json([str(testvm), "selftest", "--memory", "64M", "--vcpus", "4"])
    assert rc == 0, err
    assert out["verified"] is True
    assert out["pages"] == 64 * MIB // 4096
    assert out["guest_mismatches"] == 0
    assert out["hash"] == out["source_hash"]


def test_selftest_detects_a_corrupt_page(testvm: Path) -> None:
    rc, out, err = _run_json(
        [str(testvm), "selftest", "--memory", "16M", "--vcpus", "2", "--corrupt-page", "1234"]
    )
    assert rc == 1
    assert out["verified"] is False
    assert out["guest_mismatches"] == 1
    assert out["first_mismatch"] == 1234
    assert out["hash"] != out["source_hash"]
    assert "FAILED" in err


def test_selftest_other_seed_gives_other_hash(testvm: Path) -> None:
    hashes = set()
    for seed in ("1", "2"):
        rc, out, err = _run_json([str(testvm), "selftest", "--memory", "8M", "--seed", seed])
        assert rc == 0, err
        hashes.add(out["hash"])
    assert len(hashes) == 2


@pytest.mark.parametrize(
    ("backing", "order", "vcpus"),
    [("anon", "rand", 4), ("shmem", "seq", 2)],
)
def test_selftest_local_uffd_blocking(testvm: Path, backing: str, order: str, vcpus: int) -> None:
    """vCPUs block in the kernel on absent pages until a handler thread copies them."""
    rc, out, err = _run_json(
        [
            str(testvm),
            "selftest",
            "--memory",
            "32M",
            "--vcpus",
            str(vcpus),
            "--backing",
            backing,
            "--order",
            order,
            "--local-uffd",
        ]
    )
    assert rc == 0, err
    pages = 32 * MIB // 4096
    assert out["verified"] is True
    assert out["uffd_faults"] == pages  # every page was read first by a vCPU
    assert out["write_uffd_faults"] == pages
    assert out["exits"] == 0
    assert out["hash"] == out["source_hash"] == out["write_hash"]


@pytest.mark.parametrize("backing", ["anon", "shmem"])
def test_selftest_local_uffd_exits(testvm: Path, backing: str) -> None:
    """With UFFD_FEATURE_SIGBUS every first access exits KVM_RUN and the VMM completes it."""
    rc, out, err = _run_json(
        [
            str(testvm),
            "selftest",
            "--memory",
            "32M",
            "--vcpus",
            "4",
            "--backing",
            backing,
            "--order",
            "rand",
            "--local-uffd",
            "--exits",
        ]
    )
    assert rc == 0, err
    pages = 32 * MIB // 4096
    assert out["verified"] is True
    assert out["exits"] == pages
    assert out["write_exits"] == pages
    assert out["uffd_faults"] == 0
    assert out["hash"] == out["source_hash"] == out["write_hash"]


def test_selftest_local_uffd_minor(testvm: Path) -> None:
    rc, out, err = _run_json(
        [
            str(testvm),
            "selftest",
            "--memory",
            "16M",
            "--vcpus",
            "2",
            "--backing",
            "shmem",
            "--local-uffd",
            "--mode",
            "minor",
        ]
    )
    assert rc == 0, err
    assert out["verified"] is True


def test_selftest_memory_error_is_reported(testvm: Path) -> None:
    """inject-memory-error: the gpa is recorded and the guest's #MC handler stops the vCPU."""
    rc, out, _err = _run_json(
        [
            str(testvm),
            "selftest",
            "--memory",
            "16M",
            "--vcpus",
            "2",
            "--local-uffd",
            "--exits",
            "--mce-page",
            "77",
        ]
    )
    assert rc == 1
    assert out["verified"] is False
    assert out["mce_gpas"] == [0x40000000 + 77 * 4096]
    # KVM_X86_SET_MCE works on the development machines; where it does not, the
    # read completes with all-ones and the guest reports the page instead.
    assert out["mce_delivered"] == 1 or out["first_mismatch"] == 77


@pytest.mark.parametrize("exits", [False, True])
def test_selftest_long_mode_guest(testvm: Path, exits: bool) -> None:
    """The same guest in 64-bit long mode (paging on): same pages, same hash."""
    cmd = [str(testvm), "selftest", "--long", "--memory", "16M", "--vcpus", "2"]
    cmd += ["--order", "rand", "--local-uffd"] + (["--exits"] if exits else [])
    rc, out, err = _run_json(cmd)
    assert rc == 0, err
    assert out["guest"] == "64"
    assert out["hash"] == out["source_hash"] == out["write_hash"]
    if exits:
        assert out["exits"] == out["pages"]
    else:
        assert out["uffd_faults"] == out["pages"]


@pytest.mark.parametrize("exits", [False, True])
def test_selftest_poisoned_page_is_a_memory_error(testvm: Path, exits: bool) -> None:
    """UFFDIO_POISON (the "poison" failure policy): the guest gets a machine check, the
    VMM survives reading the page and counts it as unreadable."""
    cmd = [str(testvm), "selftest", "--memory", "16M", "--vcpus", "2", "--local-uffd"]
    cmd += ["--poison-page", "300"] + (["--exits"] if exits else [])
    rc, out, err = _run_json(cmd)
    assert rc == 1, err
    assert out["verified"] is False
    assert out["mce_gpas"] == [0x40000000 + 300 * 4096]
    assert out["unreadable_pages"] == 1
    assert "SIGBUS outside" not in err


# ---------------------------------------------------------------------------
# Migration between two real daemons.


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    name: str
    api_socket: Path
    peer: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {self.name} daemon log (last {n} lines) ---\n" + "\n".join(lines[-n:])


def _start_daemon(name: str, tmp: Path) -> Daemon:
    api = tmp / f"{name}.sock"
    port = _free_port()
    log = tmp / f"{name}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uffdd",
                "serve",
                "--api-socket",
                str(api),
                "--peer-listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                "",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )
    d = Daemon(name, api, f"127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"daemon {name} exited with {proc.returncode}\n{d.log_tail()}")
        if api.exists():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(api))
                return d
            except OSError:
                pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"daemon {name} did not open {api} within 30 s\n{d.log_tail()}")


def _stop_daemon(d: Daemon) -> None:
    if d.proc.poll() is None:
        d.proc.terminate()
        try:
            d.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture(scope="module")
def daemons(
    testvm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Daemon, Daemon]]:
    """A source-host and a destination-host daemon, talking over loopback."""
    tmp = tmp_path_factory.mktemp("kvm-daemons")
    src = _start_daemon("source", tmp)
    try:
        dst = _start_daemon("dest", tmp)
    except BaseException:
        _stop_daemon(src)
        raise
    yield src, dst
    _stop_daemon(dst)
    _stop_daemon(src)


def _migrate(
    testvm: Path,
    daemons: tuple[Daemon, Daemon],
    *,
    vcpus: int,
    backing: str,
    order: str,
    exits: bool = False,
    extra: tuple[str, ...] = (),
    memory: str = MEMORY,
    seed: int = 7,
) -> dict[str, Any]:
    src_d, dst_d = daemons
    session = (
        f"kvm-{backing}-{vcpus}-{order}-{'exits' if exits else 'block'}-{secrets.token_hex(4)}"
    )
    token = secrets.token_hex(32)
    common = [
        "--session",
        session,
        "--token",
        token,
        "--memory",
        memory,
        "--backing",
        backing,
        "--vcpus",
        str(vcpus),
        "--seed",
        str(seed),
        "--timeout",
        str(int(TIMEOUT)),
    ]
    t0 = time.monotonic()
    source = subprocess.Popen(
        [str(testvm), "source", "--socket", str(src_d.api_socket), *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert source.stdout is not None
        first = source.stdout.readline()  # the "exported" line, once the export is in place
        if not first.startswith("{"):
            source.kill()
            _, serr = source.communicate()
            pytest.fail(f"source VMM did not export: {first!r}\n{serr}\n{src_d.log_tail()}")
        exported = json.loads(first)
        assert exported["event"] == "exported"
        dest_cmd = [
            str(testvm),
            "dest",
            "--socket",
            str(dst_d.api_socket),
            "--peer",
            src_d.peer,
            *common,
            "--order",
            order,
            "--expect-hash",
            exported["hash"],
        ]
        if exits:
            dest_cmd.append("--exits")
        dest_cmd += extra
        try:
            rc, out, derr = _run_json(dest_cmd, timeout=TIMEOUT + 10)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{src_d.log_tail()}\n{dst_d.log_tail()}") from None
        sout, serr = source.communicate(timeout=TIMEOUT)
    finally:
        if source.poll() is None:
            source.kill()
            source.wait()
    elapsed = time.monotonic() - t0
    final = json.loads([ln for ln in sout.splitlines() if ln.startswith("{")][-1])
    context = (
        f"dest stderr:\n{derr}\nsource stderr:\n{serr}\n{src_d.log_tail()}\n{dst_d.log_tail()}"
    )
    assert rc == 0, f"dest VMM failed (rc {rc}): {out}\n{context}"
    assert out["verified"] is True, context
    assert out["guest_mismatches"] == 0
    assert out["hash"] == exported["hash"]
    assert out["outcome"] in ("completed",), out
    assert source.returncode == 0, f"source VMM failed: {final}\n{context}"
    assert final["outcome"] == "completed"
    out["elapsed"] = elapsed
    print(
        f"migration {session}: {elapsed:.2f}s total, dest {out['seconds']:.2f}s, "
        f"vCPUs {out['vcpu_seconds']:.2f}s, exits {out['exits']}"
    )
    return out


@pytest.mark.parametrize(
    ("vcpus", "backing", "order"),
    [(1, "shmem", "seq"), (4, "shmem", "rand"), (1, "anon", "rand"), (4, "anon", "seq")],
)
def test_migrate_blocking(
    testvm: Path, daemons: tuple[Daemon, Daemon], vcpus: int, backing: str, order: str
) -> None:
    """vCPUs block in the kernel on absent pages until the destination daemon installs them."""
    out = _migrate(testvm, daemons, vcpus=vcpus, backing=backing, order=order)
    assert out["exits"] == 0
    assert out["pages"] == 256 * MIB // 4096


@pytest.mark.parametrize(
    ("vcpus", "backing", "strategy"),
    [(4, "shmem", None), (1, "anon", None), (4, "anon", "no-uffd-wait")],
)
def test_migrate_exits(
    testvm: Path, daemons: tuple[Daemon, Daemon], vcpus: int, backing: str, strategy: str | None
) -> None:
    """UFFD_FEATURE_SIGBUS: absent pages exit KVM_RUN and go through uffdd_resolve.

    With 4 vCPUs many exits race with the background stream (the page arrives
    between the exit and the resolve): a strategy must not take that for a
    broken page."""
    extra = ("--strategy", strategy) if strategy else ()
    out = _migrate(
        testvm, daemons, vcpus=vcpus, backing=backing, order="rand", exits=True, extra=extra
    )
    assert out["pages"] == 256 * MIB // 4096
    # every page a vCPU reads before the background stream installs it is an exit;
    # the vCPUs start with the import, so their first pages are always absent
    assert 0 < out["exits"] <= out["pages"]


def test_migrate_long_mode_guest(testvm: Path, daemons: tuple[Daemon, Daemon]) -> None:
    """A 64-bit guest on the destination (the guest mode is not part of the migration)."""
    out = _migrate(
        testvm, daemons, vcpus=2, backing="shmem", order="rand", exits=True, extra=("--long",)
    )
    assert out["guest"] == "64"


def test_migrate_minor_mode(testvm: Path, daemons: tuple[Daemon, Daemon]) -> None:
    """shmem registered MISSING|MINOR, imported in "minor" mode (UFFDIO_CONTINUE)."""
    out = _migrate(
        testvm, daemons, vcpus=2, backing="shmem", order="rand", extra=("--mode", "minor")
    )
    assert out["pages"] == 256 * MIB // 4096


@pytest.mark.hugetlb
@pytest.mark.parametrize("exits", [False, True])
def test_migrate_hugetlb(testvm: Path, daemons: tuple[Daemon, Daemon], exits: bool) -> None:
    """2 MiB pages on both sides (memfd with MFD_HUGETLB)."""
    need = 2 * 64  # source and destination, 128 MiB each
    before = harness.reserve_hugepages(need + 8)
    try:
        require(harness.free_hugepages() >= need,
                f"needs {need} free 2 MiB huge pages (/proc/sys/vm/nr_hugepages)")
        _migrate_hugetlb(testvm, daemons, exits)
    finally:
        Path("/proc/sys/vm/nr_hugepages").write_text(str(before))


def _migrate_hugetlb(testvm: Path, daemons: tuple[Daemon, Daemon], exits: bool) -> None:
    out = _migrate(
        testvm, daemons, vcpus=2, backing="hugetlb", order="rand", exits=exits, memory="128M"
    )
    assert out["pages"] == 128 * MIB // 4096


def test_dest_reports_a_failed_session(testvm: Path, daemons: tuple[Daemon, Daemon]) -> None:
    """No export behind the import: the session fails and the VMM stops instead of hanging."""
    src_d, dst_d = daemons
    t0 = time.monotonic()
    rc, out, err = _run_json(
        [
            str(testvm),
            "dest",
            "--socket",
            str(dst_d.api_socket),
            "--peer",
            src_d.peer,
            "--session",
            f"kvm-nosource-{secrets.token_hex(4)}",
            "--token",
            secrets.token_hex(32),
            "--memory",
            "16M",
            "--vcpus",
            "2",
            "--deadline",
            "3",
            "--timeout",
            "60",
        ]
    )
    assert rc == 1, err
    assert out["verified"] is False
    assert out["outcome"] == "failed"
    assert "failed" in err
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------
# Failure policy: the source loses pages after the export (fault injection).
# Each test gets its own daemons: a daemon that dies here must not take the
# other tests with it.


@pytest.fixture
def fresh_daemons(testvm: Path, tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    src = _start_daemon("source", tmp_path)
    try:
        dst = _start_daemon("dest", tmp_path)
    except BaseException:
        _stop_daemon(src)
        raise
    yield src, dst
    _stop_daemon(dst)
    _stop_daemon(src)


def _migrate_losing_pages(
    testvm: Path, daemons: tuple[Daemon, Daemon], backing: str, lose: int
) -> tuple[int, dict[str, Any], str, str]:
    src_d, dst_d = daemons
    session = f"kvm-lose-{backing}-{secrets.token_hex(4)}"
    token = secrets.token_hex(32)
    common = [
        "--session",
        session,
        "--token",
        token,
        "--memory",
        "64M",
        "--backing",
        backing,
        "--vcpus",
        "2",
        "--seed",
        "5",
        "--timeout",
        "60",
    ]
    source = subprocess.Popen(
        [
            str(testvm),
            "source",
            "--socket",
            str(src_d.api_socket),
            *common,
            "--lose-pages",
            str(lose),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert source.stdout is not None
        first = source.stdout.readline()
        assert first.startswith("{"), first
        rc, out, derr = _run_json(
            [
                str(testvm),
                "dest",
                "--socket",
                str(dst_d.api_socket),
                "--peer",
                src_d.peer,
                *common,
                "--order",
                "seq",
                "--policy",
                "poison",
                "--deadline",
                "3",
            ]
        )
    finally:
        source.kill()
        _, serr = source.communicate()
    return rc, out, derr, serr + src_d.log_tail() + dst_d.log_tail()


def test_pages_the_source_lost_are_poisoned(
    testvm: Path, fresh_daemons: tuple[Daemon, Daemon]
) -> None:
    """pid mode: the source VMM unmaps its last 16 pages after the export. With the
    poison policy the destination completes with those pages poisoned: the guest gets
    machine checks for them, everything else arrives intact."""
    rc, out, derr, logs = _migrate_losing_pages(testvm, fresh_daemons, "anon", 16)
    assert out["outcome"] == "completed-with-poisoned-pages", f"{out}\n{derr}\n{logs}"
    assert out["unreadable_pages"] == 16
    assert out["guest_mismatches"] == 0
    assert out["mce_gpas"], "the vCPU reading the lost pages must get a machine check"
    assert rc == 1


def test_source_truncating_its_memfd_does_not_kill_the_daemon(
    testvm: Path, fresh_daemons: tuple[Daemon, Daemon]
) -> None:
    """memfd mode: the source VMM shrinks its memfd after the export. The source daemon
    must survive (and the pages count as lost), whatever the session's outcome."""
    src_d, _ = fresh_daemons
    _rc, out, derr, logs = _migrate_losing_pages(testvm, fresh_daemons, "shmem", 16)
    assert src_d.proc.poll() is None, f"source daemon died: rc {src_d.proc.returncode}\n{logs}"
    assert out["outcome"] in ("completed-with-poisoned-pages", "failed"), f"{out}\n{derr}"
