"""The bulk lanes' C helpers (native/fastpath/bulk.c) against pure-Python references,
and the source's chunk splitting (zero runs, holes) with and without them."""

from __future__ import annotations

import ctypes
import os
import random
import threading
import zlib

import pytest

from tests.conftest import require
from uffdd import exporter, peer
from uffdd._linux.mem import buffer_address

PAGE_SIZES = (4096, 2 << 20)


@pytest.fixture(scope="module")
def native() -> peer.PayloadNative:
    found = peer.PayloadNative.load("auto")
    require(found is not None, "libuffdd_fastpath is not built (make -C native)")
    assert found is not None
    return found


def _crc(native: peer.PayloadNative, data: bytearray, crc: int = 0) -> int:
    return native.crc32(crc, buffer_address(data), len(data)) if data else \
        native.crc32(crc, 0, 0)


def test_crc32_is_zlibs_for_every_length_and_start(native: peer.PayloadNative) -> None:
    rng = random.Random(8)
    lengths = [*range(0, 200), 4095, 4096, 4097, 65536 + 13, 2 << 20, (2 << 20) + 5]
    for n in lengths:
        data = bytearray(rng.randbytes(n))
        for start in (0, 1, 0xFFFFFFFF, rng.getrandbits(32)):
            assert _crc(native, data, start) == zlib.crc32(data, start), (n, start)


def test_crc32_chains_like_zlib(native: peer.PayloadNative) -> None:
    data = bytearray(os.urandom(3 * 4096 + 100))
    addr = buffer_address(data)
    crc = 0
    for off, n in ((0, 4096), (4096, 8192), (12288, 100)):
        crc = native.crc32(crc, addr + off, n)
    assert crc == zlib.crc32(data)


@pytest.mark.parametrize("fill", [0x00, 0xFF])
def test_crc32_of_uniform_buffers(native: peer.PayloadNative, fill: int) -> None:
    data = bytearray([fill]) * (1 << 20)
    assert _crc(native, data) == zlib.crc32(data)


def _zero_map_reference(data: bytes, page_size: int) -> bytes:
    zero = bytes(page_size)
    return bytes(data[i : i + page_size] == zero for i in range(0, len(data), page_size))


