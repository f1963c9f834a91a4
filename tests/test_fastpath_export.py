"""The source's demand lane in C (native/fastpath/export.c) against the Python one.

The C loop must be invisible on the wire: its frame codec writes what msgpack-python
writes (checked through the library's test hooks) and reads what the Python decoder
reads; over a real socket, the same request stream gives the same reply bytes, the same
counters, the same ``sent`` rows and bulk hint, and the same errors for bad frames, on
every way of reading guest memory (sealed memfd mapping, unsealed memfd pread, another
process's memory). Fault injection, stopping the lane and TLS lanes go to Python.
Live daemons: the C loop answers a real migration (the log says how many requests),
and ``fastpath = "off"`` still migrates byte-exact.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import socket
import struct
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Pair, assert_byte_exact, require
from uffdd import _fastpath, exporter, peer, protocol
from uffdd._linux.mem import buffer_address
from uffdd.config import PeerConfig
from uffdd.errors import PeerUnavailable, ProtocolError
from uffdd.lab import harness
from uffdd.metrics import SessionMetrics

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "native" / "build" / _fastpath.LIBRARY
BOUNDED = settings(max_examples=300, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])
PAGE = 4096
PAGES = 256
KINDS = {"req": 1, "data": 2, "zero": 3}  # frame.h enum fp_kind (FP_OTHER = 0)
HAVE = {"r": 1, "p": 2, "n": 4, "len": 8, "crc": 16}
_NAMES = count()


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    """The library the daemon loads (built here if make can), with the test hooks typed."""
    r = subprocess.run(["make", "-C", str(ROOT / "native"), str(LIBRARY)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"cannot build {LIBRARY}: {r.stderr[-400:]}")
    loaded = _fastpath.load("auto")
    require(loaded is not None, "libuffdd_fastpath did not load")
    assert loaded is not None
    loaded.uffdd_fp_test_put_frame_head.argtypes = (
        ctypes.c_char_p, ctypes.c_int, *[ctypes.c_uint64] * 5)
    loaded.uffdd_fp_test_put_frame_head.restype = ctypes.c_uint64
    loaded.uffdd_fp_test_parse_header.argtypes = (
        ctypes.c_char_p, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64))
    loaded.uffdd_fp_test_parse_header.restype = ctypes.c_int
    loaded.uffdd_fp_test_max_request_pages.argtypes = ()
    loaded.uffdd_fp_test_max_request_pages.restype = ctypes.c_uint64
    loaded.uffdd_fp_test_req_in_region.argtypes = (ctypes.c_uint64,) * 3
    loaded.uffdd_fp_test_req_in_region.restype = ctypes.c_int
    return loaded


def c_frame_head(lib: ctypes.CDLL, kind: str, r: int, p: int, n: int, length: int = 0,
                 crc: int = 0) -> bytes:
    out = ctypes.create_string_buffer(128)
    size = lib.uffdd_fp_test_put_frame_head(out, KINDS[kind], r, p, n, length, crc)
    return out.raw[:size]


def c_parse(lib: ctypes.CDLL, body: bytes) -> tuple[int, dict[str, int]]:
    """frame.h's verdict on a header body: kind (0: Python's) and the fields it saw."""
    out = (ctypes.c_uint64 * 6)()
    kind = lib.uffdd_fp_test_parse_header(body, len(body), out)
    have = out[5]
    return kind, {key: out[i] for i, key in enumerate(("r", "p", "n", "len", "crc"))
                  if have & HAVE[key]}


# ---------------------------------------------------------------- frame.h codec

EDGES = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x100000000, 2**64 - 1]
uints = st.one_of(st.sampled_from(EDGES), st.integers(0, 2**64 - 1))


def _header(kind: str, r: int, p: int, n: int, length: int, crc: int) -> dict[str, object]:
    if kind == "data":  # the key order of exporter._one_page / _send_group
        return {"t": "data", "r": r, "p": p, "n": n, "len": length, "crc": crc}
    return {"t": kind, "r": r, "p": p, "n": n}


@BOUNDED
@given(st.sampled_from(sorted(KINDS)), uints, uints, uints, uints, uints)
def test_frame_head_is_msgpack_python(lib: ctypes.CDLL, kind: str, r: int, p: int, n: int,
                                      length: int, crc: int) -> None:
    """fp_put_frame_head writes exactly protocol.pack_peer's bytes (length prefix too)."""
    header = _header(kind, r, p, n, length, crc)
    assert c_frame_head(lib, kind, r, p, n, length, crc) == protocol.pack_peer(header)


