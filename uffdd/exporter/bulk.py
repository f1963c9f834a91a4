"""The bulk lanes: read what the destination has, stream the rest from the demand lane's
hint (fault locality), then wait for the destination's 'done' and its tally.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Mapping as _AbcMapping

from uffdd import peer, protocol
from uffdd.errors import PeerUnavailable, ProtocolError
from uffdd.exporter.frames import Frame, send_pages
from uffdd.exporter.reader import PageReader
from uffdd.exporter.state import ExportRegion, ExportState, FinalTally
from uffdd.metrics import SessionMetrics
from uffdd.peer import FrameSocket

log = logging.getLogger("uffdd.export")
Header = _AbcMapping[str, object]

def _next_run(state: ExportState, cursor: tuple[int, int], max_bytes: int
              ) -> tuple[ExportRegion, int, int] | None:
    """Claim the next run of unsent pages of the sequential stream, at or after
    ``cursor`` (wrapping around), or at the demand hint. A warm restore's replay goes
    before it (``_send_replay_batch``, in ``_stream``). Without the background stream
    (``[peer] background = false``) there is none: the lane ends once the replay did."""
    with state.lock:
        if not state.background:
            return None
        if state.hint is not None:
            cursor, state.hint = state.hint, None
        order = list(range(cursor[0], len(state.regions))) + list(range(cursor[0]))
        for r in order:
            row = state.sent[r]
            start_at = cursor[1] if r == cursor[0] else 0
            page = row.find(0, start_at)
            if page < 0 and start_at:
                page = row.find(0)
            if page < 0:
                continue
            region = state.regions[r]
            limit = min(len(row), page + max(1, max_bytes // region.page_size))
            end = row.find(1, page, limit)
            end = limit if end < 0 else end
            row[page:end] = b"\x01" * (end - page)
            state.pages_sent += end - page
            return region, page, end - page
    return None


def _next_replay_run(state: ExportState, max_bytes: int
                     ) -> tuple[ExportRegion, int, int] | None:
    """The next unsent pages of the replay's runs (the caller holds the lock). Demand
    requests still jump the queue (the demand lane answers them, whatever bulk does);
    while the replay lasts the hint is dropped, so bulk does not leave the recorded
    order for the neighbourhood of a fault the record will reach anyway."""
    while state.replay_at < len(state.replay):
        r, first, count = state.replay[state.replay_at]
        row = state.sent[r]
        page = row.find(0, first, first + count)
        if page < 0:  # sent whole (by bulk, or demanded): the next run
            state.replay_at += 1
            continue
        region = state.regions[r]
        limit = min(first + count, page + max(1, max_bytes // region.page_size))
        end = row.find(1, page, limit)
        end = limit if end < 0 else end
        row[page:end] = b"\x01" * (end - page)
        state.pages_sent += end - page
        state.pages_replayed += end - page
        state.hint = None
        return region, page, end - page
    return None


def _send_replay_batch(fs: FrameSocket, state: ExportState, reader: PageReader) -> int:
    """Claim replayed runs worth up to a batch (at least one page) and send them with as
    few sendmsg calls as the iovec limit allows; the bytes sent (0: the replay is over)."""
    largest = max(r.page_size for r in state.regions)
    budget = max(state.chunk_bytes, largest)  # fits the scratch
    batch: list[tuple[ExportRegion, int, int]] = []
    with state.lock:
        while budget >= largest:
            run = _next_replay_run(state, budget)
            if run is None:
                break
            batch.append(run)
            budget -= run[2] * run[0].page_size
    if not batch:
        return 0
    frames: list[Frame] = []
    at = 0  # where in the reader's scratch each run is read to (pread and pid regions)
    for region, page, count in batch:
        send_pages(fs, reader, region, page, count, "bulk", at=at, out=frames)
        at += count * region.page_size
    nbytes = fs.send_frames(frames)
    state.bytes_sent += nbytes
    return nbytes


def serve_bulk(fs: FrameSocket, state: ExportState, metrics: SessionMetrics, *,
               fastpath: str = "off") -> None:
    """Bulk lane thread body: read what the destination has, stream the rest, await 'done'.

    With the C library (``fastpath``, ``[peer] fastpath``) a chunk's zero scan and CRC
    are one C call each instead of a Python step per page and zlib's slower CRC.
    """
    _receive_have(fs, state)
    reader = PageReader(state, max(state.chunk_bytes, max(r.page_size for r in state.regions)),
                        peer.PayloadNative.load(fastpath))
    try:
        _stream(fs, state, reader, metrics)
    finally:
        reader.close()


def _stream(fs: FrameSocket, state: ExportState, reader: PageReader,
            metrics: SessionMetrics) -> None:
    cursor = (0, 0)
    try:
        while state.background or state.replay_at < len(state.replay):
            if _done_arrived(fs, state):  # demand faults brought every page first
                return
            # A warm restore's replay first: whole chunk-sized blocks, as efficient as
            # the sequential stream that follows (smaller blocks, or replay and
            # sequential chunks taking turns, measured slower: README, Warm restore).
            if state.replay_at < len(state.replay):
                nbytes = _send_replay_batch(fs, state, reader)
                if nbytes:
                    metrics.sent("bulk", nbytes)
                    continue
            run = _next_run(state, cursor, state.chunk_bytes)
            if run is None:
                break
            region, page, count = run
            nbytes = send_pages(fs, reader, region, page, count, "bulk")
            metrics.sent("bulk", nbytes)
            cursor = (region.index, page + count)
        fs.send({"t": "end"})
    except PeerUnavailable:
        # The destination completes, says 'done' and closes as soon as it has every
        # page, possibly while we are still sending: its 'done' may be waiting for us.
        if _done_arrived(fs, state):
            return
        raise
    _take_done(state, fs.recv_header())


def _take_done(state: ExportState, header: protocol.Message) -> None:
    """The destination's 'done': the export is complete, with its counters."""
    if header.get("t") != "done":
        raise ProtocolError(f"expected 'done' from the destination, got {header.get('t')!r}")
    tally = FinalTally.from_done(header)
    with state.lock:  # every bulk lane gets the same 'done': the first one counts
        if state.final_tally is None:
            state.final_tally = tally
    state.done.set()


def _done_arrived(fs: FrameSocket, state: ExportState) -> bool:
    """Without blocking: has the destination said 'done' (then the export is complete)?

    The destination sends nothing else on a bulk lane after 'start', so any frame here
    is 'done' or a protocol error."""
    try:
        if not fs.header_ready() and not select.select([fs.sock], [], [], 0)[0]:
            return False
        header = fs.recv_header()
    except (PeerUnavailable, OSError, ValueError):
        return False
    _take_done(state, header)
    return True


def _receive_have(fs: FrameSocket, state: ExportState) -> None:
    while True:
        header = fs.recv_header()
        kind = header.get("t")
        if kind == "start":
            return
        if kind != "have":
            raise ProtocolError(f"expected 'have' or 'start', got {kind!r}")
        r = protocol.peer_int(header, "r")
        bits = header.get("bits")
        if r >= len(state.regions) or not isinstance(bits, bytes):
            raise ProtocolError("bad 'have' frame")
        pages = state.regions[r].pages
        if len(bits) != (pages + 7) // 8:
            raise ProtocolError("'have' bitmap has the wrong length")
        with state.lock:
            row = state.sent[r]
            for page in range(pages):
                if bits[page >> 3] >> (page & 7) & 1:
                    row[page] = 1
