"""What every bench scenario module shares (``bench``, ``bench_concurrent``,
``versus_qemu``): the result type, the error a scenario raises, and the small helpers
that read a daemon and fold repeated runs. It imports no scenario, so the scenario
modules and ``bench`` depend on it and not on each other.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from uffdd._linux.mem import MADV_POPULATE_WRITE, buffer_address, madvise
from uffdd.client import Client, ClientError
from uffdd.lab import harness

Result = dict[str, object]


class BenchError(RuntimeError):
    """A scenario could not run (a tool is missing, a migration failed)."""


class DaemonPair(Protocol):
    """Two fresh daemons for one measurement (``bench.Pair``)."""

    src: harness.DaemonProcess
    dst: harness.DaemonProcess

    def snapshot(self) -> None: ...
    def usage(self) -> dict[str, dict[str, float]]: ...
    def stop(self) -> None: ...


class BenchHost(Protocol):
    """What a scenario module needs of the bench (``bench.Bench``)."""

    args: argparse.Namespace
    repeat: int
    workdir: Path
    vmsim: Path | None

    def say(self, text: str) -> None: ...
    def pair(self, *, background: bool, demand_dscp: str | None = None,
             zero_copy: bool | None = None) -> DaemonPair: ...
    def repeated(self, fn: Callable[[], Result]) -> Result: ...
    def warm_mib(self, memory: int) -> int: ...


def warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` so the guest RAM allocated next is backed by the host.

    These test machines are VMs with free page reporting: a page freed a while ago
    costs tens of µs at its next first touch (refbench README), which a fresh guest's
    installs would pay. refbench touches and frees twice its working set before it
    measures (``-w``); the bench does the same in the destination VMM so the ratios
    compare like with like (``--no-warm`` measures cold).
    """
    if nbytes <= 0:
        return
    scratch = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        madvise(buffer_address(scratch), nbytes, MADV_POPULATE_WRITE)
    finally:
        scratch.close()


def session_status(d: harness.DaemonProcess, session: str) -> Result:
    """The daemon's status entry of ``session`` ({} when it cannot say)."""
    try:
        with Client(d.api_socket, timeout=10) as c:
            sessions = c.status(session)
    except ClientError:
        return {}
    return sessions[0] if sessions else {}


def scrape(d: harness.DaemonProcess, metric: str) -> float | None:
    """One unlabelled counter from a daemon's /metrics (None when not exported)."""
    if not d.metrics_port:
        return None
    try:
        text = d.metrics_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(metric + " "):
            return round(float(line.split()[1]), 3)
    return None


def ratio(mine: object, ref: object) -> float | None:
    if not isinstance(mine, int | float) or not isinstance(ref, int | float) or not ref:
        return None
    return round(float(mine) / float(ref), 2)


def median_dict(runs: list[Result]) -> Result:
    """Median of every numeric field over runs (nested dicts too); other fields from run 0."""
    if len(runs) == 1:
        return dict(runs[0])
    out: Result = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        numbers = [float(v) for v in values
                   if isinstance(v, int | float) and not isinstance(v, bool)]
        dicts = [v for v in values if isinstance(v, dict)]
        if len(numbers) == len(values):
            out[key] = round(statistics.median(numbers), 3)
        elif len(dicts) == len(values):
            out[key] = median_dict(dicts)
        else:
            out[key] = first
    return out
