"""The handover checks: what a VMM claims in ``import`` and ``export``, verified against
the kernel before the daemon says ``ok`` (README, Security: "What the handover checks").

A VMM's word is not evidence. A uffd that was never registered, a region larger than
the memory behind it, a blocking uffd or one without the features the session relies
on would each end in a guest reading wrong data, a vCPU that hangs, or a daemon that
runs out of memory. So every claim is checked here, in this order, cheapest and
bounding checks first, so that nothing large is allocated, mapped or read before the
request is known to be bounded:

1. counts: regions per request, pages per session and per daemon (``check_pages``);
2. the fds themselves (``check_uffd``, ``check_memfd``): O_NONBLOCK, UFFDIO_API done
   with the needed features (from ``/proc/self/fdinfo``), memory fd kind, size, seals;
3. the VMM's address space (``verify_import``, run in a worker thread):
   ``/proc/<pid>/smaps`` covers each region without holes, with the registration
   flags of its mode, the page size and (with a memory fd) that very file at that
   offset; ``UFFDIO_REGISTER`` through the received uffd proves the registration is
   this uffd's and returns the ioctls the range allows, and that the uffds are
   registered nowhere else; pages already present are counted; last, MINOR-only
   ranges get their holes allocated.

Every refusal is a :class:`RequestError` naming the region, what is wrong and what the
VMM should do.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from uffdd import protocol
from uffdd._linux import procmaps, uffd
from uffdd._linux.mem import is_hugetlb_fd
from uffdd._linux.procmaps import UFFD_VMFLAGS, Vma, uncovered
from uffdd.config import LimitsConfig, PeerConfig, split_host_port
from uffdd.errors import KernelError, RequestError

_F_GET_SEALS: Final = 1034
_F_SEAL_WRITE: Final = 0x0008
_F_SEAL_FUTURE_WRITE: Final = 0x0010

FEATURE_NAMES: Final = {
    uffd.FEATURE_EVENT_REMOVE: "UFFD_FEATURE_EVENT_REMOVE",
    uffd.FEATURE_POISON: "UFFD_FEATURE_POISON",
    uffd.FEATURE_MINOR_SHMEM: "UFFD_FEATURE_MINOR_SHMEM",
    uffd.FEATURE_MINOR_HUGETLBFS: "UFFD_FEATURE_MINOR_HUGETLBFS",
    uffd.FEATURE_EVENT_FORK: "UFFD_FEATURE_EVENT_FORK",
}
IOCTL_NAMES: Final = {
    uffd.IOCTL_BIT_WAKE: "UFFDIO_WAKE",
    uffd.IOCTL_BIT_COPY: "UFFDIO_COPY",
    uffd.IOCTL_BIT_ZEROPAGE: "UFFDIO_ZEROPAGE",
    uffd.IOCTL_BIT_CONTINUE: "UFFDIO_CONTINUE",
    uffd.IOCTL_BIT_POISON: "UFFDIO_POISON",
}
#: Features a session's uffd must not have: with EVENT_FORK the kernel would put a new
#: uffd (the forked child's) into the daemon's fd table with every fork, and nobody
#: would serve that child's faults.
FORBIDDEN_FEATURES: Final = uffd.FEATURE_EVENT_FORK


def _names(bits: int, table: dict[int, str]) -> str:
    return ", ".join(name for bit, name in table.items() if bits & bit)


# ---------------------------------------------------------------- 1. counts


def check_pages(specs: Sequence[protocol.RegionSpec], limits: LimitsConfig,
                running: int) -> int:
    """The request's pages fit ``max_pages_per_session`` and, with the ``running``
    sessions' pages, ``max_pages_per_daemon``. Returns the request's page count."""
    pages = sum(spec.pages for spec in specs)
    if pages > limits.max_pages_per_session:
        raise RequestError("limit", f"the regions hold {pages} pages, more than "
                           f"{limits.max_pages_per_session} (limits.max_pages_per_session)")
    if running + pages > limits.max_pages_per_daemon:
        raise RequestError("limit", f"the regions hold {pages} pages and running sessions "
                           f"{running}, more than {limits.max_pages_per_daemon} "
                           "(limits.max_pages_per_daemon)")
    return pages


def check_peer_security(peer: PeerConfig, address: str) -> None:
    """The import's peer link will be allowed by this daemon's [peer] rules.

    The lanes are opened only after the reply; refusing then would give the VMM ``ok``
    and a ``failed`` event a moment later, blaming the source for our own rule.
    """
    from uffdd import tls  # here: tls imports ssl, needed only for this check

    host, _port = split_host_port(address)
    if not tls.tls_enabled(peer) and not tls.plaintext_allowed_to(peer, host):
        raise RequestError("peer-security", f"import: this daemon refuses a plaintext peer "
                           f"link to {address}, which is not on loopback (no TLS is "
                           "configured): configure mutual TLS (peer.ca, peer.cert, peer.key) "
                           "or set peer.tls = false")


# ---------------------------------------------------------------- 2. the fds


def needed_features(mode: str, hugetlb: bool, policy: str) -> int:
    """What a session's uffd must have been given by UFFDIO_API.

    EVENT_REMOVE always: without it a range the guest discards (balloon, free page
    reporting) is filled from the source later, and the guest reads stale data.
    POISON under the poison policy, the MINOR feature of the backing in minor mode.
    UFFD_FEATURE_SIGBUS is not needed by any mode: it only changes who sees an absent
    page (the VMM, as a vCPU exit, instead of the fault thread), and both are served.
    The MISSING_SHMEM/MISSING_HUGETLBFS bits are for feature detection only: the
    kernel registers MISSING mode on shmem and hugetlb without them.
    """
    needed = uffd.FEATURE_EVENT_REMOVE
    if policy == "poison":
        needed |= uffd.FEATURE_POISON
    if mode == "minor":
        needed |= uffd.FEATURE_MINOR_HUGETLBFS if hugetlb else uffd.FEATURE_MINOR_SHMEM
    return needed


def check_uffd(fd: int, where: str, needed: int) -> None:
    """``fd`` is a userfaultfd, non-blocking, initialised with ``needed`` features."""
    if not uffd.is_userfaultfd(fd):
        raise RequestError("bad-fds", f"{where}: fd 'uffd' is not a userfaultfd")
    if not uffd.is_nonblocking(fd):
        # The fault thread reads it in a loop; a blocking read would stall the session
        # for good, out of reach of deadlines, cancel and SIGTERM.
        raise RequestError("bad-fds", f"{where}: the userfaultfd is blocking: create it "
                           "with O_NONBLOCK (userfaultfd(O_CLOEXEC | O_NONBLOCK))")
    try:
        features = uffd.granted_features(fd)
    except KernelError:
        raise RequestError("bad-fds", f"{where}: the userfaultfd has not had UFFDIO_API "
                           "done on it") from None
    missing = needed & ~features
    if missing:
        raise RequestError("bad-fds", f"{where}: the userfaultfd lacks "
                           f"{_names(missing, FEATURE_NAMES)} (UFFDIO_API granted "
                           f"{features:#x}): request it in UFFDIO_API")
    if features & FORBIDDEN_FEATURES:
        raise RequestError("bad-fds", f"{where}: the userfaultfd has "
                           f"{_names(features & FORBIDDEN_FEATURES, FEATURE_NAMES)}: the "
                           "daemon cannot serve a forked child's uffd; do not request it")


def is_plain_file(fd: int) -> bool:
    """True for a regular file that is neither a memfd nor on hugetlbfs: a snapshot
    memory file (on disk, or on tmpfs), which has no page size of its own."""
    if not stat.S_ISREG(os.fstat(fd).st_mode) or is_hugetlb_fd(fd):
        return False
    try:
        return not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


def check_file_region(fd: int, spec: protocol.RegionSpec, where: str) -> None:
    """An export's region read from a plain file (a Firecracker snapshot's memory file).

    It is read with pread only, never mapped (a file truncated under a mapping would
    SIGBUS the daemon; a short pread is a lost page). The file has no page size of its
    own: the region's page_size is the guest's. Its size is checked now; a file that
    shrinks later costs the pages past its new end, not the daemon.
    """
    size = os.fstat(fd).st_size
    if spec.offset + spec.size > size:
        raise RequestError("bad-region", f"{where}: region ends at {spec.offset + spec.size} "
                           f"but the file is {size} bytes")


def check_memfd(fd: int, spec: protocol.RegionSpec, where: str, *, writes: bool) -> bool:
    """The fd is a memory file that holds the region; returns 'is hugetlb'.

    ``writes``: the daemon will write pages through a mapping of it (minor mode), so a
    write seal (which makes that mapping fail) is refused here with a reason.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RequestError("bad-fds", f"{where}: fd is not a memory file (memfd) or a "
                           "regular file")
    if spec.offset + spec.size > st.st_size:
        raise RequestError("bad-region", f"{where}: region ends at {spec.offset + spec.size} "
                           f"but the memory fd is {st.st_size} bytes")
    hugetlb = is_hugetlb_fd(fd)
    if hugetlb != (spec.page_size != 4096):
        raise RequestError("bad-region", f"{where}: page_size {spec.page_size} does not match "
                           f"the memory fd ({'hugetlb' if hugetlb else 'regular pages'})")
    if writes and _seals(fd) & (_F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE):
        raise RequestError("bad-fds", f"{where}: the memory fd is sealed against writes "
                           "(F_SEAL_WRITE): minor mode installs pages by writing through it")
    if writes and not _writable(fd):
        raise RequestError("bad-fds", f"{where}: the memory fd is open read-only: minor mode "
                           "installs pages by writing through it")
    return hugetlb


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:  # not a memfd (no sealing): nothing sealed
        return 0


