"""The demand lane: answer every request already received in one batch, with one sendmsg.

On a plaintext link the common case runs in C (``cdemand``), which hands everything
unusual back to the Python loop here.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Final, Protocol

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

_DEMAND_BATCH_PAGES: Final = 64  # most pages answered with one sendmsg (and scratch size)
assert _DEMAND_BATCH_PAGES >= protocol.MAX_REQUEST_PAGES  # a batch holds any one request


class DemandEngine(Protocol):
    """The demand lane's engine: what answers the common case of a request.

    ``serve`` runs until it returns: False on its regular return (call it again), True
    when what comes next is for the Python loop (``_answer_batch``), which holds every
    rule of the lane once. Two engines: the C loop (``cdemand._CDemandLane``) and
    :class:`PyDemandEngine`, which hands everything to the Python loop."""

    requests: int  # requests this engine answered itself

    def serve(self, metrics: SessionMetrics) -> bool: ...
    def close(self) -> None: ...
    def describe(self) -> str: ...


class PyDemandEngine:
    """The Python engine: it answers nothing itself, the Python loop answers all."""

    requests = 0

    def serve(self, metrics: SessionMetrics) -> bool:
        return True

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "no C engine (the Python loop answers all)"


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
    engine: DemandEngine = _CDemandLane.open(library, fs, state, reader) or PyDemandEngine()
    label = getattr(fs, "label", "") or "demand lane"
    log.info("%s: answered by %s", label, engine.describe())
    carried: tuple[ExportRegion, int, int] | None = None
    python_requests = 0
    try:
        while True:
            # A request carried over, and fault injection, are the Python loop's.
            if carried is None and not state.injecting and not engine.serve(metrics):
                continue  # the engine's regular return: call it again
            carried, answered = _answer_batch(fs, state, reader, metrics, carried)
            python_requests += answered
    finally:
        engine.close()  # the C engine unpins its scratch first
        log.info("%s ended: %d requests answered by %s, %d by Python",
                 label, engine.requests, engine.describe(), python_requests)
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
    """Mark requested pages sent (the bulk lanes skip them), steer bulk after them, and
    record them for a warm restore (export.c's fpx_claim does the same)."""
    with state.lock:
        recorder = state.recorder
        for region, p, n in batch:
            row = state.sent[region.index]
            for page in range(p, p + n):
                row[page] = 1
            state.pages_demand += n
            if recorder is not None:
                recorder.add(region.index, p, n)
        region, p, n = batch[-1]
        state.hint = (region.index, p + n)
