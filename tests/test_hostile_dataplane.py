"""The data plane against hostile and careless VMMs: tenant memory that changes under
the daemon must never fault it, and a VMM's own mistakes end only what they touch.

Each test runs real VMM processes (tests/vmm_dataplane.py, uffdd.lab.pyvmm) against two real
daemons at the shipped defaults while a healthy tenant migrates through them
(tests/hostile.py). Where the daemon has two data paths, the test runs on both: the C
loops (libuffdd_fastpath, the default) and the Python loops (``[peer] fastpath = "off"``,
the other engine, not a limit override).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import hostile
from tests.conftest import require
from tests.hostile import Tenancy, run_tenancy
from uffdd import _fastpath
from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address
from uffdd.errors import KernelError
from uffdd.importer import fastimport, faultloop
from uffdd.lab import harness

tenancy = hostile.tenancy  # the shared fixture (the C loops), under its own name

VMM = Path(__file__).resolve().parent / "vmm_dataplane.py"
PYTHON_LOOPS = '[peer]\nfastpath = "off"\n'
MEMORY = 64 << 20
PAGES = MEMORY // 4096
_PS = 4096


@pytest.fixture(params=["c", "python"])
def tenancy_loop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenancy]:
    """``tenancy``, once with the C loops and once with the Python loops."""
    loop = request.param
    if loop == "c":
        require(_fastpath.load("auto") is not None, "libuffdd_fastpath is not built")
    yield from run_tenancy(tmp_path, config=None if loop == "c" else PYTHON_LOOPS, loop=loop)


class Hostile:
    """One hostile migration: a session id, a token, and how to start its VMMs."""

    def __init__(self, t: Tenancy) -> None:
        self.t = t
        self.session = f"hostile-{secrets.token_hex(3)}"
        self.token = secrets.token_hex(16)
        self.ready = t.workdir / f"{self.session}.ready"

    def common(self) -> list[str]:
        return ["--session", self.session, "--token", self.token]

    def ours(self, cmd: str, socket: str, *args: str, ready: bool = True
             ) -> harness.VmmProcess:
        """Start tests/vmm_dataplane.py CMD; with ``ready``, wait for its ready file."""
        vmm = harness.start_vmm(
            [sys.executable, str(VMM), cmd, "--socket", socket, *self.common(),
             *(["--ready-file", str(self.ready)] if ready else []), *args],
            cmd, self.t.workdir, self.ready if ready else None)
        if ready:
            vmm.wait_ready()
        return vmm

    def pyvmm(self, role: str, socket: str, *args: str) -> harness.VmmProcess:
        return harness.start_vmm(harness.python_vmm(
            role, "--socket", socket, *self.common(), "--memory", str(MEMORY), *args),
            role, self.t.workdir)


# ---------------------------------------------------------------- 1. never fault


def test_dest_memfd_shrunk_fails_only_that_session(tenancy_loop: Tenancy) -> None:
    """A destination VMM cuts its MINOR-mode memfd to nothing right after 'import': the
    daemon's writes into it fail (no SIGBUS), that session fails naming the memfd, and
    the daemon, its other tenant and the source VMM go on (the source hears it)."""
    t, h = tenancy_loop, Hostile(tenancy_loop)
    # The source exports only after the shrink: every install of this session meets it.
    dest = h.ours("dest-shrink", t.dst.api_socket, "--peer", t.src.peer)
    source = h.pyvmm("source", t.src.api_socket)
    got = dest.result(120)
    assert got["event"] == "failed", got
    assert "shrank the memory fd of region 0" in str(got["reason"]), got
    assert source.result(120)["event"] == "failed"


def test_dest_hugetlb_memfd_shrunk(tenancy: Tenancy, hugepages: None) -> None:
    """The same with a hugetlb memfd (MINOR_HUGETLBFS): half of it cut away."""
    h = Hostile(tenancy)
    dest = h.ours("dest-shrink", tenancy.dst.api_socket, "--peer", tenancy.src.peer,
                  "--backing", "hugetlb", "--shrink-to", str(MEMORY // 2))
    source = h.pyvmm("source", tenancy.src.api_socket, "--backing", "hugetlb")
    got = dest.result(120)
    assert got["event"] == "failed", got
    assert "shrank the memory fd of region 0" in str(got["reason"]), got
    assert source.result(120)["event"] == "failed"


def test_source_memfd_shrunk_loses_pages_not_the_daemon(tenancy_loop: Tenancy) -> None:
    """A source VMM cuts its (unsealable) memfd in half after 'export': the source
    daemon reads with pread, which comes back short, never a SIGBUS; the pages past the
    cut are lost, and the destination's crash policy ends that migration, saying why."""
    t, h = tenancy_loop, Hostile(tenancy_loop)
    source = h.ours("source-shrink", t.src.api_socket, "--memory", str(MEMORY))
    dest = h.pyvmm("dest", t.dst.api_socket, "--peer", t.src.peer, "--threads", "2")
    got = dest.result(120)
    assert got["event"] == "failed" and got["verified"] is False, got
    assert "shrank" in str(got["reason"]), got
    src = source.result(120)
    assert src["shrink"] == "shrunk" and src["event"] == "failed", src
    # One line per region, not one per unreadable page.
    assert t.src.log_text().count("cannot read region=0") == 1


