"""The VMM API contract, defined once: every request, reply, event, status field and error.

Everything a VMM can send or receive on the API socket is a :class:`Field` in one of the
tables below, with its wire type, whether it is required, the roles it appears on, its
units and its meaning (per role where the two roles differ) and, for enums, the values
it may take. The daemon checks its requests against these tables (uffdd.protocol), checks
every reply and event it sends (uffdd.api), the Python client checks every frame it
receives when ``UFFDD_STRICT_SCHEMA=1`` (the test suite sets it), and the README's wire
reference tables are generated from here (``python -m uffdd.schema`` prints them; a test
holds the README equal to that text).

Units: every ``pages_*`` counter counts pages of the region's own page size (a 2 MiB
hugetlb page counts once), and a session's counters add up its regions.

Size: over 500 lines on purpose: it is the contract, every field of every frame with
its meaning, and it is one file so that the README's reference is generated from one
place and a reviewer sees a change to the contract in one diff.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger("uffdd.schema")

#: Wire types: what each ``Field.type`` accepts (msgpack side).
TYPES: Final[dict[str, str]] = {
    "uint": "msgpack int >= 0 (addresses and sizes are unsigned 64-bit)",
    "float": "msgpack float or int",
    "str": "msgpack str (UTF-8)",
    "token": "msgpack bin or str, 16..64 bytes",
    "bool": "msgpack bool",
    "list": "msgpack array",
    "ranges": "array of [gpa: uint, length in bytes: uint] pairs",
    "regions": "array of region maps (table below)",
    "sessions": "array of status entries (table below)",
}

IMPORT: Final = "import"
EXPORT: Final = "export"
BOTH: Final = "both"
PAGES: Final = "pages of the region's page size"


@dataclass(frozen=True)
class Field:
    """One field of one message: the whole contract for it."""

    name: str
    type: str  # a key of TYPES
    required: bool
    meaning: str
    roles: str = BOTH  # IMPORT, EXPORT or BOTH (status entries; elsewhere informative)
    units: str = ""
    values: tuple[str, ...] = ()  # the allowed values of an enum
    nullable: bool = False
    #: Meaning per role where the roles differ (pages_* counters).
    by_role: Mapping[str, str] = field(default_factory=dict)


def _f(name: str, type_: str, required: bool, meaning: str, **kw: object) -> Field:
    return Field(name, type_, required, meaning, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- states and enums

STATES: Final = ("connecting", "running", "completed", "failed", "cancelled")
OUTCOMES: Final = ("completed", "completed-with-poisoned-pages")
MODES: Final = ("missing", "minor")
POLICIES: Final = ("crash", "poison")
PRESENT: Final = ("none", "keep")
ACCESS: Final = ("read", "write", "exec")
VERDICTS: Final = ("resume", "populate", "inject-memory-error", "crash")
LINKS: Final = ("up", "down", "reconnecting")
LOOPS: Final = ("c", "python")
ROLES: Final = (IMPORT, EXPORT)

#: Every error code of an error reply, with its meaning.
ERRORS: Final[dict[str, str]] = {
    "bad-frame": "the body is not a msgpack map with string keys, or not decodable; a "
                 "zero length or a stream that ends inside a frame closes the connection "
                 "after this reply",
    "frame-too-large": "length over `limits.max_frame_bytes` (the connection is closed after "
                       "the reply)",
    "bad-request": "unknown op, missing or unknown field, wrong type, a value outside its "
                   "enum or range (a region's `mode`, `minor` without `fd`, `policy`, "
                   "`present`, `access`, `deadline`, `peer`, the token's length, the session "
                   "id's pattern), `inject` while fault injection is disabled; `message` "
                   "names the field",
    "bad-fds": "missing, extra or wrong kind of fds: a uffd that is not a userfaultfd, is "
               "blocking (no `O_NONBLOCK`), had no `UFFDIO_API`, lacks a feature the session "
               "needs (the message names it), has `EVENT_FORK`, or whose region is registered "
               "by another uffd; a memory fd that is not a memory file, is sealed against "
               "writes (`F_SEAL_WRITE`), or is read-only in minor mode; fds sent with a "
               "request other than `import`/`export`/`prepare`; more than "
               "`limits.max_fds_per_request` in one frame",
    "bad-region": "region not page aligned, overlapping another, zero size, beyond any "
                  "address space (> 2^57 bytes), or outside its memory fd; not mapped in the "
                  "VMM (the message gives the first unmapped address), not registered in its "
                  "mode, registered WP, or mapped with another page size or another "
                  "file/offset than `fd`/`offset`; a uffd of the import registered over memory "
                  "no region names; pages already present without `\"present\": \"keep\"` (the "
                  "count); export with `pid`: a hole or an unreadable page in the process; "
                  "`resolve`: a `gpa`/`addr` outside the session's regions",
    "peer-security": "import: this daemon's `[peer]` rules would refuse the link to `peer` "
                     "(plaintext to a host off loopback without `peer.tls = false`); nothing "
                     "was dialled",
    "unknown-session": "no session with that id (or not visible to this connection)",
    "session-exists": "a session with that id and role is already running",
    "unauthorized": "peer credentials not allowed (sent once with `\"id\": null`, then the "
                    "connection is closed), or the session belongs to another client",
    "limit": "a configured limit would be exceeded: sessions, connections per client, "
             "outstanding requests, regions per request, pages per session or per daemon "
             "(the message names the `limits.*` key)",
    "internal": "a bug, or the kernel refused what the daemon asked on the VMM's behalf; "
                "the daemon logs it and keeps serving",
}

# ---------------------------------------------------------------- requests

_ID = _f("id", "uint", True, "chosen by the client, echoed in the reply")
_OP = _f("op", "str", True, "the request")
_SESSION = _f("session", "str", True, "the session id, `[A-Za-z0-9._:-]{1,128}`")

EXPORT_REGION: Final = (
    _f("gpa", "uint", True, "guest physical address of the region", units="bytes"),
    _f("size", "uint", True, "length of the region, a non-zero multiple of page_size",
       units="bytes"),
    _f("page_size", "uint", True, "4096, or 2097152 for hugetlb memory", units="bytes"),
    _f("fd", "uint", False, "memfd mode: index of the memory fd (memfd or hugetlb memfd) in "
       "the frame's fds; or of a regular file (a snapshot's memory file, read with pread "
       "only, any page_size)"),
    _f("offset", "uint", False, "memfd mode: offset of the region in `fd` (default 0)",
       units="bytes"),
    _f("addr", "uint", False, "pid mode: the region's address in process `pid`"),
)
IMPORT_REGION: Final = (
    _f("gpa", "uint", True, "guest physical address of the region", units="bytes"),
    _f("addr", "uint", True, "the region's address in the importing VMM"),
    _f("size", "uint", True, "length of the region, a non-zero multiple of page_size",
       units="bytes"),
    _f("page_size", "uint", True, "4096, or 2097152 for hugetlb memory", units="bytes"),
    _f("uffd", "uint", True, "index of the userfaultfd registered over [addr, addr+size)"),
    _f("mode", "str", True, "`missing`: UFFDIO_COPY/ZEROPAGE into MISSING-registered memory; "
       "`minor`: the daemon writes through the memory fd and resolves with UFFDIO_CONTINUE",
       values=MODES),
    _f("fd", "uint", False, "index of the memory fd mapped at `addr`: required for `minor`, "
       "optional otherwise"),
    _f("offset", "uint", False, "offset of `addr`'s mapping in `fd` (default 0)",
       units="bytes"),
)

REQUESTS: Final[dict[str, tuple[Field, ...]]] = {
    "export": (_OP, _ID, _SESSION,
               _f("token", "token", True, "the per-session secret shared with the destination"),
               _f("pid", "uint", False, "anonymous memory: read from this process with "
                  "process_vm_readv (regions give `addr`; no fds)"),
               _f("regions", "regions", True, "the source guest RAM (export region table)"),
               _f("warm_record", "uint", False, "warm restore: the index of an fd sent with "
                  "the request (not a region's), a regular file open for writing; the order "
                  "of the pages demanded is written to it once, when the export ends"),
               _f("warm_replay", "uint", False, "warm restore: the index of an fd sent with "
                  "the request (not a region's), a warm-order file read now; one that is "
                  "malformed or was recorded for other regions is refused; its pages are "
                  "streamed first, in order")),
    "import": (_OP, _ID, _SESSION,
               _f("token", "token", True, "the session's secret, as given to the export"),
               _f("peer", "str", True, "the source host's uffdd peer address, HOST:PORT"),
               _f("strategy", "str", False, "vCPU-exit strategy (default "
                  "`session.strategy`)"),
               _f("policy", "str", False, "failure policy (default `session.policy`)",
                  values=POLICIES),
               _f("deadline", "float", False, "how long a page may stay unobtainable before "
                  "the policy acts; also how long the import waits for the export to "
                  "appear (default `session.deadline`), in (0, 86400]", units="seconds"),
               _f("present", "str", False, "what pages already present in guest RAM mean: "
                  "`none` (default, there must be none), `keep` (valid data, adopted)",
                  values=PRESENT),
               _f("regions", "regions", True, "the destination guest RAM (import region "
                  "table)")),
    "prepare": (_OP, _ID, _SESSION,
                _f("file", "str", False, "page source: the snapshot memory file on this "
                   "host (absolute path; the client must be able to read it)"),
                _f("fd", "uint", False, "page source: the index of the snapshot memory "
                   "file among the fds sent with the request (`0` when it is the only one)"),
                _f("peer", "str", False, "page source: HOST:PORT of the source daemon that "
                   "exports the snapshot file"),
                _f("token", "token", False, "with `peer`: the export's secret; ignored "
                   "otherwise"),
                _f("strategy", "str", False, "vCPU-exit strategy (default "
                   "`session.strategy`)"),
                _f("policy", "str", False, "failure policy (default `session.policy`)",
                   values=POLICIES),
                _f("deadline", "float", False, "as for `import`", units="seconds"),
                _f("handover_deadline", "float", False, "how long to wait for a valid "
                   "Firecracker handover (default 60), in (0, 86400]", units="seconds"),
                _f("warm_record", "uint", False, "warm restore: the index of an fd sent with "
                   "the request, a regular file open for writing; the order of the pages "
                   "demanded is written to it once, when the restore ends (`file`/`fd` "
                   "source)"),
                _f("warm_replay", "uint", False, "warm restore: the index of an fd sent with "
                   "the request, a warm-order file read now (a malformed one is refused); "
                   "its pages are streamed first, in order (`file`/`fd` source)")),
    "status": (_OP, _ID, _f("session", "str", False, "only this session (default: every "
                            "session this connection may see)")),
    "subscribe": (_OP, _ID, _SESSION),
    "cancel": (_OP, _ID, _SESSION),
    "resolve": (_OP, _ID, _SESSION,
                _f("vcpu", "uint", True, "the vCPU that exited"),
                _f("gpa", "uint", False, "guest physical address of the access (or `addr`)"),
                _f("addr", "uint", False, "host address of the access in the VMM (or `gpa`)"),
                _f("size", "uint", True, "size of the access", units="bytes"),
                _f("access", "str", True, "kind of access", values=ACCESS),
                _f("flags", "uint", False, "KVM memory-fault exit flags (default 0)")),
    "populate-failed": (_OP, _ID, _SESSION,
                        _f("vcpu", "uint", True, "the vCPU whose populate failed"),
                        _f("gpa", "uint", False, "the verdict's gpa (or `addr`)"),
                        _f("addr", "uint", False, "the verdict's host address (or `gpa`)"),
                        _f("errno", "uint", True, "errno of MADV_POPULATE_WRITE")),
    "inject": (_OP, _ID, _f("session", "str", True, "an export session of this VMM"),
               _f("lose", "list", False, "4 KiB guest page numbers (gpa // 4096) the source "
                  "will report it cannot read (`lost` frames)"),
               _f("corrupt", "uint", False, "how many data frames to send with a wrong "
                  "checksum")),
}

#: Requests for tests only: refused (`bad-request`) unless `testing.fault_injection`.
TEST_ONLY: Final = frozenset({"inject"})

# ---------------------------------------------------------------- replies

_REPLY_ID = _f("id", "uint", True, "the request's id; nil when the request had no usable "
               "id (not an uint, or the frame was not decodable)", nullable=True)
OK_REPLY: Final = (_REPLY_ID, _f("ok", "bool", True, "true"))
ERROR_REPLY: Final = (
    _REPLY_ID,
    _f("ok", "bool", True, "false"),
    _f("error", "str", True, "the error code", values=tuple(ERRORS)),
    _f("message", "str", True, "what was wrong, for a human (names the field or limit)"),
)
_VERDICT = (
    _f("verdict", "str", True, "`resume`: resume the vCPU; `populate`: MADV_POPULATE_WRITE "
       "[addr, addr+size) then resume (report a failure with `populate-failed`); "
       "`inject-memory-error`: inject a machine check for [gpa, gpa+size); `crash`: stop "
       "the VM", values=VERDICTS),
    _f("gpa", "uint", True, "guest physical address the verdict is about"),
    _f("addr", "uint", True, "host address in the VMM the verdict is about"),
    _f("size", "uint", True, "length of the range the verdict is about", units="bytes"),
    _f("reason", "str", True, "why (a `crash` always says why)", nullable=True),
)
#: The op-specific fields of each success reply (besides `id` and `ok`).
REPLIES: Final[dict[str, tuple[Field, ...]]] = {
    "export": (_f("session", "str", True, "the session id"),
               _f("pages", "uint", True, "pages of the session", units=PAGES)),
    "import": (_f("session", "str", True, "the session id"),
               _f("pages", "uint", True, "pages of the session", units=PAGES)),
    "prepare": (_f("session", "str", True, "the session id"),
                _f("handover", "str", True, "the session's handover socket: Firecracker's "
                   "`backend_path`")),
    "status": (_f("sessions", "sessions", True, "one status entry per session"),),
    "subscribe": (),
    "cancel": (),
    "resolve": _VERDICT,
    "populate-failed": _VERDICT,
    "inject": (_f("lost", "uint", True, "how many page numbers of `lose` were taken"),
               _f("corrupt", "uint", True, "data frames that will be corrupted (this "
                  "request's)")),
}

# ---------------------------------------------------------------- counters

_C: Final[dict[str, Field]] = {c.name: c for c in (
    _f("pages_total", "uint", True, "pages of the session's regions", units=PAGES),
    _f("pages_installed", "uint", True, "pages in guest RAM", units=PAGES, by_role={
        IMPORT: "pages installed in guest RAM (on demand, by the stream, as zero, adopted "
                "as present), and pages the VMM discarded (which need no data)",
        EXPORT: "pages sent to the destination so far; at `completed` the destination's "
                "final pages_installed (it reports its tallies when done)"}),
    _f("pages_demand", "uint", True, "pages asked for", units=PAGES, by_role={
        IMPORT: "pages installed because a fault or vCPU exit asked for them (demand lane)",
        EXPORT: "pages sent on the demand lane; at `completed` the destination's"}),
    _f("pages_background", "uint", True, "pages streamed", units=PAGES, by_role={
        IMPORT: "pages installed from the bulk lanes, that nobody asked for",
        EXPORT: "pages sent on the bulk lanes; at `completed` the destination's"}),
    _f("pages_zero", "uint", True, "zero pages", units=PAGES, by_role={
        IMPORT: "pages that held only zeros at the source and were installed as zero "
                "(`zero` frames and holes of bulk frames); a part of pages_installed",
        EXPORT: "pages found to hold only zeros and sent as `zero` frames or holes; at "
                "`completed` the destination's"}),
    _f("pages_poisoned", "uint", True, "poisoned pages", units=PAGES, by_role={
        IMPORT: "pages the poison policy poisoned (UFFDIO_POISON) because they could not be "
                "obtained by the deadline",
        EXPORT: "the destination's pages_poisoned (learned from the destination)"}),
    _f("poisoned", "ranges", True, "the poisoned pages as [gpa, length in bytes] ranges "
       "(adjacent ranges merged); [] when none", by_role={
           IMPORT: "the ranges this daemon poisoned",
           EXPORT: "the destination's ranges (learned from the destination)"}),
    _f("pages_unmapped", "uint", True, "pages of the regions the VMM unmapped during the "
       "migration (see Reliability); not in pages_installed", roles=IMPORT, units=PAGES),
)}


def _counters(*names: str, required: bool = True) -> tuple[Field, ...]:
    out = []
    for name in names:
        c = _C[name]
        out.append(Field(c.name, c.type, required, c.meaning, c.roles, c.units, c.values,
                         c.nullable, c.by_role))
    return tuple(out)


_COUNTERS = ("pages_total", "pages_installed", "pages_demand", "pages_background",
             "pages_zero", "pages_poisoned")
_TERMINAL_COUNTERS = ("pages_total", "pages_installed", "pages_poisoned", "poisoned",
                      "pages_unmapped")

# ---------------------------------------------------------------- events

_EV_SESSION = _f("session", "str", True, "the session id")
_EVENT = _f("event", "str", True, "the event kind")
_REASON = _f("reason", "str", True, "why, for a human: who refused or failed, and why")
#: Events (frames with `event` and no `id`); fields marked import are sent for imports only.
EVENTS: Final[dict[str, tuple[Field, ...]]] = {
    "progress": (_EVENT, _EV_SESSION, *_counters(*_COUNTERS, "pages_unmapped")),
    "completed": (_EVENT, _EV_SESSION,
                  _f("outcome", "str", True, "`completed-with-poisoned-pages` when "
                     "pages_poisoned > 0 (the poison policy acted)", values=OUTCOMES),
                  *_counters(*_TERMINAL_COUNTERS)),
    "failed": (_EVENT, _EV_SESSION, _REASON, *_counters(*_TERMINAL_COUNTERS)),
    "cancelled": (_EVENT, _EV_SESSION, _REASON, *_counters(*_TERMINAL_COUNTERS)),
    "handover": (_EVENT, _EV_SESSION,
                 _f("pid", "uint", True, "Firecracker's pid (SO_PEERCRED)"),
                 _f("regions", "uint", True, "regions it handed over"),
                 _f("pages", "uint", True, "pages of those regions", units=PAGES)),
    "handover-refused": (_EVENT, _EV_SESSION,
                         _f("pid", "uint", True, "the connecting process (SO_PEERCRED; 0 "
                            "if unknown)"),
                         _REASON),
    "peer-refused": (_EVENT, _EV_SESSION,
                     _f("refusals", "uint", True, "wrong-token connections for this export "
                        "since it started (`peer-refused` is sent for exports only)"),
                     _REASON),
}
TERMINAL_EVENTS: Final = ("completed", "failed", "cancelled")

# ---------------------------------------------------------------- status entries

STATUS_ENTRY: Final = (
    _f("session", "str", True, "the session id"),
    _f("role", "str", True, "which side of the migration this daemon serves", values=ROLES),
    _f("state", "str", True, "`connecting` until the link to the peer is first up", values=STATES),
    *_counters(*_COUNTERS, "poisoned", "pages_unmapped"),
    _f("bytes_received", "uint", True, "page payload bytes received from the source "
       "(import; 0 on an export)", units="bytes"),
    _f("bytes_sent", "uint", True, "page payload bytes sent to the destination (export; 0 on "
       "an import)", units="bytes"),
    _f("faults", "uint", True, "fault events read from the uffds (import; 0 on an export)"),
    _f("reconnects", "uint", True, "times the link to the peer was re-established"),
    _f("started", "float", True, "when the session started", units="unix seconds"),
    _f("elapsed_seconds", "float", True, "time since the start (until the end, once ended)",
       units="seconds"),
    _f("demand_latency_p50_us", "float", True, "median time from a fault to its install "
       "(import); nil with no samples, and on an export", units="microseconds",
       nullable=True),
    _f("demand_latency_p99_us", "float", True, "99th percentile of the same",
       units="microseconds", nullable=True),
    _f("peer", "str", True, "import: the source address it dials; export: the importing "
       "daemon's address once a lane connected, nil before", nullable=True),
    _f("link", "str", True, "state of the peer link", values=LINKS),
    _f("reason", "str", True, "why it ended (nil while it runs)", nullable=True),
    _f("loop", "str", True, "which loop serves the demand path: C (libuffdd_fastpath) or "
       "the Python fallback", values=LOOPS),
    _f("strategy", "str", True, "the vCPU-exit strategy", roles=IMPORT),
    _f("policy", "str", True, "the failure policy", roles=IMPORT, values=POLICIES),
    # A prepared (Firecracker) import only:
    _f("handover", "str", False, "`prepare`: the handover socket", roles=IMPORT),
    _f("handover_state", "str", False, "`prepare`: waiting for Firecracker, accepted, or "
       "ended (Firecracker closed its socket or exited, or the session ended)",
       roles=IMPORT, values=("waiting", "accepted", "ended")),
    _f("vmm_pid", "uint", False, "`prepare`: Firecracker's pid once handed over",
       roles=IMPORT, nullable=True),
    _f("resident", "bool", False, "`prepare`: completed, and still serving the guest's "
       "faults after balloon removes (zero pages) until Firecracker exits", roles=IMPORT),
    _f("source", "str", False, "`prepare`: the page source", roles=IMPORT,
       values=("file", "peer")),
    _f("handover_refusals", "uint", False, "`prepare`: handover attempts refused",
       roles=IMPORT),
    _f("resident_faults", "uint", False, "`prepare`: faults zero-filled while resident",
       roles=IMPORT),
    _f("resident_removes", "uint", False, "`prepare`: UFFD_EVENT_REMOVEs read while "
       "resident", roles=IMPORT),
    _f("resumed", "bool", False, "`prepare`: taken back from the fd store by a restarted "
       "daemon (Firecracker handed its uffd to an earlier one)", roles=IMPORT),
    _f("warm_replay", "str", False, "`prepare` with `warm_replay`: `used`, or `ignored: "
       "<why>` (recorded for other regions); nil without one", roles=IMPORT, nullable=True),
    _f("warm_recorded_pages", "uint", False, "`prepare` or `export` with `warm_record`: "
       "demanded pages written to the record (once the export side ended; nil before)",
       nullable=True, units=PAGES),
)

#: Rules the daemon does not meet yet (issue 14 is landing): (message, field) pairs whose
#: field may be missing, or present on a role it is not defined for. The check enforces
#: each rule in full once its pair is removed from here. Messages are "status" (an entry)
#: and "event:KIND".
PENDING: Final[frozenset[tuple[str, str]]] = frozenset()


# ---------------------------------------------------------------- checking

class SchemaViolation(AssertionError):
    """A message that does not match its definition here (a bug in the side that sent it)."""


def _type_ok(value: object, type_: str) -> bool:
    if type_ == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if type_ == "uint":
        return isinstance(value, int) and value >= 0
    if type_ == "float":
        return isinstance(value, (int, float))
    if type_ == "str":
        return isinstance(value, str)
    if type_ == "token":
        return isinstance(value, (bytes, str))
    if type_ in ("list", "regions", "sessions"):
        return isinstance(value, list)
    if type_ == "ranges":
        return isinstance(value, list) and all(
            isinstance(r, list) and len(r) == 2 and all(_type_ok(x, "uint") for x in r)
            for r in value)
    raise ValueError(f"unknown wire type {type_!r}")


def check_fields(body: Mapping[str, object], fields: Sequence[Field], where: str, *,
                 role: str | None = None, pending_as: str = "") -> list[str]:
    """Problems of ``body`` against ``fields``: unknown, missing, mistyped, out of enum.

    ``role``: the session's role, when known; a field of the other role is then unknown
    and a required field of this role missing. ``pending_as``: the message's name in
    PENDING, whose rules are relaxed.
    """
    problems: list[str] = []
    known = {f.name: f for f in fields}
    tolerated: set[str] = set()  # pending: still sent on a role it is not for
    for key in body:
        f = known.get(key)
        if f is None:
            problems.append(f"{where}: unknown field {key!r}")
        elif role is not None and f.roles not in (BOTH, role):
            if (pending_as, key) in PENDING:
                tolerated.add(key)
            else:
                problems.append(f"{where}: field {key!r} is for {f.roles} sessions only, "
                                f"not {role}")
    for f in fields:
        if f.name not in body:
            of_role = role is None or f.roles in (BOTH, role)
            # An event does not name its role: its role-only fields may be absent.
            if f.required and of_role and (role is not None or f.roles == BOTH) \
                    and (pending_as, f.name) not in PENDING:
                problems.append(f"{where}: missing field {f.name!r}")
            continue
        if f.name in tolerated:
            continue
        value = body[f.name]
        if value is None:
            if not f.nullable:
                problems.append(f"{where}: field {f.name!r} must be {f.type}, not nil")
            continue
        if not _type_ok(value, f.type):
            negative = isinstance(value, int) and not isinstance(value, bool) and value < 0
            problems.append(f"{where}: field {f.name!r} must be {f.type}"
                            + (" (not negative)" if negative else "")
                            + f", not {type(value).__name__} {value!r:.40}")
        elif f.values and value not in f.values:
            problems.append(f"{where}: field {f.name!r} is {value!r}, not one of "
                            + ", ".join(repr(v) for v in f.values))
    return problems


def check_status_entry(entry: object, where: str = "status entry") -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: must be a map"]
    role = entry.get("role")
    return check_fields(entry, STATUS_ENTRY, where,
                        role=role if role in ROLES else None, pending_as="status")


def check_event(body: Mapping[str, object]) -> list[str]:
    kind = body.get("event")
    fields = EVENTS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return [f"event: unknown kind {kind!r}"]
    return check_fields(body, fields, f"event {kind!r}", pending_as=f"event:{kind}")


def check_reply(body: Mapping[str, object], op: str | None) -> list[str]:
    """Problems of a reply to ``op`` (None: unknown op, only the error shape is checked
    whole; a success reply then gets its `id`/`ok` checked and its own fields not)."""
    if body.get("ok") is False:
        return check_fields(body, ERROR_REPLY, "error reply")
    if body.get("ok") is not True:
        return [f"reply: field 'ok' must be bool, not {body.get('ok')!r}"]
    if op is None:
        return check_fields({k: v for k, v in body.items() if k in ("id", "ok")},
                            OK_REPLY, "reply")
    specific = REPLIES.get(op)
    if specific is None:
        return [f"reply to unknown op {op!r}"]
    problems = check_fields(body, (*OK_REPLY, *specific), f"reply to {op!r}")
    if body.get("id") is None:
        problems.append(f"reply to {op!r}: a success reply has the request's id, not nil")
    sessions = body.get("sessions")
    if op == "status" and isinstance(sessions, list):
        for i, entry in enumerate(sessions):
            problems += check_status_entry(entry, f"reply to 'status': sessions[{i}]")
    return problems


def check_message(body: Mapping[str, object], op: str | None = None) -> list[str]:
    """Problems of any frame the daemon sends: an event, or a reply to ``op``."""
    if "event" in body:
        return check_event(body)
    return check_reply(body, op)


def strict() -> bool:
    """Whether violations are errors (tests): ``UFFDD_STRICT_SCHEMA=1``."""
    return os.environ.get("UFFDD_STRICT_SCHEMA", "") == "1"


def record(side: str, problems: list[str], body: Mapping[str, object]) -> None:
    """Note violations where the test suite looks (``UFFDD_SCHEMA_LOG``, one JSON a line)."""
    path = os.environ.get("UFFDD_SCHEMA_LOG")
    if not path:
        return
    line = json.dumps({"side": side, "pid": os.getpid(), "problems": problems,
                       "message": repr(dict(body))[:2000]})
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        log.warning("cannot record a schema violation in %s: %s", path, e)


def validate_received(body: Mapping[str, object], op: str | None) -> None:
    """The client's check of a frame it received (strict mode only): raise on a violation."""
    if not strict():
        return
    problems = check_message(body, op)
    if problems:
        record("client", problems, body)
        raise SchemaViolation("the daemon sent a frame that violates uffdd/schema.py: "
                              + "; ".join(problems))