def _zero_map(native: peer.PayloadNative, data: bytearray, page_size: int) -> tuple[bytes, int]:
    out = bytearray(len(data) // page_size)
    zeros = native.zero_map(buffer_address(data), len(data), page_size, buffer_address(out))
    return bytes(out), zeros


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_zero_map_all_zero_and_no_zero(native: peer.PayloadNative, page_size: int) -> None:
    pages = 4 if page_size > 4096 else 64
    data = bytearray(pages * page_size)
    assert _zero_map(native, data, page_size) == (b"\x01" * pages, pages)
    for i in range(pages):  # one non-zero byte per page, anywhere in it
        data[i * page_size + (i * 7919) % page_size] = 1
    assert _zero_map(native, data, page_size) == (b"\x00" * pages, 0)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_zero_map_finds_a_single_byte_at_either_end(native: peer.PayloadNative,
                                                    page_size: int) -> None:
    data = bytearray(3 * page_size)
    data[page_size - 1] = 0x80  # last byte of page 0
    data[2 * page_size] = 0x01  # first byte of page 2
    assert _zero_map(native, data, page_size) == (b"\x00\x01\x00", 1)
    data[page_size - 1] = 0
    data[3 * page_size - 1] = 0x01  # page 2's last byte too
    data[2 * page_size] = 0
    assert _zero_map(native, data, page_size) == (b"\x01\x01\x00", 2)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_zero_map_matches_the_reference_on_random_patterns(native: peer.PayloadNative,
                                                           page_size: int) -> None:
    rng = random.Random(page_size)
    pages = 6 if page_size > 4096 else 300
    for _ in range(5):
        data = bytearray(pages * page_size)
        for i in range(pages):
            if rng.random() < 0.5:
                data[i * page_size + rng.randrange(page_size)] = rng.randrange(1, 256)
        ref = _zero_map_reference(bytes(data), page_size)
        assert _zero_map(native, data, page_size) == (ref, ref.count(1))


def test_zero_map_refuses_a_zero_page_size(native: peer.PayloadNative) -> None:
    data = bytearray(4096)
    out = bytearray(1)
    assert native.zero_map(buffer_address(data), len(data), 0, buffer_address(out)) == -1


def test_loading_with_fastpath_off_gives_none() -> None:
    assert peer.PayloadNative.load("off") is None


# -- the source's chunk splitting, C and Python alike


def _chunk(pattern: str) -> bytearray:
    """A chunk of 4 KiB pages: 'd' a data page (last byte set), 'z' a zero page."""
    data = bytearray(len(pattern) * 4096)
    for i, c in enumerate(pattern):
        if c == "d":
            data[i * 4096 + 4095] = i % 251 + 1
    return data


def _frames(pattern: str, native: peer.PayloadNative | None, *,
            lost: set[tuple[int, int]] | None = None) -> list[tuple[dict[str, object], bytes]]:
    region = exporter.ExportRegion(0, 0, len(pattern) * 4096, 4096, pid=os.getpid())
    state = exporter.ExportState([region], chunk_bytes=len(pattern) * 4096,
                                 lost=set(lost or ()))
    source = _chunk(pattern)
    region.addr = buffer_address(source)
    reader = exporter.PageReader(state, len(source), native)
    frames: list[exporter.Frame] = []
    exporter.send_pages(None, reader, region, 0, len(pattern), "bulk",  # type: ignore[arg-type]
                        out=frames)
    return [(dict(h), b"".join(bytes(p) for p in payload)) for h, payload in frames]


PATTERNS = [
    "d" * 40,
    "z" * 40,
    "dzdzzzd" + "z" * 20 + "dd",  # short zero runs become holes; a long one its own frame
    "zzzd" + "z" * 17,  # leading zeros, one page, trailing zeros
    "d" + "z" * 15 + "d" + "z" * 16 + "d",  # a run of 15 is a hole, of 16 a marker
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bulk_frames_are_the_same_with_and_without_c(native: peer.PayloadNative,
                                                     pattern: str) -> None:
    with_c = _frames(pattern, native)
    assert with_c == _frames(pattern, None)
    # every page is accounted for exactly once, holes and CRCs are right
    covered = bytearray(len(pattern))
    source = _chunk(pattern)
    for header, payload in with_c:
        p, n = int(header["p"]), int(header["n"])  # type: ignore[call-overload]
        assert not any(covered[p : p + n])
        covered[p : p + n] = b"\x01" * n
        if header["t"] == "zero":
            assert set(pattern[p : p + n]) == {"z"}
            continue
        assert header["t"] == "data"
        holes = header.get("zr", [])
        assert isinstance(holes, list)
        expected = bytearray(source[p * 4096 : (p + n) * 4096])
        for off, count in reversed(holes):
            assert set(pattern[p + off : p + off + count]) == {"z"}
            del expected[off * 4096 : (off + count) * 4096]
        assert payload == expected
        assert header["len"] == len(payload)
        assert header["crc"] == zlib.crc32(payload)
    assert all(covered)


def test_lost_pages_split_runs_with_the_c_zero_map(native: peer.PayloadNative) -> None:
    pattern = "ddzzdddd"
    frames = _frames(pattern, native, lost={(0, 1), (0, 5)})
    assert frames == _frames(pattern, None, lost={(0, 1), (0, 5)})
    kinds = [(h["t"], h["p"], h["n"]) for h, _ in frames]
    assert ("lost", 1, 1) in kinds and ("lost", 5, 1) in kinds
    assert ("data", 0, 1) in kinds and ("data", 6, 2) in kinds


def test_a_buffer_the_c_code_reads_is_not_copied() -> None:
    # PageReader.address is where view() put the pages: the C calls read exactly those
    region = exporter.ExportRegion(0, 0, 8 * 4096, 4096, pid=os.getpid())
    state = exporter.ExportState([region], chunk_bytes=8 * 4096)
    source = _chunk("dzdzdzdz")
    region.addr = buffer_address(source)
    reader = exporter.PageReader(state, len(source))
    view = reader.view(region, 2, 4, at=4096)
    assert ctypes.string_at(reader.address(region, 2, at=4096), 4 * 4096) == bytes(view)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_crc32_nonzero_skips_exactly_the_mapped_zero_pages(native: peer.PayloadNative,
                                                           page_size: int) -> None:
    rng = random.Random(3)
    pages = 5 if page_size > 4096 else 40
    data = bytearray(rng.randbytes(pages * page_size))
    zmap = bytearray(rng.random() < 0.4 for _ in range(pages))
    for first, end in ((0, pages), (1, pages - 1), (2, 2), (pages - 1, pages)):
        expected = 0
        for i in range(first, end):
            if not zmap[i]:
                expected = zlib.crc32(data[i * page_size : (i + 1) * page_size], expected)
        got = native.crc32_nonzero(0, buffer_address(data), page_size, buffer_address(zmap),
                                   first, end)
        assert got == expected, (first, end)


def _fill_holes(native: peer.PayloadNative, buf: bytearray, page_size: int, count: int,
                holes: list[tuple[int, int]], with_crc: bool) -> int:
    import array
    flat = array.array("I", [v for hole in holes for v in hole])
    return native.fill_holes(buffer_address(buf), page_size, count,
                             flat.buffer_info()[0] if holes else 0, len(holes), with_crc, 0)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("holes", [[], [(0, 1)], [(1, 2), (4, 1)], [(3, 2)]])
def test_fill_holes_zeroes_holes_and_checksums_the_rest(native: peer.PayloadNative,
                                                       page_size: int,
                                                       holes: list[tuple[int, int]]) -> None:
    count = 5
    buf = bytearray(b"\xa5" * (count * page_size))
    pieces, pos = [], 0
    for off, n in [*holes, (count, 0)]:
        pieces.append(bytes(buf[pos * page_size : off * page_size]))
        pos = off + n
    crc = _fill_holes(native, buf, page_size, count, holes, True)
    assert crc == zlib.crc32(b"".join(pieces))
    for off, n in holes:
        assert buf[off * page_size : (off + n) * page_size] == bytes(n * page_size)
    hole_pages = {off + k for off, n in holes for k in range(n)}
    for i in set(range(count)) - hole_pages:
        assert buf[i * page_size : (i + 1) * page_size] == b"\xa5" * page_size
    assert _fill_holes(native, bytearray(count * page_size), page_size, count, holes,
                       False) == 0


def test_recv_parts_scatters_buffered_and_new_bytes() -> None:
    import socket
    a, b = socket.socketpair()
    try:
        sender, receiver = peer.FrameSocket(a), peer.FrameSocket(b)
        payload = os.urandom(300_000)
        # a frame header first: the receiver's header read buffers part of the payload
        writer = threading.Thread(target=sender.send, args=({"t": "data", "n": 1}, payload))
        writer.start()
        assert receiver.recv_header() == {"t": "data", "n": 1}
        target = bytearray(400_000)
        view = memoryview(target)
        cuts = [(0, 10), (20, 70_000), (70_000, 70_000), (100_000, 330_010)]
        receiver.recv_parts([view[x:y] for x, y in cuts])
        writer.join()
        got = b"".join(target[x:y] for x, y in cuts)
        assert got == payload
        assert target[10:20] == bytes(10) and target[70_000:100_000] == bytes(30_000)
    finally:
        a.close()
        b.close()


def test_fill_holes_stops_at_a_hole_outside_the_run(native: peer.PayloadNative) -> None:
    buf = bytearray(b"\x01" * (4 * 4096))
    assert _fill_holes(native, buf, 4096, 4, [(3, 2)], True) == 0  # past the end
    assert buf == b"\x01" * (4 * 4096)
    assert _fill_holes(native, buf, 4096, 4, [(2, 1), (1, 1)], True) == 0  # out of order
