"""The demand lane: answer every request already received in one batch, with one sendmsg.

On a plaintext link the common case runs in C (``cdemand``), which hands everything
unusual back to the Python loop here.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping as _AbcMapping
from typing import Final

from uffdd import protocol
from uffdd.errors import ProtocolError
from uffdd.exporter.cdemand import _CDemandLane
from uffdd.exporter.frames import Frame, send_pages
from uffdd.exporter.reader import PageReader
from uffdd.exporter.state import ExportRegion, ExportState
from uffdd.metrics import SessionMetrics
from uffdd.peer import FrameSocket
from uffdd.threads import use_short_switch_interval

log = logging.getLogger("uffdd.export")

log = logging.getLogger("uffdd.export")
Header = _AbcMapping[str, object]

_DEMAND_BATCH_PAGES: Final = 64  # most pages answered with one sendmsg (and scratch size)
assert _DEMAND_BATCH_PAGES >= protocol.MAX_REQUEST_PAGES  # a batch holds any one request


def serve_demand(fs: FrameSocket, state: ExportState, metrics: SessionMetrics, *,
                 library: ctypes.CDLL | None = None) -> None:
    """Demand lane thread body: answer requests until the link closes.

    Every request already received is answered in one batch with one sendmsg: with many
    faulting vCPUs the destination sends requests in bursts, and a syscall per page
    capped the source at ~16k pages/s.

    With ``library`` (the C library, as ``peer.demand_library`` decided for this lane),
    the common case runs in C (``_CDemandLane``): it returns here for everything else
    (a frame that is not a request it can answer, a page it cannot read, fault
    injection), and this loop answers that batch in Python, with every rule it has.
    """
    use_short_switch_interval()
    max_page = max(r.page_size for r in state.regions)
    reader = PageReader(state, max_page * _DEMAND_BATCH_PAGES)
    lane = _CDemandLane.open(library, fs, state, reader)
    label = getattr(fs, "label", "") or "demand lane"
    if lane is not None:
        log.info("%s: answered by the C fast path", label)
    carried: tuple[ExportRegion, int, int] | None = None
    python_requests = 0
    try:
        while True:
            if (lane is not None and carried is None and not state.injecting
                    and not lane.serve(metrics)):
                continue  # the C loop's regular return: call it again
            carried, answered = _answer_batch(fs, state, reader, metrics, carried)
            python_requests += answered
    finally:
        if lane is not None:
            lane.close()  # unpins the scratch first
            log.info("%s ended: %d requests answered by the C fast path, %d by Python",
                     label, lane.requests, python_requests)
        reader.close()


def _answer_batch(fs: FrameSocket, state: ExportState, reader: PageReader,
                  metrics: SessionMetrics,
                  carried: tuple[ExportRegion, int, int] | None
                  ) -> tuple[tuple[ExportRegion, int, int] | None, int]:
    """Receive and answer one batch of requests (the Python demand loop's body).

    Returns the request that did not fit (the next batch starts with it) and how many
    requests were answered."""
    if carried is None:
        carried = _request(state, fs.recv_header())
    batch, carried = [carried], None
    pages = batch[0][2]
    while fs.header_ready() and pages < _DEMAND_BATCH_PAGES:
        req = _request(state, fs.recv_header())
        if pages + req[2] > _DEMAND_BATCH_PAGES:  # scratch is full: next batch
            carried = req
            break
        batch.append(req)
        pages += req[2]
    _claim(state, batch)
    frames: list[Frame] = []
    at = 0
    for region, p, n in batch:
        send_pages(fs, reader, region, p, n, "demand", at=at, out=frames)
        at += n * region.page_size
    nbytes = fs.send_frames(frames)
    state.bytes_sent += nbytes
    metrics.sent("demand", nbytes)
    return carried, len(batch)



def _request(state: ExportState, header: protocol.Message) -> tuple[ExportRegion, int, int]:
    if header.get("t") != "req":
        raise ProtocolError(f"unexpected frame on the demand lane: {header.get('t')!r}")
    r, p, n = protocol.check_req(header, state.region_pages)
    return state.regions[r], p, n


def _claim(state: ExportState, batch: list[tuple[ExportRegion, int, int]]) -> None:
    """Mark requested pages sent (the bulk lanes skip them) and steer bulk after them."""
    with state.lock:
        for region, p, n in batch:
            row = state.sent[region.index]
            for page in range(p, p + n):
                row[page] = 1
            state.pages_demand += n
        region, p, n = batch[-1]
        state.hint = (region.index, p + n)
