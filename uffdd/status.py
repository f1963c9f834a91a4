"""Human output for ``uffdd status`` and migration progress on a terminal.

The input is the ``sessions`` list of a ``status`` reply (README, wire protocol); missing
or null fields render as ``-`` so an older daemon's reply still prints.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

Session = Mapping[str, object]

_COLUMNS = ("SESSION", "ROLE", "STATE", "PAGES", "DONE", "RATE", "P50", "P99", "PEER", "LINK")
#: Columns aligned to the right (numbers).
_NUMERIC = frozenset({"PAGES", "DONE", "RATE", "P50", "P99"})


def _number(session: Session, key: str) -> float | None:
    """Return ``session[key]`` as a float, or None if absent, null or not a number."""
    value = session.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(session: Session, key: str) -> str:
    """Return ``session[key]`` as text, ``-`` when absent or null."""
    value = session.get(key)
    return "-" if value is None or value == "" else str(value)


def format_bytes_rate(bytes_per_second: float) -> str:
    """Format a transfer rate in binary units (``12.3 MiB/s``)."""
    value = bytes_per_second
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s"):
        if value < 1024 or unit == "GiB/s":
            return f"{value:.1f} {unit}" if unit != "B/s" else f"{value:.0f} B/s"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _progress(session: Session) -> tuple[str, str]:
    """Return the ``installed/total`` pages and the percentage columns."""
    total = _number(session, "pages_total")
    done = _number(session, "pages_installed")
    if total is None or done is None:
        return "-", "-"
    percent = 100.0 if total == 0 else 100.0 * done / total
    return f"{int(done)}/{int(total)}", f"{percent:.1f}%"


def _rate(session: Session) -> str:
    """Return the average transfer rate since the session started."""
    elapsed = _number(session, "elapsed_seconds")
    key = "bytes_sent" if session.get("role") == "export" else "bytes_received"
    nbytes = _number(session, key)
    if not elapsed or nbytes is None:
        return "-"
    return format_bytes_rate(nbytes / elapsed)


def _latency(session: Session, key: str) -> str:
    """Return a latency in µs, as a whole number."""
    value = _number(session, key)
    return "-" if value is None else f"{value:.0f}µs"


def _row(session: Session) -> tuple[str, ...]:
    """Return the table cells for one session."""
    pages, percent = _progress(session)
    return (
        _text(session, "session"),
        _text(session, "role"),
        _text(session, "state"),
        pages,
        percent,
        _rate(session),
        _latency(session, "demand_latency_p50_us"),
        _latency(session, "demand_latency_p99_us"),
        _text(session, "peer"),
        _text(session, "link"),
    )


def render_status_table(sessions: Sequence[Session]) -> str:
    """Render sessions as an aligned text table, one line per session.

    Columns: session, role, state, pages installed/total, percent done, average
    rate, demand latency p50 and p99 (µs), peer and link. Ends with a newline.
    """
    if not sessions:
        return "no sessions\n"
    rows = [_COLUMNS, *(_row(s) for s in sessions)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if name in _NUMERIC else cell.ljust(width)
            for name, cell, width in zip(_COLUMNS, row, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def render_status_json(sessions: Sequence[Session]) -> str:
    """Render sessions as JSON (``{"sessions": [...]}``) for scripts; ends with a newline.

    Bytes (a token never appears in status, but be safe) are shown as hex.
    """

    def default(value: object) -> object:
        if isinstance(value, bytes):
            return value.hex()
        return str(value)

    body = {"sessions": [dict(s) for s in sessions]}
    return json.dumps(body, indent=2, sort_keys=True, default=default) + "\n"


class ProgressBar:
    """A live single-line progress bar: pages, percent and rate.

    Silent when ``enabled`` is False or ``stream`` is not a TTY, so scripts and logs
    never see carriage returns. Redraws at most ``interval`` seconds apart (the last
    update before :meth:`close` is always drawn). The rate is smoothed over updates.
    Use as a context manager, or call :meth:`close` to end the line.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        interval: float = 0.1,
        label: str = "",
    ) -> None:
        """Draw to ``stream`` (default stderr), prefixed with ``label``."""
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and _is_tty(self.stream)
        self.interval = interval
        self.label = label
        self._last_draw = float("-inf")
        self._last_sample: tuple[float, int] | None = None
        self._rate = 0.0
        self._pending: str | None = None
        self._drawn = False

    def update(self, installed: int, total: int, *, now: float | None = None) -> None:
        """Report ``installed`` of ``total`` pages; redraws if ``interval`` has passed."""
        now = time.monotonic() if now is None else now
        self._update_rate(installed, now)
        if not self.enabled:
            return
        self._pending = self.render(installed, total)
        if now - self._last_draw >= self.interval:
            self._draw()
            self._last_draw = now

    def _update_rate(self, installed: int, now: float) -> None:
        """Update the smoothed pages-per-second rate with a new sample."""
        if self._last_sample is not None:
            then, before = self._last_sample
            if now > then:
                instant = (installed - before) / (now - then)
                self._rate = instant if self._rate == 0 else 0.7 * self._rate + 0.3 * instant
        self._last_sample = (now, installed)

    def render(self, installed: int, total: int) -> str:
        """Return the bar line (without carriage return) for the current state."""
        percent = 100.0 if total <= 0 else min(100.0, 100.0 * installed / total)
        text = f"{installed}/{total} pages {percent:5.1f}% {self._rate:,.0f} pages/s"
        prefix = f"{self.label} " if self.label else ""
        width = shutil.get_terminal_size((80, 24)).columns - len(prefix) - len(text) - 4
        bar = ""
        if width >= 10:
            filled = int(width * percent / 100)
            bar = "[" + "#" * filled + "." * (width - filled) + "] "
        return f"{prefix}{bar}{text}"

    def _draw(self) -> None:
        """Write the pending line over the current one."""
        if self._pending is None:
            return
        self.stream.write("\r\x1b[K" + self._pending)
        self.stream.flush()
        self._pending = None
        self._drawn = True

    def close(self) -> None:
        """Draw the last state and end the line (nothing if silent or never drawn)."""
        if not self.enabled:
            return
        self._draw()
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> ProgressBar:
        """Return self."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the bar."""
        self.close()


def _is_tty(stream: TextIO) -> bool:
    """Return True if ``stream`` is an interactive terminal."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
