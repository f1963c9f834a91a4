"""Two hosts on one machine: a network namespace per side, joined by a veth pair.

``uffdd bench --link veth[,rate=10gbit]`` and ``uffdd demo --link ...`` run the source
daemon in one namespace and the destination daemon in the other, so the peer link is
a real TCP connection between two network stacks over a (virtual) wire, not loopback.
The namespaces' addresses are their own (10.201.N.1 and .2 on a /30), made here and
removed with the namespaces. ``rate`` shapes both ends with a token bucket
(``tc qdisc ... tbf``); this kernel has no ``netem``, so added latency, where wanted,
goes through :mod:`uffdd.lab.faultproxy`.

Under the token bucket sits a priority qdisc (``pfifo_fast``, prio's three bands and
priomap: this kernel has no ``sch_prio``), so the packets the daemons mark for the
demand lane (``[peer] demand_dscp``: SO_PRIORITY 6, band 0) leave before the bulk
lanes' (band 1), as a network with priority queues would send them. ``fifo`` keeps
tbf's own single FIFO instead, for the comparison: ``veth,rate=1gbit,fifo``.
``latency=MS`` is tbf's queue bound (default 50 ms), which only the FIFO uses (the
bands are queues of the device's txqueuelen packets).

The VMM API sockets are Unix sockets in the filesystem, which a network namespace does
not separate: the VMMs stay where they are and reach both daemons.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000

_RATE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit|tbit)$")
_LATENCY = re.compile(r"^\d+(\.\d+)?(us|ms)$")
_OPTIONS = "rate=<N>(bit|kbit|mbit|gbit), fifo, latency=<N>(us|ms)"


class LinkError(RuntimeError):
    """The namespaces or the veth pair could not be made (not root, no iproute2)."""


@dataclass(frozen=True)
class LinkSpec:
    """``veth``, ``veth,rate=10gbit`` or ``veth,rate=1gbit,fifo``: what ``--link`` asks
    for (``fifo``: tbf's single queue, no priority bands; ``latency``: tbf's bound)."""

    rate: str | None = None
    fifo: bool = False
    latency: str | None = None

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        kind, _, rest = text.partition(",")
        if kind != "veth":
            raise ValueError(f"--link {text!r}: the only kind is 'veth'")
        rate, fifo, latency = None, False, None
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key == "rate" and _RATE.match(value):
                rate = value
            elif key == "latency" and _LATENCY.match(value):
                latency = value
            elif item == "fifo":
                fifo = True
            else:
                raise ValueError(f"--link {text!r}: options are {_OPTIONS}")
        if rate is None and (fifo or latency is not None):
            raise ValueError(f"--link {text!r}: fifo and latency shape a link: give rate= too")
        return cls(rate, fifo, latency)

    def __str__(self) -> str:
        parts = ["veth"]
        if self.rate is not None:
            parts.append(f"rate={self.rate}")
        if self.latency is not None:
            parts.append(f"latency={self.latency}")
        if self.fifo:
            parts.append("fifo")
        return ",".join(parts)


@dataclass
class VethLink:
    """Two namespaces, ``source`` and ``dest``, and a veth pair between them."""

    spec: LinkSpec = field(default_factory=LinkSpec)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: int = field(default_factory=lambda: secrets.randbelow(250) + 1)
    _made: list[str] = field(default_factory=list)

    @property
    def source_ns(self) -> str:
        return f"uffdd-{self.tag}-src"

    @property
    def dest_ns(self) -> str:
        return f"uffdd-{self.tag}-dst"

    @property
    def source_host(self) -> str:
        return f"10.201.{self.subnet}.1"

    @property
    def dest_host(self) -> str:
        return f"10.201.{self.subnet}.2"

    def prefix(self, netns: str) -> list[str]:
        """The command prefix that runs a program inside ``netns``."""
        return netns_prefix(netns)

    def __enter__(self) -> VethLink:
        if shutil.which("ip") is None:
            raise LinkError("--link veth needs iproute2 ('ip'), which is not installed")
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def source_dev(self) -> str:
        return f"u{self.tag}a"

    @property
    def dest_dev(self) -> str:
        return f"u{self.tag}b"

    def _make(self) -> None:
        a, b = self.source_dev, self.dest_dev
        for ns in (self.source_ns, self.dest_ns):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        for dev, ns, host in ((a, self.source_ns, self.source_host),
                              (b, self.dest_ns, self.dest_host)):
            _ip("link", "set", dev, "netns", ns)
            # No IPv6 link-local address: the link carries the migration's packets only
            # (no neighbour discovery), so the queues' counters are the daemons' own.
            _ip("-n", ns, "link", "set", dev, "addrgenmode", "none")
            _ip("-n", ns, "addr", "add", f"{host}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            if self.spec.rate is not None:
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
                     "rate", self.spec.rate, "burst", "1mb",
                     "latency", self.spec.latency or "50ms")
                if not self.spec.fifo:  # this kernel has no sch_prio; pfifo_fast's 3
                    # bands and priomap are prio's defaults: SO_PRIORITY 6 -> band 0
                    _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1",
                         "handle", "10:", "pfifo_fast")

    def tcp_marks(self, netns: str) -> list[tuple[str, str, int, int]]:
        """The established TCP connections in ``netns`` as the kernel reports them
        (``ss -tn --tos``): (local, peer, TOS byte, SO_PRIORITY) for each."""
        done = subprocess.run([*netns_prefix(netns), "ss", "-tnH", "--tos", "state",
                               "established"], capture_output=True, text=True, check=False,
                              timeout=30)
        if done.returncode != 0:
            raise LinkError(f"ss in {netns}: {done.stderr.strip()}")
        out = []
        for line in done.stdout.splitlines():
            fields = line.split()
            tos = re.search(r"\btos:(0x[0-9a-f]+|\d+)", line)
            prio = re.search(r"\bclass_id:(0x[0-9a-f]+|\d+)", line)
            if len(fields) >= 4 and tos and prio:
                out.append((fields[2], fields[3], int(tos.group(1), 0), int(prio.group(1), 0)))
        return out

    def close(self) -> None:
        """Remove both namespaces (the veth pair goes with them); idempotent."""
        while self._made:
            ns = self._made.pop()
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _ip(*args: str) -> None:
    _run("ip", *args)


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise LinkError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


def netns_prefix(netns: str) -> list[str]:
    """The command prefix that runs a program inside network namespace ``netns``."""
    return ["ip", "netns", "exec", netns]


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that entered ``netns`` (setns(2) moves only the calling
    thread, which then ends), so its sockets reach what listens there: a daemon's
    metrics endpoint on its namespace's own address, say."""
    out: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise LinkError(f"setns {netns}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            errors.append(e)

    thread = threading.Thread(target=body, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]
