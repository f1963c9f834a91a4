"""The demand lane's C loop (native/fastpath/export.c): the common case of a request, with
the same frames and rules as the Python loop, which gets everything else back.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from collections.abc import Callable
from collections.abc import Mapping as _AbcMapping
from typing import Final

from uffdd import protocol
from uffdd.errors import PeerUnavailable
from uffdd.exporter.reader import PageReader
from uffdd.exporter.state import ExportRegion, ExportState
from uffdd.metrics import SessionMetrics
from uffdd.peer import FrameSocket

log = logging.getLogger("uffdd.export")
Header = _AbcMapping[str, object]

# -- the demand lane's C loop (native/fastpath/export.c)

_C_RETURN_MS: Final = 50  # the C loop comes back at least this often (counters, stopping)
# export.c's return codes
_C_TIMEOUT: Final = 0
_C_HANDBACK: Final = 1
_C_EOF: Final = 2
_C_RECV_ERROR: Final = 3
_C_SEND_ERROR: Final = 4
# export.c's ways of reading a region
_C_MAP: Final = 0
_C_PREAD: Final = 1
_C_PID: Final = 2


class _CRegion(ctypes.Structure):
    """struct fpx_region."""

    _fields_ = (("pages", ctypes.c_uint64), ("page_size", ctypes.c_uint64),
                ("base", ctypes.c_uint64), ("offset", ctypes.c_uint64),
                ("sent", ctypes.c_void_p), ("demanded", ctypes.c_void_p),
                ("mode", ctypes.c_int32), ("fd", ctypes.c_int32),
                ("pid", ctypes.c_int32), ("pad", ctypes.c_int32))


class _CLane(ctypes.Structure):
    """struct fpx_lane."""

    _fields_ = (("regions", ctypes.c_void_p), ("nregions", ctypes.c_uint64),
                ("buf", ctypes.c_void_p), ("cap", ctypes.c_uint64),
                ("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("scratch", ctypes.c_void_p), ("scratch_len", ctypes.c_uint64),
                ("ctl", ctypes.c_void_p), ("max_header", ctypes.c_uint64),
                ("order", ctypes.c_void_p), ("order_count", ctypes.c_void_p),
                ("order_cap", ctypes.c_uint64),
                ("spin_ns", ctypes.c_int64), ("fd", ctypes.c_int32),
                ("return_ms", ctypes.c_int32), ("integrity", ctypes.c_int32),
                ("pad", ctypes.c_int32),
                ("bytes_sent", ctypes.c_uint64), ("bytes_received", ctypes.c_uint64),
                ("pages_demand", ctypes.c_uint64), ("pages_zero", ctypes.c_uint64),
                ("requests", ctypes.c_uint64), ("batches", ctypes.c_uint64),
                ("error", ctypes.c_int32), ("pad2", ctypes.c_int32))


class _PyBuffer(ctypes.Structure):
    """Py_buffer: how to get the address of a read-only mapping (ctypes cannot)."""

    _fields_ = (("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p))


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None


def _demand_function(lib: ctypes.CDLL) -> Callable[[object], int] | None:
    """The library's demand loop, if it has one built for these structs."""
    try:
        fn = lib.uffdd_fp_export_demand
        layout = lib.uffdd_fp_export_layout
    except AttributeError:
        return None
    layout.argtypes = ()
    layout.restype = ctypes.c_uint64
    if layout() != ctypes.sizeof(_CLane) << 32 | ctypes.sizeof(_CRegion):
        log.warning("fast path: the library's demand loop has another struct layout "
                    "(rebuild native/); the demand lane runs in Python")
        return None
    fn.argtypes = (ctypes.POINTER(_CLane),)
    fn.restype = ctypes.c_int
    return fn


