"""Zero-copy bulk receive in MINOR mode ([peer] zero_copy, the C fault loop).

Bulk pages are received straight into the daemon's alias of the VMM's memfd, after the
fault thread claimed them (RECEIVING); it then only CONTINUEs. These run real daemons
and real VMM processes (shmem memfd, userfaultfd MINOR) through a throttled fault proxy,
so that demand faults, guest writes and the bulk stream overlap for seconds.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import chaos_rig
from uffdd.lab import chaos, harness

VMM = Path(__file__).with_name("vmm_zero_copy.py")
RATE = 4 << 20  # bytes/s per proxied connection: 16 MiB of bulk takes a few seconds
ZERO_COPY = "bulk receive: zero-copy into the memory fd"


ZERO_COPY_CONFIG = chaos.DAEMON_CONFIG.replace("[peer]\n", "[peer]\nzero_copy = true\n")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[chaos.Rig]:
    with chaos_rig(tmp_path, rate=RATE, config=ZERO_COPY_CONFIG) as r:
        yield r


def _dest_log(rig: chaos.Rig) -> str:
    return rig.dst.log_text()


def _source(rig: chaos.Rig, session: str, token: str, memory: str) -> harness.VmmProcess:
    ready = rig.workdir / f"{session}.ready"
    src = harness.start_vmm(harness.python_vmm(
        "source", "--session", session, "--token", token, "--memory", memory,
        "--backing", "shmem", "--seed", "1", "--socket", rig.src.api_socket,
        "--ready-file", str(ready)), "source", rig.workdir, ready)
    src.wait_ready()
    return src


def _ours(rig: chaos.Rig, cmd: str, session: str, token: str, *args: str) -> harness.VmmProcess:
    return harness.start_vmm(
        [sys.executable, str(VMM), cmd, "--socket", rig.dst.api_socket, "--session", session,
         "--token", token, "--peer", rig.proxy.address, *args], cmd, rig.workdir)


def test_minor_corrupt_payloads_are_fetched_again(rig: chaos.Rig) -> None:
    """Bulk frames with a bad CRC, received in place: their claimed pages go back and
    are fetched again on the demand lane; every page reads byte-exact."""
    m = rig.start_migration(memory="16M", mode="minor")
    rig.inject(m.session, corrupt=8)
    d = m.dest.result(chaos.VMM_TIMEOUT + 30)
    s = m.source.result(60)
    assert d["verified"] is True and d["mismatches"] == 0, d
    assert d["event"] == "completed" and d["hash"] == s["hash"], (d, s)
    log = _dest_log(rig)
    assert "checksum mismatch" in log and ZERO_COPY in log


@pytest.mark.parametrize("fault", ["cut", "reset"])
def test_link_fault_mid_zero_copy_frame(rig: chaos.Rig, fault: str) -> None:
    """The link dies while frames are being received into the memory fd: their claimed
    pages go back (waiters asked again), the lanes reconnect, every page byte-exact."""
    m = rig.start_migration(memory="16M", mode="minor")
    for fraction in (0.2, 0.5):
        assert rig.wait_installed(m.session, int(m.pages * fraction))
        chaos.apply_fault(rig, fault, m)
    d = m.dest.result(chaos.VMM_TIMEOUT + 30)
    s = m.source.result(60)
    assert d["verified"] is True and d["mismatches"] == 0, d
    assert d["event"] == "completed" and d["hash"] == s["hash"], (d, s)
    assert ZERO_COPY in _dest_log(rig)


def test_demand_and_bulk_race_with_guest_writes(rig: chaos.Rig) -> None:
    """Four threads fault every page in random order while the bulk stream claims and
    receives the same pages, and write each page as soon as they read it: every read
    is the source's byte, and no write of the guest is ever overwritten by bulk."""
    session, token = f"zc-{secrets.token_hex(3)}", secrets.token_hex(16)
    source = _source(rig, session, token, "16M")
    dest = _ours(rig, "dest-write", session, token, "--memory", "16M", "--threads", "4")
    d = dest.result(chaos.VMM_TIMEOUT)
    assert d["event"] == "completed", d
    assert d["read_mismatches"] == 0 and d["writes_lost"] == 0, d
    assert source.result(60)["event"] == "completed"
    assert ZERO_COPY in _dest_log(rig)


