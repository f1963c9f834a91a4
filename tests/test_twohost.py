"""Two hosts on one machine: each daemon in its own network namespace, joined by a veth
pair (uffdd.lab.twohost, what ``--link veth`` runs), and a migration across them arrives
byte-exact, over a real TCP link between two network stacks, optionally shaped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Pair, assert_byte_exact, require
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


def test_link_spec_parsing() -> None:
    assert LinkSpec.parse("veth") == LinkSpec(None)
    assert LinkSpec.parse("veth,rate=10gbit") == LinkSpec("10gbit")
    for bad in ("wire", "veth,rate=fast", "veth,delay=5ms"):
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
