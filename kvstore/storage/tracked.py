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
are not records and are not reported.  Everything else is ``StorageWrapper``'s pass-through.
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore.storage.base import Storage, StorageWrapper

ChangeListener = Callable[[int], None]  # called with the token of the record written or deleted


class TrackedStorage(StorageWrapper):
    """``Storage`` around another, reporting every record write and delete by token."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self._listeners: list[ChangeListener] = []

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _changed(self, token: int) -> None:
        for listener in self._listeners:
            listener(token)

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
