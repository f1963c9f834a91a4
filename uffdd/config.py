"""The daemon's configuration: TOML file, documented defaults, command-line overrides.

A wrong config (unknown key, wrong type, unreadable file) is refused at start with a
ConfigError that names the file and the key. The defaults below are the reference: the
README's configuration table and ``deploy/uffdd.toml`` document the same values.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from uffdd import _fastpath
from uffdd.errors import ConfigError


@dataclass(frozen=True)
class ApiConfig:
    """[api]: the VMM API socket and who may use it."""

    socket: str = "/run/uffdd/vmm.sock"
    socket_mode: str = "0660"
    allowed_uids: list[int] = field(default_factory=lambda: [0])
    allowed_gids: list[int] = field(default_factory=list)
    # Owner and group of the socket file (name or number; "" keeps the daemon's).
    socket_owner: str = ""
    socket_group: str = ""
    # Firecracker handovers (op "prepare"): one socket per prepared session,
    # <handover_dir>/<session>.sock, with the API socket's mode, owner and group.
    handover_dir: str = "/run/uffdd/handover"


@dataclass(frozen=True)
class PeerConfig:
    """[peer]: the TCP link between daemons."""

    listen: str = "0.0.0.0:4460"
    connect_timeout: float = 5.0
    bulk_lanes: int = 1
    # Bulk frame size the destination asks for. 2 MiB: an eighth of the hand-offs
    # between the bulk receiver and the fault thread of 256 KiB (bulk +35-50%, destination
    # CPU -25% measured); installs still go 256 KiB at a time (faultloop._BULK_SLICE).
    chunk_bytes: int = 2097152
    integrity: bool = True
    # MINOR mode, C fault loop: bulk pages are received straight into the memory fd
    # (one copy instead of two), CRC checked there, then CONTINUE'd (README, MINOR mode).
    # Off by default: on 2 cores it measured 0.80-0.97x the two-copy path's GB/s for
    # 7-10% less destination CPU (the receiver thread then pays shmem's page allocation,
    # the copy and the CRC alone; with two copies the fault thread takes the second copy).
    zero_copy: bool = False
    reconnect_max_delay: float = 2.0
    # The source streams pages nobody asked for yet. Off only for benchmarks that
    # measure the demand path alone (the destination then completes only once every
    # page was faulted); honoured by the export side.
    background: bool = True
    # The C loops busy-poll this long (µs) for a demand reply (destination, only while
    # one is due) or the next request (source, after answering) before sleeping: waking
    # an idle CPU costs 25-40 µs on some machines. 0 never spins; an idle session never
    # spins. Measured with the C loops (README, Performance): fault p50 29 µs at 50
    # against 85 µs at 0, and the 2 GiB migration 3.4 s against 4.6 s. The Python loops
    # never spin (from Python, sharing the GIL with the bulk threads, it measured worse).
    spin_us: int = 50
    # The scheduler slice (µs) the demand threads ask for (the destination's fault loop,
    # the source's demand lane; uffdd/_linux/sched.py): short, so a woken demand thread
    # preempts a busy CPU at once rather than after the running task's slice (~1.4-3 ms),
    # without a larger CPU share. 0 (the default) leaves the kernel's slice: 100 against
    # 0 measured within noise on 2 cores, idle or loaded (README, Performance), so it
    # is a knob for hosts where demand threads queue behind many runnable ones.
    demand_slice_us: int = 0
    # The demand path's loops in C (native/fastpath, uffdd/_fastpath.py): "auto" uses
    # them when libuffdd_fastpath is built, "on" refuses to start without it, "off"
    # runs the Python loops. Plaintext lanes only: TLS lanes always use Python.
    fastpath: str = "auto"
    stall_timeout: float = 10.0
    # DSCP of the demand lane's packets, both directions (README, Configuration): EF
    # (expedited forwarding, 46) by default, a class name from DSCP_CLASSES, or "off".
    # With a class set, the lane's sockets also get SO_PRIORITY 6 (TC_PRIO_INTERACTIVE:
    # band 0 of a prio or pfifo_fast qdisc), so a host's own queues send it first.
    demand_dscp: str = "ef"
    # Mutual TLS (README, Security). tls unset: TLS when ca/cert/key are given, else
    # plaintext only for a daemon whose listener is on loopback; false: plaintext,
    # explicitly (warned at start); true: TLS, and ca/cert/key are required.
    tls: bool | None = None
    ca: str = ""
    cert: str = ""
    key: str = ""
    # Names (subjectAltName DNS/IP, else CN) a peer certificate must carry; [] = any.
    peer_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the Prometheus endpoint ("" disables it)."""

    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class SessionConfig:
    """[session]: defaults for sessions whose VMM does not choose."""

    strategy: str = "continue-then-populate"
    policy: str = "crash"
    deadline: float = 30.0
    kill_grace: float = 5.0


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]: bounds against abuse and runaway memory."""

    max_sessions: int = 64
    max_frame_bytes: int = 1048576
    max_fds_per_request: int = 64
    max_outstanding_requests: int = 4096
    handshake_timeout: float = 5.0
    max_connections: int = 256
    max_connections_per_peer: int = 16
    # API connections one client process (SO_PEERCRED pid) may hold at once. Per pid,
    # not per uid: every VMM on a host often runs as the same uid (root), and a share
    # per uid would let one tenant lock all the others out. See README, Security.
    max_connections_per_client: int = 32
    # Seconds a reply or event may take to be written to a VMM; a VMM that reads
    # nothing for that long is dropped (its connection closed, its sessions go on).
    send_timeout: float = 10.0
    # Bounds of the handover (README, Security). Every region may cost a mapping: 256
    # per request times max_sessions stays far below vm.max_map_count (65530), and a
    # VMM has a few RAM blocks (QEMU: one per DIMM slot at most). Every page costs about
    # a byte of state on each side, so 2^27 pages are ~128 MiB (512 GiB of 4 KiB pages,
    # 256 TiB of 2 MiB pages) and 2^28 ~256 MiB.
    max_regions_per_request: int = 256
    max_pages_per_session: int = 1 << 27
    max_pages_per_daemon: int = 1 << 28


@dataclass(frozen=True)
class LogConfig:
    """[log]: log level (debug, info, warning, error)."""

    level: str = "info"


@dataclass(frozen=True)
class TestingConfig:
    """[testing]: fault injection for demos, tests and chaos runs (never in production)."""

    fault_injection: bool = False


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    api: ApiConfig = field(default_factory=ApiConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)


_SECTION_TYPES: dict[str, type[Any]] = {
    "api": ApiConfig,
    "peer": PeerConfig,
    "metrics": MetricsConfig,
    "session": SessionConfig,
    "limits": LimitsConfig,
    "log": LogConfig,
    "testing": TestingConfig,
}


_STR_LISTS = frozenset({"peer_names"})


def _check_value(where: str, expected: object, value: object) -> object:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (int, float, str, bool):
        assert isinstance(expected, type)
        if type(value) is not expected:
            raise ConfigError(f"{where}: must be {expected.__name__}, not {type(value).__name__}")
        return value
    if expected == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of strings")
        return value
    # list[int]
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(f"{where}: must be a list of integers")
    return value


def _section(name: str, raw: object, source: str) -> Any:
    cls = _SECTION_TYPES[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, object] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'")
        expected = _field_type(cls, key)
        if value is None and getattr(cls(), key) is None:
            kwargs[key] = None  # an optional key left unset (a Config turned back into a dict)
            continue
        kwargs[key] = _check_value(f"{source}: key '{name}.{key}'", expected, value)
    return cls(**kwargs)


def _field_type(cls: type[Any], key: str) -> object:
    default = cls()
    value = getattr(default, key)
    if value is None:  # optional bool (peer.tls): unset means "decide from other keys"
        return bool
    if isinstance(value, list):
        return "list[str]" if key in _STR_LISTS else list
    return type(value)


def from_dict(raw: dict[str, object], source: str = "<config>") -> Config:
    """Build a Config from parsed TOML, refusing unknown keys and wrong types."""
    sections: dict[str, object] = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(f"{source}: unknown section or key '{name}'")
        sections[name] = _section(name, value, source)
    config = Config(**sections)  # type: ignore[arg-type]
    _check_semantics(config, source)
    return config


def load(path: str | None) -> Config:
    """Read the config file (or return the defaults when ``path`` is None)."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(raw, path)


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: ``lo``..``hi``; ``lo_open`` excludes ``lo``."""

    lo: float
    hi: float
    lo_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        if value != value:  # NaN compares false with everything: refused explicitly
            return False
        return (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


_DAY = 86400.0
_UID_MAX = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel, never a real uid
#: Every numeric key of the config and the values it may take, checked in one place
#: (``check_ranges``). A numeric key missing here is a bug: tests/test_hostile_edge.py
#: checks that every int and float field has its row.
RANGES: dict[str, Range] = {
    "api.allowed_uids": Range(0, _UID_MAX),
    "api.allowed_gids": Range(0, _UID_MAX),
    "peer.connect_timeout": Range(0, 3600, lo_open=True),
    "peer.bulk_lanes": Range(1, 64),
    "peer.chunk_bytes": Range(4096, 64 << 20),
    "peer.reconnect_max_delay": Range(0, 3600, lo_open=True),
    "peer.spin_us": Range(0, 1_000_000),
    "peer.demand_slice_us": Range(0, 100_000),
    "peer.stall_timeout": Range(0, _DAY),  # 0 turns stall detection off
    "session.deadline": Range(0, _DAY, lo_open=True),  # the API's 'deadline' field agrees
    "session.kill_grace": Range(0, 3600),
    "limits.max_sessions": Range(1, 65536),
    "limits.max_frame_bytes": Range(4096, 1 << 30),
    # SCM_MAX_FD: the kernel never passes more than 253 fds in one message.
    "limits.max_fds_per_request": Range(1, 253),
    "limits.max_outstanding_requests": Range(1, 1 << 20),
    "limits.handshake_timeout": Range(0, 3600, lo_open=True),
    "limits.max_connections": Range(1, 65536),
    "limits.max_connections_per_peer": Range(1, 65536),
    "limits.max_connections_per_client": Range(1, 65536),
    "limits.send_timeout": Range(0, 3600, lo_open=True),
    "limits.max_regions_per_request": Range(1, 65536),
    # No address space holds more than 2^57 bytes, 2^45 pages of 4 KiB.
    "limits.max_pages_per_session": Range(1, 1 << 45),
    "limits.max_pages_per_daemon": Range(1, 1 << 45),
}


def check_ranges(config: Config, source: str) -> None:
    """Every numeric value within its row of RANGES; the message names file, key, range."""
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        for item in value if isinstance(value, list) else [value]:
            if item not in allowed:
                raise ConfigError(f"{source}: key '{key}' = {item!r} is out of range: "
                                  f"must be in {allowed}")


def _check_semantics(config: Config, source: str) -> None:
    check_ranges(config, source)
    if config.session.policy not in ("crash", "poison"):
        raise ConfigError(f"{source}: key 'session.policy' must be 'crash' or 'poison'")
    # The default strategy is loaded now, so a bad one stops the daemon at start, not at
    # the first vCPU exit of some session.
    from uffdd import strategies  # here: strategies may import third-party code

    try:
        strategies.load(config.session.strategy)
    except ConfigError as e:
        raise ConfigError(f"{source}: key 'session.strategy': {e}") from None
    try:
        int(config.api.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"{source}: key 'api.socket_mode' must be an octal string") from None
    if not config.api.handover_dir.startswith("/"):
        raise ConfigError(f"{source}: key 'api.handover_dir' must be an absolute path")
    for key in ("peer.listen", "metrics.listen"):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value and not is_host_port(value):
            raise ConfigError(f"{source}: key '{key}' must be HOST:PORT, not {value!r}")
    try:
        _fastpath.load(config.peer.fastpath)
    except ConfigError as e:
        raise ConfigError(f"{source}: key 'peer.fastpath': {e}") from None
    if config.peer.demand_dscp != "off" and config.peer.demand_dscp not in DSCP_CLASSES:
        raise ConfigError(f"{source}: key 'peer.demand_dscp' must be off, ef, cs0-cs7 or "
                          f"af11-af43, not {config.peer.demand_dscp!r}")
    if config.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{source}: key 'log.level' must be debug, info, warning or error")


#: ``[peer] demand_dscp`` names and their DSCP values (RFC 2474, 2597, 3246).
DSCP_CLASSES: dict[str, int] = {
    "ef": 46, **{f"cs{n}": n << 3 for n in range(8)},
    **{f"af{c}{d}": (c << 3) | (d << 1) for c in range(1, 5) for d in range(1, 4)},
}


def demand_dscp(peer: PeerConfig) -> int | None:
    """The DSCP value the demand lane is marked with, or None for ``"off"``."""
    if peer.demand_dscp == "off":
        return None
    return DSCP_CLASSES[peer.demand_dscp]


def check_peer_security(peer: PeerConfig, source: str) -> None:
    """The peer link is TLS unless the config says plaintext explicitly (or is loopback).

    Checked when the daemon starts, on the final configuration (command-line
    overrides such as --peer-listen included), not when the file is read.
    """
    files = {"peer.ca": peer.ca, "peer.cert": peer.cert, "peer.key": peer.key}
    if peer.tls is True or (peer.tls is None and any(files.values())):
        missing = [key for key, value in files.items() if not value]
        if missing:
            raise ConfigError(f"{source}: mutual TLS needs {', '.join(missing)} as well")
        return
    if peer.tls is None and not is_loopback_host(split_host_port(peer.listen)[0]):
        raise ConfigError(
            f"{source}: peer.listen {peer.listen} is reachable from other hosts but no "
            "certificates are configured: set peer.ca, peer.cert and peer.key for mutual "
            "TLS, or peer.tls = false to run the peer link in plaintext explicitly")


def is_loopback_host(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_host_port(value: str) -> bool:
    """True for 'host:port' and '[v6]:port' with a port in 0..65535."""
    host, sep, port = value.rpartition(":")
    return bool(sep) and bool(host) and port.isdigit() and 0 <= int(port) < 65536


def split_host_port(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    """(host, port) -> 'host:port', or '[v6]:port' for an IPv6 host (split_host_port's
    inverse)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def override(config: Config, **changes: dict[str, object]) -> Config:
    """Return a copy with some section fields replaced (command-line flags)."""
    sections: dict[str, object] = {}
    for section, values in changes.items():
        if values:
            sections[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **sections)  # type: ignore[arg-type]
