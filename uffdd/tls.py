"""Mutual TLS for the peer link: SSL contexts from ``[peer]`` config, name pinning.

Both ends of every lane present a certificate signed by the operator's CA
(``peer.ca``); the server requires one from the client and the client verifies the
server's. With ``peer.peer_names`` set, the other end's certificate must also carry
one of those names (subjectAltName DNS or IP, else the subject CN) — on both sides,
so a certificate that is valid but belongs to another service of the same CA is
refused. Without ``peer_names`` the client checks the server's certificate against
the host it dialled (ordinary hostname checking) and the server accepts any client
certificate of the CA.

The lanes are blocking sockets in threads (and the demand lane is driven by the
fault thread's epoll), so this wraps plain sockets with ``SSLContext.wrap_socket``
in the thread that owns them. :class:`LaneSSLSocket` makes an SSL socket behave
like the plain one those threads were written for: non-blocking reads and writes
raise ``BlockingIOError`` (not ``SSLWantReadError``), and ``sendmsg`` works.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from uffdd.config import PeerConfig, is_loopback_host
from uffdd.errors import AuthError, ConfigError, RefusedByPeer, RefusedHere

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger("uffdd.tls")

#: TLS 1.3 only: both daemons ship together, and 1.3 has no renegotiation and
#: no static-RSA key exchange to get wrong.
_MIN_VERSION: Final = ssl.TLSVersion.TLSv1_3


#: TLS alerts that mean "your certificate is not accepted" (OpenSSL reason names).
_CERTIFICATE_ALERTS: Final = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED",
})


class LaneSSLSocket(ssl.SSLSocket):
    """An SSL socket that the lane threads can use like a plain socket."""

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None,
                  flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            # The fault thread polls the fd and loops until BlockingIOError.
            raise BlockingIOError("TLS record not complete yet") from None
        except ssl.SSLError as e:
            # In TLS 1.3 the server judges our certificate after our side of the
            # handshake is done: its verdict arrives as an alert on the first read.
            # Retrying cannot fix that, so it is an AuthError, not a dropped link.
            if e.reason in _CERTIFICATE_ALERTS:
                raise RefusedByPeer(f"the peer refused our certificate ({e.reason})") from None
            raise

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError("TLS send would block") from None

    # SSLSocket declares sendmsg as always raising; this one works, hence the override.
    def sendmsg(self, buffers: Iterable[ReadableBuffer],  # type: ignore[override]
                ancdata: Iterable[Any] = (), flags: int = 0, address: Any = None) -> int:
        """Write every buffer (blocking lanes only): TLS has no scatter-gather send."""
        if list(ancdata) or flags or address is not None:
            raise ValueError("sendmsg on a TLS lane takes plain buffers only")
        total = 0
        for buf in buffers:
            view = memoryview(buf)
            self.sendall(view)
            total += view.nbytes
        return total


def tls_enabled(peer: PeerConfig) -> bool:
    """True when the peer link runs over mutual TLS (see ``config.peer_tls_mode``)."""
    return peer.tls is True or (peer.tls is None and bool(peer.ca))


def _base_context(peer: PeerConfig, purpose: ssl.Purpose) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(purpose, cafile=peer.ca)
    except (OSError, ssl.SSLError) as e:  # (ssl.SSLError is an OSError; named for readers)
        raise ConfigError(f"peer.ca: cannot load {peer.ca}: {e}") from None
    ctx.minimum_version = _MIN_VERSION
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the server requires a client certificate
    try:
        ctx.load_cert_chain(peer.cert, peer.key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"peer.cert / peer.key: cannot load {peer.cert} with {peer.key}: "
                          f"{e}") from None
    ctx.sslsocket_class = LaneSSLSocket
    return ctx


_cache_lock = threading.Lock()
_cache: dict[tuple[object, ...], ssl.SSLContext] = {}


def _cached(peer: PeerConfig, server: bool) -> ssl.SSLContext:
    """Contexts are built once per configuration (loading keys costs milliseconds)."""
    key = (server, peer.ca, peer.cert, peer.key, tuple(peer.peer_names))
    with _cache_lock:
        ctx = _cache.get(key)
        if ctx is None:
            purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
            ctx = _base_context(peer, purpose)
            # With pinned names we check names ourselves (check_peer_names), so the
            # client need not dial the name written in the certificate.
            ctx.check_hostname = not server and not peer.peer_names
            _cache[key] = ctx
        return ctx


def server_context(peer: PeerConfig) -> ssl.SSLContext:
    """The context the peer listener wraps accepted connections with."""
    return _cached(peer, server=True)


def client_context(peer: PeerConfig) -> ssl.SSLContext:
    """The context an import session's lanes connect with."""
    return _cached(peer, server=False)


