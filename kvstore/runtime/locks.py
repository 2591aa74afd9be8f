"""Per-key asyncio locks: serialize read-modify-write of one key, without a lock per key forever.

A lock is created when the first holder asks and dropped when the last one leaves, so memory is
bounded by the keys in flight, not by the keyspace.  Used by the node's replica writes and the
Paxos acceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock_now, users_now = self._locks[key]
            assert lock_now is lock and users_now >= 1
            if users_now == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock_now, users_now - 1)
