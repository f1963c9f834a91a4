"""``uffdd demo``: a whole postcopy migration on this one machine, verified byte by byte.

Two daemons on loopback (a source and a destination), a source VMM that fills guest RAM
with a seeded pattern and exports it, and a destination VMM that imports it and touches
every page from N threads (or vCPUs) in random order, checking each one. The VMM is the
KVM test VMM when /dev/kvm works and it is built, else the native stand-in, else the
Python stand-in (``--vmm`` chooses).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from uffdd import harness, testcerts
from uffdd.client import Client, ClientError
from uffdd.errors import UffddError
from uffdd.pyvmm import PAGE, parse_size
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
    p.add_argument("--tls", action="store_true",
                   help="peer link over mutual TLS with throwaway certificates (openssl CLI)")


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1, 1 << 30)
    vmm = _choose_vmm(args)
    say = _Say(quiet=args.json)
    workdir = Path(tempfile.mkdtemp(prefix="uffdd-demo-"))
    result: dict[str, object] = {"verified": False, "vmm": vmm, "backing": args.backing}
    src = dst = None
    try:
        if args.backing == "hugetlb":
            harness.reserve_hugepages(2 * (args.memory >> 21) + 4)
        tls_configs = testcerts.daemon_configs(workdir / "pki") if args.tls else {}
        src = harness.start_daemon(workdir, "source", config=tls_configs.get("source"),
                                   extra=["--enable-fault-injection"] if args.lose_pages else [])
        dst = harness.start_daemon(workdir, "destination", config=tls_configs.get("destination"))
        say(f"uffdd demo: {args.memory >> 20} MiB {args.backing} guest, VMM {vmm}, "
            f"{_width(args, vmm)} {'vCPUs' if vmm == 'kvm' else 'threads'}, seed {seed}")
        say(f"  source daemon      {src.api_socket}  peer {src.peer}")
        say(f"  destination daemon {dst.api_socket}")
        result.update(_migrate(args, vmm, seed, workdir, src, dst, say))
        result["tls"] = testcerts.lanes_used_tls(src.log_text())  # what happened, not asked
    except (harness.HarnessError, ClientError, OSError, UffddError) as e:
        result["error"] = str(e)
        say(f"uffdd demo: {e}")
    finally:
        for d in (src, dst):
            if d is not None:
                d.stop()
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
    if args.vmm != "auto":
        return str(args.vmm)
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
             src: harness.DaemonProcess, dst: harness.DaemonProcess, say: _Say
             ) -> dict[str, object]:
    session = f"demo-{seed}"
    token = os.urandom(16).hex()
    ready = workdir / "source.ready"
    common = ["--session", session, "--token", token, "--memory", str(args.memory),
              "--backing", args.backing, "--seed", str(seed)]
    source = harness.start_vmm(_vmm_cmd(vmm, "source", args, common + [
        "--socket", src.api_socket, "--ready-file", str(ready)]), "source", workdir, ready)
    source.wait_ready()
    lost = _lose_pages(args, src, session, seed)
    t0 = time.monotonic()
    dest_args = common + ["--socket", dst.api_socket, "--peer", src.peer, "--mode", args.mode,
                          "--order", args.order, "--policy", args.policy]
    dest = harness.start_vmm(_vmm_cmd(vmm, "dest", args, dest_args), "dest", workdir)
    status = _follow(dst, session, dest, quiet=args.json)
    dest_result = dest.result()
    seconds = time.monotonic() - t0
    source_result = source.result(timeout=60)
    status = _final_status(dst, session) or status
    return _combine(args, dest_result, source_result, status, seconds, lost)


def _vmm_cmd(vmm: str, role: str, args: argparse.Namespace, common: list[str]) -> list[str]:
    extra: list[str] = []
    if role == "dest":
        extra += ["--threads", str(args.threads)]
        if args.exits:
            extra.append("--exits")
        if args.strategy:
            extra += ["--strategy", args.strategy]
        extra += ["--deadline", str(args.deadline)]
    if vmm == "python":
        if args.exits or args.strategy:
            raise harness.HarnessError("--exits needs a native VMM (make -C native)")
        return harness.python_vmm(role, *common, *_python_only(extra, role))
    tool = harness.native_tool("uffdd-testvm" if vmm == "kvm" else "uffdd-vmsim")
    if tool is None:
        raise harness.HarnessError(f"the {vmm} VMM is not built: run make -C native")
    if vmm == "kvm":
        vcpus = str(args.vcpus or min(8, args.threads))
        common = [a for a in common if a not in ("--ready-file",)]
        extra = [x for x in extra if x != str(args.threads)]
        extra = [e for e in extra if e != "--threads"] + ["--vcpus", vcpus]
    return [str(tool), role, *common, *extra]


def _python_only(extra: list[str], role: str) -> list[str]:
    out: list[str] = []
    it = iter(extra)
    for item in it:
        if item == "--deadline":
            next(it)
            continue
        out.append(item)
    del role
    return out


def _lose_pages(args: argparse.Namespace, src: harness.DaemonProcess, session: str,
                seed: int) -> list[int]:
    """Tell the source daemon (started with fault injection) to fail N pages."""
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
                    bar.update(int(status["pages_installed"]), int(status["pages_total"]))
                time.sleep(0.1)
    return status


def _final_status(dst: harness.DaemonProcess, session: str) -> dict[str, object] | None:
    try:
        with Client(dst.api_socket, timeout=10) as c:
            sessions = c.status(session)
    except ClientError:
        return None
    return sessions[0] if sessions else None


def _combine(args: argparse.Namespace, dest: dict[str, object], source: dict[str, object],
             status: dict[str, object], seconds: float, lost: list[int]) -> dict[str, object]:
    verified = bool(dest.get("verified")) and dest.get("exit_status") == 0
    if "hash" in source and dest.get("hash") not in (None, source["hash"]) and not lost:
        verified = False
    outcome = dest.get("outcome") or status.get("reason") or status.get("state")
    if dest.get("event") == "failed" or status.get("state") == "failed":
        outcome = "crashed"
        verified = bool(dest.get("verified", False)) and not dest.get("mismatches")
    result: dict[str, object] = {
        "verified": verified,
        "outcome": outcome,
        "reason": status.get("reason") if outcome == "crashed" else None,
        "memory_bytes": args.memory,
        "threads": args.threads,
        "pages_total": status.get("pages_total", dest.get("pages")),
        "pages_demand": status.get("pages_demand"),
        "pages_background": status.get("pages_background"),
        "pages_zero": status.get("pages_zero"),
        "pages_poisoned": status.get("pages_poisoned", 0),
        "pages_lost_injected": len(lost),
        "bytes_received": status.get("bytes_received"),
        "seconds": round(seconds, 3),
        "fault_latency_p50_us": status.get("demand_latency_p50_us"),
        "fault_latency_p99_us": status.get("demand_latency_p99_us"),
        "touch_latency_p50_us": dest.get("fault_latency_p50_us"),
        "touch_latency_p99_us": dest.get("fault_latency_p99_us"),
        "faults": status.get("faults"),
        "mismatches": dest.get("mismatches"),
        "tls": False,
        "dest": dest,
        "source": source,
    }
    return result


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
    mib = int(r.get("memory_bytes") or 0) >> 20
    secs = float(r.get("seconds") or 0)
    say("")
    say(f"  outcome            {r.get('outcome')}")
    say(f"  pages              {r.get('pages_total')} total: {r.get('pages_demand')} on demand, "
        f"{r.get('pages_background')} in the background, {r.get('pages_zero')} zero pages")
    say(f"  poisoned pages     {r.get('pages_poisoned')}")
    say(f"  bytes received     {r.get('bytes_received')}")
    say(f"  time               {secs:.2f} s ({mib / secs if secs else 0:.0f} MiB/s)")
    say(f"  fault latency      p50 {r.get('fault_latency_p50_us')} us, "
        f"p99 {r.get('fault_latency_p99_us')} us (fault seen -> page installed)")
    say(f"  verified           {'yes: every byte matched' if r.get('verified') else 'NO'}")


def _rmtree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        try:
            child.rmdir() if child.is_dir() else child.unlink()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass
