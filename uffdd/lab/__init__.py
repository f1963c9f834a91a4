"""The lab: tools that drive uffdd from outside, never part of the daemon.

``demo`` (a whole migration on this machine), ``bench`` (the benchmark scenarios),
``chaos`` (migrations under injected faults), ``harness`` (start daemons and VMM
stand-ins as real processes), ``pyvmm`` (a Python VMM stand-in: ``python -m
uffdd.lab.pyvmm``), ``faultproxy`` (a TCP proxy that cuts, resets and stalls a link) and
``testcerts`` (a throwaway TLS CA). They use the public client library and the kernel
layer; the core (daemon, sessions, data path) never imports them, which
tests/test_layout.py checks. The only door from the core is the CLI's ``demo``, ``chaos``
and ``bench`` subcommands, which import their lab module lazily.
"""