def test_source_sealable_memfd_cannot_be_shrunk(tenancy: Tenancy) -> None:
    """A memfd made with MFD_ALLOW_SEALING is sealed against shrinking at 'export' (and
    mapped): the source VMM's ftruncate is refused and the migration is byte-exact."""
    h = Hostile(tenancy)
    source = h.ours("source-shrink", tenancy.src.api_socket, "--memory", str(MEMORY),
                    "--sealing")
    dest = h.pyvmm("dest", tenancy.dst.api_socket, "--peer", tenancy.src.peer,
                   "--threads", "2")
    got, src = dest.result(120), source.result(120)
    assert src["shrink"] == "refused", src
    assert got["verified"] is True and got["event"] == "completed", got
    assert got["hash"] == src["hash"]


# ---------------------------------------------------------------- 2. partial unmaps


def test_dest_unmaps_half_the_rest_completes(tenancy_loop: Tenancy) -> None:
    """A destination VMM munmaps the second half of guest RAM: its installs say ENOENT
    (data, zero markers, demand and bulk alike); those pages are reported as unmapped,
    once, and the first half completes byte-exact."""
    t, h = tenancy_loop, Hostile(tenancy_loop)
    dest = h.ours("dest-unmap", t.dst.api_socket, "--peer", t.src.peer, "--touch")
    source = h.pyvmm("source", t.src.api_socket)
    got = dest.result(120)
    assert got["event"] == "completed", got
    assert got["mismatches"] == 0, got
    assert got["pages_unmapped"] == PAGES // 2, got
    assert source.result(120)["event"] == "completed"
    assert t.dst.log_text().count("unmapped by the VMM") == 1


def test_dest_unmaps_half_then_poison_gives_up(tenancy: Tenancy) -> None:
    """No source at all, poison policy, a short deadline of the VMM's own choosing: the
    give-up poisons the mapped half and reports the unmapped half (UFFDIO_POISON says
    ENOENT there), instead of failing the session."""
    h = Hostile(tenancy)
    dest = h.ours("dest-unmap", tenancy.dst.api_socket, "--peer", tenancy.src.peer,
                  "--policy", "poison", "--deadline", "2")
    got = dest.result(120)
    assert got["event"] == "completed", got
    assert got["outcome"] == "completed-with-poisoned-pages", got
    assert got["pages_unmapped"] == PAGES // 2, got


# ---------------------------------------------------------------- 3. MINOR discards


def test_minor_discarded_page_keeps_page_cache_data(tenancy_loop: Tenancy) -> None:
    """MINOR mode: a vCPU exit on a page the guest dropped with MADV_DONTNEED maps the
    data the page cache kept (it used to be zeroed through the alias); one dropped with
    MADV_REMOVE has no data left and reads as zeros."""
    t, h = tenancy_loop, Hostile(tenancy_loop)
    # No source exports this session: nothing is ever installed from there.
    got = h.ours("discard-exit", t.dst.api_socket, "--peer", t.src.peer,
                 ready=False).result(120)
    assert got["verdicts"] == ["resume", "resume"], got
    assert got["kept_intact"] is True and got["kept_zeroed"] is False, got
    assert got["removed_zeroed"] is True, got


# ---------------------------------------------------------------- 4. the C loop reports
# These drive the C fault loop alone on a stand-in fd (no real uffd returns these
# errors on demand): no daemon runs, so there is no tenancy rig to share.


class CLoop:
    """The destination's C fault loop (import.c) on one region whose "uffd" is any fd
    the test chooses, in a real epoll set: what it does with a failing or odd fd is
    what it reports to Python (nothing of this region is ever installed)."""

    def __init__(self, fake_uffd: int, epfd: int | None = None) -> None:
        lib = _fastpath.load("auto")
        require(lib is not None, "libuffdd_fastpath is not built (make -C native)")
        assert lib is not None
        self.ep = select.epoll()
        self.ep.register(fake_uffd, select.EPOLLIN)
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fast = fastimport.CImport(lib, self.ep.fileno() if epfd is None else epfd,
                                       self.wake, 1)
        self.states = bytearray(16)
        self.fast.region(0, 0x7F0000000000, 16 * _PS, _PS, fake_uffd, 0, False,
                         buffer_address(self.states))

    def run(self) -> int:
        return self.fast.run(5.0)

    def close(self) -> None:
        self.fast.close()
        self.ep.close()
        os.close(self.wake)