@BOUNDED
@given(st.sampled_from(sorted(KINDS)), uints, uints, st.integers(1, 2**64 - 1), uints, uints)
def test_parse_reads_what_pack_peer_writes(lib: ctypes.CDLL, kind: str, r: int, p: int,
                                           n: int, length: int, crc: int) -> None:
    header = _header(kind, r, p, n, length, crc)
    kind_seen, fields = c_parse(lib, protocol.pack_peer(header)[4:])
    assert kind_seen == KINDS[kind]
    assert fields == {k: v for k, v in header.items() if k != "t"}


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8))
near_headers = st.dictionaries(
    st.sampled_from(["t", "r", "p", "n", "len", "crc", "zr", "reason", "x"]),
    st.one_of(scalars, st.sampled_from(["req", "data", "zero", "lost", "cancel"]),
              st.lists(st.integers(0, 9), max_size=2)), max_size=7)


def _agrees_with_python(lib: ctypes.CDLL, body: bytes) -> None:
    """Whatever the C parser accepts, Python decodes to the very same header."""
    kind, fields = c_parse(lib, body)
    if kind == 0:
        return  # handed to Python, which accepts or refuses it itself
    decoded = protocol.unpack_peer_header(body)  # must not raise: C accepted it
    assert decoded.pop("t") == {v: k for k, v in KINDS.items()}[kind]
    assert decoded == fields, (body.hex(), decoded, fields)
    assert all(not isinstance(v, bool) for v in decoded.values())
    assert fields["n"] >= 1


@BOUNDED
@given(near_headers)
def test_parse_hostile_headers(lib: ctypes.CDLL, header: dict[str, Any]) -> None:
    _agrees_with_python(lib, msgpack.packb(header, use_bin_type=True))


@BOUNDED
@given(st.binary(max_size=64))
def test_parse_random_bytes(lib: ctypes.CDLL, body: bytes) -> None:
    _agrees_with_python(lib, body)


def test_parse_refuses_what_python_must_decide(lib: ctypes.CDLL) -> None:
    req = protocol.pack_peer({"t": "req", "r": 0, "p": 5, "n": 1})[4:]
    for cut in range(len(req)):  # every truncation
        assert c_parse(lib, req[:cut])[0] == 0
    assert c_parse(lib, req + b"\x00")[0] == 0  # a trailing byte
    hostile = [
        {"t": "req", "r": 0, "p": -1, "n": 1},  # negative
        {"t": "req", "r": 0, "p": 1.0, "n": 1},  # float
        {"t": "req", "r": True, "p": 1, "n": 1},  # bool
        {"t": "req", "r": 0, "p": 1, "n": 0},  # n = 0
        {"t": "req", "r": 0, "p": 1},  # n missing
        {"t": "req", "r": 0, "p": 1, "n": 1, "x": 1},  # an unknown key
        {"t": "data", "r": 0, "p": 1, "n": 1, "len": 4096},  # crc missing
        {"t": "lost", "r": 0, "p": 1, "n": 1},
        {"t": b"req", "r": 0, "p": 1, "n": 1},  # bytes, not str
        {"t": "req", "r": "0", "p": 1, "n": 1},
    ]
    for header in hostile:
        assert c_parse(lib, msgpack.packb(header, use_bin_type=True))[0] == 0, header
    # map16 and str8 keys: valid msgpack the fast path leaves to Python ...
    map16 = b"\xde\x00\x04" + req[1:]
    assert protocol.unpack_peer_header(map16)["p"] == 5
    assert c_parse(lib, map16)[0] == 0
    # ... and non-minimal integers, which both read alike
    wide = b"\x84\xa1t\xa3req\xa1r\xce\x00\x00\x00\x00\xa1p\xcd\x00\x05\xa1n\xcc\x01"
    assert c_parse(lib, wide) == (1, {"r": 0, "p": 5, "n": 1})
    _agrees_with_python(lib, wide)


