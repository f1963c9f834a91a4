"""``uffdd bench``: the data path measured against this machine's limits and the peers.

Every scenario runs real daemons (``uffdd serve`` child processes) on loopback with the
native VMM stand-in (``native/build/uffdd-vmsim``) and, when ``--refbench DIR`` names the
C yardstick's sources, runs the matching reference program in the same invocation and
reports uffdd / reference. The machine is noisy (2 vCPUs, 25-40 µs to wake an idle one),
so ratios from one invocation mean more than absolute figures; ``--repeat`` takes medians.

Each scenario starts a fresh pair of daemons, so the CPU time and peak RSS read from
/proc at its end belong to that scenario alone.

Size: over 500 lines: the scenarios share one ``Bench`` (daemon pairs, the yardstick,
medians, the table); the ones with machinery of their own live apart
(``bench_concurrent``, ``versus_qemu``), and take the bench as ``benchkit.BenchHost``
with the helpers of ``benchkit``, so they do not import this module.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import random
import re
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from uffdd._linux import uffd
from uffdd._linux.mem import buffer_address
from uffdd.client import Client, ClientError, GuestRegion
from uffdd.lab import bench_concurrent, harness, twohost, versus_qemu
from uffdd.lab.benchkit import (
    BenchError,
    Result,
    median_dict,
    ratio,
    scrape,
    session_status,
    warm_memory,
)

SCENARIOS: Final = ("demand-latency", "demand-latency-under-load", "fault-throughput", "bulk",
                    "migration", "cost", "kvm", "concurrent", "versus-qemu",
                    "firecracker-restore")
PAGE: Final = 4096
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sizes:
    """Guest sizes and widths of one bench run."""

    demand: int
    threads: tuple[int, ...]
    throughput: int
    bulk: int
    migration: int
    cost: tuple[int, ...]
    kvm: int


FULL: Final = Sizes(256 << 20, (1, 4, 16, 64), 256 << 20, 1 << 30, 2 << 30,
                    (1 << 30, 4 << 30), 512 << 20)
QUICK: Final = Sizes(8 << 20, (1, 4), 8 << 20, 16 << 20, 16 << 20, (8 << 20, 16 << 20),
                     32 << 20)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (seconds, for smoke tests; figures mean little)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--refbench", metavar="DIR",
                   help="sources of the C yardstick (built in a scratch dir, run beside each "
                        "scenario; ratios are uffdd / reference)")
    p.add_argument("--scenario", action="append", choices=SCENARIOS, metavar="NAME",
                   help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="runs per measurement; medians are reported (default 1)")
    p.add_argument("--spin-us", type=int, default=None, metavar="US",
                   help="daemons' [peer] spin_us (default: the built-in default)")
    p.add_argument("--demand-slice-us", type=int, default=None, metavar="US",
                   help="daemons' [peer] demand_slice_us, the demand threads' scheduler "
                        "slice (default: the built-in default; 0: the kernel's)")
    p.add_argument("--chunk-bytes", type=int, default=None, metavar="N",
                   help="daemons' [peer] chunk_bytes (default: the built-in default)")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="do not touch and free twice the guest's size in the destination VMM "
                        "before each run (the reference warms the same way: see README)")
    p.add_argument("--bulk-lanes", type=int, default=None, metavar="N",
                   help="daemons' [peer] bulk_lanes (default: the built-in default)")
    p.add_argument("--integrity", choices=("true", "false"), default=None,
                   help="daemons' [peer] integrity, the CRC32 of every payload "
                        "(default: the built-in default)")
    p.add_argument("--bulk-mib", type=int, default=None, metavar="MIB",
                   help="guest size of the bulk scenario (default: 1024; larger for profiling)")
    p.add_argument("--output", metavar="PATH", help="also write the JSON object to PATH")
    p.add_argument("--link", metavar="veth[,rate=R]", type=twohost.LinkSpec.parse, default=None,
                   help="put each daemon in its own network namespace, joined by a veth pair "
                        "(optionally shaped to rate R, e.g. 10gbit): two hosts on one machine")
    p.add_argument("--demand-dscp", default=None, metavar="CLASS",
                   help="daemons' [peer] demand_dscp: the demand lane's DSCP and SO_PRIORITY "
                        "marking (ef, cs6, ..., or off; default: the built-in default)")
    p.add_argument("--versus-mib", type=int, action="append", default=None, metavar="MIB",
                   help="guest size of the versus-qemu scenario (repeatable; default: 512 "
                        "and 2048, 64 with --quick)")
    p.add_argument("--versus-order", choices=("rand", "seq"), action="append", default=None,
                   help="access order of the versus-qemu scenario (repeatable; default: both)")
    p.add_argument("--thread-profile", action="store_true",
                   help="versus-qemu: each run also reports every thread's CPU and "
                        "run-queue wait between switchover and the last page "
                        "(/proc schedstat; uffdd/lab/threadprof.py)")
    p.add_argument("--fc-mib", type=int, default=None, metavar="MIB",
                   help="guest size of the firecracker-restore scenario (default: 1024, "
                        "32 with --quick)")


def run(args: argparse.Namespace) -> int:
    bench = Bench(args)
    try:
        report = bench.run_all()
    finally:
        bench.close()
    text = json.dumps(report, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.json:
        print(text, flush=True)
    else:
        print(render_table(report), flush=True)
    return 0 if all("error" not in s for s in report["scenarios"].values()) else 1  # type: ignore[attr-defined]


# ====================================================================== processes


@dataclass
class ProcStats:
    """CPU seconds and peak RSS of a process, from /proc."""

    cpu_s: float
    peak_rss_bytes: int

    @classmethod
    def read(cls, pid: int) -> ProcStats:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is state (stat field 3): utime and stime are stat fields 14 and 15.
        cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        hwm = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        return cls(cpu, hwm)


@dataclass
class Pair:
    """A source and a destination daemon started for one measurement."""

    src: harness.DaemonProcess
    dst: harness.DaemonProcess
    base: dict[str, ProcStats] = field(default_factory=dict)
    link: twohost.VethLink | None = None  # --link: the namespaces, removed by stop()

    def snapshot(self) -> None:
        self.base = {"source": ProcStats.read(self.src.proc.pid),
                     "destination": ProcStats.read(self.dst.proc.pid)}

    def usage(self) -> dict[str, dict[str, float]]:
        """CPU seconds since :meth:`snapshot` and peak RSS (MiB) of each daemon."""
        out: dict[str, dict[str, float]] = {}
        for name, d in (("source", self.src), ("destination", self.dst)):
            now = ProcStats.read(d.proc.pid)
            out[name] = {"cpu_s": round(now.cpu_s - self.base[name].cpu_s, 3),
                         "peak_rss_mib": round(now.peak_rss_bytes / (1 << 20), 1)}
        return out

    def stop(self) -> None:
        for d in (self.src, self.dst):
            d.stop()
        if self.link is not None:
            self.link.close()


class RefBench:
    """The C yardstick, built from ``--refbench`` sources in a scratch directory."""

    def __init__(self, sources: Path, scratch: Path) -> None:
        self.dir = scratch / "refbench"
        shutil.copytree(sources, self.dir, ignore=shutil.ignore_patterns("results"))
        build = subprocess.run(["make", "-C", str(self.dir), "uffd_remote", "kvm_fault"],
                               capture_output=True, text=True)
        if build.returncode != 0:
            raise BenchError(f"refbench did not build:\n{build.stderr[-2000:]}")

    def remote(self, *args: str) -> Result:
        """Run ``uffd_remote`` once (one timed iteration); return its key=value figures."""
        cmd = [str(self.dir / "uffd_remote"), "-i", "1", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        for line in out.stdout.splitlines():
            if line.startswith("uffd_remote "):
                return _key_values(line)
        raise BenchError(f"{' '.join(cmd)} printed no result (exit {out.returncode}): "
                         f"{out.stderr[-500:]}")


def _key_values(line: str) -> Result:
    out: Result = {}
    for item in line.split()[1:]:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value) if re.fullmatch(r"-?[0-9.]+", value) else value
        except ValueError:
            out[key] = value
    return out


# ====================================================================== the bench


class Bench:
    """Runs the scenarios; every daemon and scratch file it made goes away in close()."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        if getattr(args, "bulk_mib", None):
            self.sizes = dataclasses.replace(self.sizes, bulk=int(args.bulk_mib) << 20)
        self.repeat = max(1, int(args.repeat))
        self.workdir = Path(tempfile.mkdtemp(prefix="uffdd-bench-"))
        self.quiet = bool(args.json)
        self.vmsim = harness.native_tool("uffdd-vmsim")
        self.ref: RefBench | None = None
        self.ref_error: str | None = None
        if args.refbench:
            try:
                self.ref = RefBench(Path(args.refbench), self.workdir)
            except (BenchError, OSError) as e:
                self.ref_error = str(e)
        self._ref_cache: dict[tuple[str, ...], Result] = {}
        self._n = 0

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def run_all(self) -> Result:
        chosen = self.args.scenario or list(SCENARIOS)
        started = time.monotonic()
        scenarios: dict[str, Result] = {}
        runners: dict[str, Callable[[], Result]] = {
            "demand-latency": self.demand_latency,
            "demand-latency-under-load": self.demand_under_load,
            "fault-throughput": self.fault_throughput,
            "bulk": self.bulk,
            "migration": self.migration,
            "cost": self.cost,
            "kvm": self.kvm,
            "concurrent": lambda: bench_concurrent.concurrent(self),
            "versus-qemu": self.versus_qemu,
            "firecracker-restore": self.firecracker_restore,
        }
        for name in SCENARIOS:
            if name not in chosen:
                continue
            self.say(f"uffdd bench: {name} ...")
            t0 = time.monotonic()
            try:
                scenarios[name] = runners[name]()
            except (BenchError, harness.HarnessError, ClientError, OSError) as e:
                scenarios[name] = {"error": str(e)}
            scenarios[name]["wall_seconds"] = round(time.monotonic() - t0, 1)
        return {
            "uffdd_bench": 1,
            "quick": bool(self.args.quick),
            "warm": bool(getattr(self.args, "warm", True)),
            "repeat": self.repeat,
            "machine": machine_info(),
            "refbench": None if self.ref is None else "built",
            "refbench_error": self.ref_error,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_seconds": round(time.monotonic() - started, 1),
            "link": None if getattr(self.args, "link", None) is None else str(self.args.link),
            "demand_dscp": getattr(self.args, "demand_dscp", None),
            "scenarios": scenarios,
        }

    # -------------------------------------------------------------- building blocks

    def pair(self, *, background: bool, demand_dscp: str | None = None,
             zero_copy: bool | None = None) -> Pair:
        self._n += 1
        # listen is overridden on the command line too; a loopback value here keeps the
        # file valid on its own.
        config = (f"[peer]\nlisten = \"127.0.0.1:0\"\n"
                  f"background = {'true' if background else 'false'}\n")
        if zero_copy is not None:
            config += f"zero_copy = {'true' if zero_copy else 'false'}\n"
        if self.args.chunk_bytes is not None:
            config += f"chunk_bytes = {int(self.args.chunk_bytes)}\n"
        if self.args.spin_us is not None:
            config += f"spin_us = {int(self.args.spin_us)}\n"
        if getattr(self.args, "demand_slice_us", None) is not None:
            config += f"demand_slice_us = {int(self.args.demand_slice_us)}\n"
        if self.args.bulk_lanes is not None:
            config += f"bulk_lanes = {int(self.args.bulk_lanes)}\n"
        if self.args.integrity is not None:
            config += f"integrity = {self.args.integrity}\n"
        dscp = demand_dscp or getattr(self.args, "demand_dscp", None)
        if dscp is not None:
            config += f"demand_dscp = {json.dumps(str(dscp))}\n"
        name = f"b{self._n}"
        spec: twohost.LinkSpec | None = getattr(self.args, "link", None)
        if spec is None:
            src = harness.start_daemon(self.workdir, f"{name}-source", config=config)
            try:
                dst = harness.start_daemon(self.workdir, f"{name}-destination", config=config,
                                           metrics=True)
            except BaseException:
                src.stop()
                raise
            return Pair(src, dst)
        return self._linked_pair(name, config + "tls = false\n", spec)

    def _linked_pair(self, name: str, config: str, spec: twohost.LinkSpec) -> Pair:
        """--link: each daemon in its own namespace (plaintext off loopback, explicitly)."""
        link = twohost.VethLink(spec).__enter__()
        started: list[harness.DaemonProcess] = []
        try:
            started.append(harness.start_daemon(
                self.workdir, f"{name}-source", config=config, netns=link.source_ns,
                peer_host=link.source_host))
            started.append(harness.start_daemon(
                self.workdir, f"{name}-destination", config=config, metrics=True,
                netns=link.dest_ns, peer_host=link.dest_host))
        except BaseException:
            for d in started:
                d.stop()
            link.close()
            raise
        return Pair(started[0], started[1], link=link)

    def vmsim_migration(self, p: Pair, *, memory: int, threads: int, order: str) -> Result:
        """One migration with the native stand-in; returns its figures (or raises)."""
        if self.vmsim is None:
            raise BenchError("native/build/uffdd-vmsim is not built: run make -C native")
        session = f"bench-{secrets.token_hex(4)}"
        token = secrets.token_hex(16)
        seed = str(random.randrange(1, 1 << 30))
        ready = self.workdir / f"{session}.ready"
        common = ["--session", session, "--token", token, "--memory", str(memory),
                  "--backing", "anon", "--seed", seed]
        source = harness.start_vmm([str(self.vmsim), "source", *common, "--socket",
                                    p.src.api_socket, "--ready-file", str(ready),
                                    "--threads", "2"], "source", self.workdir, ready)
        source.wait_ready()
        p.snapshot()
        dest = harness.start_vmm([str(self.vmsim), "dest", *common, "--socket", p.dst.api_socket,
                                  "--peer", p.src.peer, "--mode", "missing", "--threads",
                                  str(threads), "--order", order, "--warm-mib",
                                  str(self.warm_mib(memory))], "dest", self.workdir)
        d = dest.result(600)
        s = source.result(60)
        status = session_status(p.dst, session)
        if not d.get("verified") or d.get("hash") != s.get("hash"):
            raise BenchError(f"migration not verified: dest={d} source={s}")
        blocked = scrape(p.dst, "uffdd_vcpu_blocked_seconds_total")
        return {"dest": d, "status": status, "usage": p.usage(), "blocked_s": blocked}

    def reference(self, *args: str) -> Result | None:
        """uffd_remote with ``args`` (cached per invocation), or None without --refbench."""
        if self.ref is None:
            return None
        key = tuple(args)
        if key not in self._ref_cache:
            runs = [self.ref.remote(*args) for _ in range(self.repeat)]
            self._ref_cache[key] = median_dict(runs)
        return self._ref_cache[key]

    def repeated(self, fn: Callable[[], Result]) -> Result:
        runs = [fn() for _ in range(self.repeat)]
        out = median_dict(runs)
        if self.repeat > 1:
            out["runs"] = runs
        return out

    # -------------------------------------------------------------- scenarios

    def _vmsim_run(self, *, background: bool, memory: int, threads: int
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Result]:
        """One random-order vmsim migration on fresh daemons: (dest, status, usage, all)."""
        p = self.pair(background=background)
        try:
            r = self.vmsim_migration(p, memory=memory, threads=threads, order="rand")
        finally:
            p.stop()
        d, st, usage = r["dest"], r["status"], r["usage"]
        assert isinstance(d, dict) and isinstance(st, dict) and isinstance(usage, dict)
        return d, st, usage, r

    def _demand_run(self, *, background: bool, memory: int, threads: int) -> Result:
        d, st, usage, _ = self._vmsim_run(background=background, memory=memory,
                                          threads=threads)
        faults = int(st.get("faults") or 0)
        cpu = sum(float(u["cpu_s"]) for u in usage.values())
        return {
            "touch_p50_us": d["fault_latency_p50_us"], "touch_p90_us": d["fault_latency_p90_us"],
            "touch_p99_us": d["fault_latency_p99_us"],
            "faults_per_second": d["faults_per_second"],
            "daemon_p50_us": st.get("demand_latency_p50_us"),
            "daemon_p99_us": st.get("demand_latency_p99_us"),
            "faults": faults, "pages_demand": st.get("pages_demand"),
            "pages_background": st.get("pages_background"),
            "seconds": d["seconds"],
            "cpu_us_per_fault": round(cpu / faults * 1e6, 1) if faults else None,
            "source_cpu_s": usage["source"]["cpu_s"],
            "destination_cpu_s": usage["destination"]["cpu_s"],
        }

    def demand_latency(self) -> Result:
        mem = self.sizes.demand
        u = self.repeated(lambda: self._demand_run(background=False, memory=mem, threads=1))
        ref = self.reference("-s", str(mem >> 20), "-t", "1", "-o", "rand")
        out: Result = {"memory_mib": mem >> 20, "threads": 1, "background": False, "uffdd": u,
                       "reference": ref, "idle": self.idle_cpu()}
        if ref:
            out["ratio"] = {k: ratio(u[f"touch_{k}_us"], ref[f"{k}_us"])
                            for k in ("p50", "p90", "p99")}
        return out

    def demand_under_load(self) -> Result:
        mem = self.sizes.demand
        u = self.repeated(lambda: self._demand_run(background=True, memory=mem, threads=1))
        ref = self.reference("-s", str(mem >> 20), "-t", "1", "-o", "rand")
        out: Result = {"memory_mib": mem >> 20, "threads": 1, "background": True, "uffdd": u,
                       "reference_unloaded": ref,
                       "note": "touch_* counts every touch (most pages arrive by the background "
                               "stream first); daemon_* is per demand fault, from the fault read "
                               "to the page installed"}
        if ref:
            out["ratio"] = {"p50": ratio(u["daemon_p50_us"], ref["p50_us"]),
                            "p99": ratio(u["daemon_p99_us"], ref["p99_us"])}
        return out

    def fault_throughput(self) -> Result:
        mem = self.sizes.throughput
        rows: Result = {}
        for t in self.sizes.threads:
            u = self.repeated(lambda t=t: self._demand_run(background=False, memory=mem, threads=t))  # type: ignore[misc]
            ref = self.reference("-s", str(mem >> 20), "-t", str(t), "-o", "rand")
            row: Result = {"uffdd": u, "reference": ref}
            if ref:
                row["ratio"] = ratio(u["faults_per_second"], float(ref["kpages_s"]) * 1000)  # type: ignore[arg-type]
            rows[str(t)] = row
        return {"memory_mib": mem >> 20, "background": False, "order": "rand", "threads": rows}

    def warm_mib(self, memory: int) -> int:
        """MiB the destination VMM touches and frees first: twice the guest, as refbench."""
        return 2 * memory >> 20 if getattr(self.args, "warm", True) else 0

    def bulk(self) -> Result:
        """MISSING mode (anonymous memory, UFFDIO_COPY: ``uffdd``, ``ratio``) and MINOR
        mode (a shmem memfd, CONTINUE) with zero-copy receive and without it ([peer]
        zero_copy = false, two copies), runs interleaved, against the one yardstick."""
        mem = self.sizes.bulk
        kinds = {"missing": ("missing", None), "minor": ("minor", True),
                 "minor_two_copies": ("minor", False)}
        runs: dict[str, list[Result]] = {k: [] for k in kinds}
        for _ in range(self.repeat):  # interleaved: the machine's drift hits all alike
            for k, (mode, zero_copy) in kinds.items():
                runs[k].append(self._bulk_run(mem, mode, zero_copy))
        med = {}
        for k, rs in runs.items():
            med[k] = median_dict(rs)
            if self.repeat > 1:
                med[k]["runs"] = rs
        ref = self.reference("-s", str(mem >> 20), "-P", "2048")
        u = med["missing"]
        out: Result = {"memory_mib": mem >> 20, "uffdd": u, "reference": ref}
        if ref:
            out["ratio"] = ratio(u["gb_per_s"], ref["GBps"])
        for k in ("minor", "minor_two_copies"):
            row: Result = {"uffdd": med[k]}
            if ref:
                row["ratio"] = ratio(med[k]["gb_per_s"], ref["GBps"])
            out[k] = row
        out["zero_copy_speedup"] = ratio(med["minor"]["gb_per_s"],
                                          med["minor_two_copies"]["gb_per_s"])
        return out

    def _bulk_run(self, memory: int, mode: str = "missing",
                  zero_copy: bool | None = None) -> Result:
        p = self.pair(background=True, zero_copy=zero_copy)
        try:
            return self._bulk_import(p, memory, mode)
        finally:
            p.stop()

    def _bulk_import(self, p: Pair, memory: int, mode: str = "missing") -> Result:
        """The bench itself is the destination VMM here: it imports and touches nothing.
        MISSING: anonymous memory; MINOR: a shmem memfd (the daemon fills its alias)."""
        if self.vmsim is None:
            raise BenchError("native/build/uffdd-vmsim is not built: run make -C native")
        session, token, seed = f"bulk-{secrets.token_hex(4)}", secrets.token_hex(16), 7
        ready = self.workdir / f"{session}.ready"
        source = harness.start_vmm([str(self.vmsim), "source", "--session", session, "--token",
                                    token, "--memory", str(memory), "--backing", "anon",
                                    "--seed", str(seed), "--socket", p.src.api_socket,
                                    "--ready-file", str(ready), "--threads", "2"],
                                   "source", self.workdir, ready)
        source.wait_ready()
        p.snapshot()
        warm_memory(self.warm_mib(memory) << 20)
        features = uffd.FEATURE_EVENT_REMOVE | uffd.FEATURE_THREAD_ID
        register = uffd.REGISTER_MODE_MISSING
        memfd: int | None = None
        if mode == "minor":
            memfd = os.memfd_create("bench-guest", os.MFD_CLOEXEC)
            os.ftruncate(memfd, memory)
            ram = mmap.mmap(memfd, memory, mmap.MAP_SHARED)
            features |= uffd.FEATURE_MINOR_SHMEM
            register |= uffd.REGISTER_MODE_MINOR
        else:
            ram = mmap.mmap(-1, memory, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = buffer_address(ram)
        ufd = uffd.new_uffd(features)
        try:
            uffd.register(ufd, addr, memory, register)
            with Client(p.dst.api_socket, timeout=600) as client:
                t0 = time.monotonic()
                client.import_session(session, bytes.fromhex(token), peer=p.src.peer,
                                      regions=[GuestRegion(gpa=0, addr=addr, size=memory,
                                                           uffd=ufd, mode=mode, fd=memfd)])
                event = client.wait_finished(session, timeout=600)
                seconds = time.monotonic() - t0
            uffd.unregister(ufd, addr, memory)
        finally:
            os.close(ufd)
            if memfd is not None:
                os.close(memfd)  # the mapping keeps the file for the check below
        s = source.result(60)
        if event.get("event") != "completed":
            raise BenchError(f"bulk session did not complete: {event}")
        bad = _check_pattern(ram, seed, memory)
        ram.close()
        if bad:
            raise BenchError(f"bulk transfer: {bad} sampled pages do not match the source")
        del s
        return {"seconds": round(seconds, 3), "gb_per_s": round(memory / seconds / 1e9, 3),
                "usage": p.usage()}

    def migration(self) -> Result:
        mem = self.sizes.migration
        u = self.repeated(lambda: self._migration_run(mem, threads=2))
        # QEMU is compared on the same guest in the versus-qemu scenario, not here.
        return {"memory_mib": mem >> 20, "threads": 2, "order": "rand", "background": True,
                "uffdd": u}

    def _migration_run(self, memory: int, *, threads: int) -> Result:
        d, st, usage, r = self._vmsim_run(background=True, memory=memory, threads=threads)
        # seconds: the VMM's whole run; migration_seconds: import accepted -> completed
        return {"seconds": d["seconds"], "migration_seconds": st.get("elapsed_seconds"),
                "blocked_seconds_total": r["blocked_s"],
                "daemon_p50_us": st.get("demand_latency_p50_us"),
                "daemon_p99_us": st.get("demand_latency_p99_us"),
                "touch_p99_us": d["fault_latency_p99_us"],
                "faults": st.get("faults"), "pages_demand": st.get("pages_demand"),
                "usage": usage}

    def cost(self) -> Result:
        rows: Result = {}
        for mem in self.sizes.cost:
            u = self.repeated(lambda mem=mem: self._migration_run(mem, threads=2))  # type: ignore[misc]
            gib = mem / (1 << 30)
            usage = u["usage"]
            assert isinstance(usage, dict)
            row: Result = {"seconds": u["seconds"]}
            for name in ("source", "destination"):
                row[name] = {"cpu_s_per_gib": round(float(usage[name]["cpu_s"]) / gib, 3),
                             "peak_rss_mib": usage[name]["peak_rss_mib"]}
            row["rss_target_mib"] = round(64 + (mem // PAGE) / (1 << 20), 1)
            rows[f"{mem >> 20}M"] = row
        return {"threads": 2, "order": "rand", "sizes": rows, "idle": self.idle_cpu()}

    def idle_cpu(self) -> Result:
        """CPU use of an idle pair of daemons over a few seconds (it must be ~0)."""
        p = self.pair(background=True)
        try:
            time.sleep(0.5)
            p.snapshot()
            window = 1.0 if self.args.quick else 3.0
            time.sleep(window)
            usage = p.usage()
        finally:
            p.stop()
        return {"window_s": window,
                "cpu_percent": {k: round(float(v["cpu_s"]) / window * 100, 2)
                                for k, v in usage.items()}}

    def versus_qemu(self) -> Result:
        """QEMU's postcopy and uffdd's on the same guest (uffdd/lab/versus_qemu.py)."""

        return versus_qemu.scenario(self, required="versus-qemu" in (self.args.scenario or ()))

    def kvm(self) -> Result:
        """The migration with the KVM test VMM (absolute figures: the emulator dominates)."""
        if not harness.kvm_usable() or harness.native_tool("uffdd-testvm") is None:
            return {"skipped": "needs /dev/kvm and native/build/uffdd-testvm"}
        mem = self.sizes.kvm
        out = subprocess.run([sys.executable, "-m", "uffdd", "demo", "--vmm", "kvm", "--memory",
                              str(mem), "--vcpus", "2", "--threads", "2", "--order", "rand",
                              "--backing", "shmem", "--json"],
                             capture_output=True, text=True, timeout=900)
        try:
            r = json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError(f"kvm demo printed no result: {out.stderr[-1000:]}") from None
        if not r.get("verified"):
            raise BenchError(f"kvm migration not verified: {r.get('error') or r.get('reason')}")
        dest = r.get("dest") or {}
        return {"memory_mib": mem >> 20, "vcpus": 2, "order": "rand", "uffdd": {
            "seconds": r.get("seconds"), "migration_seconds": r.get("migration_seconds"),
            "daemon_p50_us": r.get("fault_latency_p50_us"),
            "daemon_p99_us": r.get("fault_latency_p99_us"), "faults": r.get("faults"),
            "vcpu_seconds": dest.get("vcpu_seconds")}}


    # ---------------------------------------------------------- firecracker-restore

    def firecracker_restore(self) -> Result:
        """A Firecracker snapshot restore through the handover (issue 17), with the
        stand-in ``uffdd-testvm firecracker`` on real KVM: the page source is the local
        snapshot file, or the source host's uffdd over loopback."""
        testvm = harness.native_tool("uffdd-testvm")
        if not harness.kvm_usable() or testvm is None:
            return {"skipped": "needs /dev/kvm and native/build/uffdd-testvm"}
        mem = (int(self.args.fc_mib) << 20 if getattr(self.args, "fc_mib", None)
               else FC_QUICK_BYTES if self.args.quick else FC_FULL_BYTES)
        snap = self.workdir / "fc-snapshot.mem"
        seed = random.randrange(1, 1 << 30)
        made = subprocess.run([str(testvm), "write-snapshot", "--out", str(snap), "--memory",
                               str(mem), "--seed", str(seed)], capture_output=True, text=True,
                              timeout=600)
        if made.returncode != 0:
            raise BenchError(f"write-snapshot failed: {made.stderr[-500:]}")
        # demand only (no background stream), like the example on_demand handler, on the
        # first FC_DEMAND_BYTES of the file (every page a fault: at 1 GiB it takes minutes)
        demand = min(mem, FC_DEMAND_BYTES)
        small = self.workdir / "fc-snapshot-demand.mem"
        runs: Result = {}
        try:
            with open(snap, "rb") as f, open(small, "wb") as g:
                g.write(f.read(demand))
            # name, vCPUs, remote, background stream, file, guest waits for completed
            plan = (("local_stream_only", 1, False, True, snap, True),
                    ("local_1vcpu", 1, False, True, snap, False),
                    ("local_4vcpu", 4, False, True, snap, False),
                    ("remote_stream_only", 4, True, True, snap, True),
                    ("remote_4vcpu", 4, True, True, snap, False),
                    ("local_1vcpu_demand_only", 1, False, False, small, False),
                    ("local_4vcpu_demand_only", 4, False, False, small, False))
            for name, vcpus, remote, background, path, idle in plan:
                runs[name] = self.repeated(
                    lambda v=vcpus, r=remote, b=background, f=path, i=idle:  # type: ignore[misc]
                    self._fc_run(testvm, f, seed, v, r, background=b, idle_guest=i))
            warm = self._fc_warm(testvm, {"demand_only": (small, False, 100),
                                          "with_stream": (snap, True, 100),
                                          "working_set_with_stream": (snap, True,
                                                                      WARM_WORKING_SET)},
                                 seed)
        finally:
            snap.unlink(missing_ok=True)
            small.unlink(missing_ok=True)
        return {"memory_mib": mem >> 20, "demand_only_memory_mib": demand >> 20, "regions": 2,
                "order": "seq", "page_cache": "hot (the snapshot file was just written)",
                "uffdd": runs, "warm_restore": warm}

    def _fc_warm(self, testvm: Path, snaps: dict[str, tuple[Path, bool, int]], seed: int
                 ) -> Result:
        """Cold vs warm restore, back to back on fresh daemons, ``repeat`` pairs per mode:
        the cold one records its demand order (``warm_record``), the warm one replays it
        (``warm_replay``). 4 vCPUs reading pages in a random order (no locality for a
        stream to follow): every page, or a scattered working set of a given percentage
        of them (the same pages in both restores; the stand-in then reads the rest from
        the host to check every byte, so its faults count in ``faults`` and
        ``vcpu_blocked_s`` too: ``guest_seconds``, the guest's time to read its
        working set, is the figure there). ``snaps``: mode -> (snapshot, background
        stream on, working set %)."""
        order = self.workdir / "fc-snapshot.mem.order"
        out: Result = {"vcpus": 4, "order": "rand"}
        keys = ("pages_demand", "faults", "vcpu_blocked_s", "guest_seconds", "all_present_s")
        try:
            for mode, (snap, background, working_set) in snaps.items():
                pairs: list[tuple[Result, Result]] = []
                for _ in range(self.repeat):
                    order.unlink(missing_ok=True)
                    cold = self._fc_run(testvm, snap, seed, 4, False, background=background,
                                        idle_guest=False, order="rand", warm_record=order,
                                        working_set=working_set)
                    warm = self._fc_run(testvm, snap, seed, 4, False, background=background,
                                        idle_guest=False, order="rand", warm_replay=order,
                                        working_set=working_set)
                    warm["order_file_bytes"] = order.stat().st_size
                    pairs.append((cold, warm))
                cold_m = median_dict([c for c, _w in pairs])
                warm_m = median_dict([w for _c, w in pairs])
                row: Result = {"background": background, "working_set_pct": working_set,
                               "cold": cold_m, "warm": warm_m,
                               "warm_over_cold": {k: ratio(warm_m.get(k), cold_m.get(k))
                                                  for k in keys}}
                if self.repeat > 1:
                    row["pairs"] = [{"cold": c, "warm": w} for c, w in pairs]
                out[mode] = row
        finally:
            order.unlink(missing_ok=True)
        return out

    def _fc_run(self, testvm: Path, snap: Path, seed: int, vcpus: int, remote: bool, *,
                background: bool, idle_guest: bool, order: str = "seq",
                warm_record: Path | None = None, warm_replay: Path | None = None,
                working_set: int = 100) -> Result:
        self._n += 1
        name = f"fc{self._n}"
        handover_dir = self.workdir / f"{name}-ho"
        handover_dir.mkdir()
        # a local file is served by the destination's own export side: it reads background
        peer = f"[peer]\nlisten = \"127.0.0.1:0\"\nbackground = {str(background).lower()}\n"
        api = f'[api]\nhandover_dir = "{handover_dir}"\n'
        dst = harness.start_daemon(self.workdir, f"{name}-destination", config=peer + api,
                                   metrics=True)
        src: harness.DaemonProcess | None = None
        exporter: Client | None = None
        session = f"bench-{secrets.token_hex(4)}"
        body: dict[str, Any] = {"op": "prepare", "session": session}
        try:
            if remote:
                src = harness.start_daemon(self.workdir, f"{name}-source", config=peer)
                token = secrets.token_bytes(16)
                exporter = Client(src.api_socket, timeout=600)
                size = snap.stat().st_size
                fd = os.open(snap, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    half = size // 2 // PAGE * PAGE  # the stand-in's split into 2 regions
                    table = [{"gpa": off, "size": n, "page_size": PAGE, "fd": 0, "offset": off}
                             for off, n in ((0, half), (half, size - half))]
                    exporter.request({"op": "export", "session": session, "token": token,
                                      "regions": table}, [fd])
                finally:
                    os.close(fd)
                body |= {"peer": src.peer, "token": token}
            else:
                body["file"] = str(snap)
            fds: list[int] = []
            try:
                if warm_record is not None:  # the orchestrator opens it, the daemon writes
                    body["warm_record"] = len(fds)
                    fds.append(os.open(warm_record, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                       0o600))
                if warm_replay is not None:
                    body["warm_replay"] = len(fds)
                    fds.append(os.open(warm_replay, os.O_RDONLY | os.O_CLOEXEC))
                with Client(dst.api_socket, timeout=600) as c:
                    handover = c.request(body, fds)["handover"]
                    return _fc_standin(c, testvm, str(handover), snap, seed, vcpus, session,
                                       dst, idle_guest=idle_guest, order=order,
                                       recording=warm_record is not None,
                                       working_set=working_set)
            finally:
                for fd in fds:
                    os.close(fd)
        finally:
            if exporter is not None:
                exporter.close()
            dst.stop()
            if src is not None:
                src.stop()

# ====================================================================== helpers








FC_FULL_BYTES: Final = 1 << 30
FC_QUICK_BYTES: Final = 32 << 20
# The size at which Firecracker's example on_demand handler was measured (README, "Using
# uffdd with Firecracker", quotes those figures; no Firecracker binary can be installed
# here, so the bench measures only uffdd and types in no peer's figure).
FC_DEMAND_BYTES: Final = 256 << 20
# Warm restore's own case: the guest reads a scattered 10% of its pages (a VM that
# resumes into a small working set), with the background stream on.
WARM_WORKING_SET: Final = 10


def _fc_standin(c: Client, testvm: Path, handover: str, snap: Path, seed: int, vcpus: int,
                session: str, dst: harness.DaemonProcess, *, idle_guest: bool,
                order: str = "seq", recording: bool = False, working_set: int = 100
                ) -> Result:
    """Run the stand-in on a prepared session; its figures and the daemon's.

    ``idle_guest``: the guest starts only after ``completed`` (the stream alone, without
    the emulated vCPUs competing for this machine's two CPUs)."""
    proc = subprocess.Popen([str(testvm), "firecracker", "--handover", handover, "--snapshot",
                             str(snap), "--seed", str(seed), "--vcpus", str(vcpus),
                             "--regions", "2", "--hold", "--timeout", "600", "--order", order,
                             "--working-set", str(working_set),
                             *(["--wait-go"] if idle_guest else [])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)

    def line() -> Result:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if sel.select(max(0.0, deadline - time.monotonic())):
                text = proc.stdout.readline() if proc.stdout else ""
                if not text:
                    raise BenchError(f"stand-in ended early (exit {proc.poll()})")
                if text.startswith("{"):
                    out: Result = json.loads(text)
                    return out
        raise BenchError("stand-in printed nothing in 600 s")

    try:
        line()  # the handover
        t_handover = time.monotonic()
        if idle_guest:
            event = c.wait_finished(session, 600)
            t_all = time.monotonic() - t_handover
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = line()
        else:
            result = line()
            event = c.wait_finished(session, 600)
            t_all = time.monotonic() - t_handover
        status = session_status(dst, session)
        deadline = time.monotonic() + 60
        while recording and status.get("warm_recorded_pages") is None:  # written at the end
            if time.monotonic() > deadline:
                raise BenchError(f"the warm-order record was never written: {status}")
            time.sleep(0.05)
            status = session_status(dst, session)
        if event.get("event") != "completed" or result.get("verified") is not True:
            raise BenchError(f"restore not byte-exact: {event} {result}")
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sel.close()
        if proc.stderr is not None:
            proc.stderr.close()
        proc.stdout.close()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    return {"vcpus": vcpus, "memory_mib": snap.stat().st_size >> 20,
            "all_present_s": round(t_all, 3),
            "guest_seconds": result.get("vcpu_seconds"),
            "restore_seconds": result.get("restore_seconds"),
            "daemon_p50_us": status.get("demand_latency_p50_us"),
            "daemon_p99_us": status.get("demand_latency_p99_us"),
            "faults": status.get("faults"), "pages_demand": status.get("pages_demand"),
            "pages_background": status.get("pages_background"),
            "vcpu_blocked_s": scrape(dst, "uffdd_vcpu_blocked_seconds_total"),
            "warm_replay": status.get("warm_replay"),
            "warm_recorded_pages": status.get("warm_recorded_pages")}


def _splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _check_pattern(ram: mmap.mmap, seed: int, memory: int, samples: int = 256) -> int:
    """Compare sampled pages with vmsim's pattern (native/vmsim/pattern.h); count mismatches."""
    rng = random.Random(seed)
    bad = 0
    for page in rng.sample(range(memory // PAGE), min(samples, memory // PAGE)):
        data = ram[page * PAGE : (page + 1) * PAGE]
        if page % 11 == 5:
            want = bytes(PAGE)
        else:
            want = b"".join(_splitmix64(seed ^ (page * 512 + j)).to_bytes(8, "little")
                            for j in range(PAGE // 8))
        bad += data != want
    return bad


def machine_info() -> Result:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / (1 << 20), 1),
            "kernel": os.uname().release, "python": sys.version.split()[0],
            "kvm": harness.kvm_usable()}


# ====================================================================== table


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render_table(report: Result) -> str:
    """The report as a table a person reads: scenario, figure, uffdd, reference, ratio."""
    rows: list[tuple[str, str, object, object, object]] = []
    sc = report["scenarios"]
    assert isinstance(sc, dict)
    for name, s in sc.items():
        if "error" in s or "skipped" in s:
            rows.append((name, "error" if "error" in s else "skipped",
                         str(s.get("error") or s.get("skipped"))[:60], None, None))
            continue
        rows.extend(_scenario_rows(name, s))
    head = ("scenario", "figure", "uffdd", "reference", "ratio")
    cells = [head] + [(a, b, _fmt(c), _fmt(d), _fmt(e)) for a, b, c, d, e in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"(ratio = uffdd / reference; versus-qemu: reference = QEMU postcopy-preempt "
                 f"on the same guest; wall time {report.get('wall_seconds')} s)")
    return "\n".join(lines)


def _scenario_rows(name: str, s: Result) -> list[tuple[str, str, object, object, object]]:
    u = s.get("uffdd") or {}
    ref = s.get("reference") or s.get("reference_unloaded") or {}
    ratio = s.get("ratio") or {}
    assert isinstance(u, dict) and isinstance(ref, dict)
    rows: list[tuple[str, str, object, object, object]] = []
    if name == "demand-latency":
        assert isinstance(ratio, dict)
        for k in ("p50", "p90", "p99"):
            rows.append((name, f"{k} µs", u.get(f"touch_{k}_us"), ref.get(f"{k}_us"), ratio.get(k)))
        rows.append((name, "CPU µs/fault", u.get("cpu_us_per_fault"), None, None))
        idle = s.get("idle") or {}
        assert isinstance(idle, dict)
        rows.append((name, "idle CPU % (src/dst)", _pair_text(idle.get("cpu_percent")), None, None))
    elif name == "demand-latency-under-load":
        assert isinstance(ratio, dict)
        for k in ("p50", "p99"):
            rows.append((name, f"{k} µs (daemon)", u.get(f"daemon_{k}_us"), ref.get(f"{k}_us"),
                         ratio.get(k)))
        rows.append((name, "touch p99 µs", u.get("touch_p99_us"), None, None))
    elif name == "fault-throughput":
        threads = s.get("threads") or {}
        assert isinstance(threads, dict)
        for t, row in threads.items():
            ru, rr = row.get("uffdd") or {}, row.get("reference") or {}
            rows.append((name, f"faults/s T={t}", ru.get("faults_per_second"),
                         None if not rr else float(rr["kpages_s"]) * 1000, row.get("ratio")))
    elif name == "bulk":
        rows.append((name, "GB/s", u.get("gb_per_s"), ref.get("GBps"), s.get("ratio")))
        for k, label in (("minor", "MINOR zero-copy"), ("minor_two_copies", "MINOR two copies")):
            row = s.get(k) or {}
            assert isinstance(row, dict)
            got = row.get("uffdd") or {}
            assert isinstance(got, dict)
            rows.append((name, f"{label} GB/s", got.get("gb_per_s"), ref.get("GBps"),
                         row.get("ratio")))
    elif name == "migration":
        rows.append((name, "seconds (whole run)", u.get("seconds"), None, None))
        rows.append((name, "migration s (import->completed)", u.get("migration_seconds"),
                     None, None))
        rows.append((name, "vCPU blocked s (sum)", u.get("blocked_seconds_total"), None, None))
        rows.append((name, "p50 / p99 µs (daemon)",
                     _slash(u.get("daemon_p50_us"), u.get("daemon_p99_us")), None, None))
    elif name == "cost":
        sizes = s.get("sizes") or {}
        assert isinstance(sizes, dict)
        for size, row in sizes.items():
            for side in ("source", "destination"):
                rows.append((name, f"{size} {side} CPU s/GiB", row[side]["cpu_s_per_gib"],
                             None, None))
                rows.append((name, f"{size} {side} peak RSS MiB", row[side]["peak_rss_mib"],
                             row["rss_target_mib"], None))
    elif name == "concurrent":
        widths = s.get("widths") or {}
        assert isinstance(widths, dict)
        for n, row in widths.items():
            rows.append((name, f"N={n} aggregate GB/s (ratio to N=1)",
                         row.get("aggregate_gb_per_s"), None, row.get("ratio_to_one")))
            rows.append((name, f"N={n} slowest/fastest", row.get("fairness_slowest_over_fastest"),
                         None, None))
            rows.append((name, f"N={n} demand p99 µs worst/median",
                         _slash(row.get("demand_p99_us_worst"), row.get("demand_p99_us_median")),
                         None, None))
    elif name == "versus-qemu":

        rows.extend(versus_qemu.table_rows(s))
    elif name == "firecracker-restore":
        for run, r in u.items():
            rows.append((name, f"{run} p50 / p99 µs (daemon)",
                         _slash(r.get("daemon_p50_us"), r.get("daemon_p99_us")), None, None))
            rows.append((name, f"{run} all pages present s", r.get("all_present_s"), None, None))
        warm = s.get("warm_restore")
        for mode in ("demand_only", "with_stream"):
            pair = warm.get(mode) if isinstance(warm, dict) else None
            if not isinstance(pair, dict):
                continue
            for key in ("pages_demand", "vcpu_blocked_s", "guest_seconds", "all_present_s"):
                rows.append((name, f"warm restore {mode} {key} cold / warm",
                             _slash(pair["cold"].get(key), pair["warm"].get(key)), None, None))
    elif name == "kvm":
        rows.append((name, "seconds (whole run)", u.get("seconds"), None, None))
        rows.append((name, "migration s (import->completed)", u.get("migration_seconds"),
                     None, None))
        rows.append((name, "p50 / p99 µs (daemon)",
                     _slash(u.get("daemon_p50_us"), u.get("daemon_p99_us")), None, None))
    return rows


def _slash(a: object, b: object) -> str:
    return f"{_fmt(a)} / {_fmt(b)}"


def _pair_text(v: object) -> str:
    if not isinstance(v, dict):
        return "-"
    return " / ".join(_fmt(x) for x in v.values())


__all__ = ["SCENARIOS", "Bench", "ProcStats", "add_arguments", "render_table", "run"]
