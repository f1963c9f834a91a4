"""Test aids for the strategy and failure-policy tests.

``custom`` holds third-party-style strategies that the tests load by entry point (a
dist-info written to a temporary directory on the daemon's PYTHONPATH) and by
``module:Class``; ``vmsim`` runs migrations with the native VMM stand-in.
"""
