"""The export session's data path: lanes that serve source guest memory to the destination.

Each lane runs in its own thread with a blocking socket. The demand lane answers a
request as soon as it arrives; bulk lanes stream every page not yet sent, in chunks,
jumping to just after the most recent demand request (fault locality). Zero pages go out
as markers; every data payload carries a CRC32. Guest memory is read either through a
read-only mapping of the VMM's memory fd, or with process_vm_readv from the VMM's pid for
anonymous memory; the source VMM is paused, and this process never maps it writable.

On a plaintext link the demand lane's common case runs in C (native/fastpath/export.c,
``serve_demand``), which writes the same frames and hands everything unusual back to
the Python code here; it took the source from ~70 to ~28 µs of CPU per fault, nearly
all of the rest being the kernel's (bench demand-latency).
"""

from __future__ import annotations

from uffdd.errors import PeerUnavailable, ProtocolError
from uffdd.exporter.bulk import _next_run, serve_bulk
from uffdd.exporter.demand import serve_demand
from uffdd.exporter.frames import Frame, _one_page, send_pages
from uffdd.exporter.reader import PageReader
from uffdd.exporter.state import (
    MAX_DONE_RANGES,
    DemandControl,
    ExportRegion,
    ExportState,
    FinalTally,
    open_file_region,
    open_memfd_region,
)


def link_error(e: BaseException) -> str:
    """A one-line reason for a lane that ended with an error."""
    if isinstance(e, PeerUnavailable | ProtocolError | OSError):
        return str(e) or e.__class__.__name__
    return repr(e)


__all__ = [
    "MAX_DONE_RANGES",
    "DemandControl",
    "ExportRegion",
    "ExportState",
    "FinalTally",
    "Frame",
    "PageReader",
    "_next_run",
    "_one_page",
    "link_error",
    "open_file_region",
    "open_memfd_region",
    "send_pages",
    "serve_bulk",
    "serve_demand",
]
