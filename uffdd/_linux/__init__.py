"""Thin, typed layer over the Linux interfaces uffdd uses (userfaultfd, fds, sockets)."""
