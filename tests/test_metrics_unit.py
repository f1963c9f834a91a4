"""uffdd.metrics: names, zeros in advance, per-session series and their removal."""

from __future__ import annotations

import threading
import uuid

import pytest
import trio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from uffdd import __version__, metrics


def value(name: str, **labels: str) -> float | None:
    """Return the current value of one sample in the default registry."""
    return REGISTRY.get_sample_value(name, labels)


def uffdd_families() -> dict[str, str]:
    """Return {family name: type} of every uffdd metric in the registry."""
    return {m.name: m.type for m in REGISTRY.collect() if m.name.startswith("uffdd_")}


def new_session(role: str = "import") -> metrics.SessionMetrics:
    """Return SessionMetrics for a session id no other test uses."""
    return metrics.SessionMetrics(f"test-{uuid.uuid4().hex[:8]}", role)


def test_required_names_and_types() -> None:
    families = uffdd_families()
    expected = {
        "uffdd_build_info": "gauge",
        "uffdd_faults": "counter",
        "uffdd_fault_resolution_seconds": "histogram",
        "uffdd_vcpu_blocked_seconds": "counter",
        "uffdd_session_vcpu_blocked_seconds": "counter",
        "uffdd_session_thread_blocked_seconds": "counter",
        "uffdd_pages_installed": "counter",
        "uffdd_peer_received_bytes": "counter",
        "uffdd_peer_sent_bytes": "counter",
        "uffdd_peer_rtt_seconds": "histogram",
        "uffdd_peer_reconnects": "counter",
        "uffdd_session_link_up": "gauge",
        "uffdd_session_state": "gauge",
        "uffdd_session_pages": "gauge",
        "uffdd_session_pages_installed": "gauge",
        "uffdd_session_pages_remaining": "gauge",
        "uffdd_session_pages_unrecoverable": "gauge",
        "uffdd_session_verdicts": "counter",
        "uffdd_verdicts": "counter",
        "uffdd_unrecoverable_pages": "counter",
        "uffdd_sessions": "gauge",
        "uffdd_refused_requests": "counter",
        "uffdd_last_fault_timestamp_seconds": "gauge",
    }
    for name, kind in expected.items():
        assert families.get(name) == kind, name


def test_naming_conventions() -> None:
    for name, kind in uffdd_families().items():
        assert name.startswith("uffdd_")
        assert "milliseconds" not in name and "_ms" not in name, name
        if kind == "histogram":
            assert name.endswith("_seconds"), name


def test_latency_buckets_have_the_slo_boundary() -> None:
    buckets = metrics.LATENCY_BUCKETS
    assert buckets[0] == pytest.approx(1e-5)
    assert buckets[-1] == pytest.approx(2.5)
    assert metrics.SLO_SECONDS in buckets
    assert list(buckets) == sorted(buckets)
    sample = value("uffdd_fault_resolution_seconds_bucket", resolved_by="demand", le="0.001")
    assert sample is not None


def test_build_info() -> None:
    assert value("uffdd_build_info", version=__version__) == 1


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("uffdd_faults_total", {"mode": "vcpu_exit", "access": "write"}),
        ("uffdd_fault_resolution_seconds_count", {"resolved_by": "background"}),
        ("uffdd_pages_installed_total", {"method": "poison"}),
        ("uffdd_peer_received_bytes_total", {"lane": "bulk"}),
        ("uffdd_peer_sent_bytes_total", {"lane": "demand"}),
        ("uffdd_verdicts_total", {"strategy": "no-uffd-wait", "verdict": "crash"}),
        ("uffdd_unrecoverable_pages_total", {"reason": "deadline"}),
        ("uffdd_sessions", {"role": "export", "state": "failed"}),
        ("uffdd_refused_requests_total", {"reason": "peer-protocol"}),
        ("uffdd_peer_reconnects_total", {}),
        ("uffdd_vcpu_blocked_seconds_total", {}),
        ("uffdd_last_fault_timestamp_seconds", {}),
    ],
)
def test_zeros_in_advance(name: str, labels: dict[str, str]) -> None:
    assert value(name, **labels) is not None


