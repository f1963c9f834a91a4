"""``uffdd bench --scenario concurrent``: a host being evacuated.

1, 4 and 8 migrations of 512 MiB at once through one pair of daemons (``--quick``: 1
and 2 of 16 MiB), each its own vmsim source and destination, started together. For
each width it reports the aggregate throughput, each session's time and their spread
(slowest / fastest: fairness), the demand p99 across sessions (the worst and the
median of the sessions' own p99), the daemons' CPU seconds per GiB moved and the RSS
each session adds to each daemon. The ratio that matters, aggregate throughput at N
against one migration, comes from the same run.
"""

from __future__ import annotations

import secrets
import statistics
import time

from uffdd.lab import harness
from uffdd.lab.benchkit import BenchError, BenchHost, DaemonPair, Result, session_status

FULL_WIDTHS = (1, 4, 8)
QUICK_WIDTHS = (1, 2)
FULL_MEMORY = 512 << 20
QUICK_MEMORY = 16 << 20


def concurrent(bench: BenchHost) -> Result:
    widths = QUICK_WIDTHS if bench.args.quick else FULL_WIDTHS
    memory = QUICK_MEMORY if bench.args.quick else FULL_MEMORY
    rows: dict[str, Result] = {}
    for n in widths:
        rows[str(n)] = bench.repeated(lambda n=n: _width(bench, n, memory))  # type: ignore[misc]
    one = rows[str(widths[0])].get("aggregate_gb_per_s")
    for n in widths:
        agg = rows[str(n)].get("aggregate_gb_per_s")
        rows[str(n)]["ratio_to_one"] = (round(float(agg) / float(one), 3)  # type: ignore[arg-type]
                                        if agg and one else None)
    return {"memory_mib": memory >> 20, "threads_per_vm": 2, "order": "rand",
            "widths": rows}


def _width(bench: BenchHost, n: int, memory: int) -> Result:
    p = bench.pair(background=True)
    try:
        return _migrate_together(bench, p, n, memory)
    finally:
        p.stop()


def _migrate_together(bench: BenchHost, p: DaemonPair, n: int, memory: int) -> Result:

    if bench.vmsim is None:
        raise BenchError("native/build/uffdd-vmsim is not built: run make -C native")
    vmsim = str(bench.vmsim)
    sessions = [(f"evac{i}-{secrets.token_hex(3)}", secrets.token_hex(16), str(100 + i))
                for i in range(n)]
    sources = []
    for session, token, seed in sessions:
        ready = bench.workdir / f"{session}.ready"
        common = ["--session", session, "--token", token, "--memory", str(memory),
                  "--backing", "anon", "--seed", seed]
        sources.append(harness.start_vmm(
            [vmsim, "source", *common, "--socket", p.src.api_socket, "--ready-file",
             str(ready), "--threads", "2"], "source", bench.workdir, ready))
    for s in sources:
        s.wait_ready()
    p.snapshot()
    t0 = time.monotonic()
    dests = [harness.start_vmm(
        [vmsim, "dest", "--session", session, "--token", token, "--memory", str(memory),
         "--backing", "anon", "--seed", seed, "--socket", p.dst.api_socket, "--peer",
         p.src.peer, "--mode", "missing", "--threads", "2", "--order", "rand"],
        "dest", bench.workdir) for session, token, seed in sessions]
    results = [d.result(900) for d in dests]
    wall = time.monotonic() - t0
    for (session, _, _), d, s in zip(sessions, results, sources, strict=True):
        src = s.result(60)
        if not d.get("verified") or d.get("hash") != src.get("hash"):
            raise BenchError(f"session {session} not verified: dest={d} source={src}")
    usage = p.usage()
    seconds = [float(d["seconds"]) for d in results]  # type: ignore[arg-type]
    p99 = [v for v in (session_status(p.dst, s).get("demand_latency_p99_us")
                       for s, _, _ in sessions) if isinstance(v, int | float)]
    gib = n * memory / (1 << 30)
    return {
        "sessions": n, "wall_seconds": round(wall, 3),
        "aggregate_gb_per_s": round(n * memory / wall / 1e9, 3),
        "session_seconds": [round(s, 3) for s in seconds],
        "fairness_slowest_over_fastest": round(max(seconds) / min(seconds), 3),
        "demand_p99_us_worst": max(p99) if p99 else None,
        "demand_p99_us_median": statistics.median(p99) if p99 else None,
        "cpu_s_per_gib": {k: round(float(v["cpu_s"]) / gib, 3) for k, v in usage.items()},
        "peak_rss_mib": {k: v["peak_rss_mib"] for k, v in usage.items()},
        "peak_rss_mib_per_session": {k: round(float(v["peak_rss_mib"]) / n, 1)
                                     for k, v in usage.items()},  # the daemon's base included
    }