def _writable(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR


# ---------------------------------------------------------------- 3. the VMM's memory


def read_smaps(pid: int, why: str) -> list[Vma]:
    """The mappings of ``pid``; the VMM's own word is all we would have without them."""
    try:
        return procmaps.read_smaps(pid)
    except OSError as e:
        raise RequestError("bad-request", f"cannot read /proc/{pid}/smaps to {why}: "
                           f"{e.strerror}") from None


def covering(spans: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the spans that cover [start, end) without a hole; raises ValueError
    with the first address nothing maps."""
    starts = [s for s, _e in spans]
    out = []
    pos = start
    while pos < end:
        i = bisect.bisect_right(starts, pos) - 1
        if i < 0 or spans[i][1] <= pos:
            raise ValueError(pos)
        out.append(i)
        pos = spans[i][1]
    return out




def check_pid_regions(pid: int, specs: Sequence[protocol.RegionSpec]) -> None:
    """Export with ``pid``: every region lies in readable memory the process maps
    (process_vm_readv would fail on every page of a hole, at migration time), and none
    of it is registered with a userfaultfd: process_vm_readv of a page nobody has
    served would wait in the kernel for a resolution that never comes, and the
    daemon's bulk thread with it."""
    vmas = read_smaps(pid, "check the export's regions")
    spans = [(v.start, v.end) for v in vmas]
    for i, spec in enumerate(specs):
        try:
            found = covering(spans, spec.addr, spec.addr + spec.size)
        except ValueError as e:
            raise RequestError("bad-region", f"regions[{i}]: nothing is mapped at "
                               f"{e.args[0]:#x} in process {pid}, inside the region "
                               f"[{spec.addr:#x}, {spec.addr + spec.size:#x})") from None
        for j in found:
            vma = vmas[j]
            if "rd" not in vma.flags:
                raise RequestError("bad-region", f"regions[{i}]: [{vma.start:#x}, "
                                   f"{vma.end:#x}) of process {pid} is not readable")
            registered = sorted(vma.flags & UFFD_VMFLAGS)
            if registered:
                raise RequestError(
                    "bad-region", f"regions[{i}]: [{vma.start:#x}, {vma.end:#x}) of "
                    f"process {pid} is registered with a userfaultfd (VmFlags "
                    f"{' '.join(registered)}): reading it could wait for ever on a fault "
                    "nobody serves. Export it with its memory fd, or unregister it "
                    "(UFFDIO_UNREGISTER) before the export")


@dataclass(frozen=True, slots=True)
class ImportCheck:
    """What the checks of one import region found (for the handler and the session)."""

    hugetlb: bool
    minor_only: bool = False


@dataclass(frozen=True, slots=True)
class ImportClaim:
    """One import region with its received fds (indices resolved), as the thread sees it."""

    where: str
    spec: protocol.RegionSpec
    uffd: int
    memfd: int  # -1: none
    hugetlb: bool


def verify_import(pid: int, claims: Sequence[ImportClaim], policy: str, keep_present: bool
                  ) -> list[ImportCheck]:
    """The checks on the VMM's address space (blocking: run it in a worker thread).

    Order: smaps (coverage, flags, page size, file) and the REGISTER probe for every
    region, then the count of present pages; only then are holes of MINOR-only ranges
    allocated (it writes to the VMM's memory file, which a refused request must not).
    """
    vmas = read_smaps(pid, "check the import's regions")
    spans = [(v.start, v.end) for v in vmas]
    checks = []
    for claim in claims:
        minor_only = _check_mapping(vmas, spans, claim, pid)
        _check_registration(claim, policy)
        checks.append(ImportCheck(claim.hugetlb, minor_only))
    _check_nothing_else_registered(vmas, claims)
    if not keep_present:
        present = count_present(pid, [c.spec for c in claims])
        if present:
            raise RequestError("bad-region", f"{present} pages of the regions are already "
                               "present in the VMM: a fresh import would never fetch them. "
                               "Send \"present\": \"keep\" if they hold valid guest data "
                               "(precopy, re-import), or leave guest RAM untouched")
    for claim, check in zip(claims, checks, strict=True):
        if check.minor_only:
            fill_holes(claim)
    return checks


def _check_mapping(vmas: Sequence[Vma], spans: Sequence[tuple[int, int]],
                   claim: ImportClaim, pid: int) -> bool:
    """smaps shows the region mapped, registered in its mode, with its page size and
    file. Returns True for a minor region registered MINOR without MISSING."""
    spec, where = claim.spec, claim.where
    try:
        found = [vmas[i] for i in covering(spans, spec.addr, spec.addr + spec.size)]
    except ValueError as e:
        raise RequestError("bad-region", f"{where}: nothing is mapped at {e.args[0]:#x} in "
                           f"the VMM (pid {pid}), inside the region "
                           f"[{spec.addr:#x}, {spec.addr + spec.size:#x})") from None
    flag, mode_name = ("ui", "MINOR") if spec.mode == "minor" else ("um", "MISSING")
    st = os.fstat(claim.memfd) if claim.memfd >= 0 else None
    for vma in found:
        span = f"[{max(vma.start, spec.addr):#x}, {min(vma.end, spec.addr + spec.size):#x})"
        if flag not in vma.flags:
            raise RequestError("bad-region", f"{where}: {span} is not registered with a "
                               f"userfaultfd in {mode_name} mode (mode {spec.mode!r}): "
                               "UFFDIO_REGISTER it before the import")
        if "uw" in vma.flags:
            raise RequestError("bad-region", f"{where}: {span} is registered in WP mode too: "
                               "the daemon does not resolve write-protect faults")
        if vma.page_size != spec.page_size:
            raise RequestError("bad-region", f"{where}: {span} is mapped with "
                               f"{vma.page_size}-byte pages, not page_size {spec.page_size}")
        if st is not None and (vma.inode != st.st_ino or vma.dev != st.st_dev
                               or vma.offset - vma.start != spec.offset - spec.addr):
            raise RequestError("bad-region", f"{where}: {span} is not a mapping of the memory "
                               f"fd at offset {spec.offset:#x}: 'fd' and 'offset' must name "
                               "the file and offset mapped at 'addr'")
    return spec.mode == "minor" and any("um" not in vma.flags for vma in found)


def _check_registration(claim: ImportClaim, policy: str) -> None:
    """UFFDIO_REGISTER through the received uffd, in the region's mode.

    smaps already showed the range registered in that mode, so for the uffd that did
    it this changes nothing and returns the ioctls the range allows; a range of
    another uffd gives EBUSY. An unregistered range would be registered by this very
    call: that is not done as a repair (it is refused before, from smaps), because a
    VMM that forgot to register has not set up the rest of the handover either
    (unregistering at completion, its own fault handling) and should be told.
    """
    spec, where = claim.spec, claim.where
    mode = uffd.REGISTER_MODE_MINOR if spec.mode == "minor" else uffd.REGISTER_MODE_MISSING
    try:
        ioctls = uffd.register(claim.uffd, spec.addr, spec.size, mode)
    except KernelError as e:
        if e.errno == errno.EBUSY:
            raise RequestError("bad-fds", f"{where}: the region is registered with another "
                               "userfaultfd, not the one sent as 'uffd'") from None
        raise RequestError("bad-region", f"{where}: the kernel refuses this uffd over the "
                           f"region in {spec.mode} mode ({os.strerror(e.errno)})") from None
    needed = uffd.IOCTL_BIT_WAKE
    if spec.mode == "minor":
        needed |= uffd.IOCTL_BIT_CONTINUE
    else:
        needed |= uffd.IOCTL_BIT_COPY | (0 if claim.hugetlb else uffd.IOCTL_BIT_ZEROPAGE)
    if policy == "poison":
        needed |= uffd.IOCTL_BIT_POISON
    if needed & ~ioctls:
        raise RequestError("bad-region", f"{where}: the kernel does not allow "
                           f"{_names(needed & ~ioctls, IOCTL_NAMES)} over the region "
                           f"(ioctls {ioctls:#x}), which its mode and policy need")


def _check_nothing_else_registered(vmas: Sequence[Vma], claims: Sequence[ImportClaim]) -> None:
    """No uffd of the import is registered over memory that no region names.

    The daemon reads every fault of its uffds, but one outside all regions has no page
    to fetch: it is logged and its thread waits forever. smaps shows where some uffd is
    registered, not which one; a REGISTER probe in the flags already there tells
    (0: ours, and nothing changes; EBUSY: another uffd's).
    """
    regions = sorted((c.spec.addr, c.spec.addr + c.spec.size) for c in claims)
    fds = sorted({c.uffd for c in claims})
    for vma in vmas:
        if "um" in vma.flags:
            mode = uffd.REGISTER_MODE_MISSING
        elif "ui" in vma.flags:
            mode = uffd.REGISTER_MODE_MINOR
        else:
            continue
        for start, end in uncovered(vma.start, vma.end, regions):
            for fd in fds:
                try:
                    uffd.register(fd, start, end - start, mode)
                except KernelError:
                    continue  # another uffd's range (EBUSY) or not one we could take
                raise RequestError("bad-region", f"a uffd of the import is registered over "
                                   f"[{start:#x}, {end:#x}), which no region names: a fault "
                                   "there could never be resolved. Import every registered "
                                   "range, or unregister it first")


def fill_holes(claim: ImportClaim) -> None:
    """Allocate the holes of a MINOR-only range's memory file (the chosen repair).

    In a range registered MINOR without MISSING, a page with no page-cache page behind
    it is never reported: the kernel maps a fresh zero page and the guest reads zeros
    where its data should be. Allocated (fallocate), every page is in the page cache,
    so every first access is a MINOR fault that the daemon resolves. fallocate leaves
    allocated pages as they are, so a preallocated file costs nothing here.
    """
    spec = claim.spec
    try:
        os.posix_fallocate(claim.memfd, spec.offset, spec.size)
    except OSError as e:
        raise RequestError("bad-region", f"{claim.where}: the range is registered MINOR "
                           "without MISSING and its memory fd has holes, which cannot be "
                           f"allocated ({e.strerror}): register MISSING|MINOR, or preallocate "
                           "the memory fd") from None


def count_present(pid: int, specs: Iterable[protocol.RegionSpec]) -> int:
    """Pages of the regions already present (or swapped out) in ``pid`` (its pagemap)."""
    total = 0
    try:
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
            for spec in specs:
                total += _present_in(f.fileno(), spec)
    except OSError as e:
        raise RequestError("bad-request", f"cannot read /proc/{pid}/pagemap to check for "
                           f"pages already present: {e.strerror}") from None
    return total


def _present_in(fd: int, spec: protocol.RegionSpec) -> int:
    return sum(flags.count(1) for _first, flags in
               procmaps.present_flags(fd, spec.addr, spec.pages, spec.page_size))
