"""Storage seam: how a node persists records.

Theory of operation
-------------------
A ``Storage`` is an ordered map from ``(token, key)`` to an opaque ``bytes``
blob.  Records are ordered by ring token first so that a token range (a vnode's
share of the ring) can be scanned in order: hinted handoff and Merkle
anti-entropy walk ranges, never the whole store.  The blob's meaning belongs
to the caller (a versioned object, a hint, a Paxos acceptor state).

Durability contract, by ``fsync`` policy:

* ``always``: when ``put``/``delete`` returns, the change is on stable storage.
* ``batch``: the same promise, but writes arriving within a short window share
  one fsync (group commit); every caller still waits for that fsync.
* ``never``: the change is in the OS page cache or memory; a crash may lose it.

A node acknowledges a replica write only after ``put`` returns, so under
``always`` and ``batch`` an acknowledged write survives ``kill -9``.

Every store says whether it keeps what it acknowledged across a restart of its node
(``durable``): sqlite under ``always`` or ``batch`` does, sqlite under ``never`` and an
ordinary memory store do not.  The node trusts this attribute, never its config, to decide
whether the store may still hold the dots it issued before (``kvstore.runtime.identity``); a
simulator's disk, kept across a simulated restart, says ``durable = True``.

Besides records, a store keeps a few named *meta* blobs (``meta_get``/``meta_put``): facts
about the store itself, such as the incarnation of the node identity that wrote it.  They live
in the same file as the records, so losing or replacing the data loses them too (that is the
point: a node detects an empty or new store by their absence), and no scan, count, Merkle tree
or anti-entropy exchange ever sees them.  ``meta_put`` has the durability of ``put``.

Engines must not block the event loop: blocking I/O runs on a thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

FsyncPolicy = Literal["always", "batch", "never"]
FSYNC_POLICIES: tuple[str, ...] = ("always", "batch", "never")
ENGINES: tuple[str, ...] = ("memory", "sqlite")
MAX_META_NAME = 64


class StorageError(Exception):
    """An operating error of the storage engine (disk full, corrupt file, closed store)."""


@dataclass(frozen=True, slots=True)
class Record:
    token: int
    key: str
    blob: bytes


class Storage(Protocol):
    @property
    def durable(self) -> bool:
        """Whether an acknowledged ``put``/``meta_put`` survives a restart of the node (see above)."""
        ...

    async def get(self, key: str, token: int) -> bytes | None:
        """The blob stored under (token, key), or None."""
        ...

    async def put(self, key: str, token: int, blob: bytes) -> None:
        """Store (replace) a blob; returns once durable per the fsync policy."""
        ...

    async def delete(self, key: str, token: int) -> None:
        """Remove a record (used to reap tombstones and to drop delivered hints)."""
        ...

    async def scan(
        self, start_token: int, end_token: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[Record]:
        """Records with start_token < token <= end_token, in ring order, at most ``limit``.

        The range is half-open on the left like a ring range.  When ``start_token >= end_token``
        the range wraps around the end of the token space (tokens are signed 64-bit: records with
        token > start_token come first, then those with token <= end_token).  ``after`` resumes a
        paged scan strictly after the (token, key) of the last record of the previous page.
        """
        ...

    async def meta_get(self, name: str) -> bytes | None:
        """The meta blob stored under ``name``, or None (a new or wiped store has none)."""
        ...

    async def meta_put(self, name: str, blob: bytes) -> None:
        """Store (replace) a meta blob; returns once durable per the fsync policy, in order with
        the record writes issued before it."""
        ...

    async def count(self) -> int:
        """Number of records stored (meta blobs are not records)."""
        ...

    async def size_bytes(self) -> int:
        """Approximate bytes used (for metrics)."""
        ...

    async def close(self) -> None:
        """Flush and release resources; idempotent."""
        ...


class StorageWrapper:
    """A ``Storage`` that passes every operation to ``inner``: the base of the wrappers
    (``kvstore.storage.tracked``, ``kvstore.storage.faulty``), each of which overrides only the
    operations it changes.  Reads and writes it does not override cost one method call more than
    the engine's own."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    @property
    def durable(self) -> bool:
        return self.inner.durable

    async def get(self, key: str, token: int) -> bytes | None:
        return await self.inner.get(key, token)

    async def put(self, key: str, token: int, blob: bytes) -> None:
        await self.inner.put(key, token, blob)

    async def delete(self, key: str, token: int) -> None:
        await self.inner.delete(key, token)

    async def scan(
        self, start_token: int, end_token: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[Record]:
        return await self.inner.scan(start_token, end_token, limit, after)

    async def meta_get(self, name: str) -> bytes | None:
        return await self.inner.meta_get(name)

    async def meta_put(self, name: str, blob: bytes) -> None:
        await self.inner.meta_put(name, blob)

    async def count(self) -> int:
        return await self.inner.count()

    async def size_bytes(self) -> int:
        return await self.inner.size_bytes()

    async def close(self) -> None:
        await self.inner.close()


async def scan_pages(
    storage: Storage, start_token: int, end_token: int, page_size: int
) -> AsyncIterator[list[Record]]:
    """Every record of a range, one bounded page at a time: the project's one paging loop.

    The cursor is the (token, key) of the last record of the previous page, so a caller may
    delete records it was given (a reaped tombstone, a delivered hint) without skipping any.
    """
    assert page_size >= 1, page_size
    after: tuple[int, str] | None = None
    while True:
        page = await storage.scan(start_token, end_token, page_size, after)
        if page:
            yield page
        if len(page) < page_size:
            return
        after = (page[-1].token, page[-1].key)