# ---------------------------------------------------------------- the lane over a socket


def _plain(mode: str) -> PeerConfig:
    """A plaintext peer config with ``[peer] fastpath = mode``."""
    return PeerConfig(fastpath=mode, tls=False)


def _content(seed: int) -> bytes:
    """PAGES pages: runs of zero and non-zero pages of every length up to 9."""
    out = bytearray(PAGES * PAGE)
    page = 0
    for i in count():
        run = 1 + (i * 7 + seed) % 9
        if i % 2:
            for q in range(page, min(PAGES, page + run)):
                out[q * PAGE : (q + 1) * PAGE] = bytes([(q * 31 + seed) % 255 + 1]) * PAGE
        page += run
        if page >= PAGES:
            return bytes(out)


class Guest:
    """One region of guest memory, read the way ``backing`` says."""

    def __init__(self, backing: str, content: bytes) -> None:
        self.fd = -1
        self.mem: mmap.mmap | None = None
        self.backing = backing
        if backing == "pid":  # anonymous memory of a process: process_vm_readv
            self.mem = mmap.mmap(-1, len(content))
            self.mem[:] = content
            self.region = exporter.ExportRegion(0, 0, len(content), PAGE, pid=os.getpid(),
                                                addr=buffer_address(self.mem))
            return
        sealable = os.MFD_ALLOW_SEALING if backing == "sealed" else 0
        self.fd = os.memfd_create("guest", os.MFD_CLOEXEC | sealable)
        os.ftruncate(self.fd, len(content))
        os.pwrite(self.fd, content, 0)
        spec = protocol.RegionSpec(gpa=0, size=len(content), page_size=PAGE, fd=0)
        self.region = exporter.open_memfd_region(0, spec, self.fd)
        assert (self.region.mapping is not None) == (backing == "sealed")

    def close(self) -> None:
        self.region.close()
        if self.fd >= 0:
            os.close(self.fd)
        if self.mem is not None:
            self.mem.close()


