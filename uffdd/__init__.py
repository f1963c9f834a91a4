"""uffdd: userspace postcopy live-migration daemon for KVM hypervisors."""

__version__ = "0.1.0"
