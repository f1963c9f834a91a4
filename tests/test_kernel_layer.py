"""The thin kernel layer against the kernel's own headers and the real kernel."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from uffdd._linux import scm, uffd
from uffdd._linux.mem import buffer_address
from uffdd.errors import AlreadyPresent, KernelError, Retry

_ABI_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
#define P(name, value) printf("%s %llu\n", name, (unsigned long long)(value))
int main(void) {
    P("sizeof_uffd_msg", sizeof(struct uffd_msg));
    P("sizeof_uffdio_api", sizeof(struct uffdio_api));
    P("sizeof_uffdio_register", sizeof(struct uffdio_register));
    P("sizeof_uffdio_copy", sizeof(struct uffdio_copy));
    P("sizeof_uffdio_zeropage", sizeof(struct uffdio_zeropage));
    P("offset_pagefault_address", offsetof(struct uffd_msg, arg.pagefault.address));
    P("offset_remove_end", offsetof(struct uffd_msg, arg.remove.end));
    P("UFFDIO_API", UFFDIO_API);
    P("UFFDIO_REGISTER", UFFDIO_REGISTER);
    P("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER);
    P("UFFDIO_WAKE", UFFDIO_WAKE);
    P("UFFDIO_COPY", UFFDIO_COPY);
    P("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE);
#ifdef UFFDIO_CONTINUE
    P("UFFDIO_CONTINUE", UFFDIO_CONTINUE);
    P("sizeof_uffdio_continue", sizeof(struct uffdio_continue));
#endif
#ifdef UFFDIO_POISON
    P("UFFDIO_POISON", UFFDIO_POISON);
#endif
    P("UFFD_EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT);
    P("UFFD_EVENT_REMOVE", UFFD_EVENT_REMOVE);
    P("UFFD_FEATURE_EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE);
    P("UFFD_FEATURE_SIGBUS", UFFD_FEATURE_SIGBUS);
    P("UFFD_FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID);
    return 0;
}
"""

_OURS = {
    "sizeof_uffd_msg": uffd.MSG_SIZE,
    "sizeof_uffdio_api": ctypes.sizeof(uffd.UffdioApi),
    "sizeof_uffdio_register": ctypes.sizeof(uffd.UffdioRegister),
    "sizeof_uffdio_copy": ctypes.sizeof(uffd.UffdioCopy),
    "sizeof_uffdio_zeropage": ctypes.sizeof(uffd.UffdioRangeOp),
    "sizeof_uffdio_continue": ctypes.sizeof(uffd.UffdioRangeOp),
    "offset_pagefault_address": uffd.UffdMsg.arg1.offset,
    "offset_remove_end": uffd.UffdMsg.arg1.offset,
    "UFFDIO_API": uffd.UFFDIO_API,
    "UFFDIO_REGISTER": uffd.UFFDIO_REGISTER,
    "UFFDIO_UNREGISTER": uffd.UFFDIO_UNREGISTER,
    "UFFDIO_WAKE": uffd.UFFDIO_WAKE,
    "UFFDIO_COPY": uffd.UFFDIO_COPY,
    "UFFDIO_ZEROPAGE": uffd.UFFDIO_ZEROPAGE,
    "UFFDIO_CONTINUE": uffd.UFFDIO_CONTINUE,
    "UFFDIO_POISON": uffd.UFFDIO_POISON,
    "UFFD_EVENT_PAGEFAULT": uffd.EVENT_PAGEFAULT,
    "UFFD_EVENT_REMOVE": uffd.EVENT_REMOVE,
    "UFFD_FEATURE_EVENT_REMOVE": uffd.FEATURE_EVENT_REMOVE,
    "UFFD_FEATURE_SIGBUS": uffd.FEATURE_SIGBUS,
    "UFFD_FEATURE_THREAD_ID": uffd.FEATURE_THREAD_ID,
}


