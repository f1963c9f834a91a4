"""Structured logging: one event per line, ``key=value`` pairs, journald-aware.

Code logs *events*, not sentences::

    log = get_logger(__name__).bind(session="vm42-mig7", role="import")
    log.info("session.started", peer="192.0.2.10:4460", pages=65536)

renders as::

    2026-11-25T16:53:06.123Z level=info logger=uffdd.session event=session.started \
session=vm42-mig7 role=import peer=192.0.2.10:4460 pages=65536

``session=`` comes right after ``event=`` whenever it is known, so ``grep session=X``
finds a migration's whole story. Values with spaces, quotes, ``=`` or control
characters are double-quoted with JSON escapes, and tracebacks are folded into one
``exc="..."`` field, so a line is always exactly one event.

Under systemd (``$JOURNAL_STREAM`` names our stderr) lines carry no timestamp of our
own (journald adds one) and start with an sd-daemon(3) ``<N>`` syslog priority, so
``journalctl -p warning`` works. Elsewhere lines get an ISO 8601 UTC timestamp.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

#: sd-daemon(3) priorities for Python levels (SD_DEBUG=7 … SD_CRIT=2).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: Attribute of a LogRecord that carries an event's fields.
_FIELDS_ATTR = "uffdd_fields"
#: Characters that force a value into quotes.
_SPECIAL = frozenset(' "=\\')


def syslog_priority(levelno: int) -> int:
    """Return the syslog priority (2..7) for a Python log level."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def format_value(value: object) -> str:
    """Render one value for ``key=value``: bare when safe, JSON-quoted otherwise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        value = value.hex()
    text = str(value)
    if not text or any(c in _SPECIAL or not c.isprintable() for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_fields(fields: Mapping[str, object]) -> str:
    """Render ``fields`` as space-separated ``key=value`` pairs, in their order."""
    return " ".join(f"{key}={format_value(value)}" for key, value in fields.items())


class EventFormatter(logging.Formatter):
    """Format a record as one ``key=value`` line (see the module docstring)."""

    def __init__(self, *, journald: bool) -> None:
        """``journald``: ``<N>`` prefix and no timestamp instead of an ISO timestamp."""
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a single line."""
        fields: dict[str, object] = {
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        extra: dict[str, object] = getattr(record, _FIELDS_ATTR, {})
        if "session" in extra:
            fields["session"] = extra["session"]
        fields.update((k, v) for k, v in extra.items() if k not in fields)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        line = format_fields(fields)
        if self.journald:
            return f"<{syslog_priority(record.levelno)}>{line}"
        return f"{self._timestamp(record.created)} {line}"

    @staticmethod
    def _timestamp(created: float) -> str:
        """Return ``created`` as ISO 8601 UTC with milliseconds."""
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class EventLogger:
    """A logger for events with fields, optionally bound to context (``session=``)."""

    def __init__(self, logger: logging.Logger, context: Mapping[str, object] | None = None):
        """Wrap ``logger``; ``context`` fields are added to every event."""
        self._logger = logger
        self._context = dict(context or {})

    def bind(self, **fields: object) -> EventLogger:
        """Return a logger that adds ``fields`` to every event (for example session=)."""
        return EventLogger(self._logger, {**self._context, **fields})

    def log(self, level: int, event: str, /, **fields: object) -> None:
        """Log ``event`` at ``level`` with ``fields`` (context first, then fields)."""
        if self._logger.isEnabledFor(level):
            extra = {_FIELDS_ATTR: {**self._context, **fields}}
            self._logger.log(level, event, extra=extra, stacklevel=3)

    def debug(self, event: str, /, **fields: object) -> None:
        """Log a debug event."""
        self.log(logging.DEBUG, event, **fields)

    def info(self, event: str, /, **fields: object) -> None:
        """Log an info event."""
        self.log(logging.INFO, event, **fields)

    def warning(self, event: str, /, **fields: object) -> None:
        """Log a warning event."""
        self.log(logging.WARNING, event, **fields)

    def error(self, event: str, /, **fields: object) -> None:
        """Log an error event."""
        self.log(logging.ERROR, event, **fields)

    def critical(self, event: str, /, **fields: object) -> None:
        """Log a critical event."""
        self.log(logging.CRITICAL, event, **fields)

    def exception(self, event: str, /, **fields: object) -> None:
        """Log an error event with the current exception's traceback (as ``exc=``)."""
        if self._logger.isEnabledFor(logging.ERROR):
            extra = {_FIELDS_ATTR: {**self._context, **fields}}
            self._logger.error(event, exc_info=True, extra=extra, stacklevel=2)


def get_logger(name: str, **context: object) -> EventLogger:
    """Return an :class:`EventLogger` for ``name`` (use ``__name__``) with ``context``."""
    return EventLogger(logging.getLogger(name), context)


def under_journald() -> bool:
    """Return True if stderr is the journal stream systemd gave us (``$JOURNAL_STREAM``).

    Compares the ``device:inode`` pair with stderr's, as systemd.exec(5) advises, so a
    child whose stderr was redirected does not mistake itself for a journald client.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def parse_level(level: str | int) -> int:
    """Return the logging level for ``level`` (a config name such as "info", or an int)."""
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; expected one of {list(_LEVELS)}") from None


class _UffddHandler(logging.StreamHandler[TextIO]):
    """Marker class: the handler :func:`setup_logging` installs (replaced on re-setup)."""


def setup_logging(level: str | int = "info", journald: bool | None = None) -> None:
    """Send every log record to stderr as one structured line.

    ``level``: "debug", "info", "warning", "error", "critical" (config ``log.level``).
    ``journald``: True for ``<N>`` priorities without timestamps, False for timestamped
    lines, None (default) to decide with :func:`under_journald`. Calling it again
    replaces the previous setup instead of doubling every line.
    """
    if journald is None:
        journald = under_journald()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _UffddHandler)]:
        root.removeHandler(handler)
    handler = _UffddHandler(sys.stderr)
    handler.setFormatter(EventFormatter(journald=journald))
    root.addHandler(handler)
    root.setLevel(parse_level(level))
