"""Shared fixtures: real daemons as child processes, real VMM processes, capability checks.

Under CI (``CI=true``) a missing capability (KVM, hugetlb pages, a tool) is a failure,
not a skip: CI must not report green for tests it did not run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffdd import _fastpath, schema
from uffdd.lab import chaos, harness

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The VMM contract (uffdd/schema.py) is enforced in every process the suite starts, which
# inherit these: a daemon records each reply or event it sends that violates its
# definition, and uffdd.client (in the test itself or in a VMM child) raises on, and
# records, each frame it receives that does. The autouse fixture below fails the test
# during which a violation was recorded.
os.environ["UFFDD_STRICT_SCHEMA"] = "1"
_SCHEMA_LOG = Path(tempfile.mkdtemp(prefix="uffdd-schema-")) / "violations.jsonl"
os.environ["UFFDD_SCHEMA_LOG"] = str(_SCHEMA_LOG)


def _schema_log_size() -> int:
    try:
        return _SCHEMA_LOG.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.fixture(autouse=True)
def wire_conformance() -> Iterator[None]:
    """Fail the test if any frame a daemon sent during it violates uffdd/schema.py."""
    start = _schema_log_size()
    yield
    if _schema_log_size() > start:
        with _SCHEMA_LOG.open(encoding="utf-8") as f:
            f.seek(start)
            seen = f.read()
        pytest.fail("frames that violate their definition in uffdd/schema.py:\n" + seen,
                    pytrace=False)


def check_frame(body: dict[str, object], op: str | None = None) -> dict[str, object]:
    """For raw-socket test clients: raise if a frame the daemon sent violates the schema.

    ``op``: the request a reply answers, when known (its own fields are then checked).
    A test that sends garbage on purpose still gets schema-valid replies.
    """
    problems = schema.check_message(body, op)
    if problems:
        schema.record("raw test client", problems, body)
        raise schema.SchemaViolation("; ".join(problems))
    return body


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` unless running under CI, where a missing capability fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required capability missing under CI: {reason}")
    pytest.skip(reason)


def assert_byte_exact(result: dict[str, object], source: dict[str, object]) -> None:
    """A destination VMM's result: every page checked, session completed, hashes equal."""
    assert result["verified"] is True, result
    assert result["mismatches"] == 0, result
    assert result["event"] == "completed", result
    assert source["event"] == "completed", source
    if result.get("hash") is not None:
        assert result["hash"] == source["hash"]


class Pair:
    """A source and a destination daemon, and helpers to migrate between them."""

    def __init__(self, workdir: Path, src: harness.DaemonProcess, dst: harness.DaemonProcess,
                 loop: str = "c"):
        self.workdir = workdir
        self.loop = loop  # "c" or "python": which data-path loops the daemons run
        self.src = src
        self.dst = dst
        self._n = 0

    def migrate(self, *, source: list[str] | None = None, dest: list[str] | None = None,
                memory: str = "64M", backing: str = "shmem", session: str | None = None,
                timeout: float = 300.0) -> tuple[dict[str, object], dict[str, object]]:
        """Run a Python-VMM migration; returns (dest result, source result)."""
        src_vmm, dst_vmm = self.start_migration(source=source, dest=dest, memory=memory,
                                                backing=backing, session=session)
        d = dst_vmm.result(timeout)
        s = src_vmm.result(60)
        return d, s

    def start_migration(self, *, source: list[str] | None = None,
                        dest: list[str] | None = None, memory: str = "64M",
                        backing: str = "shmem", session: str | None = None,
                        seed: int | None = None
                        ) -> tuple[harness.VmmProcess, harness.VmmProcess]:
        self._n += 1
        session = session or f"t{self._n}-{secrets.token_hex(3)}"
        token = secrets.token_hex(16)
        seed = seed if seed is not None else self._n
        ready = self.workdir / f"{session}.ready"
        common = ["--session", session, "--token", token, "--memory", memory,
                  "--backing", backing, "--seed", str(seed)]
        src = harness.start_vmm(harness.python_vmm(
            "source", *common, "--socket", self.src.api_socket, "--ready-file", str(ready),
            *(source or [])), "source", self.workdir, ready)
        src.wait_ready()
        dst = harness.start_vmm(harness.python_vmm(
            "dest", *common, "--socket", self.dst.api_socket, "--peer", self.src.peer,
            *(dest or [])), "dest", self.workdir)
        return src, dst


def _check_logs(*daemons: harness.DaemonProcess) -> None:
    for d in daemons:
        text = d.log_text()
        assert "Traceback" not in text, f"daemon {d.name} logged a traceback:\n{text[-6000:]}"


def fastpath_lib() -> ctypes.CDLL:
    """libuffdd_fastpath as the daemon loads it; required (a failure under CI)."""
    lib = _fastpath.load("auto")
    require(lib is not None, "libuffdd_fastpath is not built (make -C native)")
    assert lib is not None
    return lib


@pytest.fixture
def no_leaked_fds() -> Iterator[None]:
    """The test closes every fd it opened (a module opts in with usefixtures)."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert len(leaked) <= 1, f"leaked fds: {leaked}"  # the directory listing's own fd


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    """Two daemons on loopback; after the test, both must stop cleanly with no traceback.

    Parametrize it indirectly with "c" (the default: libuffdd_fastpath's loops, which
    must be built), "c-zero-copy" (the same with ``[peer] zero_copy = true``: MINOR bulk
    received straight into the memory fd) or "python" (``[peer] fastpath = "off"``) to
    pick the data path.
    """
    param = getattr(request, "param", "c")
    loop = "python" if param == "python" else "c"
    config = None
    if loop == "c":
        require(_fastpath.load("auto") is not None,
                "libuffdd_fastpath is not built (make -C native)")
        if param == "c-zero-copy":
            config = "[peer]\nzero_copy = true\n"
    else:
        config = '[peer]\nfastpath = "off"\n'
    src = harness.start_daemon(tmp_path, "source", extra=["--enable-fault-injection"],
                               config=config)
    dst = harness.start_daemon(tmp_path, "destination", metrics=True, config=config)
    try:
        yield Pair(tmp_path, src, dst, loop)
    finally:
        codes = (src.stop(), dst.stop())
    _check_logs(src, dst)
    assert codes == (0, 0), f"daemons exited with {codes}"


@pytest.fixture
def hugepages() -> Iterator[None]:
    """Reserve 2 MiB pages for a test (and give them back)."""
    path = Path("/proc/sys/vm/nr_hugepages")
    require(path.exists() and os.access(path, os.W_OK), "cannot reserve hugetlb pages")
    before = harness.reserve_hugepages(96)
    require(harness.free_hugepages() >= 96, "the kernel could not reserve 96 hugetlb pages")
    try:
        yield
    finally:
        path.write_text(str(before))


@contextlib.contextmanager
def chaos_rig(tmp_path: Path, *, rate: int = 0, config: str = chaos.DAEMON_CONFIG
              ) -> Iterator[chaos.Rig]:
    """Two daemons behind the lab's fault proxy (uffdd.lab.chaos); at the end both must
    exit 0 with no traceback in their logs."""
    r = chaos.Rig(tmp_path, rate=rate, config=config)
    try:
        yield r
    finally:
        codes = r.close()
    assert not r.tracebacks(), f"daemon logs with a traceback: {r.tracebacks()}"
    assert codes == (0, 0), f"daemons exited with {codes}"
