"""``uffdd demo``: a whole postcopy migration on this one machine, verified byte by byte.

Two daemons on loopback (a source and a destination), a source VMM that fills guest RAM
with a seeded pattern and exports it, and a destination VMM that imports it and touches
every page from N threads (or vCPUs) in random order, checking each one. The VMM is the
KVM test VMM when /dev/kvm works and it is built, else the native stand-in, else the
Python stand-in (``--vmm`` chooses).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import sys
import tempfile
import time
from pathlib import Path

from uffdd.client import Client, ClientError
from uffdd.errors import UffddError
from uffdd.lab import harness, testcerts, twohost
from uffdd.lab.pyvmm import PAGE, parse_size
from uffdd.status import ProgressBar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", type=parse_size, default=256 << 20, metavar="SIZE",
                   help="guest RAM, e.g. 256M or 1G (default 256M)")
    p.add_argument("--threads", type=int, default=4, metavar="N",
                   help="touching threads of the destination VMM (default 4)")
    p.add_argument("--vcpus", type=int, default=None, metavar="N",
                   help="vCPUs of the KVM test VMM (default: --threads, at most 8)")
    p.add_argument("--backing", choices=("anon", "shmem", "hugetlb"), default="shmem",
                   help="guest RAM backing (default shmem)")
    p.add_argument("--mode", choices=("missing", "minor"), default="missing",
                   help="userfaultfd mode of the destination (minor: shmem/hugetlb only)")
    p.add_argument("--order", choices=("seq", "rand"), default="rand")
    p.add_argument("--vmm", choices=("auto", "kvm", "vmsim", "python"), default="auto",
                   help="which VMM plays source and destination (default: auto)")
    p.add_argument("--exits", action="store_true",
                   help="vCPU-exit mode: faults come back to the VMM (UFFD_FEATURE_SIGBUS) "
                        "and are resolved by the strategy")
    p.add_argument("--strategy", default=None, help="vCPU-exit strategy of the session")
    p.add_argument("--policy", choices=("crash", "poison"), default="crash",
                   help="failure policy for pages that cannot be had (default crash)")
    p.add_argument("--lose-pages", type=int, default=0, metavar="N",
                   help="make the source unable to serve N pages the destination touches")
    p.add_argument("--deadline", type=float, default=10.0,
                   help="seconds a page may stay unobtainable (default 10)")
    p.add_argument("--seed", type=int, default=None, help="pattern seed (default: random)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--link", metavar="veth[,rate=R]", type=twohost.LinkSpec.parse, default=None,
                   help="put each daemon in its own network namespace, joined by a veth pair "
                        "(optionally shaped to rate R, e.g. 10gbit): two hosts on one machine")
    p.add_argument("--tls", action="store_true",
                   help="peer link over mutual TLS with throwaway certificates (openssl CLI)")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (0 only if verified and not crashed)."""
    seed = args.seed if args.seed is not None else random.randrange(1, 1 << 30)
    say = _Say(quiet=args.json)
    result: dict[str, object] = {"verified": False, "backing": args.backing}
    try:
        vmm = _choose_vmm(args)
    except harness.HarnessError as e:
        result["error"] = str(e)
        vmm = ""
    result["vmm"] = vmm
    workdir = Path(tempfile.mkdtemp(prefix="uffdd-demo-"))
    src = dst = None
    link = None
    try:
        if "error" in result:
            raise harness.HarnessError(str(result["error"]))
        if args.link is not None and args.tls:
            raise harness.HarnessError("--link with --tls: the throwaway certificates name "
                                       "loopback only")
        if args.backing == "hugetlb":
            harness.reserve_hugepages(2 * (args.memory >> 21) + 4)
        tls_configs = testcerts.daemon_configs(workdir / "pki") if args.tls else {}
        src_ns = dst_ns = None
        src_host = dst_host = "127.0.0.1"
        if args.link is not None:  # plaintext off loopback: only when said, explicitly
            link = twohost.VethLink(args.link).__enter__()
            tls_configs = {"source": "[peer]\ntls = false\n",
                           "destination": "[peer]\ntls = false\n"}
            src_ns, src_host, dst_ns, dst_host = (link.source_ns, link.source_host,
                                                  link.dest_ns, link.dest_host)
        src = harness.start_daemon(workdir, "source", config=tls_configs.get("source"),
                                   extra=["--enable-fault-injection"] if args.lose_pages else [],
                                   netns=src_ns, peer_host=src_host)
        dst = harness.start_daemon(workdir, "destination", config=tls_configs.get("destination"),
                                   netns=dst_ns, peer_host=dst_host)
        say(f"uffdd demo: {args.memory >> 20} MiB {args.backing} guest, VMM {vmm}, "
            f"{_width(args, vmm)} {'vCPUs' if vmm == 'kvm' else 'threads'}, seed {seed}"
            f"{', vCPU exits' if args.exits else ''}, policy {args.policy}"
            f"{f', {args.lose_pages} pages lost' if args.lose_pages else ''}")
        say(f"  source daemon      {src.api_socket}  peer {src.peer}")
        say(f"  destination daemon {dst.api_socket}")
        result.update(_migrate(args, vmm, seed, workdir, src, dst))
        result["tls"] = testcerts.lanes_used_tls(src.log_text())  # what happened, not asked
    except (harness.HarnessError, ClientError, OSError, UffddError) as e:
        result["error"] = str(e)
        say(f"uffdd demo: {e}")
    finally:
        for d in (src, dst):
            if d is not None:
                d.stop()
        if link is not None:
            link.close()
        if args.keep:
            result["workdir"] = str(workdir)
        else:
            _rmtree(workdir)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        _summary(result, say)
    return 0 if result.get("verified") and result.get("outcome") != "crashed" else 1


