"""The peer link between daemons: framed sockets and the session handshake.

Lanes run in plain threads with blocking sockets (docs/architecture.md, "Tasks and
threads"), so this module is written for blocking sockets: ``FrameSocket`` reads a peer
frame header into a small buffer and lets the caller receive the payload straight into
its own buffer, so page data is never copied through Python objects.

Handshake (README, wire protocol §2): hello(nonce) -> auth(session, lane, nonce, mac)
-> welcome(mac, regions). The token never crosses the wire; MACs are compared in
constant time.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Final, NoReturn

from uffdd import _fastpath, protocol, tls
from uffdd.config import PeerConfig, demand_dscp
from uffdd.errors import AuthError, PeerUnavailable, ProtocolError, RefusedByPeer, RefusedHere

LANES: Final = ("demand", "bulk")
_MAX_IOV: Final = 512  # iovecs per sendmsg (Linux allows 1024)
_CLIENT_LABEL: Final = b"uffdd/1 client"
_SERVER_LABEL: Final = b"uffdd/1 server"
_TC_PRIO_INTERACTIVE: Final = 6  # linux/pkt_sched.h; values 0-6 need no CAP_NET_ADMIN

RegionShape = tuple[int, int, int]  # gpa, size, page_size


class PayloadNative:
    """The bulk lanes' per-byte work in C (libuffdd_fastpath, native/fastpath/bulk.c).

    ``crc32(crc, address, length)`` is zlib.crc32's value (same polynomial and
    chaining) at ~5x its speed; ``zero_map(address, length, page_size, out_address)``
    writes one byte per page, 1 for an all-zero page, and returns the zero pages; the
    other two do a frame with holes ("zr") in one call on either side. All take raw
    addresses: the caller keeps the buffers alive (ctypes releases the
    GIL for the call, so other threads run meanwhile).
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        crc = lib.uffdd_fp_crc32
        crc.restype = ctypes.c_uint32
        crc.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        zero = lib.uffdd_fp_zero_map
        zero.restype = ctypes.c_long
        zero.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
        nonzero = lib.uffdd_fp_crc32_nonzero
        nonzero.restype = ctypes.c_uint32
        nonzero.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_size_t]
        holes = lib.uffdd_fp_fill_holes
        holes.restype = ctypes.c_uint32
        holes.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p,
                          ctypes.c_size_t, ctypes.c_int, ctypes.c_uint32]
        self.crc32: Callable[[int, int, int], int] = crc
        self.zero_map: Callable[[int, int, int, int], int] = zero
        #: (crc, address, page_size, zero_map_address, first, end): the CRC of the pages
        #: in [first, end) that the zero map says are not zero
        self.crc32_nonzero: Callable[[int, int, int, int, int, int], int] = nonzero
        #: (address, page_size, count, holes_address, nholes, with_crc, crc): zero-fill
        #: a run's holes (uint32 [first, pages] pairs), return the CRC of the rest
        self.fill_holes: Callable[[int, int, int, int, int, int, int], int] = holes

    @classmethod
    def load(cls, mode: str) -> PayloadNative | None:
        """The C functions for ``[peer] fastpath`` = ``mode``, or None (use Python)."""
        lib = _fastpath.load(mode)
        if lib is None:
            return None
        try:
            return cls(lib)
        except AttributeError:  # a library built before these functions existed
            return None


