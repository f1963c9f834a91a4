"""``python -m uffdd`` is the ``uffdd`` command."""

import sys

from uffdd.cli import main

sys.exit(main())
