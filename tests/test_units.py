"""Unit tests of pure logic: protocol schemas, page state, configuration."""

from __future__ import annotations

import pytest

from uffdd import config, protocol
from uffdd.errors import ConfigError, RequestError
from uffdd.importer import pagestate


def _region(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"gpa": 0, "addr": 1 << 32, "size": 1 << 20, "page_size": 4096,
                               "uffd": 0, "mode": "missing"}
    base.update(kw)
    return base


def test_frame_round_trip() -> None:
    frame = protocol.pack({"op": "status", "id": 1})
    (length,) = protocol.LENGTH.unpack(frame[:4])
    assert protocol.unpack_body(frame[4 : 4 + length]) == {"op": "status", "id": 1}


def test_check_length() -> None:
    with pytest.raises(RequestError, match="empty"):
        protocol.check_length(0, 10)
    with pytest.raises(RequestError) as e:
        protocol.check_length(11, 10)
    assert e.value.code == "frame-too-large"


def test_bool_is_not_an_int() -> None:
    with pytest.raises(RequestError, match="'id'"):
        protocol.check_request({"op": "status", "id": True})


def test_regions_parse() -> None:
    specs = protocol.parse_regions([_region(), _region(gpa=1 << 30, addr=(1 << 32) + (1 << 20))],
                                   role="import")
    assert [s.pages for s in specs] == [256, 256]


@pytest.mark.parametrize(("region", "word", "code"), [
    # A bad mode, or minor without its fd, is a malformed request (issue 14), not a
    # region the kernel disagrees with.
    (_region(mode="sideways"), "mode", "bad-request"),
    (_region(addr=(1 << 32) + 1), "addr", "bad-region"),
    (_region(page_size=8192), "page_size", "bad-region"),
    (_region(size=4096 * 3 + 1), "size", "bad-region"),
    (_region(mode="minor"), "fd", "bad-request"),
    (_region(gpa=(1 << 64) - 4096, size=8192), "wraps", "bad-region"),
])
def test_bad_region_shapes(region: dict[str, object], word: str, code: str) -> None:
    with pytest.raises(RequestError, match=word) as e:
        protocol.parse_regions([region], role="import")
    assert e.value.code == code


def test_overlap_by_host_address() -> None:
    with pytest.raises(RequestError, match="overlap"):
        protocol.parse_regions([_region(), _region(gpa=1 << 30, addr=(1 << 32) + 4096)],
                               role="import")


def test_peer_header_checks() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.unpack_peer_header(b"\x93\x01\x02\x03")
    with pytest.raises(protocol.ProtocolError):
        protocol.peer_int({"t": "req", "r": -1}, "r")


def test_pagemap_transitions_and_totals() -> None:
    pm = pagestate.PageMap([4, 2])
    assert pm.total == 6 and not pm.complete
    pm.set(0, 1, pagestate.REQUESTED)
    pm.set(0, 2, pagestate.INSTALLED)
    assert list(pm.installable_runs(0, 0, 4)) == [(0, 2), (3, 1)]
    pm.set(0, 3, pagestate.DISCARDED)
    assert list(pm.installable_runs(0, 0, 4)) == [(0, 2)]
    for p in (0, 1):
        pm.set(0, p, pagestate.INSTALLED)
    pm.set(1, 0, pagestate.POISONED)
    pm.set(1, 1, pagestate.INSTALLED)
    assert pm.complete and pm.installed == 4 and pm.poisoned == 1 and pm.discarded == 1
    assert pm.have_bitmap(0) == bytes([0b1111])


def test_config_defaults_and_override() -> None:
    c = config.load(None)
    assert c.session.policy == "crash" and c.limits.max_frame_bytes == 1 << 20
    c2 = config.override(c, api={"socket": "/tmp/x.sock"})
    assert c2.api.socket == "/tmp/x.sock" and c.api.socket != "/tmp/x.sock"


def test_config_errors_name_file_and_key() -> None:
    with pytest.raises(ConfigError, match=r"f\.toml: unknown key 'limits\.max_sesions'"):
        config.from_dict({"limits": {"max_sesions": 1}}, "f.toml")
    with pytest.raises(ConfigError, match=r"'peer\.listen' must be HOST:PORT"):
        config.from_dict({"peer": {"listen": "nowhere"}}, "f.toml")
    with pytest.raises(ConfigError, match="must be a list of integers"):
        config.from_dict({"api": {"allowed_uids": ["root"]}}, "f.toml")
    assert config.from_dict({"peer": {"connect_timeout": 3}}).peer.connect_timeout == 3.0