# ---------------------------------------------------------------- reference (README)

BEGIN: Final = "<!-- generated by uffdd.schema: begin (python -m uffdd.schema) -->"
END: Final = "<!-- generated by uffdd.schema: end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(fields: Sequence[Field], *, roles: bool = False) -> list[str]:
    head = "| field | type | required | " + ("roles | " if roles else "") + "meaning |"
    lines = [head, "| --- " * (head.count("|") - 1) + "|"]
    for f in fields:
        type_ = f.type + (" \\| nil" if f.nullable else "")
        meaning = f.meaning
        if f.values:
            meaning += "; one of " + ", ".join(f"`{v}`" for v in f.values)
        if f.units:
            meaning += f" ({f.units})"
        for role, text in f.by_role.items():
            meaning += f"<br>**{role}**: {text}"
        req = "yes" if f.required else "no"
        role_cell = f"{f.roles} | " if roles else ""
        lines.append(f"| `{f.name}` | {type_} | {req} | {role_cell}{_cell(meaning)} |")
    return lines


def reference() -> str:
    """The README's generated wire reference (between BEGIN and END)."""
    out = [BEGIN, "", "Wire types: " + "; ".join(f"`{k}` = {v}" for k, v in TYPES.items())
           + ".", "", "Every `pages_*` counter counts pages of the region's own page size (a "
           "2 MiB hugetlb page counts once).", "", "##### Error codes", "",
           "| code | meaning |", "| --- | --- |"]
    out += [f"| `{code}` | {_cell(text)} |" for code, text in ERRORS.items()]
    for op, fields in REQUESTS.items():
        note = " (for tests only: refused unless `testing.fault_injection`)" \
            if op in TEST_ONLY else ""
        out += ["", f"##### Request `{op}`{note}", "", *_table(fields)]
        reply = REPLIES[op]
        out += ["", f"Reply to `{op}`: `id`, `ok` and "
                + (", ".join(f"`{f.name}`" for f in reply) if reply else "nothing else")]
        if reply:
            out += ["", *_table(reply)]
    out += ["", "##### Region tables", "", "`export` regions:", "", *_table(EXPORT_REGION),
            "", "`import` regions:", "", *_table(IMPORT_REGION),
            "", "##### Error reply", "", *_table(ERROR_REPLY),
            "", "##### Status entry (`status` reply, `sessions`)", "",
            *_table(STATUS_ENTRY, roles=True)]
    for kind, fields in EVENTS.items():
        out += ["", f"##### Event `{kind}`", "", *_table(fields, roles=True)]
    out += ["", END]
    return "\n".join(out) + "\n"


def main() -> None:
    print(reference(), end="")


if __name__ == "__main__":
    main()
