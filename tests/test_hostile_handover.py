"""A verified handover (issue 12): every claim of an ``import``/``export`` is checked
against the kernel before ``ok``, while another tenant migrates through the same daemons.

Each case is a real hostile VMM process (``tests/vmm_handover.py``) that sets up its
uffd, memory and region table wrongly in one way and sends the request itself. The
daemons run at the shipped defaults (``tenancy``); after each case the healthy
tenant's migration must have completed byte-exact and the daemons hold no more fds
than when idle, with bounded RSS and no traceback (tests/hostile.py).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Pair, _check_logs
from tests.hostile import Tenancy, tenancy  # noqa: F401
from uffdd.lab import harness

ROOT = Path(__file__).resolve().parent.parent


def hostile(socket: str, case: str, *args: str) -> dict[str, object]:
    """Run one case of the hostile VMM and return its JSON line."""
    done = subprocess.run([sys.executable, "-m", "tests.vmm_handover", case, "--socket", socket,
                           *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the hostile VMM printed nothing (exit {done.returncode}):\n{done.stderr}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


def refused(reply: object, code: str, *words: str) -> None:
    assert isinstance(reply, dict), reply
    assert reply["ok"] is False, reply
    assert reply["error"] == code, reply
    for word in words:
        assert word in str(reply["message"]), f"{word!r} not in {reply['message']!r}"


# (case, daemon it is sent to, error code, words the message must contain)
REFUSALS = [
    # 1. the uffd must be non-blocking
    ("blocking", "dst", "bad-fds", ["blocking", "O_NONBLOCK"]),
    # 2. UFFDIO_API with what the session needs (and nothing it cannot serve)
    ("no-features", "dst", "bad-fds", ["UFFD_FEATURE_EVENT_REMOVE", "UFFDIO_API"]),
    ("no-poison-feature", "dst", "bad-fds", ["UFFD_FEATURE_POISON"]),
    ("no-minor-feature", "dst", "bad-fds", ["UFFD_FEATURE_MINOR_SHMEM"]),
    ("event-fork", "dst", "bad-fds", ["UFFD_FEATURE_EVENT_FORK"]),
    # 3. registered over exactly the region, in its mode, by this uffd
    ("unregistered", "dst", "bad-region", ["not registered", "MISSING", "UFFDIO_REGISTER"]),
    ("other-uffd", "dst", "bad-fds", ["another userfaultfd"]),
    ("stray-registration", "dst", "bad-region", ["no region names"]),
    ("nothing-mapped", "dst", "bad-region", ["nothing is mapped"]),
    ("hole-in-region", "dst", "bad-region", ["nothing is mapped"]),
    ("minor-registered-missing", "dst", "bad-region", ["not registered", "MINOR"]),
    ("write-protect", "dst", "bad-region", ["WP"]),
    ("wrong-memfd", "dst", "bad-region", ["not a mapping of the memory fd"]),
    ("half-registered", "dst", "bad-region", ["not registered"]),
    # 4. sizes against real memory; bounded page state
    ("minor-memfd-too-small", "dst", "bad-region", ["memory fd is 524288 bytes"]),
    ("export-memfd-too-small", "src", "bad-region", ["memory fd is 524288 bytes"]),
    ("export-memfd-offset-past-end", "src", "bad-region", ["memory fd is 1048576 bytes"]),
    ("huge-region", "dst", "limit", ["limits.max_pages_per_session"]),
    ("export-huge", "src", "limit", ["limits.max_pages_per_session"]),
    ("import-many-regions", "dst", "limit", ["2000", "limits.max_regions_per_request"]),
    ("export-many-regions", "src", "limit", ["20000", "256", "limits.max_regions_per_request"]),
    ("export-pid-unmapped", "src", "bad-region", ["nothing is mapped"]),
    ("export-pid-unreadable", "src", "bad-region", ["not readable"]),
    # 6. a fresh import does not adopt pages present already
    ("present", "dst", "bad-region", ["10 pages", "present", "keep"]),
    # 7. clear refusals where the connection used to be dropped
    ("sealed-minor", "dst", "bad-fds", ["F_SEAL_WRITE"]),
    ("exa-region", "dst", "bad-region", ["address space"]),
    # 8. what the daemon's own config refuses is refused before ok
    ("plaintext-peer", "dst", "peer-security", ["192.0.2.10:4460", "TLS", "peer.tls"]),
]


@pytest.mark.parametrize(("case", "side", "code", "words"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refused_before_ok(tenancy: Tenancy, case: str, side: str, code: str,  # noqa: F811
                           words: list[str]) -> None:
    daemon = tenancy.dst if side == "dst" else tenancy.src
    refused(hostile(daemon.api_socket, case)["reply"], code, *words)


def test_two_imports_cannot_share_one_uffd(tenancy: Tenancy) -> None:  # noqa: F811
    """A VMM that imports block A with a uffd, then registers block B with the same
    uffd and imports B as another session: the second is refused before ok (the uffd
    is registered over A, which that import does not name), so no two fault threads
    ever read one uffd."""
    out = hostile(tenancy.dst.api_socket, "shared-uffd")
    assert isinstance(out["first"], dict) and out["first"]["ok"] is True, out
    refused(out["reply"], "bad-region", "which no region names")


def test_present_pages_kept_when_the_vmm_says_so(tenancy: Tenancy) -> None:  # noqa: F811
    """With "present": "keep" the same import is accepted (and the VMM then cancels)."""
    reply = hostile(tenancy.dst.api_socket, "present-keep")["reply"]
    assert isinstance(reply, dict) and reply["ok"] is True, reply


def minor_only_migration(pair: Pair, backing: str) -> None:
    """MINOR without MISSING over a memfd never preallocated: the daemon allocates the
    holes, so no page can read the kernel's zeros; every page arrives from the source."""
    session, token, seed = f"minor-{secrets.token_hex(3)}", secrets.token_hex(16), 77
    ready = pair.workdir / f"{session}.ready"
    common = ["--session", session, "--token", token, "--memory", "64M", "--seed", str(seed)]
    src = harness.start_vmm(harness.python_vmm(
        "source", *common, "--backing", backing, "--socket", pair.src.api_socket,
        "--ready-file", str(ready)), "source", pair.workdir, ready)
    src.wait_ready()
    out = hostile(pair.dst.api_socket, "minor-only-holes", "--peer", pair.src.peer,
                  "--session", session, "--token", token, "--seed", str(seed),
                  "--memory", str(64 << 20), "--backing", backing)
    source = src.result(120)
    assert out.get("reply", {}).get("ok") is True, out  # type: ignore[union-attr]
    assert out["event"] == "completed", out
    assert out["mismatches"] == 0, out
    assert out["pages"] == 16384
    assert source["event"] == "completed", source


