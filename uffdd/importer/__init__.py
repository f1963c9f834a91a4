"""The destination side: the import session, its fault thread and the two engines under it.

``session`` (the Trio side of an import: link, events, vCPU exits), ``faultloop`` (the
fault thread: the rules and the slow paths, once), ``engine`` (the engine interface and
the Python engine), ``cengine`` and ``fastimport`` (the C engine, native/fastpath/import.c),
``pagestate`` (one byte of state per page). Nothing here imports the export side.
"""
