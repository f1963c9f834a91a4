"""Long-running data-path threads owned by Trio tasks.

A session's lanes and fault loop are plain threads (docs/architecture.md, "Tasks and
threads"), but each belongs to a Trio task in the session's nursery: cancelling the
task calls the thread's ``stop`` and waits for it to return, so a session ends as a whole.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Final, TypeVar

import trio

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


async def run_thread(fn: Callable[[], T], stop: Callable[[], None]) -> T:
    """Run ``fn`` in a thread; on cancellation call ``stop`` and wait for ``fn`` to return."""
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
            value = await trio.to_thread.run_sync(fn, limiter=DATA_PATH_THREADS)
        except Exception as e:  # re-raised below, outside the nursery: callers see it bare
            error = e
        finally:
            finished = True
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return value  # type: ignore[return-value]
