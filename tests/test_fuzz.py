"""Hostile and broken input: property tests of both decoders and a bounded live fuzz run.

Property tests (hypothesis, derandomized and bounded so CI time is fixed) feed the VMM
API decoder (``protocol.unpack_body``, ``check_request``, ``parse_regions``) and the
peer decoders (``FrameSocket.recv_header``, the fault thread's demand-lane parser, the
exporter's request loop) truncated, oversized, wrongly typed, out-of-range and
reordered input. Each must either accept well-formed input or refuse it with its one
documented error type, never anything else.

The live run throws random frames at both daemons' sockets (VMM API and peer port)
while a real migration runs between them: every bad connection is refused or closed,
the daemons stay up with bounded memory and no traceback, and the migration still
completes byte-exact.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Pair
from uffdd import _fastpath, exporter, peer, protocol
from uffdd.errors import PeerUnavailable, ProtocolError, RequestError
from uffdd.importer.faultloop import FaultLoop, ImportRegion
from uffdd.importer.pagestate import PageMap
from uffdd.metrics import SessionMetrics

BOUNDED = settings(max_examples=300, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])

# Any msgpack-encodable value, nested a little.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)

# ---------------------------------------------------------------- VMM API decoder


@BOUNDED
@given(st.binary(max_size=200))
def test_unpack_body_random_bytes(data: bytes) -> None:
    try:
        body = protocol.unpack_body(data)
    except RequestError as e:
        assert e.code == "bad-frame"
        return
    assert isinstance(body, dict) and all(isinstance(k, str) for k in body)


@BOUNDED
@given(values)
def test_unpack_body_any_msgpack(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    try:
        body = protocol.unpack_body(data)
    except RequestError as e:
        assert e.code == "bad-frame"
        assert not isinstance(value, dict) or any(not isinstance(k, str) for k in value)
        return
    assert body == value


@BOUNDED
@given(st.binary(min_size=1, max_size=120))
def test_unpack_body_truncated_valid_frame(tail: bytes) -> None:
    """A valid request cut anywhere is refused as bad-frame, never half-accepted."""
    full = protocol.pack({"op": "status", "id": 7, "session": "vm-1", "pad": tail})[4:]
    for cut in range(len(full)):
        with pytest.raises(RequestError):
            protocol.unpack_body(full[:cut])


@BOUNDED
@given(st.integers(0, 2**32 - 1))
def test_check_length(length: int) -> None:
    limit = 1 << 20
    if 0 < length <= limit:
        protocol.check_length(length, limit)
    else:
        with pytest.raises(RequestError) as e:
            protocol.check_length(length, limit)
        assert e.value.code == ("bad-frame" if length == 0 else "frame-too-large")


ops = st.sampled_from([*sorted(protocol.REQUESTS), "", "exp0rt", "\x00"])


@BOUNDED
@given(ops, st.dictionaries(st.sampled_from(
    ["id", "session", "token", "regions", "peer", "pid", "policy", "deadline", "vcpu", "gpa",
     "addr", "size", "access", "flags", "errno", "strategy", "lose", "corrupt", "bogus"]),
    values, max_size=8))
def test_check_request_random_fields(op: str, fields: dict[str, Any]) -> None:
    body = {"op": op, **fields}
    try:
        assert protocol.check_request(body) == op
    except RequestError as e:
        assert e.code == "bad-request" and e.message


def _valid_import() -> dict[str, Any]:
    return {"op": "import", "id": 1, "session": "vm.1", "token": b"t" * 16,
            "peer": "127.0.0.1:1", "regions": [
                {"gpa": 0, "addr": 1 << 30, "size": 1 << 20, "page_size": 4096, "uffd": 0,
                 "mode": "missing"}]}


@BOUNDED
@given(st.sampled_from(["op", "id", "session", "token", "peer", "regions"]), values)
def test_check_request_one_field_wrong(key: str, value: object) -> None:
    """A valid import with one field replaced: accepted only if still well-typed."""
    body = _valid_import()
    body[key] = value
    try:
        protocol.check_request(body)
        if key == "regions":
            protocol.parse_regions(body["regions"], role="import")
    except RequestError as e:
        assert e.code in ("bad-request", "bad-region")


region_fields = st.fixed_dictionaries({}, optional={
    "gpa": st.one_of(st.integers(-5, 2**65), values),
    "addr": st.one_of(st.integers(0, 2**64).map(lambda v: v & ~4095), values),
    "size": st.one_of(st.sampled_from([0, 4096, 8192, 2 << 20, 4095, 2**64]), values),
    "page_size": st.one_of(st.sampled_from([4096, 2 << 20, 0, 512]), values),
    "fd": st.integers(-1, 70), "uffd": st.integers(-1, 70), "offset": st.integers(0, 2**20),
    "mode": st.sampled_from(["missing", "minor", "", "MISSING"]),
})


@BOUNDED
@given(st.one_of(values, st.lists(region_fields, max_size=5)),
       st.sampled_from(["import", "export"]))
def test_parse_regions(raw: object, role: str) -> None:
    """Accepted tables are aligned, in range and non-overlapping; the rest are refused."""
    try:
        specs = protocol.parse_regions(raw, role=role)
    except RequestError as e:
        assert e.code in ("bad-request", "bad-region")
        return
    assert specs
    spans = sorted((s.gpa, s.gpa + s.size) for s in specs)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    for s in specs:
        assert s.page_size in protocol.PAGE_SIZES and s.size and not s.size % s.page_size
        assert not s.gpa % s.page_size and s.gpa + s.size <= 1 << 64


# ---------------------------------------------------------------- peer decoders


def _frame_socket_fed(data: bytes) -> peer.FrameSocket:
    a, b = socket.socketpair()
    b.sendall(data)
    b.close()
    a.settimeout(5)
    return peer.FrameSocket(a)


@BOUNDED
@given(st.binary(max_size=300))
def test_recv_header_random_bytes(data: bytes) -> None:
    fs = _frame_socket_fed(data)
    try:
        while True:
            header = fs.recv_header()
            assert isinstance(header, dict) and isinstance(header["t"], str)
    except (ProtocolError, PeerUnavailable):
        pass
    finally:
        fs.close()


@BOUNDED
@given(st.integers(protocol.MAX_PEER_HEADER + 1, 2**32 - 1))
def test_recv_header_oversized_length(length: int) -> None:
    """An oversized length is refused from the 4 length bytes alone (nothing allocated)."""
    fs = _frame_socket_fed(struct.pack(">I", length) + b"\x80")
    with pytest.raises(ProtocolError):
        fs.recv_header()
    fs.close()


peer_headers = st.fixed_dictionaries({"t": st.sampled_from(
    ["req", "data", "zero", "lost", "end", "have", "start", "done", "cancel", "bogus"])},
    optional={"r": st.one_of(st.integers(-2, 4), values),
              "p": st.one_of(st.integers(-2, 300), values),
              "n": st.one_of(st.integers(-1, 300), values), "len": st.integers(0, 8 << 20),
              "crc": st.integers(0, 2**32), "reason": values, "bits": values})


class _Recorder:
    """Stands in for the installs of a FaultLoop: records what would be installed."""

    def __init__(self, loop: FaultLoop) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        loop._install_data = lambda r, p, n, src, lane: self.calls.append(("data", r, p, n))  # type: ignore[method-assign]
        loop._install_zero = lambda r, p, n, lane: self.calls.append(("zero", r, p, n))  # type: ignore[method-assign]
        loop._unrecoverable = lambda r, p, code, why: self.calls.append(("lost", r, p, 1))  # type: ignore[method-assign]


_LOOPS = itertools.count()


def _loop() -> FaultLoop:
    regions = [ImportRegion(0, 0, 1 << 30, 64 * 4096, 4096, -1, "missing"),
               ImportRegion(1, 1 << 32, 1 << 31, 16 * 4096, 4096, -1, "missing")]
    pages = PageMap([r.pages for r in regions])
    return FaultLoop(regions, pages, notify=lambda kind, data: None,
                     metrics=SessionMetrics(f"fuzz-{next(_LOOPS)}", "import"),
                     deadline=30.0, policy="crash", integrity=True)


@BOUNDED
@given(st.lists(st.tuples(peer_headers, st.binary(max_size=64)), max_size=6),
       st.integers(1, 40))
def test_demand_lane_parser(frames: list[tuple[dict[str, Any], bytes]], split: int) -> None:
    """The fault thread's parser: in-range frames install in range, the rest break the link."""
    loop = _loop()
    rec = _Recorder(loop)
    stream = b"".join(protocol.pack_peer(h) + payload for h, payload in frames)
    try:
        for i in range(0, len(stream), split):  # arrives in arbitrary pieces
            chunk = stream[i : i + split]
            loop._rx[loop._rx_end : loop._rx_end + len(chunk)] = chunk
            loop._rx_end += len(chunk)
            loop._parse_demand()
    except ProtocolError:
        pass
    finally:
        os.close(loop._wakefd)
        loop._ep.close()
    sizes = [r.pages for r in loop.regions]
    for _kind, r, p, n in rec.calls:
        assert 0 <= r < len(sizes) and n >= 1 and p >= 0 and p + n <= sizes[r]


