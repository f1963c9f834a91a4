"""``uffdd bench --scenario versus-qemu``: one guest, two VMMs, the same postcopy job.

The guest is native/guest/ (``uffdd-guest.elf``, a multiboot v1 ELF) with 2 vCPUs. On
the source it writes one word into every 4 KiB page above 2 MiB and says so on COM1;
after the switchover the host tells it "go" and, on the destination, it reads every
page's word back (sequential or LCG order) and prints its verdict. Each case (guest size
x order) runs, in one invocation:

* ``qemu-postcopy``: QEMU's own postcopy (``migrate`` then ``migrate-start-postcopy`` at
  once), capabilities postcopy-ram, postcopy-blocktime and events;
* ``qemu-postcopy-preempt``: the same with postcopy-preempt;
* ``uffdd-missing`` / ``uffdd-minor``: ``uffdd-testvm --kernel`` migrated by two uffdd
  daemons (anonymous RAM with userfaultfd MISSING; a shmem memfd with MINOR).

Every run reports the same figures under the same names: ``switchover_to_complete_s``
(source vCPUs stopped -> every page at the destination: QEMU's STOP event on the source
to the MIGRATION "completed" event on the destination; uffdd-testvm's own stamps), the
vCPU blocked time, the demand requests, latency where the VMM reports it, throughput and
the guest's verdict. The phases around it (VMM start and guest boot, the guest's own
verification, the host's RAM hash) are reported apart and never counted as migration.
The ratios uffdd / QEMU come from the same invocation.

With ``--link veth[,rate=R]`` (uffdd.lab.twohost) each side runs in its own network
namespace: QEMU's source and destination processes, like the uffdd daemons, with the
migration over the veth pair's addresses. A ``uffdd-missing-unmarked`` run is added,
with ``[peer] demand_dscp = "off"``: the demand lane's priority on the link, against
QEMU's postcopy-preempt channel, its own answer to the same queueing.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, cast

from uffdd.lab import harness, threadprof, twohost
from uffdd.lab.benchkit import (
    BenchError,
    BenchHost,
    Result,
    median_dict,
    ratio,
    scrape,
    session_status,
    warm_memory,
)
from uffdd.lab.qemu import QemuError, QemuVm, qemu_binary

NAME: Final = "versus-qemu"
VCPUS: Final = 2
PAGE: Final = 4096
FIRST_PAGE_ADDR: Final = 2 << 20  # the guest's pages: [2 MiB, end of RAM)
FULL_SIZES: Final = (512 << 20, 2 << 30)
FULL_ORDERS: Final = ("rand", "seq")
QUICK_SIZES: Final = (64 << 20,)
QUICK_ORDERS: Final = ("rand",)
VARIANTS: Final = ("qemu-postcopy", "qemu-postcopy-preempt", "uffdd-missing", "uffdd-minor")
UNMARKED: Final = "uffdd-missing-unmarked"  # --link only: demand_dscp = "off"
_VERDICT = re.compile(r"uffdd-guest: verdict bad=(\d+) checked=(\d+) cpus=(\d+)")
# Guest boot + writing 2 GiB runs under the instruction emulator: tens of seconds.
BOOT_TIMEOUT: Final = 600.0
RUN_TIMEOUT: Final = 900.0


# --thread-profile: the processes whose threads are sampled (daemons, VMMs, QEMU), and
# the key under which a run hands its switchover -> complete window (epoch seconds) to
# _run_variant, which removes it (absolute times have no median).
PROFILED: Final = ("python", "uffdd-testvm", "qemu-system-x86")
WINDOW: Final = "_window"


def scenario(bench: BenchHost, *, required: bool) -> Result:
    """The whole scenario: every case and variant, then the ratios."""
    missing = _missing_tools()
    if missing:
        if required:
            raise BenchError(f"versus-qemu needs {missing}")
        return {"skipped": f"needs {missing}"}
    kernel = harness.native_tool("uffdd-guest.elf")
    testvm = harness.native_tool("uffdd-testvm")
    assert kernel is not None and testvm is not None
    quick = bool(bench.args.quick)
    sizes, orders = (QUICK_SIZES, QUICK_ORDERS) if quick else (FULL_SIZES, FULL_ORDERS)
    sizes = tuple(m << 20 for m in getattr(bench.args, "versus_mib", None) or ()) or sizes
    orders = tuple(getattr(bench.args, "versus_order", None) or ()) or orders
    link: twohost.LinkSpec | None = getattr(bench.args, "link", None)
    variants = VARIANTS if link is None else (*VARIANTS, UNMARKED)
    cases: dict[str, Result] = {}
    errors: list[str] = []
    for memory in sizes:
        for order in orders:
            name = f"{memory >> 20}M-{order}"
            seed = 0x5EED + (memory >> 20) + (1 if order == "seq" else 0)
            runs: dict[str, Result] = {}
            for variant in variants:
                bench.say(f"uffdd bench: versus-qemu {name} {variant} ...")

                def one(variant: str = variant, memory: int = memory, order: str = order,
                        seed: int = seed) -> Result:
                    return _run_variant(bench, variant, kernel, testvm, memory, order, seed,
                                        link)

                try:
                    runs[variant] = _repeated(bench.repeat, one)
                except (BenchError, QemuError, harness.HarnessError, OSError) as e:
                    runs[variant] = {"error": str(e)[-2000:]}
                    errors.append(f"{name} {variant}: {str(e)[:200]}")
            cases[name] = {"memory_mib": memory >> 20, "order": order, "seed": seed,
                           "pages_checked": (memory - FIRST_PAGE_ADDR) // PAGE,
                           "runs": runs, "ratios": _ratios(runs)}
    out: Result = {
        "vcpus": VCPUS, "guest": "native/guest (uffdd-guest.elf, multiboot v1)",
        "qemu": _qemu_version(), "machine_type": "microvm", "cases": cases,
        "link": None if link is None else str(link),
        "guest_verdicts_clean": all(bool(r.get("guest_clean")) for c in cases.values()
                                    for r in c["runs"].values()),  # type: ignore[attr-defined]
        "fields": {
            "switchover_to_complete_s": "source vCPUs stopped -> every page at the destination",
            "vcpu_blocked_s": "sum over vCPUs of time blocked on absent pages",
            "demand_requests": "pages asked for by the destination (QEMU: postcopy-requests)",
            "blocked_per_request_ms": "vcpu_blocked_s / demand_requests",
            "throughput_gb_s": "guest RAM / switchover_to_complete_s",
            "boot_and_write_s": "VMM start -> guest wrote every page (not migration)",
            "guest_verify_s": "destination guest's 'go' -> verdict (not migration)",
        },
    }
    if errors:
        out["error"] = f"{len(errors)} run(s) failed: " + "; ".join(errors)
    return out


def _missing_tools() -> str:
    need = []
    if qemu_binary() is None:
        need.append("qemu-system-x86_64 (Debian: qemu-system-x86)")
    if not harness.kvm_usable():
        need.append("/dev/kvm")
    for tool in ("uffdd-testvm", "uffdd-guest.elf"):
        if harness.native_tool(tool) is None:
            need.append(f"native/build/{tool} (make -C native)")
    return ", ".join(need)


def _qemu_version() -> str | None:
    binary = qemu_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.splitlines()[0] if out.stdout else ""
    match = re.search(r"version (\S+)", first)
    return match.group(1) if match else first or None


def _repeated(repeat: int, fn: Callable[[], Result]) -> Result:
    runs = [fn() for _ in range(max(1, repeat))]
    out = median_dict(runs)
    out["guest_clean"] = all(bool(r.get("guest_clean")) for r in runs)
    if len(runs) > 1:
        out["runs"] = runs
    return out


def _ratios(runs: dict[str, Result]) -> Result:
    """uffdd / QEMU for the figures both report (lower is better for uffdd)."""
    out: Result = {}
    for mine in ("uffdd-missing", "uffdd-minor", UNMARKED):
        if mine not in runs:
            continue
        for peer in ("qemu-postcopy", "qemu-postcopy-preempt"):
            u, q = runs.get(mine) or {}, runs.get(peer) or {}
            if "error" in u or "error" in q:
                continue
            out[f"{mine}/{peer}"] = {
                key: ratio(u.get(key), q.get(key))
                for key in ("switchover_to_complete_s", "vcpu_blocked_s", "demand_requests")}
    return out


def guest_verdict(serial: str, memory: int) -> Result:
    """The guest's own verdict line from its COM1 output; clean = no bad word, all read."""
    match = _VERDICT.search(serial)
    if not match:
        return {"bad": None, "checked": None, "clean": False}
    bad, checked, cpus = (int(g) for g in match.groups())
    want = (memory - FIRST_PAGE_ADDR) // PAGE
    return {"bad": bad, "checked": checked, "cpus": cpus,
            "clean": bad == 0 and checked == want and cpus == VCPUS}


