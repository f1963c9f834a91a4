"""Finds and loads libuffdd_fastpath, the daemon's hot loops in C (native/fastpath/).

Why C: profiles of the demand path showed ~170 µs of Python per fault across the two
daemons, six times the C yardstick's whole round trip (README, Performance). The
loops in the library do only the common case (a fault, a request, a reply, an install)
and hand everything else back to the Python code, which stays the one place for the
rules. ctypes releases the GIL for the whole call, so the loop never waits for (or
blocks) the daemon's other threads.

``[peer] fastpath``: ``auto`` uses the library when it is found, ``on`` refuses to
start without it, ``off`` runs the pure-Python loops.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Final

from uffdd.errors import ConfigError

#: Must match FP_ABI_VERSION in native/fastpath/frame.h.
ABI_VERSION: Final = 2
LIBRARY: Final = "libuffdd_fastpath.so"
#: Set to a path to load that file (tests, odd installs).
ENV_PATH: Final = "UFFDD_FASTPATH_LIB"
MODES: Final = ("auto", "on", "off")



class _Loaded:
    """The one load attempt of this process: the library (or None) and where/why."""

    tried = False
    lib: ctypes.CDLL | None = None
    where = ""


def candidates() -> list[str]:
    """Where the library is looked for, in order."""
    explicit = os.environ.get(ENV_PATH)
    if explicit:
        return [explicit]
    checkout = Path(__file__).resolve().parent.parent / "native" / "build" / LIBRARY
    # A source checkout (make -C native); the Debian package's private directory; where
    # make -C native install puts it (PREFIX /usr/local by default, and ldconfig may not
    # have run yet); the loader's path.
    libdirs = ("/usr/lib/uffdd", "/usr/local/lib", "/usr/lib")
    installed = [f"{libdir}/{LIBRARY}" for libdir in libdirs]
    return [str(checkout), *installed, LIBRARY]


def _try_load() -> tuple[ctypes.CDLL | None, str]:
    problems: list[str] = []
    for path in candidates():
        if "/" in path and not os.path.exists(path):
            problems.append(f"{path}: not built")
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            problems.append(f"{path}: {e}")
            continue
        abi = lib.uffdd_fp_abi()
        if abi != ABI_VERSION:
            problems.append(f"{path}: ABI {abi}, this uffdd needs {ABI_VERSION} (rebuild native/)")
            continue
        return lib, path
    return None, "; ".join(problems)


def load(mode: str) -> ctypes.CDLL | None:
    """The library for ``mode`` (see module doc), or None for the pure-Python loops.

    Loaded once per process; ``describe`` says what came of it (the daemon logs that
    when it serves: the config, which loads the library first, is read before logging
    is set up). ``on`` without a usable library raises ConfigError naming every place
    looked at.
    """
    if mode not in MODES:
        raise ConfigError(f"peer.fastpath must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return None
    if not _Loaded.tried:
        _Loaded.tried = True
        _Loaded.lib, _Loaded.where = _try_load()
    if _Loaded.lib is None and mode == "on":
        raise ConfigError(f"peer.fastpath = \"on\" but the library cannot be loaded: "
                          f"{_Loaded.where}")
    return _Loaded.lib


def describe(mode: str) -> str:
    """One line for the start-up log: which loops ``mode`` gives, and from where."""
    if mode == "off":
        return "fast path: off (peer.fastpath is off); using the Python loops"
    if load(mode) is not None:
        return f"fast path: C loops from {_Loaded.where}"
    return f"fast path: not available ({_Loaded.where}); using the Python loops"
