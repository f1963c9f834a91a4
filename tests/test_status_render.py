"""uffdd.status and uffdd.logs: what people read (status table, progress bar, log lines)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffdd.logs import format_value, get_logger, parse_level, setup_logging, syslog_priority
from uffdd.status import ProgressBar, format_bytes_rate, render_status_json, render_status_table

IMPORT = {
    "session": "vm42-mig7",
    "role": "import",
    "state": "running",
    "pages_total": 65536,
    "pages_installed": 16384,
    "bytes_received": 64 * 1024 * 1024,
    "bytes_sent": 1024,
    "elapsed_seconds": 2.0,
    "demand_latency_p50_us": 87.4,
    "demand_latency_p99_us": 912.6,
    "peer": "192.0.2.10:4460",
    "link": "up",
    "strategy": "continue-then-populate",
    "policy": "crash",
    "reason": None,
}
EXPORT = {
    "session": "vm43",
    "role": "export",
    "state": "completed",
    "pages_total": 100,
    "pages_installed": 100,
    "bytes_sent": 2048,
    "elapsed_seconds": 1.0,
    "demand_latency_p50_us": None,
    "demand_latency_p99_us": None,
    "peer": "198.51.100.7:52110",
    "link": "down",
}


class FakeTTY(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_table_columns_and_values() -> None:
    table = render_status_table([IMPORT, EXPORT])
    lines = table.splitlines()
    assert table.endswith("\n")
    assert len(lines) == 3
    header = lines[0].split()
    assert header == [
        "SESSION",
        "ROLE",
        "STATE",
        "PAGES",
        "DONE",
        "RATE",
        "P50",
        "P99",
        "PEER",
        "LINK",
    ]
    row = lines[1]
    for expected in (
        "vm42-mig7",
        "import",
        "running",
        "16384/65536",
        "25.0%",
        "32.0 MiB/s",
        "87µs",
        "913µs",
        "192.0.2.10:4460",
        "up",
    ):
        assert expected in row, expected
    export_row = lines[2]
    assert "100/100" in export_row and "100.0%" in export_row
    assert "2.0 KiB/s" in export_row  # an export's rate is what it sent
    assert "down" in export_row


def test_table_is_aligned() -> None:
    lines = render_status_table([IMPORT, EXPORT]).splitlines()
    starts = [
        line.index("import" if i == 1 else "export" if i == 2 else "ROLE")
        for i, line in enumerate(lines)
    ]
    assert len(set(starts)) == 1


def test_missing_and_null_fields_render_as_dash() -> None:
    table = render_status_table([{"session": "bare"}])
    row = table.splitlines()[1].split()
    assert row[0] == "bare"
    assert set(row[1:]) == {"-"}


def test_empty() -> None:
    assert render_status_table([]) == "no sessions\n"


def test_zero_total_is_complete() -> None:
    row = render_status_table([{**EXPORT, "pages_total": 0, "pages_installed": 0}])
    assert "100.0%" in row


def test_json_round_trip() -> None:
    text = render_status_json([IMPORT, {**EXPORT, "odd": b"\x01\x02"}])
    assert text.endswith("\n")
    data = json.loads(text)
    assert data["sessions"][0] == IMPORT
    assert data["sessions"][1]["odd"] == "0102"


def test_rates() -> None:
    assert format_bytes_rate(512) == "512 B/s"
    assert format_bytes_rate(1536) == "1.5 KiB/s"
    assert format_bytes_rate(3 * 1024**3) == "3.0 GiB/s"
    assert format_bytes_rate(5000 * 1024**3) == "5000.0 GiB/s"


def test_progress_bar_silent_when_not_a_tty() -> None:
    stream = io.StringIO()
    with ProgressBar(stream) as bar:
        bar.update(10, 100, now=0.0)
        bar.update(100, 100, now=1.0)
    assert stream.getvalue() == ""


def test_progress_bar_silent_when_disabled() -> None:
    stream = FakeTTY()
    with ProgressBar(stream, enabled=False) as bar:
        bar.update(10, 100, now=0.0)
    assert stream.getvalue() == ""


def test_progress_bar_draws_one_line() -> None:
    stream = FakeTTY()
    bar = ProgressBar(stream, interval=0.5, label="vm42")
    bar.update(0, 1000, now=0.0)
    bar.update(100, 1000, now=0.1)  # throttled
    bar.update(500, 1000, now=1.0)
    out = stream.getvalue()
    assert out.count("\r") == 2
    assert "\n" not in out
    assert "500/1000 pages" in out and "50.0%" in out
    assert "vm42" in out
    bar.update(1000, 1000, now=1.1)  # throttled, but close() draws it
    bar.close()
    out = stream.getvalue()
    assert out.endswith("\n")
    last = out.rstrip("\n").split("\r")[-1]
    assert "1000/1000 pages" in last and "100.0%" in last
    assert "pages/s" in last


def test_progress_bar_rate() -> None:
    bar = ProgressBar(FakeTTY())
    bar.update(0, 10_000, now=0.0)
    bar.update(1000, 10_000, now=1.0)
    assert "1,000 pages/s" in bar.render(1000, 10_000)


def test_progress_bar_close_without_updates() -> None:
    stream = FakeTTY()
    ProgressBar(stream).close()
    assert stream.getvalue() == ""


# --- log lines (uffdd.logs): the other human-facing output of the daemon ----------

LINE_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


def capture(journald: bool, level: str = "debug") -> io.StringIO:
    """Set up logging as the daemon does, but into a StringIO; return it."""
    setup_logging(level, journald=journald)
    stream = io.StringIO()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(stream)
    return stream


@pytest.fixture(autouse=False)
def restore_logging() -> Iterator[None]:
    """Put the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_format_value() -> None:
    assert format_value("plain") == "plain"
    assert format_value("two words") == '"two words"'
    assert format_value("a=b") == '"a=b"'
    assert format_value('say "hi"') == '"say \\"hi\\""'
    assert format_value("line\nbreak") == '"line\\nbreak"'
    assert format_value("") == '""'
    assert format_value(None) == "null"
    assert format_value(True) == "true"
    assert format_value(4096) == "4096"
    assert format_value(b"\x01\xff") == "01ff"


