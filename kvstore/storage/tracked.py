"""A Storage that tells its listeners which token each record write or delete touched.

Theory of operation
-------------------
``TrackedStorage`` wraps any ``Storage`` (the node's data store, ``kvstore.runtime.node``) and,
after every ``put`` or ``delete`` returns, raises or is cancelled, calls each listener with the
record's token.  A listener that caches something derived from the store (anti-entropy's range
summaries, ``kvstore.runtime.anti_entropy``) drops what that token's range contributed, so a
cache filled by a scan that finished before the write landed is never trusted after it.

What it guarantees: when a write's caller sees it return, every listener has been told.  What
it cannot see: a write handed to an engine that lands *after* its caller was cancelled (the
fault layer's slow fsync, the simulator's disk) is reported at the cancellation, possibly
before it lands; a listener bounds how long it trusts a cached value for that case.  Meta blobs
are not records and are not reported.  Reads go straight through: one method call more.
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore.storage.base import Record, Storage

ChangeListener = Callable[[int], None]  # called with the token of the record written or deleted


class TrackedStorage:
    """``Storage`` around another, reporting every record write and delete by token."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self._listeners: list[ChangeListener] = []

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _changed(self, token: int) -> None:
        for listener in self._listeners:
            listener(token)

    @property
    def durable(self) -> bool:
        return self.inner.durable

    async def get(self, key: str, token: int) -> bytes | None:
        return await self.inner.get(key, token)

    async def put(self, key: str, token: int, blob: bytes) -> None:
        try:
            await self.inner.put(key, token, blob)
        finally:
            self._changed(token)

    async def delete(self, key: str, token: int) -> None:
        try:
            await self.inner.delete(key, token)
        finally:
            self._changed(token)

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