def _run_variant(bench: BenchHost, variant: str, kernel: Path, testvm: Path, memory: int,
                 order: str, seed: int, link: twohost.LinkSpec | None = None) -> Result:
    warm_memory(bench.warm_mib(memory) << 20)
    append = f"seed={seed} order={order} cpus={VCPUS}"
    profile = bool(getattr(bench.args, "thread_profile", False))
    with threadprof.ThreadSampler(PROFILED if profile else ()) as sampler:
        if variant.startswith("qemu"):
            r = qemu_postcopy(bench.workdir, kernel, append, memory,
                              preempt=variant.endswith("preempt"), link=link)
        else:
            r = uffdd_postcopy(bench, testvm, kernel, append, memory,
                               minor=variant.endswith("minor"),
                               demand_dscp="off" if variant == UNMARKED else None)
    start, end = cast("tuple[float, float]", r.pop(WINDOW))
    if profile:
        r["threads"] = sampler.window(start, end)
    return r


# ====================================================================== QEMU


def qemu_postcopy(workdir: Path, kernel: Path, append: str, memory: int, *,
                  preempt: bool, link: twohost.LinkSpec | None = None) -> Result:
    """One QEMU postcopy migration of the guest on loopback TCP, or across ``link``
    (each QEMU in its own network namespace); its figures."""
    if link is None:
        return _qemu_postcopy(workdir, kernel, append, memory, preempt, None)
    with twohost.VethLink(link) as veth:
        return _qemu_postcopy(workdir, kernel, append, memory, preempt, veth)


