"""vCPU-exit strategies with real daemons, real userfaultfd and the native VMM stand-in.

The destination VMM (uffdd-vmsim) registers guest RAM with UFFD_FEATURE_SIGBUS, so a
touch of an absent page comes back to it as SIGBUS (its "vCPU exit"); it asks the
daemon with ``resolve`` and acts on the verdict. ``--reexit-page`` makes it report an
exit for a page that was installed before (optionally after MADV_PAGEOUT put it in
swap), the case where the two strategies differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.conftest import Pair, require
from tests.strategy_pkg import vmsim
from uffdd.lab import harness
from uffdd.strategies import NoUffdWait, VcpuExit, Verdict

STRATEGIES = ["continue-then-populate", "no-uffd-wait"]
PAGE_OF_INTEREST = 7  # holds pattern data (page % 11 != 5)


def _ok(result: dict[str, object]) -> None:
    assert result["exit_status"] == 0, json.dumps(result)
    assert result["verified"] is True, result
    assert result["mismatches"] == 0, result
    assert result["event"] == "completed", result


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_path(pair: Pair, strategy: str) -> None:
    """Absent pages: the exit is resolved by installing the page; the vCPU resumes."""
    m = vmsim.start(pair.workdir, pair.src, pair.dst,
                    dest_args=["--exits", "--strategy", strategy])
    result = m.dest_result()
    _ok(result)
    assert int(result["exits"]) > 0, "no fault came back as an exit"
    assert result["hash"] == m.source_result()["hash"]


@pytest.mark.parametrize("backing", ["shmem", "anon"])
def test_continue_then_populate_answers_populate(pair: Pair, backing: str) -> None:
    """An exit for a page installed before gets populate; the VMM's populate succeeds."""
    m = vmsim.start(pair.workdir, pair.src, pair.dst, backing=backing, memory="256M", dest_args=[
        "--exits", "--strategy", "continue-then-populate",
        "--reexit-page", str(PAGE_OF_INTEREST)])
    result = m.dest_result()
    _ok(result)
    reexit = result["reexit"]
    assert isinstance(reexit, dict)
    assert reexit["verdict"] == "populate", reexit
    assert reexit["populate_ok"] is True and reexit["bytes_ok"] is True, reexit


@pytest.fixture
def swap(tmp_path: Path) -> Iterator[Path]:
    """A 256 MiB swap file for the test (swapoff and removed afterwards)."""
    require(os.geteuid() == 0, "swapon needs root")
    path = tmp_path / "swapfile"
    try:
        subprocess.run(["fallocate", "-l", "256M", str(path)], check=True, capture_output=True)
        path.chmod(0o600)
        subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
        on = subprocess.run(["swapon", str(path)], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        require(False, f"cannot set up a swap file: {e}")
    require(on.returncode == 0, f"swapon refused: {on.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["swapoff", str(path)], check=False, capture_output=True)
        path.unlink(missing_ok=True)


def test_populate_after_swap_out(pair: Pair, swap: Path) -> None:
    """The page's PTE is a swap entry: populate, and MADV_POPULATE_WRITE swaps it in."""
    m = vmsim.start(pair.workdir, pair.src, pair.dst, backing="anon", memory="256M", dest_args=[
        "--exits", "--strategy", "continue-then-populate",
        "--reexit-page", str(PAGE_OF_INTEREST), "--pageout"])
    result = m.dest_result()
    _ok(result)
    reexit = result["reexit"]
    assert isinstance(reexit, dict)
    assert reexit["swapped"] is True, f"MADV_PAGEOUT did not swap the page out: {reexit}"
    assert reexit["verdict"] == "populate", reexit
    assert reexit["populate_ok"] is True and reexit["bytes_ok"] is True, reexit


@pytest.mark.parametrize("pageout", [False, True], ids=["installed", "swapped"])
def test_no_uffd_wait_crash_policy(pair: Pair, request: pytest.FixtureRequest,
                                   pageout: bool) -> None:
    """no-uffd-wait: a page installed before that still faults goes to the policy (crash)."""
    if pageout:
        request.getfixturevalue("swap")
    m = vmsim.start(pair.workdir, pair.src, pair.dst, backing="anon", memory="256M", dest_args=[
        "--exits", "--strategy", "no-uffd-wait", "--policy", "crash",
        "--reexit-page", str(PAGE_OF_INTEREST), *(["--pageout"] if pageout else [])])
    rc, lines = vmsim.dest_lines(m.dest)
    m.kill_all()
    assert rc == 2, (rc, lines, m.dest.stderr())
    crash = lines[-1]
    assert crash["crash"] is True and crash["gpa"] == PAGE_OF_INTEREST * 4096, crash
    assert "installed before" in str(crash["reason"]), crash
    assert "unrecoverable page" in pair.dst.log_text()


def test_no_uffd_wait_poison_policy(pair: Pair) -> None:
    """no-uffd-wait, poison policy: the vCPU gets inject-memory-error; the rest migrates."""
    m = vmsim.start(pair.workdir, pair.src, pair.dst, backing="anon", memory="256M", dest_args=[
        "--exits", "--strategy", "no-uffd-wait", "--policy", "poison",
        "--reexit-page", str(PAGE_OF_INTEREST)])
    result = m.dest_result()
    _ok(result)
    reexit = result["reexit"]
    assert isinstance(reexit, dict)
    assert reexit["verdict"] == "inject-memory-error" and reexit["reports"] == 2, reexit
    assert result["memory_errors"] == [
        {"gpa": PAGE_OF_INTEREST * 4096, "si_gpa": PAGE_OF_INTEREST * 4096, "code": -1}]


# ---------------------------------------------------------------- custom strategies


def _entry_point_dir(tmp_path: Path) -> Path:
    """A dist-info that declares test strategies in the ``uffdd.strategies`` group."""
    site = tmp_path / "site"
    info = site / "uffdd_test_strategies-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: uffdd-test-strategies\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[uffdd.strategies]\n"
        "test-counting = tests.strategy_pkg.custom:CountingStrategy\n"
        "test-not-a-strategy = tests.strategy_pkg.custom:NotAStrategy\n"
        "test-missing-module = tests.strategy_pkg.nothere:Strategy\n")
    return site


def _env(tmp_path: Path) -> dict[str, str]:
    path = [str(_entry_point_dir(tmp_path)), str(vmsim.repo_root())]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(path)}


