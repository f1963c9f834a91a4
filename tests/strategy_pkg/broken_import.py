"""Broken: importing this module fails, as a third-party strategy with a bug would."""

raise RuntimeError("this strategy module is broken on purpose")
