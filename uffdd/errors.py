"""The exceptions uffdd raises: a small hierarchy named for what the caller does next."""

from __future__ import annotations


class UffddError(Exception):
    """Base class of every error uffdd raises on purpose."""


class ConfigError(UffddError):
    """Raised at start when the configuration is wrong; the message names file and key."""


class RequestError(UffddError):
    """Raised while handling a VMM API request that must be refused.

    ``code`` is one of the error codes of the VMM API (README, wire protocol), and the
    message says what is wrong in words a VMM developer can act on.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProtocolError(UffddError):
    """Raised when a peer or a VMM sends bytes that break the protocol.

    The connection can no longer be trusted and is closed.
    """


class AuthError(ProtocolError):
    """Raised when a peer fails the session handshake (wrong token, wrong session)."""


class RefusedByPeer(AuthError):
    """The other daemon refused this link (an error frame or a TLS alert from it)."""


class RefusedHere(AuthError):
    """This daemon refused the link itself (its plaintext rule, the peer's certificate)."""


class PeerUnavailable(UffddError):
    """Raised when the peer daemon cannot be reached or the link dropped."""


class PageLost(UffddError):
    """Raised when a page can never be had; the session's failure policy decides."""


class KernelError(UffddError):
    """Raised when a kernel call fails; ``op`` names the call and ``errno`` the reason."""

    def __init__(self, op: str, errno_value: int, message: str = "") -> None:
        super().__init__(f"{op}: {message or errno_value}")
        self.op = op
        self.errno = errno_value


class AlreadyPresent(KernelError):
    """Raised when an install found a page already present (EEXIST).

    ``done`` bytes before that page were installed by the same call.
    """

    def __init__(self, op: str, errno_value: int, done: int) -> None:
        super().__init__(op, errno_value, f"page already present after {done} bytes")
        self.done = done


class Retry(KernelError):
    """Raised when an install must be retried (EAGAIN: the address space is changing).

    ``done`` bytes were installed before the call stopped.
    """

    def __init__(self, op: str, errno_value: int, done: int) -> None:
        super().__init__(op, errno_value, f"address space changing after {done} bytes")
        self.done = done


class TargetGone(KernelError):
    """Raised when the VMM whose memory we fill has exited (ESRCH, ENOSPC)."""


class RangeGone(KernelError):
    """Raised when the target range is no longer registered or mapped (ENOENT)."""
