"""OwnedFds: an fd closed once by its owner, never a second time (real fds)."""

from __future__ import annotations

import os

import pytest

from uffdd._linux.fds import OwnedFds


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_close_once_never_closes_a_reused_number() -> None:
    r, w = os.pipe()
    owned = OwnedFds.adopt(handed := [r, w])
    assert handed == [] and list(owned) == [r, w]  # the handler's list no longer owns them
    owned.close()
    assert owned.closed and not _is_open(r) and not _is_open(w)
    again = os.open("/dev/null", os.O_RDONLY)  # the kernel hands out the lowest free number
    try:
        assert again in (r, w)
        owned.close()  # a second cleanup path: closes nothing
        assert _is_open(again), "the second close closed somebody else's fd"
    finally:
        os.close(again)


def test_an_fd_closed_behind_the_owner_is_logged_and_the_rest_closed(
        caplog: pytest.LogCaptureFixture) -> None:
    r, w = os.pipe()
    owned = OwnedFds([r, w])
    os.close(r)
    owned.close()
    assert not _is_open(w)
    assert "closed behind its owner's back" in caplog.text
