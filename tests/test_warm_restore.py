"""Warm restore (issue 17): a Firecracker restore records the order in which its pages
were first demanded; the next restore of the same snapshot streams that order first.

Real processes: the daemon, and the Firecracker stand-in (``uffdd-testvm firecracker``)
on real KVM, restoring from a local snapshot file (served by the daemon's internal
loopback export, where the recording and the replay happen). The destinations stream
nothing beyond a replay (``[peer] background = false``), so what arrives by bulk is the
replay's pages exactly, and every other page the guest reads is demanded: the counts
are exact, not a race. Also unit tests of the file format (pure logic).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.test_firecracker_standin import (
    PAGE,
    StandIn,
    accepted,
    assert_byte_exact,
    end,
    wait_event,
    write_snapshot,
)
from uffdd import warmorder
from uffdd.client import Client, ClientError
from uffdd.lab import harness

NATIVE = Path(__file__).resolve().parent.parent / "native"
MIB = 1 << 20
TIMEOUT = 60.0  # bounds a hang only


# ----------------------------------------------------------------- the format (unit)


def _order(runs: tuple[tuple[int, int, int], ...], flags: int = 0) -> warmorder.Order:
    return warmorder.Order(((0, 64 * PAGE, PAGE), (64 * PAGE, 32 * PAGE, PAGE)), runs, flags)


def test_format_round_trip_and_recorder_coalesces() -> None:
    rec = warmorder.Recorder(_order(()).layout)
    for r, p, n in ((1, 5, 2), (1, 7, 1), (0, 3, 1), (1, 5, 3), (0, 4, 2), (0, 0, 1)):
        rec.add(r, p, n)  # repeats are dropped; consecutive pages coalesce
    order = rec.order(completed=True)
    assert order.runs == ((1, 5, 3), (0, 3, 3), (0, 0, 1))
    assert order.pages == 7 and order.flags == warmorder.FLAG_COMPLETED
    assert warmorder.decode(warmorder.encode(order)) == order


def test_replay_streams_whole_blocks_in_first_recorded_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the rule with 64 KiB blocks (16 pages), small enough to show it on small regions;
    # shipped blocks are a bulk chunk (2 MiB)
    assert warmorder.REPLAY_BLOCK_BYTES == 2 << 20
    monkeypatch.setattr(warmorder, "REPLAY_BLOCK_BYTES", 64 << 10)
    order = _order(((1, 20, 1), (0, 63, 1), (1, 3, 1), (0, 0, 17), (1, 17, 2)))
    assert warmorder.blocks(order) == ((1, 16, 16), (0, 48, 16), (1, 0, 16), (0, 0, 32))
    huge = warmorder.Order(((0, 8 << 20, 2 << 20),), ((0, 2, 1), (0, 0, 1)))
    assert warmorder.blocks(huge) == ((0, 2, 1), (0, 0, 1))  # a 2 MiB page is a block


def _damaged(kind: str) -> bytes:
    good = warmorder.encode(_order(((1, 0, 4), (0, 60, 4))))
    if kind == "magic":
        return b"notwarm!" + good[8:]
    if kind == "version":
        return good[:8] + struct.pack("<I", 2) + good[12:]
    if kind == "truncated":
        return good[:-1]
    if kind == "crc":
        return good[:-1] + bytes([good[-1] ^ 1])
    if kind == "beyond":  # a run past its region, with a valid checksum
        return warmorder.encode(_order(((0, 62, 4),)))
    if kind == "twice":
        return warmorder.encode(_order(((0, 0, 4), (0, 3, 1))))
    if kind == "bad-region":
        return warmorder.encode(warmorder.Order(((0, 5000, PAGE),), ()))
    raise AssertionError(kind)


DAMAGE = ("magic", "version", "truncated", "crc", "beyond", "twice", "bad-region")


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_file_is_refused(kind: str) -> None:
    with pytest.raises(warmorder.OrderError):
        warmorder.decode(_damaged(kind))


def test_too_large_is_refused_before_reading_it_whole() -> None:
    with pytest.raises(warmorder.OrderError, match="larger"):
        warmorder.decode(bytes(warmorder.MAX_FILE_BYTES + 1))


# ----------------------------------------------------------------- real restores


@pytest.fixture(scope="module")
def testvm() -> Path:
    require(harness.kvm_usable(), "/dev/kvm is missing or not read-write")
    tool = NATIVE / "build" / "uffdd-testvm"
    proc = subprocess.run(["make", "-s", "-C", str(NATIVE)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tool


@contextlib.contextmanager
def _destination(workdir: Path, fastpath: str) -> Iterator[harness.DaemonProcess]:
    ho = Path(tempfile.mkdtemp(prefix="uffdd-warm-"))
    config = (f'[peer]\nlisten = "127.0.0.1:0"\nbackground = false\nfastpath = "{fastpath}"\n'
              f'[api]\nhandover_dir = "{ho}"\n')
    d = harness.start_daemon(workdir, "destination", config=config)
    try:
        yield d
    finally:
        code = d.stop()
        shutil.rmtree(ho, ignore_errors=True)
        assert "Traceback" not in d.log_text(), d.log_text()[-6000:]
        assert code == 0, d.log_text()[-3000:]


@pytest.fixture(params=["on", "off"], ids=["c-demand", "python-demand"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[harness.DaemonProcess]:
    """A destination whose file source streams nothing but a replay; its demand lane in
    C (the fast path) or in Python: both record."""
    with _destination(tmp_path, str(request.param)) as d:
        yield d


@pytest.fixture(scope="module")
def api_dest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.DaemonProcess]:
    """One daemon for the refusals (each leaves nothing behind)."""
    with _destination(tmp_path_factory.mktemp("refusals"), "auto") as d:
        yield d


def _poll(client: Client, session: str, ok: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        st = client.status(session)[0]
        if ok(st):
            return st
        time.sleep(0.02)
    raise AssertionError(f"{what}: {client.status(session)}")


def _warm_fds(stack: contextlib.ExitStack, record: Path | None, replay: Path | None
              ) -> dict[str, int]:
    """The orchestrator opens the order files; the daemon gets fds."""
    fds: dict[str, int] = {}
    if record is not None:
        fds["warm_record"] = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        stack.callback(os.close, fds["warm_record"])
    if replay is not None:
        fds["warm_replay"] = os.open(replay, os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, fds["warm_replay"])
    return fds


def _export(stack: contextlib.ExitStack, source: harness.DaemonProcess, snap: Path,
            session: str, token: bytes, fds: dict[str, int]) -> Client:
    """The source host exports the snapshot file (two regions, as the stand-in splits
    it) with the warm fds after the file's."""
    size = snap.stat().st_size
    half = size // 2
    src = stack.enter_context(Client(source.api_socket))
    fd = os.open(snap, os.O_RDONLY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    sent = [fd, *fds.values()]
    body = {"op": "export", "session": session, "token": token,
            "regions": [{"gpa": off, "size": half, "page_size": PAGE, "fd": 0, "offset": off}
                        for off in (0, half)],
            **{key: i + 1 for i, key in enumerate(fds)}}
    src.request(body, sent)
    return src


def _restore(testvm: Path, dest: harness.DaemonProcess, snap: Path, workdir: Path, *,
             record: Path | None = None, replay: Path | None = None,
             replayed_pages: int | None = None,
             source: harness.DaemonProcess | None = None, hugetlb: bool = False
             ) -> dict[str, Any]:
    """One restore (2 regions, 1 vCPU, sequential reads); the final status entry (with
    ``source``, a remote restore: the source host's export records and replays, and its
    status entry is returned).

    With ``replay`` the guest starts only once the replay's ``replayed_pages`` arrived
    (counted by the importer, a wait with a deadline), so they are all present before
    anything faults."""
    session = f"warm-{secrets.token_hex(3)}"
    with contextlib.ExitStack() as stack:
        fds = _warm_fds(stack, record, replay)
        client = stack.enter_context(Client(dest.api_socket))
        src: Client | None = None
        if source is None:
            handover = client.prepare(session, file=str(snap), **fds)
        else:
            token = secrets.token_bytes(16)
            src = _export(stack, source, snap, session, token, fds)
            handover = client.prepare(session, peer=source.peer, token=token)
        seed = 3
        args = ["--hold", "--vcpus", "1", "--regions", "2", "--order", "seq",
                *(["--hugetlb"] if hugetlb else [])]
        vm = StandIn(testvm, handover, snap, seed, [*args, *(["--wait-go"] if replay else [])],
                     workdir)
        stack.callback(vm.kill)
        accepted(client, session, vm, 2 * MIB if hugetlb else PAGE)
        if replay is not None:
            assert replayed_pages is not None
            _poll(client, session, lambda s: s["pages_background"] >= replayed_pages,
                  "the replay never arrived")
            vm.send("go")
        result = vm.line()
        assert result is not None, vm.stderr()
        ev = wait_event(client, session, ("completed", "failed"))
        assert ev["event"] == "completed", (ev, dest.log_text()[-3000:])
        assert_byte_exact(result, snap.stat().st_size // PAGE)
        st = client.status(session)[0]
        if src is not None:
            assert src.wait_finished(session, TIMEOUT)["event"] == "completed"
            export = src.status(session)[0]
            if record is not None:
                assert export["warm_recorded_pages"] is not None, export
            st = {**st, "warm_recorded_pages": export.get("warm_recorded_pages")}
        elif record is not None:
            st = _poll(client, session, lambda s: s["warm_recorded_pages"] is not None,
                       "no record written")
        end(vm, client, session)
        return st


def test_record_then_replay(testvm: Path, dest: harness.DaemonProcess,
                            tmp_path: Path) -> None:
    """The first restore records every page it demanded, in first-demand order; the
    second, replaying it, gets every page by bulk before the guest runs: 0 demands."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 8 * MIB, seed=3)
    pages = 8 * MIB // PAGE
    order_file = tmp_path / "snapshot.mem.order"
    cold = _restore(testvm, dest, snap, tmp_path, record=order_file)
    assert cold["pages_demand"] == pages and cold["warm_recorded_pages"] == pages, cold
    assert cold["warm_replay"] is None
    order = warmorder.decode(order_file.read_bytes())
    half = pages // 2
    # one vCPU reading page after page: region 0, then region 1, each one run
    assert order.layout == ((0, half * PAGE, PAGE), (half * PAGE, half * PAGE, PAGE))
    assert order.runs == ((0, 0, half), (1, 0, half)), order.runs[:8]
    assert order.flags & warmorder.FLAG_COMPLETED
    assert order_file.stat().st_size == 32 + 2 * 24 + 2 * 16  # small: run-length coded

    warm = _restore(testvm, dest, snap, tmp_path, replay=order_file, replayed_pages=pages)
    assert warm["warm_replay"] == "used", warm
    assert warm["pages_demand"] == 0 and warm["pages_background"] == pages, warm


@pytest.mark.hugetlb
def test_record_then_replay_hugetlb_2m(testvm: Path, dest: harness.DaemonProcess,
                                       tmp_path: Path, hugepages: None) -> None:
    """2 MiB pages: recorded and replayed in units of the region's page size."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 16 * MIB, seed=3)
    order_file = tmp_path / "snapshot.mem.order"
    cold = _restore(testvm, dest, snap, tmp_path, record=order_file, hugetlb=True)
    assert cold["pages_demand"] == 8 and cold["warm_recorded_pages"] == 8, cold
    order = warmorder.decode(order_file.read_bytes())
    assert order.layout == ((0, 8 * MIB, 2 * MIB), (8 * MIB, 8 * MIB, 2 * MIB))
    assert order.runs == ((0, 0, 4), (1, 0, 4))
    warm = _restore(testvm, dest, snap, tmp_path, replay=order_file, replayed_pages=8,
                    hugetlb=True)
    assert warm["pages_demand"] == 0 and warm["pages_background"] == 8, warm


def test_partial_replay_streams_its_order_and_the_record_holds_what_was_demanded(
        testvm: Path, dest: harness.DaemonProcess, tmp_path: Path) -> None:
    """A replay of some pages in a scattered order: exactly those arrive by bulk first;
    the guest demands the rest, and the new record lists only those (pages the stream
    delivered before any fault are never faulted, so never recorded)."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 16 * MIB, seed=3)
    pages = 16 * MIB // PAGE
    half = pages // 2
    block = warmorder.REPLAY_BLOCK_BYTES // PAGE  # 512 pages: one bulk chunk
    layout = ((0, half * PAGE, PAGE), (half * PAGE, half * PAGE, PAGE))
    runs = ((1, 10, 10), (0, 5, 3), (1, 40, 2))
    replay = tmp_path / "replay.order"
    replay.write_bytes(warmorder.encode(warmorder.Order(layout, runs)))
    # streamed as whole 2 MiB blocks around the recorded pages, in first-recorded order
    streamed = warmorder.blocks(warmorder.Order(layout, runs))
    assert streamed == ((1, 0, block), (0, 0, block))
    record = tmp_path / "record.order"
    st = _restore(testvm, dest, snap, tmp_path, record=record, replay=replay,
                  replayed_pages=2 * block)
    assert st["warm_replay"] == "used"
    assert st["pages_background"] == 2 * block and st["pages_demand"] == pages - 2 * block, st
    got = warmorder.decode(record.read_bytes())
    assert got.runs == ((0, block, half - block), (1, block, half - block)), got.runs
    assert st["warm_recorded_pages"] == pages - 2 * block


def test_remote_record_then_replay(testvm: Path, dest: harness.DaemonProcess,
                                   tmp_path: Path) -> None:
    """A remote restore: the source host's export records (next to its snapshot file)
    and replays; the same counts as locally."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 4 * MIB, seed=3)
    pages = 4 * MIB // PAGE
    order_file = tmp_path / "snapshot.mem.order"
    with _destination(tmp_path / "source", "auto") as source:
        cold = _restore(testvm, dest, snap, tmp_path, record=order_file, source=source)
        assert cold["pages_demand"] == pages and cold["warm_recorded_pages"] == pages, cold
        order = warmorder.decode(order_file.read_bytes())
        assert order.runs == ((0, 0, pages // 2), (1, 0, pages // 2))
        warm = _restore(testvm, dest, snap, tmp_path, replay=order_file, replayed_pages=pages,
                        source=source)
        assert warm["pages_demand"] == 0 and warm["pages_background"] == pages, warm


def test_export_refuses_a_replay_for_other_regions(api_dest: harness.DaemonProcess,
                                                   tmp_path: Path) -> None:
    """An export knows its regions at once: a record made for others is refused."""
    snap = tmp_path / "snapshot.mem"
    snap.write_bytes(bytes(4 * MIB))
    other = tmp_path / "other.order"
    other.write_bytes(warmorder.encode(warmorder.Order(((0, 8 * MIB, PAGE),), ())))
    with contextlib.ExitStack() as stack:
        fds = _warm_fds(stack, None, other)
        with pytest.raises(ClientError) as e:
            _export(stack, api_dest, snap, "x", secrets.token_bytes(16), fds)
        assert e.value.code == "bad-request" and "warm_replay" in e.value.message, e.value


def test_replay_for_other_regions_is_ignored(testvm: Path, dest: harness.DaemonProcess,
                                             tmp_path: Path) -> None:
    """A valid record made for another layout (another snapshot): ignored with a logged
    warning and said in status; the restore is as without it, byte-exact."""
    snap = write_snapshot(testvm, tmp_path / "snapshot.mem", 4 * MIB, seed=3)
    replay = tmp_path / "other.order"
    replay.write_bytes(warmorder.encode(warmorder.Order(((0, 8 * MIB, PAGE),),
                                                        ((0, 0, 16),))))
    st = _restore(testvm, dest, snap, tmp_path, replay=replay, replayed_pages=0)
    assert str(st["warm_replay"]).startswith("ignored: "), st
    assert st["pages_background"] == 0 and st["pages_demand"] == 4 * MIB // PAGE, st
    assert "the replay is ignored" in dest.log_text()


@pytest.mark.parametrize("kind", [*DAMAGE, "oversize", "pipe", "record-read-only", "peer"])
def test_hostile_warm_fds_are_refused_at_prepare(api_dest: harness.DaemonProcess,
                                                 tmp_path: Path, kind: str) -> None:
    """A damaged replay, a huge one, a pipe, a read-only record fd, warm with a peer
    source: each ``prepare`` is refused with a clear error; no session is left."""
    snap = tmp_path / "snapshot.mem"
    snap.write_bytes(bytes(4 * MIB))
    path = tmp_path / "bad.order"
    session = f"bad-{secrets.token_hex(3)}"
    fds: list[int] = []
    body: dict[str, Any] = {"op": "prepare", "session": session, "file": str(snap)}
    try:
        if kind == "oversize":
            with open(path, "wb") as f:
                f.truncate(warmorder.MAX_FILE_BYTES + 1)  # sparse: costs no disk
        elif kind in DAMAGE:
            path.write_bytes(_damaged(kind))
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        elif kind == "record-read-only":
            path.write_bytes(b"")
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        else:
            if kind == "peer":
                path.write_bytes(warmorder.encode(_order(())))
                del body["file"]
                body |= {"peer": "127.0.0.1:1", "token": b"t" * 16}
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        body["warm_record" if kind == "record-read-only" else "warm_replay"] = 0
        with Client(api_dest.api_socket) as c:
            with pytest.raises(ClientError) as e:
                c.request(body, fds)
            want = {"pipe": "bad-fds", "record-read-only": "bad-fds"}.get(kind, "bad-request")
            assert e.value.code == want, e.value
            assert "warm" in str(e.value), e.value
            assert not [s for s in c.status() if s["session"] == session]
    finally:
        for fd in fds:
            os.close(fd)


def test_fd_fields_must_name_every_fd_once(api_dest: harness.DaemonProcess,
                                           tmp_path: Path) -> None:
    snap = tmp_path / "snapshot.mem"
    snap.write_bytes(bytes(MIB))
    fd = os.open(snap, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Client(api_dest.api_socket) as c:
            for extra in ({"fd": 0, "warm_replay": 0}, {"file": str(snap)}, {"fd": 1}):
                with pytest.raises(ClientError) as e:
                    c.request({"op": "prepare", "session": "x", **extra}, [fd])
                assert e.value.code == "bad-fds", (extra, e.value)
    finally:
        os.close(fd)


def test_record_written_is_crc_checked(tmp_path: Path) -> None:
    """write_fd replaces what the file held (it may be longer than the new record)."""
    path = tmp_path / "o"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_WRONLY)
    try:
        order = _order(((0, 1, 2),), warmorder.FLAG_COMPLETED)
        n = warmorder.write_fd(fd, order)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == n and warmorder.decode(data) == order
    assert struct.unpack_from("<I", data, 24)[0] == zlib.crc32(data[32:])


@pytest.mark.slow  # the whole firecracker-restore scenario: 10-20 s here
def test_bench_reports_cold_and_warm_pairs(testvm: Path) -> None:
    """``uffdd bench --scenario firecracker-restore`` runs a recording cold restore and a
    replaying warm one per mode, and reports both with their ratios."""
    proc = subprocess.run([sys.executable, "-m", "uffdd", "bench", "--quick", "--fc-mib", "8",
                           "--scenario", "firecracker-restore", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warm = json.loads(proc.stdout)["scenarios"]["firecracker-restore"]["warm_restore"]
    pages = 8 * MIB // PAGE
    for mode, background, working_set in (("demand_only", False, 100),
                                          ("with_stream", True, 100),
                                          ("working_set_with_stream", True, 10)):
        pair = warm[mode]
        assert pair["background"] is background
        assert pair["working_set_pct"] == working_set
        assert pair["cold"]["warm_replay"] is None and pair["warm"]["warm_replay"] == "used"
        # a page demanded while the stream had it in flight counts as streamed at the
        # destination, but it was demanded: it is in the record
        assert pair["cold"]["warm_recorded_pages"] >= pair["cold"]["pages_demand"]
        assert pair["warm"]["order_file_bytes"] > 0
        assert set(pair["warm_over_cold"]) >= {"pages_demand", "vcpu_blocked_s",
                                               "guest_seconds", "all_present_s"}
    # demand only: the cold restore demanded (so recorded) every page
    assert warm["demand_only"]["cold"]["warm_recorded_pages"] == pages
