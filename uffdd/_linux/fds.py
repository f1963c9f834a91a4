"""Ownership of file descriptors: each held by one owner that closes it exactly once.

A number closed twice is worse than a leak: the kernel hands the number out again at
once, and the second close then closes another session's fd (or a listener's) under
it. :class:`OwnedFds` forgets its numbers as it closes them, so that cannot happen
through it, and ``close`` may be called from every cleanup path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

log = logging.getLogger("uffdd.fds")


class OwnedFds:
    """The fds one owner (a session) holds; closed once, by ``close``."""

    __slots__ = ("_fds",)

    def __init__(self, fds: Iterable[int] = ()) -> None:
        self._fds = list(fds)

    def __iter__(self) -> Iterator[int]:
        return iter(self._fds)

    def __len__(self) -> int:
        return len(self._fds)

    def __getitem__(self, index: int) -> int:
        return self._fds[index]

    def __repr__(self) -> str:
        return f"OwnedFds({self._fds})"

    @classmethod
    def adopt(cls, fds: list[int]) -> OwnedFds:
        """Take the fds over from ``fds``, which is emptied: its holder must no longer
        close them (a request handler's list, say, once a session owns them)."""
        owned = cls(fds)
        fds.clear()
        return owned

    @property
    def closed(self) -> bool:
        return not self._fds

    def close(self) -> None:
        """Close every fd, once: the numbers are forgotten first, so a second call (or
        one from another cleanup path) closes nothing. An fd somebody else closed
        already is a bug elsewhere; it is logged, and the rest still closed."""
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError as e:
                log.error("fd %d was closed behind its owner's back: %s", fd, e)
