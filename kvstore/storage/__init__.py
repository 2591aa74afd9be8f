"""Storage engines behind the ``Storage`` seam, and ``open_storage`` to pick one by name.

Theory of operation
-------------------
``kvstore.storage.base`` defines the contract (ordering, scan semantics, durability per fsync
policy); the engines implement it:

* ``memory`` (``MemoryStorage``): a sorted map in the process; nothing survives its death.
* ``sqlite`` (``SqliteStorage``): one WAL-mode SQLite file; a writer thread with group commit
  and a reader thread keep all blocking I/O off the event loop; acknowledged writes survive
  ``kill -9`` under ``always`` and ``batch``.

Engines raise ``StorageError`` for operating errors, its subclass ``StorageBusy`` when a
bounded write queue is full (shed load, answer 503), ``StorageFull`` when the disk is full (the
write was rolled back: certainly not applied) and ``StorageClosed`` after ``close()``.
``faulty`` (``FaultyStorage``) wraps any engine to inject disk faults at run time (the chaos
harness's disk nemesis).
"""

from __future__ import annotations

import os

from kvstore.storage._common import StorageBusy, StorageClosed, StorageFull
from kvstore.storage.base import ENGINES, FSYNC_POLICIES, FsyncPolicy, Record, Storage, StorageError
from kvstore.storage.memory import MemoryStorage
from kvstore.storage.sqlite import SqliteStorage

__all__ = [
    "ENGINES",
    "FSYNC_POLICIES",
    "FsyncPolicy",
    "MemoryStorage",
    "Record",
    "SqliteStorage",
    "Storage",
    "StorageBusy",
    "StorageClosed",
    "StorageError",
    "StorageFull",
    "open_storage",
]


def open_storage(
    engine: str, path: str | None, fsync: FsyncPolicy = "batch", batch_window_ms: float = 2.0
) -> Storage:
    """Open the named engine.  ``memory`` ignores ``path``; ``sqlite`` needs a file path and
    creates its parent directories.  Raises ``ValueError`` for an unknown engine or fsync policy
    or a missing path, ``StorageError`` if the file cannot be opened."""
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"unknown fsync policy {fsync!r}; expected one of {FSYNC_POLICIES}")
    if engine == "memory":
        return MemoryStorage(fsync)
    if engine == "sqlite":
        if not path:
            raise ValueError("the sqlite storage engine needs a file path")
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create directory {parent}: {exc}") from exc
        return SqliteStorage(path, fsync, batch_window_ms)
    raise ValueError(f"unknown storage engine {engine!r}; expected one of {ENGINES}")