def test_every_refused_reason_exists() -> None:
    for reason in metrics.REFUSED_REASONS:
        assert value("uffdd_refused_requests_total", reason=reason) is not None


def test_refused_counts_and_rejects_unknown_reasons() -> None:
    before = value("uffdd_refused_requests_total", reason="bad-fds") or 0
    metrics.refused("bad-fds")
    assert value("uffdd_refused_requests_total", reason="bad-fds") == before + 1
    with pytest.raises(ValueError, match="unknown reason"):
        metrics.refused("because")


def test_session_series_exist_with_zeros() -> None:
    s = new_session()
    key = {"session": s.session, "role": "import"}
    for name in (
        "uffdd_session_link_up",
        "uffdd_session_pages",
        "uffdd_session_pages_installed",
        "uffdd_session_pages_remaining",
        "uffdd_session_pages_unrecoverable",
        "uffdd_session_vcpu_blocked_seconds_total",
    ):
        assert value(name, **key) == 0, name
    assert value("uffdd_session_state", **key, state="connecting") == 1
    assert value("uffdd_session_state", **key, state="running") == 0
    assert value("uffdd_session_verdicts_total", **key, verdict="populate") == 0
    s.close()


def test_fault_path_counts() -> None:
    s = new_session()
    faults = value("uffdd_faults_total", mode="minor", access="write") or 0
    blocked = value("uffdd_vcpu_blocked_seconds_total") or 0
    s.fault("minor", "write")
    s.fault("minor", "write")
    s.resolved("inflight", 0.0002)
    s.blocked(4242, 0.25)
    s.blocked(4242, 0.25)
    s.blocked(7, 1.0)
    assert value("uffdd_faults_total", mode="minor", access="write") == faults + 2
    assert (value("uffdd_last_fault_timestamp_seconds") or 0) > 1.6e9
    assert value("uffdd_vcpu_blocked_seconds_total") == pytest.approx(blocked + 1.5)
    key = {"session": s.session, "role": "import"}
    assert value("uffdd_session_vcpu_blocked_seconds_total", **key) == pytest.approx(1.5)
    thread = "uffdd_session_thread_blocked_seconds_total"
    assert value(thread, **key, thread="4242") == pytest.approx(0.5)
    assert value(thread, **key, thread="7") == pytest.approx(1.0)
    s.close()


def test_bulk_counts_match_one_by_one() -> None:
    """faults()/resolved_many() (the C loop's totals) expose what fault()/resolved() would."""
    s = new_session()
    samples = [0.000005, 0.00001, 0.00003, 0.0009, 0.001, 0.3, 7.0]
    bounds = [*metrics.LATENCY_BUCKETS, float("inf")]
    buckets = [0] * len(bounds)
    for x in samples:
        buckets[next(i for i, b in enumerate(bounds) if x <= b)] += 1

    def histogram() -> dict[str, float]:
        return {le: value("uffdd_fault_resolution_seconds_bucket", resolved_by="background",
                          le=le) or 0.0
                for le in ("1e-05", "0.001", "0.5", "+Inf")} | {
            "sum": value("uffdd_fault_resolution_seconds_sum", resolved_by="background") or 0,
            "count": value("uffdd_fault_resolution_seconds_count",
                           resolved_by="background") or 0}

    before = histogram()
    for x in samples:
        s.resolved("background", x)
    one_by_one = {k: v - before[k] for k, v in histogram().items()}
    s.resolved_many("background", buckets, sum(samples))
    in_bulk = {k: v - before[k] - one_by_one[k] for k, v in histogram().items()}
    assert in_bulk == pytest.approx(one_by_one)
    assert one_by_one["1e-05"] == 2 and one_by_one["0.001"] == 5 and one_by_one["count"] == 7
    with pytest.raises(ValueError):
        s.resolved_many("background", buckets[:-1], 0.0)
    faults = value("uffdd_faults_total", mode="missing", access="write") or 0
    s.faults("missing", "write", 5)
    assert value("uffdd_faults_total", mode="missing", access="write") == faults + 5
    s.close()


