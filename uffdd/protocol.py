"""Wire encoding of both protocols (README, wire protocol), in one place.

VMM API frames: ``u32 big-endian length`` + msgpack map. Peer frames: ``u32 big-endian
header length`` + msgpack header map + ``header["len"]`` raw payload bytes. Requests are
checked here against their definition in uffdd.schema, so the daemon's handlers only ever
see well-typed values, and every refusal names the field that is wrong.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack

from uffdd import schema
from uffdd.errors import ProtocolError, RequestError

LENGTH: Final = struct.Struct(">I")
PROTOCOL_VERSION: Final = 1
SESSION_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_PEER_HEADER: Final = 64 * 1024
#: A demand request ({"t": "req", "r", "p", "n"}) asks for 1..MAX_REQUEST_PAGES pages of
#: one region. native/fastpath/frame.h mirrors it (FP_MAX_REQUEST_PAGES; a test holds
#: the two equal); ``check_req`` is the rule.
MAX_REQUEST_PAGES: Final = 64

Message = dict[str, object]


def pack(body: Mapping[str, object]) -> bytes:
    """Encode one frame (length prefix + msgpack map)."""
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return LENGTH.pack(len(data)) + data


def unpack_body(data: bytes | bytearray | memoryview) -> Message:
    """Decode a frame body; refuse anything but a map with string keys."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise RequestError("bad-frame", f"frame body is not valid msgpack: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("bad-frame", "frame body must be a msgpack map")
    for key in body:
        if not isinstance(key, str):
            raise RequestError("bad-frame", "frame map keys must be strings")
    return body


def check_length(length: int, limit: int) -> None:
    """Refuse a frame length of 0 or over ``limit``."""
    if length == 0:
        raise RequestError("bad-frame", "empty frame")
    if length > limit:
        raise RequestError("frame-too-large", f"frame of {length} bytes exceeds limit {limit}")


# ---------------------------------------------------------------- requests

#: Every request's fields (uffdd.schema is the one definition; re-exported by op).
REQUESTS: Final = schema.REQUESTS


def check_fields(body: Mapping[str, object], fields: Sequence[schema.Field], where: str
                 ) -> None:
    """Refuse missing, extra, wrongly typed or out-of-enum fields, naming the first bad one."""
    problems = schema.check_fields(body, fields, where)
    if problems:
        raise RequestError("bad-request", problems[0])


def check_request(body: Message) -> str:
    """Validate a VMM API request; return its op."""
    op = body.get("op")
    if not isinstance(op, str):
        raise RequestError("bad-request", "request: missing field 'op' (a string)")
    fields = REQUESTS.get(op)
    if fields is None:
        raise RequestError("bad-request", f"request: unknown op {op!r}")
    check_fields(body, fields, op)
    session = body.get("session")
    if isinstance(session, str) and not SESSION_RE.fullmatch(session):
        raise RequestError("bad-request", f"{op}: session id must match {SESSION_RE.pattern}")
    return op