def _choose_vmm(args: argparse.Namespace) -> str:
    """The KVM test VMM when it can run, else the native stand-in, else the Python one.

    Lost pages and the vCPU-exit path need a VMM that survives SIGBUS and acts on
    verdicts, and whose verification skips poisoned pages: the native stand-in.
    """
    needs_vmsim = args.exits or args.lose_pages or args.policy == "poison"
    if args.vmm != "auto":
        if args.vmm == "python" and needs_vmsim:
            raise harness.HarnessError("--exits, --lose-pages and --policy poison need the "
                                       "native VMM (make -C native)")
        return str(args.vmm)
    if needs_vmsim:
        if harness.native_tool("uffdd-vmsim") is None:
            raise harness.HarnessError("--exits, --lose-pages and --policy poison need "
                                       "native/build/uffdd-vmsim (make -C native)")
        return "vmsim"
    if harness.kvm_usable() and harness.native_tool("uffdd-testvm"):
        return "kvm"
    if harness.native_tool("uffdd-vmsim"):
        return "vmsim"
    return "python"


def _width(args: argparse.Namespace, vmm: str) -> int:
    if vmm == "kvm":
        return int(args.vcpus or min(8, args.threads))
    return int(args.threads)


def _migrate(args: argparse.Namespace, vmm: str, seed: int, workdir: Path,
             src: harness.DaemonProcess, dst: harness.DaemonProcess) -> dict[str, object]:
    session = f"demo-{seed}"
    token = os.urandom(16).hex()
    common = ["--session", session, "--token", token, "--memory", str(args.memory),
              "--backing", args.backing, "--seed", str(seed)]
    source, expect = _start_source(vmm, args, common, src, workdir)
    lost = _lose_pages(args, src, session, seed)
    t0 = time.monotonic()
    wall0 = time.time()
    dest_args = [*common, "--socket", dst.api_socket, "--peer", src.peer, "--order", args.order]
    dest = harness.start_vmm(_dest_cmd(vmm, args, dest_args, expect), "dest", workdir)
    try:
        status = _follow(dst, session, dest, quiet=args.json)
        dest_result = dest.result()
        seconds = time.monotonic() - t0
        source_result = _source_result(source, ended_badly=dest_result.get("exit_status") != 0)
    finally:
        for p in (dest.proc, source.proc):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    status = _final_status(dst, session) or status
    result = _combine(args, vmm, dest_result, source_result, status, seconds, lost)
    result.update(_phases(status, dest_result, wall0, seconds))
    return result


def _phases(status: dict[str, object], dest: dict[str, object], wall0: float,
            seconds: float) -> dict[str, object]:
    """The migration's own time apart from the rest of the run.

    ``migration_seconds`` is the destination daemon's session time: import accepted ->
    completed. ``seconds`` (the whole run) adds the destination VMM's start, its guest's
    work (which overlaps the migration) and its verification after it.
    """
    started, elapsed = status.get("started"), status.get("elapsed_seconds")
    if not isinstance(started, int | float) or not isinstance(elapsed, int | float):
        return {"migration_seconds": None}
    guest = dest.get("vcpu_seconds", dest.get("touch_seconds"))
    return {
        "migration_seconds": round(float(elapsed), 3),
        "vmm_start_seconds": round(max(0.0, float(started) - wall0), 3),
        "guest_seconds": guest if isinstance(guest, int | float) else None,
        "after_completion_seconds": round(
            max(0.0, seconds - (float(started) - wall0) - float(elapsed)), 3),
    }


