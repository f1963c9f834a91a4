"""uffdd: userspace postcopy live-migration daemon for KVM hypervisors.

The package's public face is what a VMM (or a script driving one) needs: the client
library (:class:`Client`, the region descriptions it takes) and the errors it raises.
Everything else is named by its module (``uffdd.daemon``, ``uffdd.config``, ...) and
may change; ``uffdd.lab`` holds the demo, benchmark and test tools. How the pieces fit
is in docs/architecture.md.
"""

__version__ = "0.1.0"  # first: modules imported below read it (metrics, cli)

from uffdd.client import Client, ClientError, GuestRegion, MemoryRegion
from uffdd.errors import ConfigError, ProtocolError, UffddError

__all__ = [
    "Client",
    "ClientError",
    "ConfigError",
    "GuestRegion",
    "MemoryRegion",
    "ProtocolError",
    "UffddError",
    "__version__",
]