def _custom_pair(tmp_path: Path, strategy: str | None) -> tuple[harness.DaemonProcess,
                                                                harness.DaemonProcess]:
    config = f'[session]\nstrategy = "{strategy}"\n' if strategy else None
    src = harness.start_daemon(tmp_path, "source")
    try:
        dst = harness.start_daemon(tmp_path, "destination", config=config, metrics=True,
                                   env=_env(tmp_path))
    except BaseException:
        src.stop()
        raise
    return src, dst


def _verdicts(dst: harness.DaemonProcess) -> dict[str, float]:
    url = f"http://127.0.0.1:{dst.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith('uffdd_verdicts_total{strategy="custom"'):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.parametrize("how", ["entry-point", "module:Class"])
def test_custom_strategy(tmp_path: Path, how: str) -> None:
    """A third-party strategy resolves the exits: by entry point (config default) or
    by ``module:Class`` (per session)."""
    spec = "tests.strategy_pkg.custom:CountingStrategy"
    src, dst = _custom_pair(tmp_path, "test-counting" if how == "entry-point" else None)
    try:
        m = vmsim.start(tmp_path, src, dst, dest_args=[
            "--exits", *(["--strategy", spec] if how == "module:Class" else [])])
        result = m.dest_result()
        _ok(result)
        assert int(result["exits"]) > 0
        assert "test-counting strategy: exit 1 " in dst.log_text()
        counted = _verdicts(dst)
        assert sum(counted.values()) >= int(result["exits"]), counted
    finally:
        codes = (src.stop(), dst.stop())
    assert codes == (0, 0)
    assert "Traceback" not in dst.log_text()


@pytest.mark.parametrize(("spec", "message"), [
    ("no-such-strategy", "unknown strategy 'no-such-strategy'; known: continue-then-populate, "
     "no-uffd-wait"),
    ("test-not-a-strategy", "is not a subclass of uffdd.strategies.Strategy"),
    ("test-missing-module", "(entry point) cannot be loaded"),
    ("tests.strategy_pkg.broken_import:Anything", "this strategy module is broken on purpose"),
    ("tests.strategy_pkg.custom:Unfinished", "cannot be created"),
    ("tests.strategy_pkg.custom:Nameless", "has no name"),
    ("tests.strategy_pkg.custom:Missing", "has no attribute 'Missing'"),
])
def test_broken_strategy_refused_at_start(tmp_path: Path, spec: str, message: str) -> None:
    """A default strategy that cannot be loaded stops the daemon before it serves anything."""
    config = tmp_path / "uffdd.toml"
    config.write_text(f'[session]\nstrategy = "{spec}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "uffdd", "serve", "--config", str(config),
         "--api-socket", str(tmp_path / "api.sock"), "--peer-listen", "127.0.0.1:0",
         "--metrics-listen", ""],
        capture_output=True, text=True, timeout=60, env={**os.environ, **_env(tmp_path)})
    assert proc.returncode == 2, proc
    assert "configuration error" in proc.stderr and "session.strategy" in proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "api.sock").exists()


def test_broken_strategy_refused_at_import(pair: Pair) -> None:
    """A per-session strategy that cannot be loaded fails the import, not the first fault."""
    m = vmsim.start(pair.workdir, pair.src, pair.dst,
                    dest_args=["--exits", "--strategy", "tests.strategy_pkg.custom:Unfinished"])
    rc, lines = vmsim.dest_lines(m.dest)
    m.kill_all()
    assert rc == 1
    assert "import" in str(lines[-1]["error"]) and "cannot be created" in str(lines[-1]["error"])


