"""Long-running data-path threads owned by Trio tasks.

A session's lanes and fault loop are plain threads (docs/architecture.md, "Tasks and
threads"), but each belongs to a Trio task in the session's nursery: cancelling the
task calls the thread's ``stop`` and waits for it to return, so a session ends as a whole.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Final, TypeVar

import trio

from uffdd._linux import sched

T = TypeVar("T")

# Trio's default limiter allows 40 worker threads in all; data-path threads live as long
# as their session, so they get a limiter of their own that the API's short jobs don't share.
DATA_PATH_THREADS = trio.CapacityLimiter(4096)

# A demand thread (the export side's demand lane, the import side's fault loop) shares
# the GIL with the bulk threads. A thread that wants the GIL waits up to the switch
# interval (5 ms by default) for a holder busy in Python code, so a request arriving
# while a bulk thread scans a chunk waited milliseconds. Process wide, but only
# contended threads pay for it.
DEMAND_SWITCH_INTERVAL: Final = 0.0002


def use_short_switch_interval() -> None:
    """Lower the GIL switch interval to ``DEMAND_SWITCH_INTERVAL`` (never raise it)."""
    if sys.getswitchinterval() > DEMAND_SWITCH_INTERVAL:
        sys.setswitchinterval(DEMAND_SWITCH_INTERVAL)


def thread_name(fn: Callable[[], object]) -> str:
    """The OS name of the thread running ``fn`` (15 bytes at most, what ``top -H``,
    ``ps -L`` and ``perf`` show): the function's own name, so a profile of the daemon
    says which data-path thread spent the time (``_receive_bulk``, ``run`` of the fault
    loop, ``serve_bulk``...) instead of Trio's generic worker name."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None) or "data-path"
    return name.lstrip("_")[:15]


def _with_slice(fn: Callable[[], T], slice_ns: int) -> Callable[[], T]:
    """``fn`` run with a scheduler slice of ``slice_ns`` (0: unchanged); the pooled thread
    gets the default slice back when ``fn`` returns."""
    if not slice_ns:
        return fn

    def body() -> T:
        shortened = sched.request_slice(slice_ns)
        try:
            return fn()
        finally:
            if shortened:
                sched.default_slice()

    return body


async def to_data_path_thread(fn: Callable[[], T], *, slice_ns: int = 0) -> T:
    """``trio.to_thread.run_sync`` for a data-path thread: its own limiter, its name
    (``thread_name``), and for a demand thread the scheduler slice ``[peer]
    demand_slice_us`` asks for (``slice_ns``; 0: the kernel's default)."""
    body = _with_slice(fn, slice_ns)
    return await trio.to_thread.run_sync(body, limiter=DATA_PATH_THREADS,
                                         thread_name=thread_name(fn))


async def run_thread(fn: Callable[[], T], stop: Callable[[], None], *,
                     slice_ns: int = 0) -> T:
    """Run ``fn`` in a thread; on cancellation call ``stop`` and wait for ``fn`` to return.
    ``slice_ns``: a demand thread's scheduler slice (``to_data_path_thread``)."""
    finished = False

    async def stop_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not finished:
                stop()

    error: Exception | None = None
    value: T | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_cancel)
        try:
            value = await to_data_path_thread(fn, slice_ns=slice_ns)
        except Exception as e:  # re-raised below, outside the nursery: callers see it bare
            error = e
        finally:
            finished = True
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return value  # type: ignore[return-value]