def token_bytes(value: object) -> bytes:
    """The session token as bytes (16..64 bytes; str tokens are UTF-8 encoded)."""
    token = value.encode() if isinstance(value, str) else value
    if not isinstance(token, bytes) or not 16 <= len(token) <= 64:
        raise RequestError("bad-request", "field 'token' must be 16 to 64 bytes")
    return token


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One region as a VMM described it, checked for shape (not yet against the fds).

    ``fd``/``uffd`` are indices into the fds that came with the request, or -1.
    """

    gpa: int
    size: int
    page_size: int
    addr: int = 0
    fd: int = -1
    offset: int = 0
    uffd: int = -1
    mode: str = ""

    @property
    def pages(self) -> int:
        return self.size // self.page_size


PAGE_SIZES: Final = (4096, 2 << 20)
#: No process has more address space than this (x86-64 with 5-level paging: 2^56 bytes
#: for user space). A region larger than that cannot be memory that exists, whatever
#: the VMM says; refusing it here keeps absurd sizes away from every later check.
ADDRESS_SPACE_LIMIT: Final = 1 << 57
#: Values of the import field "present": what pages already present in the VMM mean.
PRESENT_NONE: Final = "none"  # the default: none may be present (a fresh import)
PRESENT_KEEP: Final = "keep"  # they hold valid data (VMM precopy, or a re-import)
PRESENT_VALUES: Final = (PRESENT_NONE, PRESENT_KEEP)


def _region(raw: object, fields: Sequence[schema.Field], where: str) -> Mapping[str, object]:
    if not isinstance(raw, dict):
        raise RequestError("bad-request", f"{where}: must be a map")
    check_fields(raw, fields, where)
    return raw


def _int(raw: Mapping[str, object], key: str, default: int = -1) -> int:
    value = raw.get(key, default)
    assert isinstance(value, int)
    return value


def parse_regions(raw: object, *, role: str, limit: int | None = None) -> list[RegionSpec]:
    """Parse and shape-check a region table (count, alignment, sizes, overlaps).

    ``limit`` is ``limits.max_regions_per_request``, checked before anything else: each
    region costs the daemon a mapping or a dup'd fd and page state.
    """
    if not isinstance(raw, list) or not raw:
        raise RequestError("bad-request", "field 'regions' must be a non-empty list")
    if limit is not None and len(raw) > limit:
        raise RequestError("limit", f"{len(raw)} regions in one request, more than "
                           f"{limit} (limits.max_regions_per_request)")
    fields = schema.IMPORT_REGION if role == "import" else schema.EXPORT_REGION
    specs: list[RegionSpec] = []
    for i, item in enumerate(raw):
        where = f"regions[{i}]"
        r = _region(item, fields, where)
        spec = RegionSpec(
            gpa=_int(r, "gpa"),
            size=_int(r, "size"),
            page_size=_int(r, "page_size"),
            addr=_int(r, "addr", 0),
            fd=_int(r, "fd"),
            offset=_int(r, "offset", 0),
            uffd=_int(r, "uffd"),
            mode=str(r.get("mode", "")),
        )
        _check_region_shape(spec, where, role)
        specs.append(spec)
    _check_overlaps(specs)
    return specs


def _check_region_shape(r: RegionSpec, where: str, role: str) -> None:
    if r.page_size not in PAGE_SIZES:
        raise RequestError("bad-region", f"{where}: page_size must be 4096 or 2097152")
    if r.size == 0 or r.size % r.page_size:
        raise RequestError("bad-region", f"{where}: size must be a non-zero multiple of page_size")
    for name, value in (("gpa", r.gpa), ("addr", r.addr), ("offset", r.offset)):
        if value % r.page_size:
            raise RequestError("bad-region", f"{where}: {name} {value:#x} is not page aligned")
    if r.gpa + r.size > 1 << 64 or r.addr + r.size > 1 << 64:
        raise RequestError("bad-region", f"{where}: region wraps around the address space")
    if r.size > ADDRESS_SPACE_LIMIT or r.addr + r.size > ADDRESS_SPACE_LIMIT:
        raise RequestError("bad-region", f"{where}: size {r.size:#x} at addr {r.addr:#x} lies "
                           f"beyond any process's address space ({ADDRESS_SPACE_LIMIT:#x})")
    if role == "import" and r.mode not in schema.MODES:  # check_fields refused it already
        raise RequestError("bad-request", f"{where}: mode must be 'missing' or 'minor'")
    if role == "import" and r.mode == "minor" and r.fd < 0:
        raise RequestError("bad-request", f"{where}: mode 'minor' needs the memory fd ('fd')")


def _check_overlaps(specs: list[RegionSpec]) -> None:
    for key in ("gpa", "addr"):
        spans = sorted(
            (getattr(s, key), getattr(s, key) + s.size, i)
            for i, s in enumerate(specs)
            if key == "gpa" or s.addr
        )
        for (_a0, a1, i), (b0, _b1, j) in itertools.pairwise(spans):
            if b0 < a1:
                raise RequestError("bad-region", f"regions[{i}] and regions[{j}] overlap ({key})")


def error_reply(req_id: object, code: str, message: str) -> Message:
    """The error reply of the VMM API: ``id`` is nil unless the request had a usable one
    (an int >= 0, not a bool), so a client never sees back a value it did not mean."""
    usable = isinstance(req_id, int) and not isinstance(req_id, bool) and req_id >= 0
    return {"id": req_id if usable else None, "ok": False, "error": code, "message": message}


# ---------------------------------------------------------------- peer frames

def pack_peer(header: Mapping[str, object]) -> bytes:
    """Encode a peer frame header (payload, if any, is sent right after it)."""
    data: bytes = msgpack.packb(header, use_bin_type=True)
    return LENGTH.pack(len(data)) + data


def unpack_peer_header(data: bytes | bytearray | memoryview) -> Message:
    """Decode a peer frame header; a bad header breaks the link (ProtocolError)."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"bad peer frame header: {e}") from None
    if not isinstance(body, dict) or not isinstance(body.get("t"), str):
        raise ProtocolError("peer frame header must be a map with a string 't'")
    return body


def peer_int(header: Mapping[str, object], key: str) -> int:
    """An integer field of a peer header; ProtocolError if missing or wrong."""
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"peer frame {header.get('t')!r}: field {key!r} must be an int >= 0")
    return value


def check_req(header: Mapping[str, object], region_pages: Sequence[int]) -> tuple[int, int, int]:
    """The (region, page, count) of a demand request, or ProtocolError.

    The one rule for "req" frames, wherever one is read (the peer listener's lane, the
    export side's demand loop; the C loop mirrors it): ``r`` names a region of the
    session, ``n`` is 1..MAX_REQUEST_PAGES, and pages ``p .. p+n`` lie inside region
    ``r`` (``region_pages[r]`` pages long).
    """
    r = peer_int(header, "r")
    p = peer_int(header, "p")
    n = peer_int(header, "n")
    if r >= len(region_pages) or not 1 <= n <= MAX_REQUEST_PAGES or p + n > region_pages[r]:
        raise ProtocolError(f"demand request r={r} p={p} n={n} is outside the session's "
                            f"regions (n is 1..{MAX_REQUEST_PAGES} pages inside one region)")
    return r, p, n