@pytest.mark.parametrize("policy", ["poison", "crash"])
def test_populate_failed_goes_to_policy(pair: Pair, policy: str) -> None:
    """The VMM's MADV_POPULATE_WRITE fails for real (read-only mapping); it reports
    populate-failed and the failure policy answers."""
    m = vmsim.start(pair.workdir, pair.src, pair.dst, backing="anon", memory="256M", dest_args=[
        "--exits", "--strategy", "continue-then-populate", "--policy", policy,
        "--reexit-page", str(PAGE_OF_INTEREST), "--populate-fails"])
    rc, lines = vmsim.dest_lines(m.dest)
    m.kill_all()
    result = lines[-1]
    if policy == "crash":
        assert rc == 2 and result["crash"] is True, (rc, lines)
        assert "populate failed" in str(result["reason"]), result
        return
    assert rc == 0, (rc, lines)
    reexit = result["reexit"]
    assert isinstance(reexit, dict)
    assert reexit["verdict"] == "populate" and reexit["populate_ok"] is False, reexit
    assert reexit["populate_errno"] != 0 and reexit["verdict2"] == "inject-memory-error", reexit
    assert "unrecoverable page" in pair.dst.log_text()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kvm_exits_resume_path(strategy: str) -> None:
    """The KVM test VMM's --exits mode: real vCPUs exit to the VMM and resume."""
    require(harness.kvm_usable(), "/dev/kvm is not usable")
    require(harness.native_tool("uffdd-testvm") is not None,
            "native/build/uffdd-testvm is not built (make -C native)")
    result = _demo("--vmm", "kvm", "--exits", "--strategy", strategy, "--vcpus", "2")
    assert result["verified"] is True and result["outcome"] == "completed", result
    assert result["vmm"] == "kvm" and result["strategy"] == strategy, result
    assert int(result["vcpu_exits"]) > 0, result  # type: ignore[call-overload]


def _demo(*args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-m", "uffdd", "demo", "--memory", "64M", "--json",
                           *args], capture_output=True, text=True, timeout=vmsim.HANG_TIMEOUT)
    result: dict[str, object] = json.loads(proc.stdout)
    result["exit_status"] = proc.returncode
    return result


@pytest.mark.parametrize("backing", ["shmem", "anon"])
def test_vmm_unregisters_on_completion(pair: Pair, backing: str) -> None:
    """After 'completed' the VMM unregisters guest RAM: a page discarded later reads as
    zeros, served by the kernel (it would hang if the range were still registered)."""
    m = vmsim.start(pair.workdir, pair.src, pair.dst, backing=backing,
                    dest_args=["--exits", "--discard-after", str(PAGE_OF_INTEREST)])
    result = m.dest_result()
    _ok(result)
    assert result["discard_after"] == {"page": PAGE_OF_INTEREST, "zero": True}, result


def test_strategy_that_raises_crashes_the_vcpu_not_the_daemon(pair: Pair) -> None:
    m = vmsim.start(pair.workdir, pair.src, pair.dst,
                    dest_args=["--exits", "--strategy", "tests.strategy_pkg.custom:Raising"])
    rc, lines = vmsim.dest_lines(m.dest)
    m.kill_all()
    assert rc == 2 and lines[-1]["crash"] is True, (rc, lines)
    assert "a bug in a third-party strategy" in str(lines[-1]["reason"]), lines
    # the daemon keeps serving: a normal migration afterwards
    _ok(vmsim.start(pair.workdir, pair.src, pair.dst, dest_args=["--exits"]).dest_result())


class _FakeContext:
    """A ResolveContext whose pages are 'present' (installed before) or 'installed'."""

    session = "unit"
    policy = "crash"
    reason = ""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self.failed: list[int] = []

    def page_state(self, gpa: int) -> str:
        return "installed"

    async def make_present(self, gpa: int) -> str:
        return self.outcome

    async def fail_page(self, gpa: int, reason: str) -> Verdict:
        self.failed.append(gpa)
        return self.verdict("crash", gpa, reason)

    def verdict(self, kind: str, gpa: int, reason: str | None = None) -> Verdict:
        page = gpa & ~4095
        return Verdict(kind, page, 0x7F0000000000 + page, 4096, reason)


def test_no_uffd_wait_resumes_once_on_a_present_page() -> None:
    """An install that raced the exit gets resume; the same vCPU on the same page again
    goes to the policy; another vCPU or page starts afresh."""
    strategy = NoUffdWait()
    ctx = _FakeContext("present")

    def resolve(vcpu: int, gpa: int) -> str:
        exit = VcpuExit(vcpu=vcpu, gpa=gpa, size=8, access="read")
        return trio.run(strategy.resolve, exit, ctx).kind

    assert resolve(0, 0x5008) == "resume"
    assert resolve(1, 0x5000) == "resume"
    assert resolve(0, 0x5010) == "crash"
    assert ctx.failed == [0x5010]
    assert resolve(0, 0x5000) == "resume"
    assert resolve(0, 0x9000) == "resume"
    assert resolve(0, 0x5000) == "resume"