def test_syslog_priorities() -> None:
    assert syslog_priority(logging.DEBUG) == 7
    assert syslog_priority(logging.INFO) == 6
    assert syslog_priority(logging.WARNING) == 4
    assert syslog_priority(logging.ERROR) == 3
    assert syslog_priority(logging.CRITICAL) == 2


@pytest.mark.usefixtures("restore_logging")
def test_plain_lines_have_timestamps_and_fields_in_order() -> None:
    stream = capture(journald=False)
    log = get_logger("uffdd.session").bind(session="vm42-mig7")
    log.info("session.started", peer="192.0.2.10:4460", pages=65536)
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert LINE_TS.match(line)
    assert line.split(" ", 1)[1] == (
        "level=info logger=uffdd.session event=session.started session=vm42-mig7 "
        "peer=192.0.2.10:4460 pages=65536\n"
    )


@pytest.mark.usefixtures("restore_logging")
def test_journald_lines_have_priorities_and_no_timestamp() -> None:
    stream = capture(journald=True)
    log = get_logger("uffdd.peer", session="s1")
    log.warning("peer.lost", lane="bulk")
    log.debug("peer.detail")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "<4>level=warning logger=uffdd.peer event=peer.lost session=s1 lane=bulk"
    assert lines[1].startswith("<7>level=debug ")


@pytest.mark.usefixtures("restore_logging")
def test_exception_stays_on_one_line() -> None:
    stream = capture(journald=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("uffdd.x").exception("task.crashed", session="s2")
    out = stream.getvalue()
    assert out.count("\n") == 1
    assert out.startswith("<3>level=error logger=uffdd.x event=task.crashed session=s2 exc=")
    assert "RuntimeError: boom" in out


@pytest.mark.usefixtures("restore_logging")
def test_level_filter_and_idempotent_setup() -> None:
    capture(journald=False, level="debug")
    stream = capture(journald=False, level="warning")
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_UffddHandler"]
    assert len(ours) == 1
    log = get_logger("uffdd.y")
    log.info("hidden")
    log.error("shown")
    assert stream.getvalue().count("\n") == 1
    with pytest.raises(ValueError):
        parse_level("loud")


@pytest.mark.parametrize("matching", [True, False])
def test_journal_stream_detection(tmp_path: Path, matching: bool) -> None:
    err = tmp_path / "stderr"
    with err.open("w") as f:
        st = os.fstat(f.fileno())
        inode = st.st_ino if matching else st.st_ino + 1
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{inode}"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        code = (
            "from uffdd.logs import get_logger, setup_logging\n"
            "setup_logging('info')\n"
            "get_logger('uffdd.t').warning('hello', session='s')\n"
        )
        subprocess.run([sys.executable, "-c", code], env=env, stderr=f, check=True, timeout=60)
    line = err.read_text()
    if matching:
        assert line == "<4>level=warning logger=uffdd.t event=hello session=s\n"
    else:
        assert LINE_TS.match(line)