def _tool(vmm: str) -> str:
    tool = harness.native_tool("uffdd-testvm" if vmm == "kvm" else "uffdd-vmsim")
    if tool is None:
        raise harness.HarnessError(f"the {vmm} VMM is not built: run make -C native")
    return str(tool)


def _start_source(vmm: str, args: argparse.Namespace, common: list[str],
                  src: harness.DaemonProcess, workdir: Path) -> tuple[harness.VmmProcess, str]:
    """Start the source VMM and wait until it has exported; returns it and the RAM hash
    the KVM destination must reproduce ("" for the other VMMs, which check the pattern)."""
    if vmm == "kvm":
        source = harness.start_vmm([_tool(vmm), "source", *common, "--socket", src.api_socket,
                                    "--vcpus", str(_width(args, vmm))], "source", workdir)
        exported = _first_json_line(source)
        return source, str(exported.get("hash", ""))
    ready = workdir / "source.ready"
    cmd_args = [*common, "--socket", src.api_socket, "--ready-file", str(ready)]
    if vmm == "python":
        cmd = harness.python_vmm("source", *cmd_args)
    else:
        cmd = [_tool(vmm), "source", *cmd_args, "--threads", "2"]
    source = harness.start_vmm(cmd, "source", workdir, ready)
    source.wait_ready()
    return source, ""


def _first_json_line(vmm: harness.VmmProcess, timeout: float = 120.0) -> dict[str, object]:
    """The KVM source prints an 'exported' line once its export is in place."""
    stream = vmm.proc.stdout
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    line = stream.readline() if ready else ""
    if not line.startswith("{"):
        raise harness.HarnessError(f"the {vmm.role} VMM did not export:\n{line}{vmm.stderr()}")
    parsed: dict[str, object] = json.loads(line)
    return parsed


def _dest_cmd(vmm: str, args: argparse.Namespace, dest_args: list[str], expect: str
              ) -> list[str]:
    """The destination VMM's command line (each VMM has its own flags)."""
    policy = ["--policy", args.policy]
    strategy = ["--strategy", args.strategy] if args.strategy else []
    if vmm == "python":
        return harness.python_vmm("dest", *dest_args, "--mode", args.mode,
                                  "--threads", str(args.threads), *policy)
    extra = [*strategy, *policy, "--deadline", str(args.deadline), "--mode", args.mode]
    if args.exits:
        extra.append("--exits")
    if vmm == "kvm":
        return [_tool(vmm), "dest", *dest_args, "--vcpus", str(_width(args, vmm)),
                "--expect-hash", expect, *extra]
    return [_tool(vmm), "dest", *dest_args, "--threads", str(args.threads), *extra]


def _source_result(source: harness.VmmProcess, *, ended_badly: bool) -> dict[str, object]:
    """The source VMM's result; after a failed destination it may never hear the end."""
    try:
        return source.result(timeout=15 if ended_badly else 120)
    except harness.HarnessError as e:
        return {"event": "unknown", "error": str(e)}


def _lose_pages(args: argparse.Namespace, src: harness.DaemonProcess, session: str,
                seed: int) -> list[int]:
    """Tell the source daemon (started with fault injection) to fail N pages.

    The pages hold data (the pattern's zero pages are left out) and every destination
    VMM touches every page, so each lost page is one the guest needs.
    """
    if not args.lose_pages:
        return []
    rng = random.Random(seed)
    pages = args.memory // PAGE
    candidates = [p for p in range(pages) if p % 11 != 5]
    lost = sorted(rng.sample(candidates, args.lose_pages))
    with Client(src.api_socket) as c:
        c.request({"op": "inject", "session": session, "lose": lost})
    return lost


def _follow(dst: harness.DaemonProcess, session: str, dest: harness.VmmProcess, *,
            quiet: bool) -> dict[str, object]:
    """Show a live progress bar from the destination daemon's status until the VMM exits."""
    status: dict[str, object] = {}
    with ProgressBar(sys.stderr, enabled=not quiet, label="migrating") as bar:
        try:
            client = Client(dst.api_socket, timeout=10)
        except ClientError:
            return status
        with client:
            while dest.proc.poll() is None:
                try:
                    sessions = client.status(session)
                except ClientError:
                    sessions = []
                if sessions:
                    status = sessions[0]
                    bar.update(_int(status["pages_installed"]), _int(status["pages_total"]))
                time.sleep(0.1)
    return status


def _final_status(dst: harness.DaemonProcess, session: str) -> dict[str, object] | None:
    try:
        with Client(dst.api_socket, timeout=10) as c:
            sessions = c.status(session)
    except ClientError:
        return None
    return sessions[0] if sessions else None