def test_minor_only_over_holes_migrates_byte_exact(tenancy: Tenancy) -> None:  # noqa: F811
    minor_only_migration(tenancy.pair, "shmem")


def test_minor_only_hugetlb_over_holes_migrates_byte_exact(hugepages: None,
                                                          tenancy: Tenancy) -> None:  # noqa: F811
    """The same over hugetlb, on the tenancy rig: the source daemon's RSS bound holds
    now that an export lane gives its scratch (128 MiB with 2 MiB pages) back."""
    minor_only_migration(tenancy.pair, "hugetlb")


def test_page_limits_per_daemon(tmp_path: Path) -> None:
    """max_pages_per_daemon sums the running sessions' pages. Configured small here to
    reach it with real memory (at the defaults it bounds page state to ~256 MiB)."""
    daemon = harness.start_daemon(tmp_path, "source", config=(
        "[limits]\nmax_pages_per_session = 256\nmax_pages_per_daemon = 300\n"))
    try:
        out = hostile(daemon.api_socket, "daemon-pages")
        assert out["first"]["ok"] is True, out  # type: ignore[index]
        refused(out["reply"], "limit", "running sessions 256", "limits.max_pages_per_daemon")
        big = hostile(daemon.api_socket, "export-pid-unreadable", "--session", "three")
        refused(big["reply"], "limit", "512 pages", "limits.max_pages_per_session")
    finally:
        code = daemon.stop()
    _check_logs(daemon)
    assert code == 0
