"""A fault-injecting TCP proxy on loopback, for reliability tests and ``uffdd chaos``.

It sits between the destination daemon and the source daemon's peer port and forwards
bytes both ways, until told to break things:

* ``cut()`` closes every open connection in an orderly way (FIN), as a peer that went away;
* ``reset()`` aborts every open connection with a TCP RST (SO_LINGER 0), as a crashed host;
* ``stall(seconds)`` stops forwarding on every connection without closing it, as a network
  black hole: the sockets stay open, nothing moves, and only a stall detector notices;
* ``refuse(seconds)`` closes new connections at once for a while (the link cannot come back);
* ``throttle(bytes_per_second)`` slows every connection down, so that a small migration
  lasts long enough for a fault to land in its middle (0: full speed).

The proxy is bounded: at most ``max_connections`` at a time, and after ``lifetime``
seconds it closes everything and stops by itself, so a test that forgets it leaves
nothing behind. Threads only, no event loop: the proxy must keep working while the
process that owns it is busy (and it is never on a production path).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("uffdd.faultproxy")

_CHUNK = 256 * 1024


@dataclass(eq=False)
class _Link:
    """One proxied connection: the accepted client side and the upstream side."""

    client: socket.socket
    upstream: socket.socket
    closed: bool = False
    half_closed: int = 0  # directions that saw EOF (2: both: close the link)

    def close(self, *, abort: bool = False) -> None:
        """Close both sides; ``abort`` sends a RST instead of a FIN."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                if abort:  # close() with a zero linger time sends RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # Wakes a pump thread blocked in recv: until that recv returns, close()
                # cannot release the socket, and nothing reaches the other end.
                sock.shutdown(socket.SHUT_RD if abort else socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@dataclass
class ProxyStats:
    """What the proxy did (for test assertions and the chaos summary)."""

    connections: int = 0
    cuts: int = 0
    resets: int = 0
    stalls: int = 0
    refused: int = 0
    bytes_forwarded: int = 0


@dataclass(eq=False)
class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``target`` (HOST:PORT), breaking it on command."""

    target: str
    lifetime: float = 600.0
    max_connections: int = 64
    stats: ProxyStats = field(default_factory=ProxyStats)

    def __post_init__(self) -> None:
        host, _, port = self.target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._refuse_until = 0.0
        self.rate = 0  # bytes per second per connection and direction; 0: unlimited
        self._stop = threading.Event()
        self._expires = time.monotonic() + self.lifetime
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """HOST:PORT to give the destination as its peer."""
        return f"127.0.0.1:{self.port}"

    # -- commands

    def cut(self) -> int:
        """Close every open connection (FIN); returns how many."""
        return self._close_all(abort=False)

    def reset(self) -> int:
        """Abort every open connection (RST); returns how many."""
        return self._close_all(abort=True)

    def stall(self, seconds: float) -> None:
        """Stop forwarding for ``seconds`` (connections stay open); returns at once."""
        self.stats.stalls += 1
        self._flowing.clear()
        timer = threading.Timer(seconds, self._flowing.set)
        timer.daemon = True
        timer.start()

    def resume(self) -> None:
        """End a stall early."""
        self._flowing.set()

    def refuse(self, seconds: float) -> None:
        """Close new connections at once for ``seconds``."""
        self._refuse_until = time.monotonic() + seconds

    def throttle(self, bytes_per_second: int) -> None:
        """Limit each connection and direction to ``bytes_per_second`` (0: no limit)."""
        self.rate = bytes_per_second

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for link in self._links if not link.closed)

    def close(self) -> None:
        """Stop accepting and close everything (idempotent)."""
        self._stop.set()
        self._flowing.set()
        self._close_all(abort=False, count=False)
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _close_all(self, *, abort: bool, count: bool = True) -> int:
        with self._lock:
            links, self._links = self._links, []
        n = 0
        for link in links:
            if not link.closed:
                n += 1
            link.close(abort=abort)
        if count and n:
            if abort:
                self.stats.resets += 1
            else:
                self.stats.cuts += 1
        return n

    def _accept_loop(self) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() < self._expires:
                try:
                    client, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break
                self._admit(client)
        finally:
            self._listener.close()
            self._stop.set()
            self._flowing.set()
            self._close_all(abort=False, count=False)

    def _admit(self, client: socket.socket) -> None:
        with self._lock:
            self._links = [link for link in self._links if not link.closed]
            full = len(self._links) >= self.max_connections
        if full or time.monotonic() < self._refuse_until:
            self.stats.refused += 1
            client.close()
            return
        try:
            upstream = socket.create_connection(self._target, timeout=5)
        except OSError:  # the source is down: the client sees its connection close
            self.stats.refused += 1
            client.close()
            return
        for sock in (client, upstream):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        with self._lock:
            self._links.append(link)
        self.stats.connections += 1
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(link, src, dst), daemon=True,
                             name="faultproxy-pump").start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        """Forward one direction until EOF (passed on as a half-close) or an error."""
        buf = bytearray(_CHUNK if not self.rate else min(_CHUNK, 65536))
        view = memoryview(buf)
        other_direction_open = False
        try:
            while not link.closed:
                n = src.recv_into(buf)
                if n == 0:
                    # Pass the FIN on and keep the other direction going: closing both at
                    # once would reset a peer still sending, and it would lose the last
                    # frames it had not read yet (a 'cancel', say).
                    dst.shutdown(socket.SHUT_WR)
                    with self._lock:
                        link.half_closed += 1
                        other_direction_open = link.half_closed < 2
                    break
                # A stall holds the bytes here; the kernel buffers fill and TCP stops.
                while not self._flowing.wait(0.1):
                    if link.closed or self._stop.is_set():
                        return
                dst.sendall(view[:n])
                self.stats.bytes_forwarded += n
                if self.rate:
                    time.sleep(n / self.rate)
        except OSError:
            pass
        if not other_direction_open:
            link.close()


__all__ = ["FaultProxy", "ProxyStats"]
