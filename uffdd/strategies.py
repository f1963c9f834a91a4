"""vCPU-exit resolution strategies: how a session turns a vCPU memory-fault exit into a verdict.

A strategy is given the exit (:class:`VcpuExit`) and a :class:`ResolveContext` through
which it may look at the page's state, have the page made present (fetched and
installed, joining a fetch already in flight), and hand the page to the session's
failure policy. It returns a :class:`Verdict`. Strategies are chosen per session; the two
built in are described in the README ("vCPU exits: strategies, verdicts and failure
policies"), and docs/architecture.md shows where an exit enters the data path.
Operators add their own with the entry point group ``uffdd.strategies`` or
``module:Class`` in the config; a strategy that cannot be loaded is refused when the
daemon starts or the session is created.
"""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol

from uffdd.errors import ConfigError

RESUME: Final = "resume"
POPULATE: Final = "populate"
INJECT: Final = "inject-memory-error"
CRASH: Final = "crash"
VERDICTS: Final = (RESUME, POPULATE, INJECT, CRASH)

ENTRY_POINT_GROUP: Final = "uffdd.strategies"


@dataclass(frozen=True, slots=True)
class VcpuExit:
    """A vCPU memory-fault exit as the VMM reported it.

    ``populate_errno`` is set when the VMM reports that the populate verdict failed.
    """

    vcpu: int
    gpa: int
    size: int
    access: str  # "read" | "write" | "exec"
    flags: int = 0
    populate_errno: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to a vCPU exit: ``kind`` is one of VERDICTS; the range is the page's."""

    kind: str
    gpa: int
    addr: int
    size: int
    reason: str | None = None


class ResolveContext(Protocol):
    """What a strategy may see and do. Provided by the import session."""

    session: str
    policy: str  # "crash" | "poison"
    reason: str  # why the last make_present() ended as it did ("" when installed)

    def page_state(self, gpa: int) -> str:
        """'absent', 'requested', 'installed', 'poisoned' or 'discarded'."""
        ...

    async def make_present(self, gpa: int) -> str:
        """Fetch (or join the fetch in flight) and install the page.

        Returns 'installed' (this call put it there), 'present' (it was installed before:
        if the vCPU still faults, its PTE is a swap/migration/poison entry), 'poisoned',
        or 'lost' (unrecoverable under the crash policy).
        """
        ...

    async def fail_page(self, gpa: int, reason: str) -> Verdict:
        """Apply the failure policy to a page: a crash or inject-memory-error verdict."""
        ...

    def verdict(self, kind: str, gpa: int, reason: str | None = None) -> Verdict:
        """A verdict covering the page that holds ``gpa``."""
        ...


class Strategy(abc.ABC):
    """Base class of strategies. Subclasses set ``name`` and implement ``resolve``.

    ``resolve`` runs in the daemon's event loop, once per exit, possibly for many vCPUs
    at once; it must not block (await the context's methods instead).
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    async def resolve(self, exit: VcpuExit, ctx: ResolveContext) -> Verdict:
        """Turn ``exit`` into a verdict."""


class ContinueThenPopulate(Strategy):
    """Never installed: install and resume. Installed before: populate. Populate failed: policy."""

    name = "continue-then-populate"

    async def resolve(self, exit: VcpuExit, ctx: ResolveContext) -> Verdict:
        if exit.populate_errno is not None:
            return await ctx.fail_page(exit.gpa, _populate_failed(exit.populate_errno))
        outcome = await ctx.make_present(exit.gpa)
        if outcome == "installed":
            return ctx.verdict(RESUME, exit.gpa)
        if outcome == "present":
            return ctx.verdict(POPULATE, exit.gpa, "page was installed before: populate it")
        if outcome == "poisoned":
            return ctx.verdict(INJECT, exit.gpa, "page is unrecoverable (poisoned)")
        return ctx.verdict(CRASH, exit.gpa, ctx.reason or _LOST)


class NoUffdWait(Strategy):
    """Never installed: install and resume. Installed before: slow GUP failed, so policy.

    "Installed before" means before the vCPU faulted. A page the background stream
    installs while the exit is on its way to us looks installed too, and that race is
    common. So the first exit of a vCPU on a present page is answered ``resume``; if the
    same vCPU exits on the same page again, the kernel really cannot map it and the
    page goes to the failure policy.
    """

    name = "no-uffd-wait"

    def __init__(self) -> None:
        self._resumed_present: dict[int, int] = {}  # vCPU -> page it was resumed on

    async def resolve(self, exit: VcpuExit, ctx: ResolveContext) -> Verdict:
        if exit.populate_errno is not None:
            return await ctx.fail_page(exit.gpa, _populate_failed(exit.populate_errno))
        outcome = await ctx.make_present(exit.gpa)
        page = ctx.verdict(RESUME, exit.gpa).gpa
        if outcome == "present":
            if self._resumed_present.pop(exit.vcpu, None) == page:
                return await ctx.fail_page(exit.gpa, "page was installed before and still faults")
            self._resumed_present[exit.vcpu] = page
            return ctx.verdict(RESUME, exit.gpa, "page is present (installed while the exit "
                               "was on its way): resume once")
        self._resumed_present.pop(exit.vcpu, None)
        if outcome == "installed":
            return ctx.verdict(RESUME, exit.gpa)
        if outcome == "poisoned":
            return ctx.verdict(INJECT, exit.gpa, "page is unrecoverable (poisoned)")
        return ctx.verdict(CRASH, exit.gpa, ctx.reason or _LOST)


_LOST: Final = "page is unrecoverable (source unreachable, lost or corrupt; policy crash)"


def _populate_failed(errno_value: int) -> str:
    return f"the VMM's populate failed with errno {errno_value}"


BUILTIN: Final[dict[str, type[Strategy]]] = {
    ContinueThenPopulate.name: ContinueThenPopulate,
    NoUffdWait.name: NoUffdWait,
}


def load(spec: str) -> Strategy:
    """Instantiate a strategy by built-in name, entry point name, or ``module:Class``.

    Raises ConfigError with a message that says what went wrong.
    """
    cls: object
    if spec in BUILTIN:
        cls = BUILTIN[spec]
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except Exception as e:  # any error while importing third-party code: refuse it
            raise ConfigError(f"strategy {spec!r} cannot be loaded: {e!r}") from None
    else:
        found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
                 if ep.name == spec]
        if not found:
            known = sorted(BUILTIN) + sorted(
                ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
            raise ConfigError(f"unknown strategy {spec!r}; known: {', '.join(known)}")
        try:
            cls = found[0].load()
        except Exception as e:
            raise ConfigError(f"strategy {spec!r} (entry point) cannot be loaded: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy {spec!r} is not a subclass of uffdd.strategies.Strategy")
    try:
        instance = cls()
    except Exception as e:
        raise ConfigError(f"strategy {spec!r} cannot be created: {e}") from None
    if not instance.name:
        raise ConfigError(f"strategy {spec!r} has no name")
    return instance
