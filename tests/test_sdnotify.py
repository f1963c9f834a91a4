"""uffdd._linux.sdnotify against a real AF_UNIX datagram socket as NOTIFY_SOCKET."""

from __future__ import annotations

import array
import os
import select
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffdd._linux import sdnotify


class Manager:
    """A stand-in for the service manager's notification socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(5)

    def receive(self, maxfds: int = 16) -> tuple[list[str], list[int]]:
        """Return the next datagram's fields and the fds that came with it."""
        fds = array.array("i")
        size = socket.CMSG_SPACE(maxfds * fds.itemsize)
        data, ancdata, flags, _ = self.sock.recvmsg(65536, size)
        assert not flags & socket.MSG_CTRUNC
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        return data.decode().split("\n"), list(fds)

    def pending(self) -> bool:
        """Return True if a datagram is waiting."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    """A datagram socket bound to a path and set as $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield Manager(sock)


def test_no_socket_means_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_ready_and_status(manager: Manager) -> None:
    assert sdnotify.notify("READY=1", "STATUS=2 sessions, 10 faults/s") is True
    fields, fds = manager.receive()
    assert fields == ["READY=1", "STATUS=2 sessions, 10 faults/s"]
    assert fds == []


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"uffdd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        fields, _ = Manager(sock).receive()
    assert fields == ["WATCHDOG=1"]


def test_unreachable_socket_is_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False


def test_relative_path_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("field", ["READY", "STATUS=a\nREADY=1", "=1", "lower=1", ""])
def test_malformed_fields_are_refused(manager: Manager, field: str) -> None:
    with pytest.raises(ValueError):
        sdnotify.notify(field)
    assert not manager.pending()


def test_store_fds_passes_the_fds(manager: Manager, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        assert sdnotify.store_fds("uffd-vm42", [read_end, write_end])
        fields, fds = manager.receive()
        assert fields == ["FDSTORE=1", "FDNAME=uffd-vm42"]
        assert len(fds) == 2
        # The received fds are the same pipe: write through one, read from ours.
        os.write(fds[1], b"kept")
        assert os.read(read_end, 4) == b"kept"
        for fd in fds:
            os.close(fd)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_store_many_fds_splits_datagrams(manager: Manager) -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert sdnotify.store_fds("many", [fd] * 300)
        first = manager.receive(maxfds=sdnotify.SCM_MAX_FD)
        second = manager.receive(maxfds=sdnotify.SCM_MAX_FD)
        assert len(first[1]) == sdnotify.SCM_MAX_FD
        assert len(second[1]) == 300 - sdnotify.SCM_MAX_FD
        assert second[0] == ["FDSTORE=1", "FDNAME=many"]
        for received in first[1] + second[1]:
            os.close(received)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["", "a:b", "with space", "x" * 256, "tab\t"])
def test_store_fds_checks_the_name(manager: Manager, name: str) -> None:
    with pytest.raises(ValueError):
        sdnotify.store_fds(name, [0])


def test_store_fds_needs_fds(manager: Manager) -> None:
    with pytest.raises(ValueError):
        sdnotify.store_fds("empty", [])


def test_remove_fds(manager: Manager) -> None:
    assert sdnotify.remove_fds("uffd-vm42")
    fields, fds = manager.receive()
    assert fields == ["FDSTOREREMOVE=1", "FDNAME=uffd-vm42"]
    assert fds == []


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    assert sdnotify.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "", "-5", "ten"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None