def _outcome(dest: dict[str, object], status: dict[str, object]) -> tuple[str, str | None]:
    """'completed', 'completed-with-poisoned-pages' or 'crashed' (with the reason)."""
    crashed = (dest.get("event") == "failed" or bool(dest.get("crash"))
               or status.get("state") in ("failed", "cancelled")
               or dest.get("outcome") in ("failed", "crashed"))
    if crashed:
        reason = dest.get("reason") or status.get("reason") or dest.get("error")
        return "crashed", str(reason) if reason else None
    outcome = dest.get("outcome") or status.get("reason") or status.get("state")
    return str(outcome), None


def _combine(args: argparse.Namespace, vmm: str, dest: dict[str, object],
             source: dict[str, object], status: dict[str, object], seconds: float,
             lost: list[int]) -> dict[str, object]:
    outcome, reason = _outcome(dest, status)
    mismatches = dest.get("mismatches", dest.get("guest_mismatches"))
    # The native VMMs check every byte of every page they could read; lost pages are
    # the only ones allowed to be missing, and only under the poison policy.
    verified = (bool(dest.get("verified")) and dest.get("exit_status") == 0
                and not mismatches and outcome != "crashed")
    if not lost and "hash" in source and dest.get("hash") not in (None, source["hash"]):
        verified = False
    poisoned = status.get("pages_poisoned", dest.get("daemon_pages_poisoned", 0))
    return {
        "verified": verified,
        "outcome": outcome,
        "reason": reason,
        "vmm": vmm,
        "exits": args.exits,
        "strategy": status.get("strategy") or args.strategy,
        "policy": args.policy,
        "memory_bytes": args.memory,
        "threads": _width(args, vmm),
        "pages_total": status.get("pages_total", dest.get("pages")),
        "pages_demand": status.get("pages_demand"),
        "pages_background": status.get("pages_background"),
        "pages_zero": status.get("pages_zero"),
        "pages_poisoned": poisoned,
        "pages_lost_injected": len(lost),
        "vmm_memory_errors": dest.get("poisoned_pages", dest.get("unreadable_pages")),
        "vcpu_exits": dest.get("exits"),
        "bytes_received": status.get("bytes_received"),
        "seconds": round(seconds, 3),
        "fault_latency_p50_us": status.get("demand_latency_p50_us"),
        "fault_latency_p99_us": status.get("demand_latency_p99_us"),
        "touch_latency_p50_us": dest.get("fault_latency_p50_us"),
        "touch_latency_p99_us": dest.get("fault_latency_p99_us"),
        "faults": status.get("faults"),
        "mismatches": mismatches,
        "dest": dest,
        "source": source,
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


class _Say:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr if self.quiet else sys.stdout, flush=True)


def _summary(r: dict[str, object], say: _Say) -> None:
    if "error" in r:
        say(f"FAILED: {r['error']}")
        return
    mib = _int(r.get("memory_bytes")) >> 20
    seconds = r.get("seconds")
    secs = float(seconds) if isinstance(seconds, (int, float)) else 0.0
    say("")
    reason = f" ({r['reason']})" if r.get("reason") else ""
    say(f"  outcome            {r.get('outcome')}{reason}")
    say(f"  pages              {r.get('pages_total')} total: {r.get('pages_demand')} on demand, "
        f"{r.get('pages_background')} in the background, {r.get('pages_zero')} zero pages")
    say(f"  poisoned pages     {r.get('pages_poisoned')} "
        f"(lost on purpose: {r.get('pages_lost_injected')})")
    say(f"  bytes received     {r.get('bytes_received')}")
    mig = r.get("migration_seconds")
    if isinstance(mig, int | float) and mig > 0:
        say(f"  migration          {mig:.2f} s ({mib / mig:.0f} MiB/s), import accepted -> "
            f"completed")
        say(f"  whole run          {secs:.2f} s: destination VMM start "
            f"{_secs(r.get('vmm_start_seconds'))}, guest's work {_secs(r.get('guest_seconds'))} "
            f"(overlaps the migration), {_secs(r.get('after_completion_seconds'))} after "
            f"completion (the guest's rest and the VMM's verification)")
    else:
        say(f"  time               {secs:.2f} s ({mib / secs if secs else 0:.0f} MiB/s)")
    say(f"  fault latency      p50 {r.get('fault_latency_p50_us')} us, "
        f"p99 {r.get('fault_latency_p99_us')} us (fault seen -> page installed)")
    good = "yes: every byte matched" + (" (poisoned pages left out)" if r.get("pages_poisoned")
                                        else "")
    say(f"  verified           {good if r.get('verified') else 'NO'}")


def _secs(v: object) -> str:
    return f"{float(v):.2f} s" if isinstance(v, int | float) else "-"


def _rmtree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir() if child.is_dir() else child.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()
