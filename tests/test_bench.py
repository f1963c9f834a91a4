"""Smoke test of ``uffdd bench``: tiny sizes, the JSON shape only — never timing thresholds.

The figures of a --quick run mean nothing (the machine is shared and noisy); what must
hold is that every scenario ran real migrations to completion and reported its fields.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import require
from uffdd.lab import bench, harness


def _bench(*args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "uffdd", "bench", "--quick", "--json", *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:] + out.stdout[-4000:]
    report = json.loads(out.stdout)
    assert isinstance(report, dict)
    return report


def test_quick_bench_json_shape() -> None:
    require(harness.native_tool("uffdd-vmsim") is not None, "make -C native (uffdd-vmsim)")
    report = _bench("--scenario", "demand-latency", "--scenario", "fault-throughput",
                    "--scenario", "bulk", "--scenario", "cost")
    assert report["quick"] is True
    assert isinstance(report["machine"], dict) and report["machine"]["cpus"]
    sc = report["scenarios"]
    assert isinstance(sc, dict)
    assert set(sc) == {"demand-latency", "fault-throughput", "bulk", "cost"}
    for name, s in sc.items():
        assert "error" not in s, (name, s)

    lat = sc["demand-latency"]["uffdd"]
    for key in ("touch_p50_us", "touch_p90_us", "touch_p99_us", "cpu_us_per_fault", "faults"):
        assert isinstance(lat[key], int | float), key
    assert lat["pages_background"] == 0, "background off: every page must come on demand"
    assert set(sc["demand-latency"]["idle"]["cpu_percent"]) == {"source", "destination"}

    tp = sc["fault-throughput"]["threads"]
    assert set(tp) == {str(t) for t in bench.QUICK.threads}
    for row in tp.values():
        assert row["uffdd"]["faults_per_second"] > 0

    assert sc["bulk"]["uffdd"]["gb_per_s"] > 0
    for row in sc["cost"]["sizes"].values():
        for side in ("source", "destination"):
            assert row[side]["peak_rss_mib"] > 0
            assert row[side]["cpu_s_per_gib"] >= 0


def test_quick_concurrent_migrations() -> None:
    """Several migrations at once through one daemon pair, each verified by its VMMs."""
    require(harness.native_tool("uffdd-vmsim") is not None, "make -C native (uffdd-vmsim)")
    sc = _bench("--scenario", "concurrent")["scenarios"]
    assert isinstance(sc, dict) and "error" not in sc["concurrent"], sc
    widths = sc["concurrent"]["widths"]
    assert set(widths) == {"1", "2"}, widths
    for n, row in widths.items():
        assert row["sessions"] == int(n) and len(row["session_seconds"]) == int(n), row
        assert row["aggregate_gb_per_s"] > 0 and row["fairness_slowest_over_fastest"] >= 1
        assert set(row["cpu_s_per_gib"]) == {"source", "destination"}, row
    assert widths["1"]["ratio_to_one"] == 1.0
    assert "concurrent" in bench.render_table({"wall_seconds": 1.0, "scenarios": sc})


def test_table_renders_every_scenario() -> None:
    """The human table from a hand-made report (no daemons needed)."""
    report = {"wall_seconds": 1.0, "scenarios": {
        "demand-latency": {"uffdd": {"touch_p50_us": 30.0}, "reference": {"p50_us": 28.0},
                           "ratio": {"p50": 1.07}, "idle": {"cpu_percent": {"source": 0.0}}},
        "bulk": {"uffdd": {"gb_per_s": 1.5}, "reference": {"GBps": 1.6}, "ratio": 0.94},
        "kvm": {"skipped": "no /dev/kvm"},
        "migration": {"error": "boom"},
    }}
    text = bench.render_table(report)
    for word in ("demand-latency", "bulk", "kvm", "skipped", "migration", "error", "1.07"):
        assert word in text