def _qemu_postcopy(workdir: Path, kernel: Path, append: str, memory: int, preempt: bool,
                   veth: twohost.VethLink | None) -> Result:
    caps = ["postcopy-ram", "postcopy-blocktime", "events"]
    if preempt:
        caps.append("postcopy-preempt")
    tag = secrets.token_hex(3)
    host = "127.0.0.1" if veth is None else veth.dest_host
    src_prefix = () if veth is None else tuple(veth.prefix(veth.source_ns))
    dst_prefix = () if veth is None else tuple(veth.prefix(veth.dest_ns))
    t_start = time.time()
    dst: QemuVm | None = None
    src: QemuVm | None = None
    try:
        dst = QemuVm.start(workdir, f"q{tag}-dst", kernel=kernel, append=append, memory=memory,
                           vcpus=VCPUS, incoming=True, prefix=dst_prefix)
        src = QemuVm.start(workdir, f"q{tag}-src", kernel=kernel, append=append, memory=memory,
                           vcpus=VCPUS, incoming=False, prefix=src_prefix)
        arguments = {"capabilities": [{"capability": c, "state": True} for c in caps]}
        for vm in (dst, src):
            vm.qmp.execute("migrate-set-capabilities", arguments)
        dst.qmp.execute("migrate-incoming", {"uri": f"tcp:{host}:0"})
        incoming = dst.qmp.execute("query-migrate")
        port = incoming["socket-address"][0]["port"]
        src.qmp.execute("cont")
        _, t_written, _ = src.serial.wait_for(lambda t: "uffdd-guest: written" in t,
                                              BOOT_TIMEOUT)
        src.qmp.execute("migrate", {"uri": f"tcp:{host}:{port}"})
        src.qmp.execute("migrate-start-postcopy")
        t_stop, _ = src.qmp.wait_event("STOP", 120)
        dst.qmp.wait_event("RESUME", RUN_TIMEOUT)
        t_go = _send_go(dst)
        t_done, _ = dst.qmp.wait_event("MIGRATION", RUN_TIMEOUT,
                                       lambda d: d.get("status") == "completed")
        src.qmp.wait_event("MIGRATION", 120, lambda d: d.get("status") == "completed")
        src_info = src.qmp.execute("query-migrate")
        dst_info = dst.qmp.execute("query-migrate")
        _, t_verdict, _ = dst.serial.wait_for(lambda t: "uffdd-guest: verdict" in t,
                                              RUN_TIMEOUT)
        exit_status = dst.wait_exit(60)
        serial = dst.serial.text()
    except (QemuError, OSError, KeyError, IndexError, TypeError) as e:
        logs = "".join(f"\n{v.name}: {v.log_text()}" for v in (src, dst) if v is not None)
        raise BenchError(f"QEMU postcopy{' preempt' if preempt else ''}: {e}{logs}") from e
    finally:
        for v in (src, dst):
            if v is not None:
                v.stop()
    ram = src_info.get("ram") or {}
    vcpu_ms = dst_info.get("postcopy-vcpu-blocktime") or []
    blocked = sum(float(x) for x in vcpu_ms) / 1000 if vcpu_ms else None
    requests = ram.get("postcopy-requests")
    seconds = t_done - t_stop
    verdict = guest_verdict(serial, memory)
    # isa-debug-exit: QEMU exits with (value << 1) | 1; the guest writes 0 when clean.
    clean = bool(verdict["clean"]) and exit_status == 1
    return {
        "switchover_to_complete_s": round(seconds, 3),
        "vcpu_blocked_s": None if blocked is None else round(blocked, 3),
        "all_vcpus_blocked_s": _ms(dst_info.get("postcopy-blocktime")),
        "vcpu_blocked_s_each": [round(float(x) / 1000, 3) for x in vcpu_ms],
        "demand_requests": requests,
        "blocked_per_request_ms": _per(blocked, requests),
        "demand_p50_us": None, "demand_p99_us": None,  # QEMU 7.2 reports blocktime only
        "throughput_gb_s": round(memory / seconds / 1e9, 3) if seconds > 0 else None,
        "qemu_total_time_s": _ms(src_info.get("total-time")),
        "precopy_bytes": ram.get("precopy-bytes"),
        "postcopy_bytes": ram.get("postcopy-bytes"),
        "transferred_bytes": ram.get("transferred"),
        "boot_and_write_s": round(t_written - t_start, 3),
        "written_to_switchover_s": round(t_stop - t_written, 3),
        "guest_verify_s": round(t_verdict - t_go, 3),
        "guest": verdict, "guest_exit_status": exit_status, "guest_clean": clean,
        WINDOW: (t_stop, t_done),
    }


