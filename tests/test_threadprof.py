"""The bench's thread sampler (uffdd/lab/threadprof.py) reads the kernel's per-thread
accounting: a thread that burns CPU in the window shows that CPU, under its OS name;
a window before it ran shows nothing of it. No daemon."""

from __future__ import annotations

import ctypes
import hashlib
import threading
import time
from pathlib import Path

from uffdd.lab.threadprof import ThreadSampler

_PR_SET_NAME = 15


def _burn(seconds: float) -> None:
    """Burn CPU without the GIL (hashlib releases it for large buffers), so the
    sampler thread keeps its 50 ms pace."""
    ctypes.CDLL(None).prctl(_PR_SET_NAME, b"tp-burner", 0, 0, 0)
    data = bytes(1 << 22)
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        hashlib.sha256(data).digest()


def test_a_busy_thread_shows_its_cpu_under_its_name() -> None:
    comm = Path("/proc/self/comm").read_text().strip()
    with ThreadSampler((comm,)) as sampler:
        time.sleep(0.2)
        before = time.time()
        burner = threading.Thread(target=_burn, args=(0.3,))
        burner.start()
        burner.join()
        after = time.time()
        time.sleep(0.2)
    rows = {r["thread"]: r for r in sampler.window(before, after + 0.1)}
    assert "tp-burner" in rows, rows
    assert float(rows["tp-burner"]["cpu_s"]) >= 0.2, rows["tp-burner"]  # its 0.3 s, sampled
    quiet = {r["thread"] for r in sampler.window(sampler.samples[0].at, before - 0.1)}
    assert "tp-burner" not in quiet


def test_nothing_to_sample_starts_no_thread() -> None:
    with ThreadSampler(()) as sampler:
        pass
    assert sampler.samples == [] and sampler.window(0, 1) == []
