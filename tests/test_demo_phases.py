"""``uffdd demo`` reports the migration's own time apart from the rest of the run."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import require
from uffdd.lab import harness


def test_demo_reports_migration_time_apart_from_the_run() -> None:
    require(harness.native_tool("uffdd-vmsim") is not None, "make -C native (uffdd-vmsim)")
    out = subprocess.run([sys.executable, "-m", "uffdd", "demo", "--vmm", "vmsim", "--memory",
                          "16M", "--threads", "2", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["verified"] is True
    mig, whole = r["migration_seconds"], r["seconds"]
    assert isinstance(mig, float) and mig > 0
    # the session (import accepted -> completed) lies inside the VMM's whole run
    assert mig <= whole
    assert r["vmm_start_seconds"] >= 0 and r["after_completion_seconds"] >= 0
    assert isinstance(r["guest_seconds"], int | float)
