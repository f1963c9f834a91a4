"""Per-thread CPU and run-queue wait of the processes of one measurement (lab only).

``uffdd bench --thread-profile`` samples ``/proc/<pid>/task/<tid>/schedstat`` (CPU time
and time spent runnable but waiting for a CPU, both in ns) of the daemons, the VMMs and
QEMU every 50 ms while a migration runs, and reports each thread's share of a window
(switchover to every page present). On a host with more runnable threads than CPUs the
demand path's cost is mostly the second figure: a woken fault loop or demand lane that
waits for a CPU. Threads are named by the daemon (``uffdd.threads.thread_name``),
by QEMU (``CPU 0/KVM``, ``live_migration``...) and by the test VMMs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

INTERVAL: Final = 0.05
# Trio names an idle pooled thread so; a thread's last other name is the one reported.
_POOLED: Final = "Trio thread"


@dataclass
class _Sample:
    at: float
    stats: dict[tuple[int, int], tuple[float, float]]  # (pid, tid) -> (cpu s, runq wait s)


@dataclass
class ThreadSampler:
    """Samples every thread of the processes whose name starts with one of ``comms``."""

    comms: tuple[str, ...]
    samples: list[_Sample] = field(default_factory=list)
    names: dict[tuple[int, int], str] = field(default_factory=dict)
    processes: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ThreadSampler:
        if not self.comms:  # nothing to sample: no thread
            return self
        self._thread = threading.Thread(target=self._run, name="threadprof", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def label(self, pid: int, name: str) -> None:
        """Report process ``pid`` as ``name`` (e.g. "source daemon")."""
        self.processes[pid] = name

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(_Sample(time.time(), self._read()))
            self._stop.wait(INTERVAL)

    def _read(self) -> dict[tuple[int, int], tuple[float, float]]:
        out: dict[tuple[int, int], tuple[float, float]] = {}
        for pid in _pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                if not comm.startswith(self.comms):
                    continue
                if pid not in self.processes:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    self.processes[pid] = _describe(comm, [a.decode(errors="replace")
                                                           for a in argv if a])
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in map(int, tids):
                stat = _schedstat(pid, tid)
                if stat is None:
                    continue
                out[(pid, tid)] = stat
                name = _thread_comm(pid, tid)
                if name and (not name.startswith(_POOLED) or (pid, tid) not in self.names):
                    self.names[(pid, tid)] = name
        return out

    def window(self, start: float, end: float) -> list[dict[str, object]]:
        """Each (process, thread name) with its CPU and run-queue wait in [start, end],
        busiest first; threads under 10 ms of either are left out. A thread's figures
        are its last sample in the window against its last one before it (0 for a
        thread born inside), so a thread that ended inside the window still counts."""
        at_start: dict[tuple[int, int], tuple[float, float]] = {}
        at_end: dict[tuple[int, int], tuple[float, float]] = {}
        for sample in self.samples:
            if sample.at <= start:
                at_start.update(sample.stats)
            if sample.at <= end + INTERVAL:
                at_end.update(sample.stats)
        rows: dict[tuple[str, str], list[float]] = {}
        for key, (cpu, wait) in at_end.items():
            cpu0, wait0 = at_start.get(key, (0.0, 0.0))
            if cpu - cpu0 < 0.01 and wait - wait0 < 0.01:
                continue
            row = rows.setdefault((self.processes.get(key[0], "?"),
                                   self.names.get(key, "?")), [0.0, 0.0, 0])
            row[0] += cpu - cpu0
            row[1] += wait - wait0
            row[2] += 1
        return [{"process": p, "thread": t, "threads": int(n), "cpu_s": round(c, 3),
                 "runq_wait_s": round(w, 3)}
                for (p, t), (c, w, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])]


def _pids() -> Iterable[int]:
    return (int(p) for p in os.listdir("/proc") if p.isdigit())


def _schedstat(pid: int, tid: int) -> tuple[float, float] | None:
    try:
        cpu, wait, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return None
    return int(cpu) / 1e9, int(wait) / 1e9


def _thread_comm(pid: int, tid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return None


def _describe(comm: str, argv: list[str]) -> str:
    """A short, machine-independent name for a process: no paths. The bench's daemons
    are told apart by their socket's name, QEMU's two by their ``-name`` (its last
    ``-src``/``-dst`` part)."""
    if "uffdd" in argv and "serve" in argv:
        line = " ".join(argv)
        for role in ("destination", "source"):
            if role in line:
                return f"uffdd {role} daemon"
        return "uffdd daemon"
    if "-name" in argv[:-1]:
        name = argv[argv.index("-name") + 1].split(",")[0]
        return f"qemu {name.rsplit('-', 1)[-1]}"
    words = [os.path.basename(a) for a in argv[:3] if not a.startswith("-")]
    return " ".join(words) or comm