def test_faults_seen_sums_every_mode() -> None:
    s = new_session()
    before = metrics.faults_seen()
    s.fault("missing", "read")
    s.fault("vcpu_exit", "write")
    assert metrics.faults_seen() == before + 2
    s.close()


def test_exec_access_counts_as_read() -> None:
    s = new_session()
    before = value("uffdd_faults_total", mode="vcpu_exit", access="read") or 0
    s.fault("vcpu_exit", "exec")
    assert value("uffdd_faults_total", mode="vcpu_exit", access="read") == before + 1
    s.close()


def test_unknown_label_values_are_refused() -> None:
    s = new_session()
    with pytest.raises(ValueError):
        s.fault("major", "read")
    with pytest.raises(ValueError):
        s.resolved("magic", 0.1)
    with pytest.raises(ValueError):
        s.installed("memcpy", 1)
    with pytest.raises(ValueError):
        s.received("side", 1)
    with pytest.raises(ValueError):
        s.state("sleeping")
    with pytest.raises(ValueError):
        s.verdict("continue-then-populate", "maybe")
    with pytest.raises(ValueError):
        metrics.SessionMetrics("x", "sideways")
    s.close()


def test_progress_derives_remaining() -> None:
    s = new_session()
    s.progress(total=100, installed=60, unrecoverable=5)
    key = {"session": s.session, "role": "import"}
    assert value("uffdd_session_pages", **key) == 100
    assert value("uffdd_session_pages_installed", **key) == 60
    assert value("uffdd_session_pages_unrecoverable", **key) == 5
    assert value("uffdd_session_pages_remaining", **key) == 35
    s.close()


def test_peer_and_install_counters() -> None:
    s = new_session("export")
    sent = value("uffdd_peer_sent_bytes_total", lane="bulk") or 0
    received = value("uffdd_peer_received_bytes_total", lane="demand") or 0
    copies = value("uffdd_pages_installed_total", method="copy") or 0
    rtts = value("uffdd_peer_rtt_seconds_count") or 0
    reconnects = value("uffdd_peer_reconnects_total") or 0
    s.sent("bulk", 2 << 20)
    s.received("demand", 4096)
    s.installed("copy", 512)
    s.rtt(0.0003)
    s.reconnected()
    assert value("uffdd_peer_sent_bytes_total", lane="bulk") == sent + (2 << 20)
    assert value("uffdd_peer_received_bytes_total", lane="demand") == received + 4096
    assert value("uffdd_pages_installed_total", method="copy") == copies + 512
    assert value("uffdd_peer_rtt_seconds_count") == rtts + 1
    assert value("uffdd_peer_reconnects_total") == reconnects + 1
    s.link(True)
    assert value("uffdd_session_link_up", session=s.session, role="export") == 1
    s.close()


def test_state_moves_the_sessions_gauge() -> None:
    def sessions(state: str) -> float:
        return value("uffdd_sessions", role="export", state=state) or 0

    connecting, running = sessions("connecting"), sessions("running")
    s = new_session("export")
    assert sessions("connecting") == connecting + 1
    s.state("running")
    s.state("running")  # no double count
    assert sessions("connecting") == connecting
    assert sessions("running") == running + 1
    key = {"session": s.session, "role": "export"}
    assert value("uffdd_session_state", **key, state="running") == 1
    assert value("uffdd_session_state", **key, state="connecting") == 0
    s.close()
    assert sessions("running") == running
    s.close()  # idempotent
    assert sessions("running") == running


