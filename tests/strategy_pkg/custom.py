"""Strategies as an operator would write them, loaded by the tests from outside uffdd."""

from __future__ import annotations

import logging

from uffdd.strategies import ContinueThenPopulate, ResolveContext, Strategy, VcpuExit, Verdict

log = logging.getLogger("uffdd.test-strategy")


class CountingStrategy(Strategy):
    """Resolves like continue-then-populate and logs every 100th exit it saw."""

    name = "test-counting"

    def __init__(self) -> None:
        self._inner = ContinueThenPopulate()
        self.exits = 0

    async def resolve(self, exit: VcpuExit, ctx: ResolveContext) -> Verdict:
        self.exits += 1
        if self.exits == 1 or self.exits % 100 == 0:
            log.info("test-counting strategy: exit %d session=%s gpa=%#x state=%s",
                     self.exits, ctx.session, exit.gpa, ctx.page_state(exit.gpa))
        return await self._inner.resolve(exit, ctx)


class NotAStrategy:
    """Broken: not a subclass of Strategy."""

    name = "not-a-strategy"


class Unfinished(Strategy):
    """Broken: never implements resolve (abstract), so it cannot be created."""

    name = "unfinished"


class Nameless(ContinueThenPopulate):
    """Broken: no name to show in status and logs."""

    name = ""


class Raising(Strategy):
    """Buggy: raises on every exit. The vCPU must still get an answer (crash)."""

    name = "raising"

    async def resolve(self, exit: VcpuExit, ctx: ResolveContext) -> Verdict:
        raise RuntimeError("a bug in a third-party strategy")