def check_contexts(peer: PeerConfig) -> None:
    """Load CA, certificate and key now, so a wrong path stops the daemon at start."""
    if tls_enabled(peer):
        server_context(peer)
        client_context(peer)


def certificate_names(cert: dict[str, Any]) -> list[str]:
    """The names a peer certificate (``getpeercert()``) stands for."""
    names = [value for kind, value in cert.get("subjectAltName", ())
             if kind in ("DNS", "IP Address")]
    if names:
        return [str(n) for n in names]
    return [str(value) for rdn in cert.get("subject", ()) for key, value in rdn
            if key == "commonName"]


def check_peer_names(sock: ssl.SSLSocket, allowed: list[str]) -> str:
    """Refuse a verified peer whose certificate carries none of the pinned names.

    Returns the name that matched (or the first name, when nothing is pinned), for logs.
    """
    cert = sock.getpeercert()
    if not cert:
        raise AuthError("the peer presented no certificate")
    names = certificate_names(cert)
    if not allowed:
        return names[0] if names else "?"
    for name in names:
        if name in allowed or _same_ip(name, allowed):
            return name
    raise AuthError(f"peer certificate names {names} are not in peer.peer_names")


def _same_ip(name: str, allowed: list[str]) -> bool:
    """'::1' and '0:0:0:0:0:0:0:1' are the same address."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if ipaddress.ip_address(entry) == ip:
                return True
        except ValueError:
            continue
    return False


def wrap_server(sock: socket.socket, peer: PeerConfig) -> ssl.SSLSocket:
    """Blocking: TLS handshake on an accepted connection, then the pinned-name check.

    Raises ``ssl.SSLError`` (no or bad client certificate) or ``AuthError`` (name);
    the caller closes the socket either way. ``sock``'s timeout bounds the handshake.
    """
    tls_sock = server_context(peer).wrap_socket(sock, server_side=True)
    return _names_checked(tls_sock, peer.peer_names)


def wrap_client(sock: socket.socket, peer: PeerConfig, host: str) -> ssl.SSLSocket:
    """Blocking: TLS handshake to the source daemon at ``host``, then the name check.

    A server certificate the CA did not sign (or for another host) is a
    ``RefusedHere``: retrying cannot fix it, so the session fails with a clear reason
    that says this daemon, not the source, refused.
    """
    try:
        tls_sock = client_context(peer).wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise RefusedHere(f"the source daemon's certificate was refused: {e.verify_message}"
                          ) from None
    return _names_checked(tls_sock, peer.peer_names, client=True)


def _names_checked(tls_sock: ssl.SSLSocket, allowed: list[str],
                   client: bool = False) -> ssl.SSLSocket:
    """``tls_sock`` if its peer carries an allowed name; else closed, and AuthError
    (``RefusedHere`` on the connecting side: this daemon refuses the source)."""
    try:
        check_peer_names(tls_sock, allowed)
    except AuthError as e:
        tls_sock.close()
        if client:
            raise RefusedHere(str(e)) from None
        raise
    return tls_sock


def plaintext_allowed_to(peer: PeerConfig, host: str) -> bool:
    """Whether a plaintext lane may be opened to ``host``.

    ``tls = false`` said so explicitly; otherwise plaintext is only the implicit mode
    of a daemon confined to loopback (no certificates, loopback listener), and then
    only to loopback addresses.
    """
    return peer.tls is False or is_loopback_host(host)


def describe(peer: PeerConfig) -> str:
    """One line for the start-up log: how the peer link is protected."""
    if tls_enabled(peer):
        pinned = ", ".join(peer.peer_names) if peer.peer_names else "any name the CA signed"
        return f"mutual TLS (CA {peer.ca}; peers: {pinned})"
    if peer.tls is False:
        return "PLAINTEXT (peer.tls = false): page data and session ids cross the network " \
               "unencrypted and peers are not authenticated beyond the session token"
    return "plaintext on loopback only (no certificates configured)"