class Lane:
    """serve_demand in a thread on one end of a socketpair, as the session runs it."""

    def __init__(self, guest: Guest, mode: str, *, integrity: bool = True,
                 make: Callable[[socket.socket], peer.FrameSocket] = peer.FrameSocket,
                 tcp: bool = False) -> None:
        self.state = exporter.ExportState([guest.region], 65536, integrity=integrity)
        self.metrics = SessionMetrics(f"fastpath-{next(_NAMES)}", "export")
        self.ours, self.theirs = _tcp_pair() if tcp else socket.socketpair()
        self.fs = make(self.ours)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._body, args=(mode,), daemon=True)
        self.theirs.settimeout(30)
        self.received = bytearray()

    def _body(self, mode: str) -> None:
        try:
            exporter.serve_demand(self.fs, self.state, self.metrics,
                                  library=peer.demand_library(_plain(mode), self.fs.sock))
        except BaseException as e:  # the tests compare which error ended the lane
            self.error = e
        finally:  # as the session does when a lane ends: the peer sees EOF
            self.fs.close()

    def start(self) -> Lane:
        self.thread.start()
        return self

    def send(self, data: bytes) -> None:
        self.theirs.sendall(data)

    def read_frame(self) -> tuple[dict[str, Any], bytes]:
        """One reply frame (header, payload)."""
        head = self._exactly(4)
        header = msgpack.unpackb(self._exactly(struct.unpack(">I", head)[0]))
        return header, self._exactly(int(header.get("len", 0)))

    def read_pages(self, pages: int) -> None:
        """Read the reply frames of ``pages`` requested pages."""
        while pages > 0:
            header, _ = self.read_frame()
            pages -= int(header["n"])
        assert pages == 0

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.theirs.recv(n - len(out))
            assert chunk, "the lane closed the link"
            out += chunk
        self.received += out
        return out

    def finish(self) -> bytes:
        """Close our sending side, read every reply until the lane ends; its bytes."""
        self.theirs.shutdown(socket.SHUT_WR)
        while chunk := self.theirs.recv(1 << 16):
            self.received += chunk
        self.thread.join(30)
        assert not self.thread.is_alive(), "the lane thread did not end"
        self.theirs.close()
        return bytes(self.received)

    def counters(self) -> tuple[object, ...]:
        s = self.state
        return (s.bytes_sent, s.pages_zero, s.pages_demand, s.hint, bytes(s.sent[0]),
                self.fs.sent, self.fs.received)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback (the daemons' transport)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.settimeout(None)
    return ours, theirs


def req(p: int, n: int = 1, r: int = 0) -> bytes:
    return protocol.pack_peer({"t": "req", "r": r, "p": p, "n": n})


def _both(backing: str, stream: bytes, *, integrity: bool = True, seed: int = 1,
          spin_s: float = 0.0) -> tuple[Lane, Lane]:
    """The stream through the Python lane and through the C lane (all of it buffered
    before the lane starts, so both see the same bytes in one read)."""
    guest = Guest(backing, _content(seed))
    lanes = []
    try:
        for mode in ("off", "on"):
            lane = Lane(guest, mode, integrity=integrity)
            lane.state.spin_s = spin_s
            lane.send(stream)
            lane.start().finish()
            lanes.append(lane)
    finally:
        guest.close()
    return lanes[0], lanes[1]


REQUESTS = [(0, 1), (1, 1), (3, 1), (5, 9), (0, 64), (10, 20), (200, 56), (100, 64),
            (255, 1), (7, 3), (7, 3), (40, 50), (90, 30), (130, 2)]


@pytest.mark.parametrize("integrity", [True, False], ids=["crc", "no-crc"])
@pytest.mark.parametrize("backing", ["sealed", "pread", "pid"])
def test_same_replies_and_counters(lib: ctypes.CDLL, backing: str, integrity: bool) -> None:
    """Single pages, runs, batches that overflow 64 pages, repeats: identical bytes."""
    stream = b"".join(req(p, n) for p, n in REQUESTS)
    py, c = _both(backing, stream, integrity=integrity)
    assert c.received == py.received
    assert c.counters() == py.counters()
    assert isinstance(py.error, PeerUnavailable) and isinstance(c.error, PeerUnavailable)
    assert str(c.error) == str(py.error)
    assert c.state.pages_demand_c == c.state.pages_demand > 0  # C answered them all
    assert py.state.pages_demand_c == 0
    assert c.state.hint == (0, 132)  # the last request's end steers bulk
    assert c.state.sent[0].count(1) == len({p for a, n in REQUESTS for p in range(a, a + n)})


def test_spinning_lane_same_replies(lib: ctypes.CDLL) -> None:
    """[peer] spin_us > 0: the C loop busy-polls between requests, same replies."""
    py, c = _both("sealed", b"".join(req(p, n) for p, n in REQUESTS), spin_s=0.002)
    assert c.received == py.received and c.counters() == py.counters()
    assert c.state.pages_demand_c == c.state.pages_demand


@pytest.mark.parametrize("backing", ["sealed", "pread", "pid"])
def test_replies_carry_the_right_pages(lib: ctypes.CDLL, backing: str) -> None:
    """Decoded: every page once per request, zero pages as markers, CRCs that check."""
    content = _content(3)
    guest = Guest(backing, content)
    lane = Lane(guest, "on").start()
    try:
        for p, n in REQUESTS:
            lane.send(req(p, n))
            got = p
            while got < p + n:
                header, payload = lane.read_frame()
                assert header["p"] == got and header["r"] == 0
                size = header["n"] * PAGE
                want = content[got * PAGE : got * PAGE + size]
                if header["t"] == "zero":
                    assert want == bytes(size)
                else:
                    assert header["t"] == "data" and payload == want and want != bytes(size)
                    assert header["crc"] == zlib.crc32(payload)
                got += header["n"]
        lane.finish()
    finally:
        guest.close()
    assert lane.state.pages_demand_c == sum(n for _, n in REQUESTS)


BAD_FRAMES = {
    "outside-region": req(250, 7),
    "region-index": req(0, 1, r=1),
    "n-zero": protocol.pack_peer({"t": "req", "r": 0, "p": 0, "n": 0}),
    "n-65": req(0, 65),
    "negative": protocol.pack_peer({"t": "req", "r": 0, "p": -1, "n": 1}),
    "string-page": protocol.pack_peer({"t": "req", "r": 0, "p": "1", "n": 1}),
    "data-frame": protocol.pack_peer({"t": "data", "r": 0, "p": 0, "n": 1, "len": 0,
                                      "crc": 0}),
    "bogus-kind": protocol.pack_peer({"t": "bogus"}),
    "not-a-map": struct.pack(">I", 1) + b"\x01",
    "garbage": struct.pack(">I", 3) + b"\xc1\xc1\xc1",
    "length-zero": struct.pack(">I", 0),
    "length-huge": struct.pack(">I", 2**32 - 1) + b"\x80",
    "length-over-limit": struct.pack(">I", protocol.MAX_PEER_HEADER + 1),
    "truncated": req(0)[:-2],
    # frames the Python loop answers (the C loop hands them over): not errors at all
    "extra-key": protocol.pack_peer({"t": "req", "r": 0, "p": 9, "n": 2, "x": None}),
    "map16": struct.pack(">I", 19) + b"\xde\x00\x04" + req(9, 2)[5:],
}


@pytest.mark.parametrize("backing", ["sealed", "pid"])
@pytest.mark.parametrize("bad", sorted(BAD_FRAMES))
def test_bad_frames_same_error(lib: ctypes.CDLL, bad: str, backing: str) -> None:
    """A bad frame alone, after answered requests, and inside a batch: the C lane ends
    with the Python lane's error and has sent exactly what it sent."""
    frame = BAD_FRAMES[bad]
    for stream in (frame, req(1) + req(3, 4) + frame + req(5)):
        py, c = _both(backing, stream)
        assert type(c.error) is type(py.error), (c.error, py.error)
        assert str(c.error) == str(py.error)
        assert isinstance(py.error, ProtocolError | PeerUnavailable)
        assert c.received == py.received
        assert c.counters() == py.counters()


def test_c_request_limit_is_the_protocol_constant(lib: ctypes.CDLL) -> None:
    """frame.h's FP_MAX_REQUEST_PAGES mirrors protocol.MAX_REQUEST_PAGES."""
    assert lib.uffdd_fp_test_max_request_pages() == protocol.MAX_REQUEST_PAGES


def _python_accepts(p: int, n: int, region_pages: int) -> bool:
    try:
        protocol.check_req({"t": "req", "r": 0, "p": p, "n": n}, [region_pages])
    except ProtocolError:
        return False
    return True


_EDGES = [0, 1, 2, 63, 64, 65, 255, 256, 257, 2**32, 2**63 - 1, 2**64 - 1]


@pytest.mark.parametrize("region_pages", [0, 1, 64, 256, 2**63])
def test_c_request_rule_is_check_req_at_the_edges(lib: ctypes.CDLL, region_pages: int) -> None:
    """fp_req_in_region says what protocol.check_req says, at every edge of the rule."""
    for p in _EDGES:
        for n in _EDGES:
            expected = _python_accepts(p, n, region_pages)
            assert bool(lib.uffdd_fp_test_req_in_region(p, n, region_pages)) == expected, (
                p, n, region_pages)


@BOUNDED
@given(p=st.integers(0, 2**64 - 1), n=st.integers(0, 2**64 - 1),
       region_pages=st.integers(0, 2**64 - 1))
def test_c_request_rule_is_check_req(lib: ctypes.CDLL, p: int, n: int, region_pages: int) -> None:
    assert bool(lib.uffdd_fp_test_req_in_region(p, n, region_pages)) == _python_accepts(
        p, n, region_pages)


def test_bad_frame_after_served_requests(lib: ctypes.CDLL) -> None:
    """Requests the C loop answered, then a request outside the region: ProtocolError,
    the answers already sent stay sent."""
    guest = Guest("sealed", _content(1))
    lane = Lane(guest, "on").start()
    try:
        lane.send(req(4, 2))
        lane.read_pages(2)
        lane.send(req(PAGES - 1, 2))
        lane.finish()
    finally:
        guest.close()
    assert isinstance(lane.error, ProtocolError)
    assert "outside the session's regions" in str(lane.error)
    assert lane.state.pages_demand == lane.state.pages_demand_c == 2


class _RefusingLane(peer.FrameSocket):
    """Like the daemon's _PeerLane: it refuses out-of-region requests in recv_header,
    sending an 'error' frame first."""

    def recv_header(self) -> protocol.Message:
        header = super().recv_header()
        if header.get("t") == "req" and int(header["p"]) + int(header["n"]) > PAGES:
            self.send({"t": "error", "code": "bad-request", "message": "outside"})
            raise ProtocolError("outside")
        return header


def test_refusal_goes_through_the_lanes_own_reader(lib: ctypes.CDLL) -> None:
    """The C loop never consumes a frame it does not answer: the FrameSocket subclass
    the daemon uses sees it (and sends its refusal) exactly as on the Python path."""
    guest = Guest("sealed", _content(2))
    try:
        lanes = []
        for mode in ("off", "on"):
            lane = Lane(guest, mode, make=_RefusingLane)
            lane.send(req(0, 3) + req(PAGES - 2, 3))
            lane.start().finish()
            lanes.append(lane)
    finally:
        guest.close()
    py, c = lanes
    assert str(py.error) == str(c.error) == "outside"
    assert c.received == py.received
    assert b"bad-request" in c.received


def test_unreadable_pages_are_lost_frames(lib: ctypes.CDLL) -> None:
    """The VMM shrank its (unsealed) memfd: the C loop cannot read, Python sends 'lost'
    for exactly the pages past the end, and the C loop takes over again after."""
    content = _content(4)
    guest = Guest("pread", content)
    try:
        lanes = []
        for mode in ("off", "on"):
            os.ftruncate(guest.fd, len(content))
            os.pwrite(guest.fd, content, 0)
            lane = Lane(guest, mode).start()
            lane.send(req(0, 4))
            lane.read_pages(4)
            os.ftruncate(guest.fd, 100 * PAGE)
            lane.send(req(98, 4))
            lost = []
            while sum(n for _, n in lost) < 2:
                header, _ = lane.read_frame()
                if header["t"] == "lost":
                    lost.append((header["p"], header["n"]))
            assert lost == [(100, 1), (101, 1)]
            lane.send(req(1))
            lane.read_frame()
            lanes.append(lane)
            lane.finish()
    finally:
        guest.close()
    py, c = lanes
    assert c.received == py.received
    assert c.counters() == py.counters()
    assert c.state.pages_demand_c == 5  # not the batch with the lost pages


def test_fault_injection_mid_session(lib: ctypes.CDLL) -> None:
    """'inject' while the C loop runs: lost pages and corrupt frames, as the Python loop
    sends them; when the injection is used up, the C loop answers again."""
    content = _content(5)
    guest = Guest("sealed", content)
    lane = Lane(guest, "on").start()
    data_page = next(p for p in range(PAGES) if content[p * PAGE] != 0)
    try:
        lane.send(req(data_page))
        header, _ = lane.read_frame()
        assert header["t"] == "data"
        lane.state.lost.add((0, data_page))  # what ExportSession.lose_gpa does
        lane.send(req(data_page))
        header, _ = lane.read_frame()
        assert header["t"] == "lost" and header["p"] == data_page
        lane.state.lost.discard((0, data_page))
        lane.state.corrupt_frames += 1  # what the inject handler does
        lane.send(req(data_page))
        header, payload = lane.read_frame()
        assert header["t"] == "data" and header["crc"] != zlib.crc32(payload)
        assert lane.state.corrupt_frames == 0
        lane.send(req(data_page))
        header, payload = lane.read_frame()
        assert header["crc"] == zlib.crc32(payload)
        lane.finish()
    finally:
        guest.close()
    assert lane.state.pages_demand == 4
    assert lane.state.pages_demand_c == 2  # the first and the last


def test_counters_fold_in_while_idle(lib: ctypes.CDLL) -> None:
    """The C loop returns regularly: an answered request shows in the session's counters
    and metrics without any further traffic."""
    guest = Guest("sealed", _content(6))
    lane = Lane(guest, "on").start()
    try:
        lane.send(req(0, 8))
        lane.read_pages(8)
        for _ in range(1000):  # no timing here: only until it shows (the hang guard)
            if lane.state.bytes_sent == len(lane.received):
                break
            threading.Event().wait(0.01)
        assert lane.state.bytes_sent == len(lane.received) == lane.fs.sent
        assert lane.state.pages_demand == 8
        assert lane.thread.is_alive()
        lane.finish()
    finally:
        guest.close()


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("how", ["close", "stop-reading"])
def test_stopping_the_lane_wakes_the_c_loop(lib: ctypes.CDLL, how: str, tcp: bool) -> None:
    """Session teardown from another thread ends a C lane that waits for requests:
    fs.close() (shutdown + close), or the session's stop that keeps sending possible."""
    guest = Guest("sealed", _content(7))
    lane = Lane(guest, "on", tcp=tcp).start()
    try:
        lane.send(req(2))
        lane.read_frame()
        if how == "close":
            lane.fs.close()
        else:
            socket.socket.shutdown(lane.fs.sock, socket.SHUT_RD)
        lane.thread.join(30)
        assert not lane.thread.is_alive(), "the C loop did not notice"
        assert isinstance(lane.error, PeerUnavailable)
        lane.finish()
    finally:
        guest.close()


def test_stop_reading_leaves_sending_open(lib: ctypes.CDLL) -> None:
    """After SHUT_RD the lane's own socket still sends (the session's 'cancel' frame)."""
    guest = Guest("sealed", _content(7))
    state = exporter.ExportState([guest.region], 65536)
    a, b = socket.socketpair()
    fs = peer.FrameSocket(a)
    errors: list[BaseException] = []

    def body() -> None:
        try:
            exporter.serve_demand(fs, state, SessionMetrics(f"fp-{next(_NAMES)}", "export"),
                                  library=peer.demand_library(_plain("on"), fs.sock))
        except PeerUnavailable as e:
            errors.append(e)
        fs.send({"t": "cancel", "reason": "stopped"})

    t = threading.Thread(target=body, daemon=True)
    t.start()
    b.sendall(req(1))
    b.settimeout(30)
    socket.socket.shutdown(a, socket.SHUT_RD)
    t.join(30)
    assert not t.is_alive() and errors
    fs.close()
    replies = b""
    while chunk := b.recv(1 << 16):
        replies += chunk
    b.close()
    guest.close()
    assert protocol.pack_peer({"t": "cancel", "reason": "stopped"}) in replies


def test_tls_and_off_lanes_run_python(lib: ctypes.CDLL) -> None:
    """Only a plain socket gets the C loop (an SSL socket is a socket subclass)."""

    class Wrapped(socket.socket):
        pass

    guest = Guest("sealed", _content(8))
    try:
        for mode, make in (("on", lambda s: peer.FrameSocket(Wrapped(fileno=s.detach()))),
                           ("off", peer.FrameSocket), ("on", peer.FrameSocket)):
            lane = Lane(guest, mode, make=make)
            lane.send(req(0, 5))
            lane.start().finish()
            assert lane.state.pages_demand == 5
            assert lane.state.pages_demand_c == (5 if make is peer.FrameSocket
                                                 and mode == "on" else 0)
    finally:
        guest.close()


def test_hint_steers_bulk_after_the_c_loop(lib: ctypes.CDLL) -> None:
    """The bulk lanes' next run starts after the latest request the C loop answered."""
    guest = Guest("sealed", _content(9))
    lane = Lane(guest, "on").start()
    try:
        lane.send(req(70, 3))
        lane.read_pages(3)
        run = exporter._next_run(lane.state, (0, 0), 4 * PAGE)
        assert run is not None and run[1:] == (73, 4)
        assert lane.state.hint is None
        assert bytes(lane.state.sent[0][70:77]) == b"\x01" * 7
        lane.finish()
    finally:
        guest.close()


def test_new_bulk_link_rows_are_marked(lib: ctypes.CDLL) -> None:
    """A new bulk link resets ``state.sent`` (reset_sent): the next page the C loop
    answers is marked in the rows the new bulk lanes read, at once (a page marked only
    in stale rows is sent again by bulk)."""
    guest = Guest("sealed", _content(10))
    lane = Lane(guest, "on").start()
    try:
        lane.send(req(20))
        lane.read_pages(1)
        lane.state.reset_sent()
        lane.send(req(30))
        lane.read_pages(1)
        row = lane.state.sent[0]
        assert row[30] == 1 and row[20] == 0
        lane.finish()
    finally:
        guest.close()
    assert lane.state.pages_demand == lane.state.pages_demand_c == 2


# ---------------------------------------------------------------- live daemons


@pytest.fixture
def off_pair(tmp_path: Path) -> Iterator[Pair]:
    """Both daemons with ``[peer] fastpath = "off"``."""
    config = '[peer]\nfastpath = "off"\n'
    src = harness.start_daemon(tmp_path, "source", config=config)
    try:
        dst = harness.start_daemon(tmp_path, "destination", config=config)
    except BaseException:
        src.kill()
        raise
    try:
        yield Pair(tmp_path, src, dst)
    finally:
        codes = (src.stop(), dst.stop())
    for d in (src, dst):
        assert "Traceback" not in d.log_text(), d.log_text()[-4000:]
    assert codes == (0, 0)


_C_COUNT = re.compile(r"(\d+) requests answered by the C fast path, (\d+) by Python")


def test_migration_demand_lane_in_c(lib: ctypes.CDLL, pair: Pair) -> None:
    """A real migration: the source's demand lane is the C loop, and it answered."""
    result, source = pair.migrate(memory="32M", backing="anon")
    assert_byte_exact(result, source)
    pair.src.stop()
    text = pair.src.log_text()
    assert "demand lane: answered by the C fast path" in text, text[-3000:]
    counts = [(int(c), int(p)) for c, p in _C_COUNT.findall(text)]
    assert counts and sum(c for c, _ in counts) > 0, text[-3000:]


def test_migration_fastpath_off_is_byte_exact(off_pair: Pair) -> None:
    """``fastpath = "off"``: the Python demand lane, still byte-exact."""
    result, source = off_pair.migrate(memory="32M")
    assert_byte_exact(result, source)
    off_pair.src.stop()
    assert "C fast path" not in off_pair.src.log_text()


@pytest.mark.parametrize(("mode", "line"), [
    ("auto", "fast path: C loops from "), ("off", "fast path: off (peer.fastpath is off)")])
def test_start_up_log_says_which_loops(lib: ctypes.CDLL, tmp_path: Path, mode: str,
                                       line: str) -> None:
    """The daemon's log names the loops it runs, and the library's path: config.load
    loads the library before logging is set up, so the line is logged by serve."""
    daemon = harness.start_daemon(tmp_path, mode, config=f'[peer]\nfastpath = "{mode}"\n')
    try:
        text = daemon.log_text()
    finally:
        assert daemon.stop() == 0
    assert line in text, text[-2000:]
    if mode == "auto":
        assert "libuffdd_fastpath" in text.split(line, 1)[1].splitlines()[0], text[-2000:]