def test_structs_and_ioctl_numbers_match_the_kernel_headers(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    require(cc is not None, "no C compiler")
    require(Path("/usr/include/linux/userfaultfd.h").exists(), "no linux uapi headers")
    src = tmp_path / "abi.c"
    src.write_text(_ABI_PROGRAM)
    exe = tmp_path / "abi"
    subprocess.run([str(cc), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    seen = dict(line.split() for line in out.splitlines())
    assert len(seen) >= 18
    for name, value in seen.items():
        assert _OURS[name] == int(value), f"{name}: ours {_OURS[name]:#x}, header {value}"


def test_copy_stops_at_a_present_page_then_says_eexist() -> None:
    """A run that meets a present page: the kernel copies up to it and says EAGAIN with
    the bytes done (Retry), and EEXIST (AlreadyPresent) when the run starts on it."""
    fd = uffd.new_uffd(0)
    region = mmap.mmap(-1, 4 * 4096)
    src = bytearray(b"\xab" * 4 * 4096)
    try:
        base = buffer_address(region)
        uffd.register(fd, base, 4 * 4096, uffd.REGISTER_MODE_MISSING)
        uffd.copy(fd, base + 2 * 4096, buffer_address(src), 4096)
        with pytest.raises(Retry) as partial:
            uffd.copy(fd, base, buffer_address(src), 4 * 4096)
        assert partial.value.done == 2 * 4096
        assert partial.value.errno == errno.EAGAIN
        with pytest.raises(AlreadyPresent) as info:
            uffd.copy(fd, base + 2 * 4096, buffer_address(src), 2 * 4096)
        assert info.value.done == 0
        assert info.value.errno == errno.EEXIST
        # The daemon never touches registered memory; this test process is the "VMM"
        # and reads only pages it knows are present now.
        assert region[:8] == b"\xab" * 8
    finally:
        os.close(fd)


def test_read_events_sees_a_remove() -> None:
    fd = uffd.new_uffd(uffd.FEATURE_EVENT_REMOVE)
    region = mmap.mmap(-1, 4 * 4096)
    src = bytearray(4096)
    try:
        base = buffer_address(region)
        uffd.register(fd, base, 4 * 4096, uffd.REGISTER_MODE_MISSING)
        assert uffd.read_events(fd, bytearray(uffd.MSG_SIZE * 4)) == []
        uffd.copy(fd, base, buffer_address(src), 4096)
        # A REMOVE event blocks madvise until it is read, so read it from a thread.
        import threading

        got: list[uffd.Event] = []

        def reader() -> None:
            import select
            p = select.poll()
            p.register(fd, select.POLLIN)
            p.poll(5000)
            got.extend(uffd.read_events(fd, bytearray(uffd.MSG_SIZE * 4)))

        t = threading.Thread(target=reader)
        t.start()
        # madvise through ctypes, which releases the GIL: mmap.madvise holds it while the
        # kernel waits for the reader thread, which then could never run.
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.madvise(ctypes.c_void_p(base), 4096, mmap.MADV_DONTNEED) == 0
        t.join(10)
        assert got == [uffd.Remove(base, base + 4096, False)]
    finally:
        os.close(fd)


def test_granted_features_and_is_userfaultfd() -> None:
    fd = uffd.new_uffd(uffd.FEATURE_THREAD_ID)
    r, w = os.pipe()
    try:
        assert uffd.is_userfaultfd(fd)
        assert not uffd.is_userfaultfd(r)
        assert uffd.granted_features(fd) == uffd.FEATURE_THREAD_ID
        with pytest.raises(KernelError):
            uffd.granted_features(r)
    finally:
        for x in (fd, r, w):
            os.close(x)


def test_scm_rights_round_trip_and_truncation() -> None:
    import socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.memfd_create(f"m{i}") for i in range(3)]
    try:
        scm.send_with_fds(a, b"x", fds)
        data, anc, flags, _ = b.recvmsg(1, scm.fd_control_space(4))
        got = scm.parse_fds(anc, flags)
        assert data == b"x" and len(got) == 3
        assert [os.fstat(f).st_ino for f in got] == [os.fstat(f).st_ino for f in fds]
        scm.close_all(got)
        scm.send_with_fds(a, b"y", fds)
        data, anc, flags, _ = b.recvmsg(1, scm.fd_control_space(1))
        with pytest.raises(Exception, match="truncated"):
            scm.parse_fds(anc, flags)
        cred = scm.peer_cred(b)
        assert cred.pid == os.getpid() and cred.uid == os.getuid()
    finally:
        a.close()
        b.close()
        scm.close_all(fds)
