"""End-to-end postcopy migrations between two real daemons, with real userfaultfd.

Every test runs a source VMM process that fills guest RAM with a seeded pattern and a
destination VMM process whose threads touch every page in random order and compare it
byte for byte; the run passes only if every page matched and the session completed.
"""

from __future__ import annotations

import pytest

from tests.conftest import Pair, assert_byte_exact


@pytest.mark.parametrize("pair", ["c", "python"], indirect=True)
@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize(
    ("backing", "mode"),
    [("anon", "missing"), ("shmem", "missing"), ("shmem", "minor")],
)
def test_byte_exact(pair: Pair, backing: str, mode: str, threads: int) -> None:
    """Both data paths: the C loops (libuffdd_fastpath) and the Python fallback."""
    result, source = pair.migrate(
        backing=backing, dest=["--mode", mode, "--threads", str(threads), "--order", "rand"])
    assert_byte_exact(result, source)
    assert result["pages"] == 16384
    used_c = "fault loop: C" in pair.dst.log_text()
    assert used_c == (pair.loop == "c"), f"expected the {pair.loop} fault loop"


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("mode", ["missing", "minor"])
def test_byte_exact_hugetlb(pair: Pair, hugepages: None, mode: str, threads: int) -> None:
    result, source = pair.migrate(
        backing="hugetlb", dest=["--mode", mode, "--threads", str(threads), "--order", "rand"])
    assert_byte_exact(result, source)


ZERO_COPY_LOG = "bulk receive: zero-copy into the memory fd"


@pytest.mark.parametrize("pair", ["c-zero-copy"], indirect=True)
@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("backing", ["shmem", "hugetlb"])
def test_byte_exact_minor_zero_copy(pair: Pair, request: pytest.FixtureRequest,
                                    backing: str, threads: int) -> None:
    """The matrix's MINOR cases with ``[peer] zero_copy = true`` (off by default): bulk
    frames received straight into the memory fd, their pages claimed against demand
    installs, CRC-checked in place, CONTINUE'd. (Corrupt and cut frames: test_zero_copy.)"""
    if backing == "hugetlb":
        request.getfixturevalue("hugepages")
    result, source = pair.migrate(
        backing=backing, dest=["--mode", "minor", "--threads", str(threads), "--order", "rand"])
    assert_byte_exact(result, source)
    assert ZERO_COPY_LOG in pair.dst.log_text()


@pytest.mark.parametrize("backing", ["anon", "shmem"])
def test_several_regions_with_holes(pair: Pair, backing: str) -> None:
    """Four regions with 1 GiB gpa holes between them; pages never written stay zero."""
    holes = "0+3,5000+200,16383+1"
    result, source = pair.migrate(
        backing=backing, source=["--split", "4", "--holes", holes],
        dest=["--split", "4", "--holes", holes, "--threads", "4"])
    assert_byte_exact(result, source)


@pytest.mark.parametrize("backing", ["anon", "shmem"])
def test_discarded_range_reads_zero(pair: Pair, backing: str) -> None:
    """A range the VMM discards (MADV_DONTNEED / MADV_REMOVE) comes back as zeros."""
    result, source = pair.migrate(
        memory="256M", backing=backing, dest=["--discard", "100+64,30000+1", "--threads", "4"])
    assert_byte_exact(result, source)
    log = pair.dst.log_text()
    assert "discard region=0" in log, "the daemon never saw the REMOVE event"


def test_three_sessions_at_once(pair: Pair) -> None:
    started = [pair.start_migration(backing=b, dest=["--threads", "2"])
               for b in ("anon", "shmem", "shmem")]
    for src, dst in started:
        assert_byte_exact(dst.result(300), src.result(60))