class FrameSocket:
    """A connected blocking socket that speaks peer frames."""

    def __init__(self, sock: socket.socket, max_header: int = protocol.MAX_PEER_HEADER) -> None:
        self.sock = sock
        self.max_header = max_header
        self._buf = bytearray(max(65536, max_header + 4))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.received = 0
        self.sent = 0
        self.closed = False

    # -- lending the receive buffer to a C loop (exporter.cdemand)

    @property
    def rx_buffer(self) -> bytearray:
        """The receive buffer, which is never resized: a C loop may read and write it in
        place, between :meth:`rx_window` and :meth:`set_rx_window`."""
        return self._buf

    def rx_window(self) -> tuple[int, int]:
        """Where the received bytes not yet parsed start and end in ``rx_buffer``."""
        return self._start, self._end

    def set_rx_window(self, start: int, end: int) -> None:
        """Take the window back from a C loop that parsed and received in place."""
        if not 0 <= start <= end <= len(self._buf):
            raise ValueError(f"receive window {start}..{end} outside the buffer")
        self._start, self._end = start, end

    def close(self) -> None:
        """Shut the connection down (wakes a thread blocked in recv) and close it."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # -- sending

    def send(self, header: Mapping[str, object], *payload: memoryview | bytes) -> None:
        """Send one frame; the payload (in one or more pieces, which the receiver sees as
        one) goes out with the same sendmsg, never copied or re-encoded."""
        data = protocol.pack_peer(header)
        parts: list[bytes | memoryview] = [data, *payload]
        total = sum(len(p) for p in parts)
        self._sendmsg_all(parts, total)
        self.sent += total

    def send_frames(self, frames: list[tuple[Mapping[str, object],
                                              tuple[memoryview | bytes, ...]]]) -> int:
        """Send several frames with as few sendmsg calls as the iovec limit allows.

        A syscall per frame was most of the source's cost per page: on loopback the
        sender also runs the receiver's TCP processing. Returns the bytes sent."""
        total = 0
        parts: list[bytes | memoryview] = []
        for header, payload in frames:
            if len(parts) + 1 + len(payload) > _MAX_IOV and parts:
                total += self._send_parts(parts)
                parts = []
            parts.append(protocol.pack_peer(header))
            parts.extend(payload)
        if parts:
            total += self._send_parts(parts)
        return total

    def _send_parts(self, parts: list[bytes | memoryview]) -> int:
        total = sum(len(p) for p in parts)
        self._sendmsg_all(parts, total)
        self.sent += total
        return total

    def header_ready(self) -> bool:
        """True if a whole frame header is already buffered (recv_header will not block)."""
        avail = self._end - self._start
        if avail < 4:
            return False
        (length,) = protocol.LENGTH.unpack_from(self._buf, self._start)
        return bool(avail >= 4 + int(length))

    def send_raw(self, data: bytes) -> None:
        """Send already encoded frames (several requests batched in one write)."""
        self.sock.sendall(data)
        self.sent += len(data)

    def _sendmsg_all(self, parts: list[bytes | memoryview], total: int) -> None:
        del total
        views = [memoryview(p) for p in parts]
        try:
            while views:
                n = self.sock.sendmsg(views)
                while views and n >= len(views[0]):
                    n -= len(views.pop(0))
                if views and n:
                    views[0] = views[0][n:]
        except OSError as e:
            raise PeerUnavailable(f"peer link send failed: {e}") from None

    # -- receiving

    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available in the buffer."""
        if self._start and self._end - self._start < need:
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start : self._end]
            self._start, self._end = 0, left
        while self._end - self._start < need:
            try:
                n = self.sock.recv_into(self._view[self._end :])
            except OSError as e:
                raise PeerUnavailable(f"peer link receive failed: {e}") from None
            if n == 0:
                raise PeerUnavailable("peer closed the link")
            self._end += n
            self.received += n

    def recv_header(self) -> protocol.Message:
        """Receive one frame header (the payload, if any, is still to be read)."""
        self._fill(4)
        (length,) = protocol.LENGTH.unpack_from(self._buf, self._start)
        if not 0 < length <= self.max_header:
            raise ProtocolError(f"peer frame header of {length} bytes is out of bounds")
        self._fill(4 + length)
        start = self._start + 4
        header = protocol.unpack_peer_header(self._view[start : start + length])
        self._start = start + length
        return header

    def take_buffered(self, limit: int) -> memoryview:
        """Up to ``limit`` payload bytes the header's read already buffered, consumed:
        a zero-copy receive (uffdd/importer/bulkrx.py) copies them itself, with
        tenant_write, since they may be bound for tenant memory (no plain store)."""
        have = min(self._end - self._start, limit)
        view = self._view[self._start : self._start + have]
        self._start += have
        return view

    def recv_into(self, target: memoryview) -> None:
        """Receive exactly ``len(target)`` payload bytes into ``target``."""
        have = min(self._end - self._start, len(target))
        if have:
            target[:have] = self._view[self._start : self._start + have]
            self._start += have
        pos = have
        # Plain sockets wait for the whole payload in the kernel (one wake-up and one
        # Python step per payload, not per segment); an SSL socket refuses flags.
        flags = socket.MSG_WAITALL if type(self.sock) is socket.socket else 0
        while pos < len(target):
            try:
                n = self.sock.recv_into(target[pos:], 0, flags)
            except OSError as e:
                raise PeerUnavailable(f"peer link receive failed: {e}") from None
            if n == 0:
                raise PeerUnavailable("peer closed the link")
            pos += n
            self.received += n

    def recv_parts(self, parts: list[memoryview]) -> None:
        """Receive exactly ``sum(len(p) for p in parts)`` payload bytes, scattered into
        ``parts`` in order: one recvmsg for a bulk frame whose pages go to places
        between holes, instead of a receive per piece."""
        todo = [p for p in parts if len(p)]
        while todo and self._end > self._start:  # what the header read already buffered
            have = min(self._end - self._start, len(todo[0]))
            todo[0][:have] = self._view[self._start : self._start + have]
            self._start += have
            todo[0] = todo[0][have:]
            if not len(todo[0]):
                todo.pop(0)
        if type(self.sock) is not socket.socket:  # SSL: no recvmsg
            for part in todo:
                self.recv_into(part)
            return
        first = 0
        while first < len(todo):
            batch = todo[first : first + _MAX_IOV]
            try:
                n = self.sock.recvmsg_into(batch, 0, socket.MSG_WAITALL)[0]
            except OSError as e:
                raise PeerUnavailable(f"peer link receive failed: {e}") from None
            if n == 0:
                raise PeerUnavailable("peer closed the link")
            self.received += n
            while first < len(todo) and n >= len(todo[first]):
                n -= len(todo[first])
                first += 1
            if n:
                todo[first] = todo[first][n:]

    def skip(self, length: int) -> None:
        """Receive and drop ``length`` payload bytes."""
        scratch = bytearray(min(length, 1 << 20))
        view = memoryview(scratch)
        while length:
            step = min(length, len(scratch))
            self.recv_into(view[:step])
            length -= step


def _mac(token: bytes, label: bytes, snonce: bytes, cnonce: bytes, session: str,
         lane: str) -> bytes:
    msg = label + snonce + cnonce + session.encode() + b"\0" + lane.encode()
    return hmac.new(token, msg, hashlib.sha256).digest()


def _expect(header: protocol.Message, kind: str,
            refused: type[ProtocolError] = RefusedByPeer) -> protocol.Message:
    """``header`` if it is a ``kind`` frame; an error frame raises ``refused``."""
    if header.get("t") == "error":
        raise refused(f"peer refused: {header.get('code')}: {header.get('message')}")
    if header.get("t") != kind:
        raise ProtocolError(f"expected peer frame {kind!r}, got {header.get('t')!r}")
    return header


def _bytes_field(header: protocol.Message, key: str, size: int) -> bytes:
    value = header.get(key)
    if not isinstance(value, bytes) or len(value) != size:
        raise ProtocolError(f"peer frame {header.get('t')!r}: field {key!r} must be {size} bytes")
    return value


def client_handshake(fs: FrameSocket, session: str, token: bytes, lane: str) -> list[RegionShape]:
    """Authenticate a lane to the source daemon; return the source's region shapes.

    Who refused, and whether trying again can help, follows from where the refusal
    comes: in place of ``hello`` the source refuses this daemon itself (its
    certificate's names): ``RefusedByPeer``, final. In place of ``welcome``, code
    ``unauthorized`` is the one answer for an unknown session and a wrong token:
    ``SessionRefused``, which a destination retries (a restarted source daemon has no
    export until its VMM exports again). Any other code there is final.
    """
    hello = _expect(fs.recv_header(), "hello")
    if hello.get("v") != protocol.PROTOCOL_VERSION:
        raise RefusedHere(f"the source daemon speaks peer protocol version {hello.get('v')!r}, "
                          f"this daemon speaks {protocol.PROTOCOL_VERSION}")
    snonce = _bytes_field(hello, "nonce", 16)
    cnonce = os.urandom(16)
    mac = _mac(token, _CLIENT_LABEL, snonce, cnonce, session, lane)
    fs.send({"t": "auth", "v": protocol.PROTOCOL_VERSION, "session": session, "lane": lane,
             "nonce": cnonce, "mac": mac})
    reply = fs.recv_header()
    if reply.get("t") == "error" and reply.get("code") == "unauthorized":
        raise SessionRefused(f"peer refused: unauthorized: {reply.get('message')}")
    welcome = _expect(reply, "welcome")
    expected = _mac(token, _SERVER_LABEL, snonce, cnonce, session, lane)
    if not hmac.compare_digest(_bytes_field(welcome, "mac", 32), expected):
        raise RefusedHere("the source daemon failed to prove it knows the session token")
    return _region_shapes(welcome.get("regions"))


def _region_shapes(raw: object) -> list[RegionShape]:
    if not isinstance(raw, list):
        raise ProtocolError("welcome: 'regions' must be a list")
    shapes: list[RegionShape] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3
                and all(isinstance(v, int) for v in item)):
            raise ProtocolError("welcome: each region must be [gpa, size, page_size]")
        shapes.append((item[0], item[1], item[2]))
    return shapes


TokenLookup = Callable[[str], "tuple[bytes, list[RegionShape]] | None"]

#: The one answer to an unknown session and to a wrong token (README, Security): two
#: answers would tell anyone who can reach the port which session ids exist.
SESSION_REFUSAL: Final = "unknown session or wrong token"
#: For an unknown session the MAC is still computed and compared, with a key nobody
#: knows, so the answer takes the same work either way.
_DECOY_KEY: Final = os.urandom(32)


def server_handshake(fs: FrameSocket, lookup: TokenLookup) -> tuple[str, str]:
    """Authenticate an incoming lane; return (session, lane). Refusals are sent, then raised.

    Everything that does not depend on the session (version, field types) is checked
    first; then the MAC is verified -- against the session's token, or a decoy key
    when there is no such session -- before anything is answered, and both failures
    get the same frame. Only the exception raised here (for this daemon's log and the
    export's VMM, never the wire) says which it was: ``WrongToken`` for an existing
    session, ``SessionRefused`` otherwise.
    """
    snonce = os.urandom(16)
    fs.send({"t": "hello", "v": protocol.PROTOCOL_VERSION, "nonce": snonce})
    auth = _expect(fs.recv_header(), "auth", ProtocolError)
    version = auth.get("v")
    if version != protocol.PROTOCOL_VERSION:
        _refuse(fs, "bad-version", f"peer protocol version {version!r} is not supported: "
                f"this daemon speaks {protocol.PROTOCOL_VERSION}", RefusedHere)
    session, lane = auth.get("session"), auth.get("lane")
    # A malformed id is refused as such: that says nothing about which sessions exist.
    if (not isinstance(session, str) or not protocol.SESSION_RE.fullmatch(session)
            or lane not in LANES):
        _refuse(fs, "bad-request", f"auth needs a session id ({protocol.SESSION_RE.pattern}) "
                "and lane 'demand' or 'bulk'", RefusedHere)
    assert isinstance(session, str) and isinstance(lane, str)
    cnonce = _bytes_field(auth, "nonce", 16)
    mac = _bytes_field(auth, "mac", 32)
    found = lookup(session)
    token, shapes = found if found is not None else (_DECOY_KEY, [])
    expected = _mac(token, _CLIENT_LABEL, snonce, cnonce, session, lane)
    if not hmac.compare_digest(mac, expected) or found is None:
        if found is None:
            refusal: SessionRefused = SessionRefused(f"no export session {session!r} here (yet)")
        else:
            refusal = WrongToken(f"wrong token for export session {session!r} ({lane} lane)",
                                 session, lane)
        _refuse(fs, "unauthorized", SESSION_REFUSAL, refusal)
    fs.send({
        "t": "welcome",
        "mac": _mac(token, _SERVER_LABEL, snonce, cnonce, session, lane),
        "regions": [list(s) for s in shapes],
    })
    return session, lane


def _refuse(fs: FrameSocket, code: str, message: str,
            error: AuthError | type[AuthError]) -> NoReturn:
    """Send the error frame (best effort: the peer may be gone), then raise ``error``."""
    try:
        fs.send({"t": "error", "code": code, "message": message})
    finally:
        raise error(message) if isinstance(error, type) else error


class SessionRefused(RefusedByPeer):
    """No export of this session here, or a wrong token: the peer cannot tell which.

    On the destination it is not final (a restarted source daemon has no export
    until its VMM exports again): the import retries until its deadline.
    """


class WrongToken(SessionRefused):
    """Source side only: the session exists but the peer's MAC is wrong."""

    def __init__(self, message: str, session: str, lane: str) -> None:
        super().__init__(message)
        self.session = session
        self.lane = lane


def connect(address: str, timeout: float, config: PeerConfig | None = None,
            opened: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """Open a TCP connection to ``host:port`` with TCP_NODELAY (requests are tiny).

    With ``config`` (the daemon's ``[peer]``), the connection is mutual TLS when the
    config enables it, and a plaintext one is refused unless the config allows
    plaintext to that host (README, Security). ``timeout`` also bounds the TLS handshake.
    ``opened`` is called with the TCP socket before the TLS handshake, so the caller
    can end a handshake that drags on (see ``session._Dialer``).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    secure = config is not None and tls.tls_enabled(config)
    if config is not None and not secure and not tls.plaintext_allowed_to(config, host):
        raise RefusedHere(f"refusing a plaintext peer link to {address}: configure mutual "
                          "TLS (peer.ca, peer.cert, peer.key) or set peer.tls = false")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        raise PeerUnavailable(f"cannot connect to peer {address}: {e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if opened is not None:
        try:
            opened(sock)
        except BaseException:
            sock.close()
            raise
    if not secure:
        return sock
    assert config is not None
    try:
        return tls.wrap_client(sock, config, host)
    except OSError as e:  # handshake failed or timed out: the link, not the session, is bad
        sock.close()
        raise PeerUnavailable(f"TLS handshake with peer {address} failed: {e}") from None


def mark_demand(sock: socket.socket, config: PeerConfig) -> None:
    """Mark a demand lane's socket (either side) per ``[peer] demand_dscp``: the DSCP in
    IP_TOS / IPV6_TCLASS for the network, SO_PRIORITY for this host's own qdiscs
    (set after the TOS, which would otherwise pick a priority of its own). Bulk lanes
    stay unmarked, so a queue that honours either sends a page fault's frames first."""
    dscp = demand_dscp(config)
    if dscp is None:
        return
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, dscp << 2)
    # On an AF_INET6 socket too: a v4-mapped peer's packets take the IPv4 TOS.
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp << 2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, _TC_PRIO_INTERACTIVE)


def accept_lane(sock: socket.socket, config: PeerConfig, lookup: TokenLookup,
                make: Callable[[socket.socket], FrameSocket] = FrameSocket,
                ) -> tuple[FrameSocket, str, str]:
    """Blocking server side of a new connection: TLS (if configured), then the handshake.

    Returns the lane's FrameSocket, session and lane name. A refusal raises (the
    caller closes ``sock``): ``ssl.SSLError`` for a missing or untrusted certificate,
    ``AuthError`` for a certificate name that is not pinned or a wrong token. Either
    way nothing of any session has been sent.
    """
    if tls.tls_enabled(config):  # a failed TLS handshake closes sock and raises ssl.SSLError
        sock = tls.server_context(config).wrap_socket(sock, server_side=True)
    fs = make(sock)
    try:
        if isinstance(sock, ssl.SSLSocket):
            try:
                tls.check_peer_names(sock, config.peer_names)
            except AuthError as e:  # the TLS channel is up, so say why before closing
                _refuse(fs, "unauthorized", str(e), e)
        session, lane = server_handshake(fs, lookup)
        if lane == "demand":
            mark_demand(sock, config)
    except BaseException:
        fs.close()
        raise
    return fs, session, lane


def demand_library(cfg: PeerConfig, sock: socket.socket | None = None) -> ctypes.CDLL | None:
    """Which loop serves a demand lane, on either role: the C library, or None for the
    Python loop. The one place this is decided (the fault loop of an import, the demand
    lane of an export, and the ``loop`` field of ``status`` all ask here).

    The C loops read and write the lane's socket themselves, so they run on plaintext
    links only: never under TLS, and never on a socket that is not a plain one (an SSL
    socket is a ``socket.socket`` subclass), whatever the config says.
    """
    if tls.tls_enabled(cfg) or (sock is not None and type(sock) is not socket.socket):
        return None
    return _fastpath.load(cfg.fastpath)