class _CDemandLane:
    """One demand lane's C loop: the struct it runs on, and everything it points into,
    pinned (buffer exports) for as long as the lane lives.

    The receive buffer is the FrameSocket's own: bytes it already holds are the C
    loop's first input, and what the C loop hands back is simply still in it for
    ``recv_header``. The socket is a dup() closed by ``close``: another thread's
    ``fs.close()`` shuts the connection down (waking the C loop's poll), and the
    descriptor number the C loop uses cannot be reused while it runs.
    """

    def __init__(self, fn: Callable[[object], int], fs: FrameSocket, state: ExportState,
                 reader: PageReader) -> None:
        self.fn = fn
        self.fs = fs
        self.state = state
        self.requests = 0
        self._pins: list[object] = []
        self._views: list[_PyBuffer] = []
        self._rows: list[bytearray] | None = None
        self._row_pins: list[ctypes.c_char] = []
        self.c_regions = (_CRegion * len(state.regions))()
        self.lane = lane = _CLane()
        self.fd = os.dup(fs.sock.fileno())
        try:
            for i, region in enumerate(state.regions):
                self._describe(self.c_regions[i], region)
            # FrameSocket's receive buffer (peer.py): read and written in place, never resized
            buf = fs.rx_buffer
            lane.buf = self._pin(buf)
            lane.cap = len(buf)
            lane.scratch = self._pin(reader.scratch)
            lane.scratch_len = len(reader.scratch)
            lane.regions = ctypes.addressof(self.c_regions)
            lane.nregions = len(state.regions)
            lane.ctl = state.control.address
            lane.max_header = min(fs.max_header, protocol.MAX_PEER_HEADER)
            lane.fd = self.fd
            lane.return_ms = _C_RETURN_MS
            lane.integrity = 1 if state.integrity else 0
            recorder = state.recorder
            if recorder is not None:  # a warm restore's record (uffdd.warmorder)
                lane.order = ctypes.addressof(recorder.entries)
                lane.order_count = ctypes.addressof(recorder.count)
                lane.order_cap = recorder.capacity
                for c, seen in zip(self.c_regions, recorder.seen, strict=True):
                    c.demanded = self._pin(seen)
            self._bind_rows()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, lib: ctypes.CDLL | None, fs: FrameSocket, state: ExportState,
             reader: PageReader) -> _CDemandLane | None:
        """The C loop for this lane, or None where the Python loop must run: no library
        (``peer.demand_library`` decided: off, not built, or not a plain TCP socket)."""
        if lib is None:
            return None
        if type(fs.sock) is not socket.socket:  # the decision is peer.demand_library's
            raise ValueError("the C demand loop needs a plain socket (see demand_library)")
        fn = _demand_function(lib)
        if fn is None:
            return None
        return cls(fn, fs, state, reader)

    def _pin(self, buf: bytearray) -> int:
        """The address of ``buf``, which cannot be resized (or freed) until ``close``."""
        pin = ctypes.c_char.from_buffer(buf)
        self._pins.append(pin)
        return ctypes.addressof(pin)

    def _describe(self, c: _CRegion, region: ExportRegion) -> None:
        c.pages = region.pages
        c.page_size = region.page_size
        if region.mapping is not None:  # PageReader.view's order of preference
            view = _PyBuffer()
            _get_buffer(region.mapping.map, ctypes.byref(view), 0)  # PyBUF_SIMPLE: read-only
            self._views.append(view)  # an export: the mapping cannot go while it is held
            c.mode, c.base = _C_MAP, view.buf
        elif region.fd >= 0:
            c.mode, c.fd, c.offset = _C_PREAD, region.fd, region.offset
        else:
            c.mode, c.pid, c.base = _C_PID, region.pid, region.addr

    def _bind_rows(self) -> None:
        """Point the C loop at the current ``state.sent`` rows (a new bulk link replaces
        them: until the next return the C loop marks the old ones, so a page may go
        twice, which the destination drops)."""
        rows = self.state.sent
        pins = [ctypes.c_char.from_buffer(row) for row in rows]
        for c, pin in zip(self.c_regions, pins, strict=True):
            c.sent = ctypes.addressof(pin)
        self._row_pins = pins  # the old rows' pins go (the C loop is not running)
        self._rows = rows

    def serve(self, metrics: SessionMetrics) -> bool:
        """Run the C loop until it returns; True if Python must handle what comes next.

        Folds the call's counters into the session's. A closed link raises
        PeerUnavailable, as the Python loop's recv and send do."""
        fs, lane, state = self.fs, self.lane, self.state
        if fs.closed:
            raise PeerUnavailable("peer link receive failed: the lane was closed")
        if state.sent is not self._rows:
            self._bind_rows()
        lane.start, lane.end = fs.rx_window()
        lane.spin_ns = int(state.spin_s * 1e9)
        lane.bytes_sent = lane.bytes_received = lane.pages_demand = lane.pages_zero = 0
        lane.requests = lane.batches = 0
        rc = self.fn(ctypes.byref(lane))  # ctypes releases the GIL for the call
        fs.set_rx_window(lane.start, lane.end)
        fs.received += lane.bytes_received
        if lane.bytes_sent:
            fs.sent += lane.bytes_sent
            state.bytes_sent += lane.bytes_sent
            state.pages_zero += lane.pages_zero
            with state.lock:
                state.pages_demand += lane.pages_demand
            state.pages_demand_c += lane.pages_demand
            self.requests += lane.requests
            metrics.sent("demand", lane.bytes_sent)
        if rc in (_C_TIMEOUT, _C_HANDBACK):
            return rc == _C_HANDBACK
        if rc == _C_EOF:
            raise PeerUnavailable("peer closed the link")
        what = "receive" if rc == _C_RECV_ERROR else "send"
        raise PeerUnavailable(f"peer link {what} failed: "
                              f"{OSError(lane.error, os.strerror(lane.error))}")

    def describe(self) -> str:
        return "the C fast path"

    def close(self) -> None:
        """Release the descriptor and every pinned buffer (the lane's thread, after the
        last call)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for view in self._views:
            _release_buffer(ctypes.byref(view))
        self._views.clear()
        self._pins.clear()
        self._row_pins.clear()