def test_verdicts_and_unrecoverable() -> None:
    s = new_session()
    total = value("uffdd_verdicts_total", strategy="continue-then-populate", verdict="populate")
    lost = value("uffdd_unrecoverable_pages_total", reason="lost") or 0
    s.verdict("continue-then-populate", "populate")
    s.unrecoverable("lost", 3)
    key = {"session": s.session, "role": "import"}
    assert value("uffdd_session_verdicts_total", **key, verdict="populate") == 1
    assert (
        value("uffdd_verdicts_total", strategy="continue-then-populate", verdict="populate")
        == (total or 0) + 1
    )
    assert value("uffdd_unrecoverable_pages_total", reason="lost") == lost + 3
    s.close()


def test_close_removes_every_session_series_and_keeps_daemon_counters() -> None:
    s = new_session()
    s.state("running")
    s.fault("missing", "read")
    s.blocked(11, 0.5)
    s.verdict("no-uffd-wait", "resume")
    s.progress(10, 5)
    s.link(True)
    faults = value("uffdd_faults_total", mode="missing", access="read")
    s.close()
    leftovers = [
        sample
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.labels.get("session") == s.session
    ]
    assert leftovers == []
    assert value("uffdd_faults_total", mode="missing", access="read") == faults
    # Late calls from a fault thread must not resurrect the series.
    s.blocked(11, 0.5)
    s.progress(10, 6)
    s.link(False)
    s.state("completed")
    s.verdict("no-uffd-wait", "resume")
    assert value("uffdd_session_pages", session=s.session, role="import") is None
    assert (
        value(
            "uffdd_session_thread_blocked_seconds_total",
            session=s.session,
            role="import",
            thread="11",
        )
        is None
    )


def test_same_id_import_and_export_do_not_collide() -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    imp = metrics.SessionMetrics(name, "import")
    exp = metrics.SessionMetrics(name, "export")
    imp.progress(10, 1)
    exp.progress(10, 9)
    imp.close()
    assert value("uffdd_session_pages_installed", session=name, role="export") == 9
    exp.close()


def test_thread_safety_of_blocked() -> None:
    s = new_session()

    def work() -> None:
        for _ in range(2000):
            s.blocked(1, 0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    key = {"session": s.session, "role": "import", "thread": "1"}
    assert value("uffdd_session_thread_blocked_seconds_total", **key) == pytest.approx(16.0)
    s.close()


async def http_get(port: int, request: bytes) -> bytes:
    """Send one raw HTTP request to 127.0.0.1:port and return the whole answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_serve_metrics_over_http(nursery: trio.Nursery) -> None:
    port = await nursery.start(metrics.serve_metrics, "127.0.0.1", 0)
    answer = await http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "uffdd_faults" in names
    assert "uffdd_fault_resolution_seconds" in names
    missing = await http_get(port, b"GET /nope HTTP/1.0\r\n\r\n")
    assert missing.startswith(b"HTTP/1.0 404")
    post = await http_get(port, b"POST /metrics HTTP/1.0\r\n\r\n")
    assert post.startswith(b"HTTP/1.0 405")
    head_only = await http_get(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head_only.endswith(b"\r\n\r\n")
    nursery.cancel_scope.cancel()


async def test_serve_metrics_openmetrics(nursery: trio.Nursery) -> None:
    port = await nursery.start(metrics.serve_metrics, "127.0.0.1", 0)
    request = b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n"
    answer = await http_get(port, request)
    assert b"application/openmetrics-text" in answer.split(b"\r\n\r\n")[0]
    assert answer.rstrip().endswith(b"# EOF")
    nursery.cancel_scope.cancel()


async def test_serve_metrics_stops_on_cancel() -> None:
    with trio.move_on_after(5) as outer:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(metrics.serve_metrics, "127.0.0.1", 0)
            nursery.cancel_scope.cancel()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
    assert not outer.cancelled_caught