def _send_go(dst: QemuVm) -> float:
    """Send the guest its "go" byte until it says "go" (a byte that reached COM1 before
    the device state arrived is overwritten by it); returns when it was sent."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        sent = time.time()
        dst.send_serial(b"g")
        try:
            dst.serial.wait_for(lambda t: t == "uffdd-guest: go", 2.0)
            return sent
        except QemuError:
            if dst.serial.closed or time.monotonic() > deadline:
                raise


def _ms(v: Any) -> float | None:
    return round(float(v) / 1000, 3) if isinstance(v, int | float) else None


def _per(blocked: float | None, requests: Any) -> float | None:
    if blocked is None or not isinstance(requests, int | float) or not requests:
        return None
    return round(blocked * 1000 / float(requests), 4)


# ====================================================================== uffdd


def uffdd_postcopy(bench: BenchHost, testvm: Path, kernel: Path, append: str, memory: int, *,
                   minor: bool, demand_dscp: str | None = None) -> Result:
    """One migration of the guest in uffdd-testvm between two fresh uffdd daemons (with
    ``[peer] demand_dscp`` = ``demand_dscp`` when given)."""
    session = f"vq-{secrets.token_hex(4)}"
    token = secrets.token_hex(16)
    backing = "shmem" if minor else "anon"
    common = ["--session", session, "--token", token, "--memory", str(memory),
              "--backing", backing, "--vcpus", str(VCPUS), "--kernel", str(kernel),
              "--append", append, "--timeout", str(int(RUN_TIMEOUT))]
    p = bench.pair(background=True, demand_dscp=demand_dscp)
    procs: list[subprocess.Popen[str]] = []
    try:
        t_start = time.time()
        dest = _spawn([str(testvm), "dest", *common, "--socket", p.dst.api_socket, "--peer",
                       p.src.peer, "--mode", "minor" if minor else "missing"], bench.workdir)
        procs.append(dest)
        ready = _json_line(dest, 60, "dest ready", bench.workdir)
        t_dest_ready = float(ready["t_ready"])
        p.snapshot()
        source = _spawn([str(testvm), "source", *common, "--socket", p.src.api_socket],
                        bench.workdir)
        procs.append(source)
        t_source_start = time.time()
        exported = _json_line(source, BOOT_TIMEOUT, "source exported", bench.workdir)
        assert dest.stdin is not None
        dest.stdin.write(str(exported["cpu_state"]) + "\n")
        dest.stdin.flush()
        d = _json_line(dest, RUN_TIMEOUT, "dest result", bench.workdir)
        s = _json_line(source, 120, "source result", bench.workdir)
        status = session_status(p.dst, session)
        blocked = scrape(p.dst, "uffdd_vcpu_blocked_seconds_total")
        usage = p.usage()
        for proc in procs:
            proc.wait(60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        p.stop()
    if d.get("outcome") != "completed":
        raise BenchError(f"uffdd {'minor' if minor else 'missing'}: the session did not "
                         f"complete: {d.get('outcome')} ({_stderr_tail(bench.workdir)})")
    t_stop, t_done = float(exported["t_stopped"]), float(d["t_completed"])
    seconds = t_done - t_stop
    verdict = guest_verdict(str(d.get("serial", "")), memory)
    ram_match = d.get("pattern_hash") == s.get("pattern_hash")
    requests = status.get("faults")
    return {
        "switchover_to_complete_s": round(seconds, 3),
        "vcpu_blocked_s": blocked,
        "demand_requests": requests,
        "pages_demand": status.get("pages_demand"),
        "pages_background": status.get("pages_background"),
        "blocked_per_request_ms": _per(blocked, requests),
        "demand_p50_us": status.get("demand_latency_p50_us"),
        "demand_p99_us": status.get("demand_latency_p99_us"),
        "throughput_gb_s": round(memory / seconds / 1e9, 3) if seconds > 0 else None,
        "import_to_complete_s": round(t_done - float(d["t_accepted"]), 3),
        "stopped_to_import_s": round(float(d["t_accepted"]) - t_stop, 3),
        "dest_vmm_start_s": round(t_dest_ready - t_start, 3),
        "boot_and_write_s": round(float(exported["t_written"]) - t_source_start, 3),
        "guest_verify_s": (round(float(d["t_verdict"]) - float(d["t_go"]), 3)
                           if d.get("t_verdict") and d.get("t_go") else None),
        "hash_s": d.get("hash_seconds"),
        "usage": usage,
        "guest": verdict, "ram_hash_match": ram_match,
        "guest_clean": bool(verdict["clean"]) and bool(d.get("verified")) and ram_match,
        WINDOW: (t_stop, t_done),
    }


# ====================================================================== table


def table_rows(s: Result) -> list[tuple[str, str, object, object, object]]:
    """Rows of bench's table: uffdd figure, QEMU postcopy-preempt's, ratio."""
    rows: list[tuple[str, str, object, object, object]] = []
    cases = s.get("cases") or {}
    assert isinstance(cases, dict)
    for name, case in cases.items():
        runs = case.get("runs") or {}
        q = runs.get("qemu-postcopy-preempt") or {}
        q0 = runs.get("qemu-postcopy") or {}
        rows.append((NAME, f"{name} QEMU postcopy s (no preempt)",
                     None, q0.get("switchover_to_complete_s"), None))
        for mine in ("uffdd-missing", "uffdd-minor", UNMARKED):
            if mine not in runs:
                continue
            u = runs.get(mine) or {}
            mode = mine.removeprefix("uffdd-")
            if "error" in u:
                rows.append((NAME, f"{name} {mode}", "error", None, None))
                continue
            for key, label in (("switchover_to_complete_s", "switchover->all pages s"),
                               ("vcpu_blocked_s", "vCPU blocked s"),
                               ("demand_requests", "demand requests")):
                rows.append((NAME, f"{name} {mode} {label}", u.get(key), q.get(key),
                             ratio(u.get(key), q.get(key))))
        clean = all(bool(r.get("guest_clean")) for r in runs.values())
        rows.append((NAME, f"{name} guest verdicts", "clean" if clean else "NOT CLEAN",
                     None, None))
    return rows


def _spawn(cmd: list[str], workdir: Path) -> subprocess.Popen[str]:
    err = workdir / f"{Path(cmd[0]).name}-{cmd[1]}-{time.monotonic_ns()}.err"
    with open(err, "w") as f:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f,
                                text=True, start_new_session=True)


def _json_line(proc: subprocess.Popen[str], timeout: float, what: str,
               workdir: Path) -> dict[str, Any]:
    """The next JSON line a testvm prints, within ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"uffdd-testvm: no {what} in {timeout:.0f} s")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            raise BenchError(f"uffdd-testvm exited ({proc.wait(10)}) before {what}: "
                             f"{_stderr_tail(workdir)}")
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed


def _stderr_tail(workdir: Path) -> str:
    files = sorted(workdir.glob("uffdd-testvm-*.err"), key=lambda f: f.stat().st_mtime)
    text = ""
    for f in files[-2:]:
        with contextlib.suppress(OSError):
            text += f.read_text(errors="replace")[-1000:]
    return text


__all__ = ["NAME", "UNMARKED", "VARIANTS", "guest_verdict", "qemu_postcopy", "scenario",
           "table_rows", "uffdd_postcopy"]