def test_memfd_shrunk_during_zero_copy_bulk(rig: chaos.Rig) -> None:
    """The VMM cuts its memfd while bulk frames are being received into it: the receive
    or the in-place check fails (EFAULT, never a SIGBUS), that session fails naming
    the memfd, and the daemon goes on (the next migration through it is byte-exact)."""
    session, token = f"zc-{secrets.token_hex(3)}", secrets.token_hex(16)
    flag = rig.workdir / f"{session}.shrink"
    source = _source(rig, session, token, "16M")
    dest = _ours(rig, "dest-shrink", session, token, "--memory", "16M",
                 "--shrink-when", str(flag))
    give_up = time.monotonic() + 60
    while ZERO_COPY not in _dest_log(rig):
        assert time.monotonic() < give_up, "no zero-copy bulk frame was installed"
        time.sleep(0.02)
    flag.touch()
    d = dest.result(chaos.VMM_TIMEOUT)
    assert d["event"] == "failed", d
    assert "shrank the memory fd of region 0" in str(d["reason"]), d
    assert source.result(60)["event"] == "failed"
    rig.proxy.throttle(0)
    m = rig.start_migration(memory="16M", mode="minor")
    d2, s2 = m.dest.result(chaos.VMM_TIMEOUT), m.source.result(60)
    assert d2["verified"] is True and d2["hash"] == s2["hash"], (d2, s2)


def test_zero_copy_off_keeps_two_copies(tmp_path: Path) -> None:
    """The shipped default (zero_copy = false): MINOR bulk goes through the daemon's
    buffer."""
    assert "zero_copy" not in chaos.DAEMON_CONFIG
    rig = chaos.Rig(tmp_path)
    try:
        m = rig.start_migration(memory="16M", mode="minor")
        d, s = m.dest.result(chaos.VMM_TIMEOUT), m.source.result(60)
        assert d["verified"] is True and d["hash"] == s["hash"], (d, s)
        assert ZERO_COPY not in rig.dst.log_text()
    finally:
        codes = rig.close()
    assert not rig.tracebacks() and codes == (0, 0), (rig.tracebacks(), codes)


_GUARD_SCRIPT = r"""
import ctypes, mmap, os, sys, zlib, faulthandler
from array import array
from uffdd.importer import bulkrx
from uffdd._linux.mem import buffer_address
from tests.conftest import fastpath_lib
faulthandler.enable()  # owns SIGBUS first: the guard must chain, not replace it for good
lib = fastpath_lib()
verify = bulkrx._alias_verify(lib)
ps, count = 4096, 8
fd = os.memfd_create("guard-test")
os.ftruncate(fd, ps * count)
alias = mmap.mmap(fd, ps * count)
addr = buffer_address(alias)
buf = bytearray(ps * count)
for i in range(count):
    alias[i * ps : (i + 1) * ps] = bytes([i + 1]) * ps
    buf[i * ps : (i + 1) * ps] = bytes([0x80 + i]) * ps
claimed = bytes([1, 1, 0, 1, 1, 1, 0, 1])
holes = array("I", [4, 2])  # pages 4 and 5 are a hole
mask = (ctypes.c_char * count).from_buffer_copy(claimed)
crc = ctypes.c_uint32()
assert verify(addr, buffer_address(buf), ps, count, ctypes.addressof(mask),
              holes.buffer_info()[0], 1, 1, 0, ctypes.byref(crc)) == 0
want = 0
for i in (0, 1, 2, 3, 6, 7):  # payload order: the alias where claimed, else buf
    src = alias if claimed[i] else buf
    want = zlib.crc32(bytes(src[i * ps : (i + 1) * ps]), want)
assert crc.value == want, (crc.value, want)
assert alias[4 * ps : 6 * ps] == bytes(2 * ps)  # the claimed hole pages are zeroed
os.ftruncate(fd, ps)  # the tenant shrinks the file: loads past page 0 would SIGBUS
for _ in range(3):  # the guard is per call: it works again and again
    assert verify(addr, buffer_address(buf), ps, count, ctypes.addressof(mask),
                  holes.buffer_info()[0], 1, 1, 0, ctypes.byref(crc)) == 14  # EFAULT
print("ok")
"""


def test_in_place_check_is_exact_and_never_sigbuses() -> None:
    """uffdd_fp_alias_verify: the CRC of a frame received partly into the alias and
    partly into the buffer, in payload order, and its claimed holes zeroed; on a memfd
    shrunk under the alias it returns EFAULT (in a child: a SIGBUS would kill it)."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr)
