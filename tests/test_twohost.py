"""Two hosts on one machine: each daemon in its own network namespace, joined by a veth
pair (uffdd.lab.twohost, what ``--link veth`` runs), and a migration across them arrives
byte-exact, over a real TCP link between two network stacks, optionally shaped."""

from __future__ import annotations

import os
import shutil
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
                                   prefix=link.prefix(link.source_ns),
                                   peer_host=link.source_host)
        try:
            dst = harness.start_daemon(tmp_path, "destination", config=PLAINTEXT,
                                       prefix=link.prefix(link.dest_ns),
                                       peer_host=link.dest_host)
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


def test_link_spec_parsing() -> None:
    assert LinkSpec.parse("veth") == LinkSpec(None)
    assert LinkSpec.parse("veth,rate=10gbit") == LinkSpec("10gbit")
    for bad in ("wire", "veth,rate=fast", "veth,delay=5ms"):
        with pytest.raises(ValueError):
            LinkSpec.parse(bad)
