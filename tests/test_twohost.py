"""Two hosts on one machine: each daemon in its own network namespace, joined by a veth
pair (uffdd.lab.twohost, what ``--link veth`` runs), and a migration across them arrives
byte-exact, over a real TCP link between two network stacks, optionally shaped."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Pair, assert_byte_exact, require
from uffdd import config, peer
from uffdd.errors import ConfigError
from uffdd.lab import harness
from uffdd.lab.twohost import LinkSpec, VethLink

# Off loopback the peer link is plaintext only when the config says so, explicitly.
PLAINTEXT = "[peer]\ntls = false\n"


@pytest.fixture(params=["veth", "veth,rate=2gbit"])
def two_hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    require(os.geteuid() == 0 and shutil.which("ip") is not None,
            "network namespaces need root and iproute2")
    with VethLink(LinkSpec.parse(request.param)) as link:
        src = harness.start_daemon(tmp_path, "source", config=PLAINTEXT,
                                   netns=link.source_ns, peer_host=link.source_host)
        try:
            dst = harness.start_daemon(tmp_path, "destination", config=PLAINTEXT,
                                       netns=link.dest_ns, peer_host=link.dest_host,
                                       metrics=True)
        except BaseException:
            src.stop()
            raise
        try:
            yield Pair(tmp_path, src, dst)
        finally:
            codes = (src.stop(), dst.stop())
        assert codes == (0, 0), codes
        for d in (src, dst):
            assert "Traceback" not in d.log_text(), d.log_text()[-4000:]


def test_migration_across_two_network_namespaces(two_hosts: Pair) -> None:
    assert not two_hosts.src.peer.startswith("127."), two_hosts.src.peer
    dest, source = two_hosts.migrate(memory="64M")
    assert_byte_exact(dest, source)
    text = two_hosts.dst.log_text()
    assert f"link up to {two_hosts.src.peer}" in text, text[-3000:]
    metrics = two_hosts.dst.metrics_text()  # scraped inside its namespace
    assert "uffdd_pages_installed_total" in metrics


EF_TOS = 46 << 2  # DSCP EF in the TOS byte
TC_PRIO_INTERACTIVE = 6


def test_demand_lane_is_marked_on_a_shaped_link(tmp_path: Path) -> None:
    """With the default ``[peer] demand_dscp`` (EF), the kernel reports the demand lane's
    sockets on both hosts with TOS 0xb8 and priority 6, and the bulk lane's with neither,
    while a migration crosses a link with priority bands; and it arrives byte-exact."""
    require(os.geteuid() == 0 and shutil.which("ip") is not None
            and shutil.which("ss") is not None, "network namespaces need root, iproute2, ss")
    # 100 mbit: 64 MiB take ~5 s of bulk, so the lanes are up while they are looked at.
    with VethLink(LinkSpec.parse("veth,rate=100mbit")) as link:
        src = harness.start_daemon(tmp_path, "source", config=PLAINTEXT,
                                   netns=link.source_ns, peer_host=link.source_host)
        dst = harness.start_daemon(tmp_path, "destination", config=PLAINTEXT,
                                   netns=link.dest_ns, peer_host=link.dest_host)
        pair = Pair(tmp_path, src, dst)
        try:
            src_vmm, dst_vmm = pair.start_migration(memory="64M")
            seen: dict[str, set[tuple[int, int]]] = {}
            deadline = time.monotonic() + 120
            while dst_vmm.proc.poll() is None and time.monotonic() < deadline:
                for side, ns in (("source", link.source_ns), ("dest", link.dest_ns)):
                    port = src.peer.rpartition(":")[2]
                    for local, remote, tos, prio in link.tcp_marks(ns):
                        if port in (local.rpartition(":")[2], remote.rpartition(":")[2]):
                            seen.setdefault(side, set()).add((tos, prio))
                if all(len(seen.get(side, ())) >= 2 for side in ("source", "dest")):
                    break
                time.sleep(0.05)
            d, s = dst_vmm.result(300), src_vmm.result(60)
        finally:
            codes = (src.stop(), dst.stop())
    assert_byte_exact(d, s)
    assert codes == (0, 0), codes
    # one demand lane (marked) and one bulk lane (not) on each side, as the kernel has them
    want = {(EF_TOS, TC_PRIO_INTERACTIVE), (0, 0)}
    assert seen.get("source") == want and seen.get("dest") == want, seen


@pytest.mark.parametrize(("value", "tos", "prio"), [("ef", EF_TOS, TC_PRIO_INTERACTIVE),
                                                     ("af41", 34 << 2, TC_PRIO_INTERACTIVE),
                                                     ("off", 0, 0)])
def test_mark_demand_sets_the_kernel_options(value: str, tos: int, prio: int) -> None:
    cfg = config.from_dict({"peer": {"demand_dscp": value}}).peer
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sock:
        peer.mark_demand(sock, cfg)
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == tos
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == prio


def test_demand_dscp_config_refuses_a_bad_value() -> None:
    assert config.load(None).peer.demand_dscp == "ef"
    for bad in ("EF", "46", "cs8", "af44", "", "on"):
        with pytest.raises(ConfigError, match=r"f\.toml: key 'peer\.demand_dscp' must be"):
            config.from_dict({"peer": {"demand_dscp": bad}}, "f.toml")
    with pytest.raises(ConfigError, match="must be str"):
        config.from_dict({"peer": {"demand_dscp": 46}}, "f.toml")


def test_link_spec_parsing() -> None:
    assert LinkSpec.parse("veth") == LinkSpec(None)
    assert LinkSpec.parse("veth,rate=10gbit") == LinkSpec("10gbit")
    assert LinkSpec.parse("veth,rate=1gbit,fifo") == LinkSpec("1gbit", fifo=True)
    assert str(LinkSpec.parse("veth,fifo,rate=1gbit,latency=5ms")) == \
        "veth,rate=1gbit,latency=5ms,fifo"
    for bad in ("wire", "veth,rate=fast", "veth,delay=5ms", "veth,fifo", "veth,latency=5"):
        with pytest.raises(ValueError):
            LinkSpec.parse(bad)


def _uffdd(*args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "uffdd", *args, "--json"], capture_output=True,
                         text=True, timeout=300)
    report = json.loads(out.stdout)  # one JSON object (the bench indents it)
    assert isinstance(report, dict), out.stdout
    assert out.returncode == 0, (report, out.stderr[-3000:])
    return report


def test_demo_and_bench_take_the_link() -> None:
    require(os.geteuid() == 0 and shutil.which("ip") is not None,
            "network namespaces need root and iproute2")
    demo = _uffdd("demo", "--link", "veth,rate=1gbit", "--memory", "32M", "--vmm", "python")
    assert demo["verified"] is True and demo["outcome"] == "completed", demo
    bench = _uffdd("bench", "--quick", "--link", "veth", "--scenario", "bulk")
    assert bench["link"] == "veth", bench
    scenario = bench["scenarios"]["bulk"]  # type: ignore[index]
    assert "error" not in scenario and scenario["uffdd"]["gb_per_s"] > 0, scenario
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                            text=True).stdout.split() if "uffdd-" in ns]


def test_versus_qemu_takes_the_link() -> None:
    """QEMU's postcopy (each QEMU in its own namespace, the URI over the veth) and
    uffdd's, marked and unmarked, migrate the same guest across one shaped link, every
    guest verdict clean (the JSON's shape and verdicts only, never a timing)."""
    from tests.test_versus_qemu import _require_tools
    from uffdd.lab import versus_qemu

    require(os.geteuid() == 0 and shutil.which("ip") is not None,
            "network namespaces need root and iproute2")
    _require_tools()
    bench = _uffdd("bench", "--quick", "--link", "veth,rate=1gbit", "--scenario", "versus-qemu")
    s = bench["scenarios"]["versus-qemu"]  # type: ignore[index]
    assert "error" not in s and s["link"] == "veth,rate=1gbit", s
    for case in s["cases"].values():
        runs = case["runs"]
        assert set(runs) == {*versus_qemu.VARIANTS, versus_qemu.UNMARKED}, runs
        for name, r in runs.items():
            assert r["guest_clean"] is True, (name, r)
        assert runs[versus_qemu.UNMARKED]["ram_hash_match"] is True
        assert f"{versus_qemu.UNMARKED}/qemu-postcopy-preempt" in case["ratios"]