def _export_state() -> tuple[exporter.ExportState, int]:
    fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 32 * 4096)
    os.pwrite(fd, b"\x01" * 4096, 4096)
    spec = protocol.RegionSpec(gpa=0, size=32 * 4096, page_size=4096, fd=0)
    return exporter.ExportState([exporter.open_memfd_region(0, spec, fd)], 65536), fd


def _serve(target: Callable[..., None], frames: bytes) -> tuple[BaseException | None, bytes]:
    """Run an exporter lane over a socketpair fed ``frames``; returns (error, replies)."""
    state, fd = _export_state()
    a, b = socket.socketpair()
    b.sendall(frames)
    b.shutdown(socket.SHUT_WR)
    error: list[BaseException] = []

    def body() -> None:
        try:
            target(peer.FrameSocket(a), state, SessionMetrics(f"fuzz-{next(_LOOPS)}", "export"))
        except BaseException as e:  # the property is about which types end the lane
            error.append(e)
        finally:  # as the daemon does when a lane ends: the other side sees EOF
            a.shutdown(socket.SHUT_RDWR)

    t = threading.Thread(target=body)
    t.start()
    replies = bytearray()
    b.settimeout(10)
    while True:
        chunk = b.recv(1 << 16)
        if not chunk:
            break
        replies += chunk
    t.join(10)
    assert not t.is_alive(), "the lane thread did not end"
    a.close()
    b.close()
    for region in state.regions:
        region.close()
    os.close(fd)
    return (error[0] if error else None), bytes(replies)


@BOUNDED
@given(st.lists(peer_headers, max_size=6))
def test_exporter_demand_requests(headers: list[dict[str, Any]]) -> None:
    """The source's demand lane ends with ProtocolError/PeerUnavailable, nothing else
    (with its C loop where the library is built, as a daemon runs it by default)."""
    serve = partial(exporter.serve_demand, library=_fastpath.load("auto"))
    error, _ = _serve(serve, b"".join(protocol.pack_peer(h) for h in headers))
    assert isinstance(error, ProtocolError | PeerUnavailable), repr(error)


@BOUNDED
@given(st.lists(peer_headers, max_size=5), st.binary(max_size=40))
def test_exporter_bulk_lane_reordered(headers: list[dict[str, Any]], junk: bytes) -> None:
    """The bulk lane with frames in any order (or junk): a clean refusal or a clean end."""
    error, _ = _serve(exporter.serve_bulk,
                      b"".join(protocol.pack_peer(h) for h in headers) + junk)
    assert error is None or isinstance(error, ProtocolError | PeerUnavailable), repr(error)


# ---------------------------------------------------------------- live daemons


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _garbage(rng: random.Random) -> bytes:
    """One of: random bytes, a huge length, a truncated frame, a wrongly typed request,
    a peer handshake out of order."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 1:
        return struct.pack(">I", rng.choice([0, 2**32 - 1, (1 << 20) + 1])) + b"x" * 16
    if kind == 2:
        return protocol.pack({"op": "import", "id": 1, "regions": [{"gpa": "x"}]})[:-3]
    if kind == 3:
        return protocol.pack({"op": rng.choice(["export", "import", "resolve", "cancel"]),
                              "id": rng.randrange(-5, 5), "session": rng.randbytes(8),
                              "regions": rng.randrange(100), "token": 5})
    if kind == 4:
        return protocol.pack_peer({"t": "welcome", "mac": b"0" * 32}) + \
            protocol.pack_peer({"t": "req", "r": 0, "p": 0, "n": 1})
    return protocol.pack_peer({"t": "auth", "v": 1, "session": "nope", "lane": "bulk",
                               "nonce": rng.randbytes(rng.choice([3, 16])), "mac": 7})


def _throw(address: str | tuple[str, int], data: bytes) -> None:
    """Send ``data`` on a fresh connection and read until the daemon closes or stays quiet."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(address)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (TimeoutError, ConnectionError):
            pass


def test_live_daemons_survive_random_frames(pair: Pair) -> None:
    """300 hostile connections to both daemons during a migration; it still completes."""
    rng = random.Random(5)
    src_vmm, dst_vmm = pair.start_migration(memory="256M", dest=["--threads", "2"])
    rss = {d.name: _rss_kib(d.proc.pid) for d in (pair.src, pair.dst)}
    for i in range(300):
        if i == 30:
            assert dst_vmm.proc.poll() is None, "the migration ended before the fuzzing"
        daemon = pair.dst if i % 2 else pair.src
        target: str | tuple[str, int] = daemon.api_socket if i % 3 else \
            ("127.0.0.1", daemon.peer_port)
        _throw(target, _garbage(rng))
    result, source = dst_vmm.result(300), src_vmm.result(60)
    assert result["verified"] is True and result["hash"] == source["hash"], (result, source)
    for d in (pair.src, pair.dst):
        assert d.proc.poll() is None, f"daemon {d.name} died"
        grown = _rss_kib(d.proc.pid) - rss[d.name]
        assert grown < 64 * 1024, f"daemon {d.name} grew by {grown} KiB"
    time.sleep(0.2)
