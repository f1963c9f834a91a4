#!/bin/sh
# uffdd, from the package's private Python environment (exec: under systemd the daemon
# stays the service's main process, which Type=notify and NotifyAccess=main need).
exec /usr/lib/uffdd/venv/bin/python3 -m uffdd "$@"
