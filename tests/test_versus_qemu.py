"""``uffdd bench --scenario versus-qemu --quick``: QEMU and uffdd migrate the same guest.

The smoke run is real: two QEMU postcopy migrations (with and without postcopy-preempt)
and two uffdd migrations (MISSING and MINOR) of native/guest's multiboot guest, each
checked by the guest itself (every page's word read back on the destination). Only the
JSON's shape and the verdicts are checked, never a timing. Under CI=true a missing
QEMU, /dev/kvm or native build fails instead of skipping (deploy/setup.sh installs
qemu-system-x86).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import require
from uffdd.lab import bench, harness, versus_qemu
from uffdd.lab.qemu import qemu_binary


def _require_tools() -> None:
    require(qemu_binary() is not None, "qemu-system-x86_64 (Debian: qemu-system-x86)")
    require(harness.kvm_usable(), "/dev/kvm")
    for tool in ("uffdd-testvm", "uffdd-guest.elf"):
        require(harness.native_tool(tool) is not None, f"make -C native ({tool})")


def test_quick_versus_qemu_runs_both_vmms_with_clean_verdicts() -> None:
    _require_tools()
    out = subprocess.run([sys.executable, "-m", "uffdd", "bench", "--quick", "--json",
                          "--scenario", "versus-qemu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:] + out.stdout[-4000:]
    report = json.loads(out.stdout)
    s = report["scenarios"]["versus-qemu"]
    assert "error" not in s and "skipped" not in s, s
    assert s["vcpus"] == 2
    assert s["qemu"]
    assert set(s["cases"]) == {f"{m >> 20}M-{o}" for m in versus_qemu.QUICK_SIZES
                               for o in versus_qemu.QUICK_ORDERS}
    for case in s["cases"].values():
        runs = case["runs"]
        assert set(runs) == set(versus_qemu.VARIANTS)
        for name, r in runs.items():
            assert "error" not in r, (name, r)
            # the guest's own verdict: every page above 2 MiB read back, none wrong
            assert r["guest"]["bad"] == 0, (name, r["guest"])
            assert r["guest"]["checked"] == case["pages_checked"], (name, r["guest"])
            assert r["guest"]["cpus"] == 2
            assert r["guest_clean"] is True, (name, r)
            for key in ("switchover_to_complete_s", "throughput_gb_s", "boot_and_write_s",
                        "guest_verify_s"):
                assert isinstance(r[key], float) and r[key] > 0, (name, key, r[key])
            assert isinstance(r["vcpu_blocked_s"], float), (name, r)
            assert isinstance(r["demand_requests"], int), (name, r)
        for name in ("qemu-postcopy", "qemu-postcopy-preempt"):
            assert runs[name]["guest_exit_status"] == 1  # isa-debug-exit with value 0
            assert len(runs[name]["vcpu_blocked_s_each"]) == 2
        for name in ("uffdd-missing", "uffdd-minor"):
            r = runs[name]
            assert r["ram_hash_match"] is True
            assert r["pages_demand"] + r["pages_background"] > 0
            assert r["import_to_complete_s"] <= r["switchover_to_complete_s"]
        assert set(case["ratios"]) == {f"{u}/{q}" for u in ("uffdd-missing", "uffdd-minor")
                                       for q in ("qemu-postcopy", "qemu-postcopy-preempt")}
    assert s["guest_verdicts_clean"] is True
    assert "qemu_seconds" not in out.stdout  # no figure typed in from another machine


def test_guest_verdict_parsing() -> None:
    memory = 64 << 20
    pages = (memory - (2 << 20)) // 4096
    ok = versus_qemu.guest_verdict(
        f"uffdd-guest: go\nuffdd-guest: verdict bad=0 checked={pages} cpus=2\n", memory)
    assert ok == {"bad": 0, "checked": pages, "cpus": 2, "clean": True}
    bad = versus_qemu.guest_verdict(f"uffdd-guest: verdict bad=3 checked={pages} cpus=2", memory)
    assert bad["clean"] is False and bad["bad"] == 3
    short = versus_qemu.guest_verdict("uffdd-guest: verdict bad=0 checked=10 cpus=2", memory)
    assert short["clean"] is False  # pages the guest never read are not a clean verdict
    assert versus_qemu.guest_verdict("uffdd-guest: error x", memory)["clean"] is False


def test_table_has_versus_qemu_rows() -> None:
    run = {"switchover_to_complete_s": 1.0, "vcpu_blocked_s": 0.5, "demand_requests": 10,
           "guest_clean": True}
    report = {"wall_seconds": 1.0, "scenarios": {"versus-qemu": {"cases": {"64M-rand": {
        "runs": {"qemu-postcopy": run, "qemu-postcopy-preempt": run,
                 "uffdd-missing": {**run, "switchover_to_complete_s": 0.5},
                 "uffdd-minor": {"error": "x"}}}}}}}
    text = bench.render_table(report)
    assert "64M-rand missing switchover->all pages s" in text
    assert "64M-rand minor  " in text or "64M-rand minor" in text
    # a run that failed leaves the case's verdicts not clean
    assert "NOT CLEAN" in text
