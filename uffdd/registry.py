"""The sessions a daemon holds: running imports and exports, and the recently finished.

The daemon (which runs sessions in its nursery) and the VMM API (which creates them and
answers ``status``) both need this table; it lives here, below both, so that neither
imports the other for it. The table knows nothing of nurseries, sockets or the wire: it
admits a new session (``check_new_session``), records it (``add``), moves it to the
finished list when its task ends (``finish``) and counts the pages the running ones hold
(``running_pages``, for limits.max_pages_per_daemon).
"""

from __future__ import annotations

import trio

from uffdd.errors import RequestError
from uffdd.exporter.session import ExportSession
from uffdd.importer.session import ImportSession
from uffdd.session import SessionBase

#: Finished sessions kept for ``status`` and for a late ``subscribe``.
KEEP_FINISHED = 64


class Registry:
    """Every session of one daemon, by role and id; the finished ones in order of ending."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self.imports: dict[str, ImportSession] = {}
        self.exports: dict[str, ExportSession] = {}
        self.finished: list[SessionBase] = []
        self._emptied: trio.Event | None = None  # set by finish() when none runs any more

    async def wait_empty(self) -> None:
        """Return once no session's task is running (the daemon's shutdown waits here,
        under its grace deadline)."""
        while self.imports or self.exports:
            self._emptied = trio.Event()
            await self._emptied.wait()

    def all_sessions(self) -> list[SessionBase]:
        return [*self.imports.values(), *self.exports.values(), *self.finished]

    def running(self) -> list[SessionBase]:
        """The sessions whose task has not ended (some may have failed already)."""
        return [*self.imports.values(), *self.exports.values()]

    def check_new_session(self, role: str, session_id: str) -> None:
        """Refuse a session whose id runs already in this role, or one past max_sessions."""
        table: dict[str, ImportSession] | dict[str, ExportSession]
        table = self.imports if role == "import" else self.exports
        if session_id in table:
            raise RequestError("session-exists", f"an {role} session {session_id!r} is running")
        if len(self.imports) + len(self.exports) >= self.max_sessions:
            raise RequestError("limit", f"the daemon already runs "
                               f"{self.max_sessions} sessions (limits.max_sessions)")

    def add(self, session: SessionBase) -> None:
        if isinstance(session, ImportSession):
            self.imports[session.session_id] = session
        else:
            assert isinstance(session, ExportSession)
            self.exports[session.session_id] = session

    def finish(self, session: SessionBase) -> None:
        """The session's task ended: it leaves the running table for the finished list."""
        table: dict[str, ImportSession] | dict[str, ExportSession]
        table = self.imports if session.role == "import" else self.exports
        if table.get(session.session_id) is session:
            del table[session.session_id]
        self.finished.append(session)
        del self.finished[:-KEEP_FINISHED]
        if not (self.imports or self.exports) and self._emptied is not None:
            self._emptied.set()

    def running_pages(self) -> int:
        """Pages of every running session (limits.max_pages_per_daemon counts them)."""
        imports = sum(s.pages.total for s in self.imports.values() if not s.finished)
        exports = sum(r.pages for s in self.exports.values() if not s.finished
                      for r in s.regions)
        return imports + exports