def test_c_loop_reports_a_short_uffd_read() -> None:
    """A read of the uffd that is not whole messages: the Python loop fails the session
    (IncompleteMessage); the C loop used to drop the remainder. Now it reports it and
    Python raises the very same error. (No real uffd returns part of a message, so an
    eventfd stands in: its read returns 8 bytes.)
    No tenancy: the C loop alone, no daemon."""
    fd = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    loop = CLoop(fd)
    try:
        assert loop.run() == fastimport.ERROR
        io = loop.fast.io
        assert (io.err_op, io.err_fd, io.err_bytes) == (fastimport.E_SHORT_UFFD, fd, 8)
        with pytest.raises(uffd.IncompleteMessage) as from_c:
            faultloop._error_from_c(io)
        os.eventfd_write(fd, 1)
        with pytest.raises(uffd.IncompleteMessage) as from_python:
            uffd.read_events(fd, bytearray(uffd.MSG_SIZE * 64))
        assert str(from_c.value) == str(from_python.value)
    finally:
        loop.close()
        os.close(fd)


def test_c_loop_reports_a_failed_uffd_read() -> None:
    """A read of the uffd that fails (here ECONNRESET: a socket whose peer closed with
    data unread) used to be swallowed ("Python sees it", but Python never reads in C
    mode): now it is reported, and is the session's KernelError.
    No tenancy: the C loop alone, no daemon."""
    a, b = socket.socketpair()
    a.send(b"unread")
    b.close()  # a's next read: ECONNRESET
    loop = CLoop(a.fileno())
    try:
        assert loop.run() == fastimport.ERROR
        io = loop.fast.io
        assert (io.err_op, io.err_errno) == (fastimport.E_READ_UFFD, errno.ECONNRESET)
        with pytest.raises(KernelError) as e:
            faultloop._error_from_c(io)
        assert e.value.op == "read(uffd)" and e.value.errno == errno.ECONNRESET
    finally:
        loop.close()
        a.close()


def test_c_loop_reports_a_failed_epoll_wait() -> None:
    """epoll_wait failing (here EINVAL: the fd is no epoll set) was reported as a
    timeout, so the loop spun on; now it is an error with its errno.
    No tenancy: the C loop alone, no daemon."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    not_epoll = os.eventfd(0, os.EFD_CLOEXEC)
    loop = CLoop(fd, epfd=not_epoll)
    try:
        assert loop.run() == fastimport.ERROR
        io = loop.fast.io
        assert (io.err_op, io.err_errno) == (fastimport.E_EPOLL_WAIT, errno.EINVAL)
        with pytest.raises(KernelError, match="epoll_wait"):
            faultloop._error_from_c(io)
    finally:
        loop.close()
        os.close(fd)
        os.close(not_epoll)


def test_c_loop_reports_a_failed_epoll_ctl_on_the_demand_lane() -> None:
    """A request that does not fit the send buffer needs EPOLLOUT on the demand socket;
    the epoll_ctl that asks for it failing (here ENOENT: the socket is not in the set)
    was ignored, and the rest of the outbox would never have been sent. Now it drops the
    lane with that errno, as a failed send does.
    No tenancy: the C loop alone, no daemon."""
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            a.send(bytes(65536))
    loop = CLoop(fd)
    try:
        loop.fast.set_demand(a.fileno())  # never registered in the epoll set
        loop.fast.request(0, 3, 0.0)
        assert loop.run() == fastimport.DEMAND
        assert loop.fast.io.demand_errno == errno.ENOENT
    finally:
        loop.close()
        os.close(fd)
        a.close()
        b.close()


def _anon_mappings(pid: int, at_least: int) -> list[str]:
    """Anonymous mappings of ``pid`` of at least ``at_least`` bytes that hold memory."""
    found, head = [], ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) <= 5:  # a header with no path: anonymous
            head = line
        elif "-" in fields[0]:
            head = ""
        elif fields[0] == "Rss:" and head:
            start, end = (int(x, 16) for x in head.split()[0].split("-"))
            if end - start >= at_least and int(fields[1]) * 1024 >= at_least // 2:
                found.append(f"{head} Rss {fields[1]} kB")
    return found


def test_hugetlb_export_gives_its_scratch_back(tenancy: Tenancy, hugepages: None) -> None:
    """After a hugetlb migration the source daemon holds no 128 MiB anonymous mapping
    (the demand lane's scratch, 64 pages of 2 MiB): its RSS is back to where it was."""
    src = tenancy.src.proc.pid
    before = hostile.rss_bytes(src)
    result, source = tenancy.pair.migrate(memory="64M", backing="hugetlb")
    assert result["verified"] is True and source["event"] == "completed", (result, source)
    scratch = 64 * (2 << 20)
    deadline = time.monotonic() + 15
    while _anon_mappings(src, scratch) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _anon_mappings(src, scratch) == [], tenancy.src.log_text()[-2000:]
    assert hostile.rss_bytes(src) < before + scratch // 2, (before, hostile.rss_bytes(src))
