"""In-memory storage engine: a sorted map in the node's own process.

Theory of operation
-------------------
Records live in one ``SortedDict`` keyed by ``(token, key)``, which is exactly the ring order
``scan`` needs, so a range scan is a bisect plus a walk (``irange``).  Every operation runs
synchronously on the event loop and finishes in O(log n); there is no I/O to offload, no
queue, and therefore nothing to bound or to report as busy.

Durability: none.  The ``fsync`` policy is accepted so the engines are interchangeable, and
ignored: *nothing survives the death of the process*, whatever the policy.  A node using this
engine must not reuse its actor id across restarts (see ``Node``), since it forgets the dots
it acknowledged: it says ``durable = False``.  Use it for tests, simulations and throw-away
clusters.  A simulator that keeps one ``MemoryStorage`` object across a *simulated* restart of
its node (its disk survives, the process does not) builds it with ``durable=True``.

Because no operation awaits, each one is atomic with respect to other coroutines, and
operations apply in the order they are called.
"""

from __future__ import annotations

from sortedcontainers import SortedDict

from kvstore.storage._common import StorageClosed, check_meta, check_record, scan_segments
from kvstore.storage.base import FsyncPolicy, Record

# Rough per-record cost besides key and blob (tuple, int, dict and list slots) for metrics.
_RECORD_OVERHEAD = 64


class MemoryStorage:
    """A ``Storage`` backed by a ``SortedDict``; loses everything when the process ends."""

    def __init__(self, fsync: FsyncPolicy = "never", *, durable: bool = False) -> None:
        assert fsync in ("always", "batch", "never"), f"unknown fsync policy {fsync!r}"
        self.fsync: FsyncPolicy = fsync
        self.durable = durable  # True only for an object its owner keeps across a simulated restart
        self._data: SortedDict = SortedDict()
        self._meta: dict[str, bytes] = {}
        self._bytes = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed("storage is closed")

    @staticmethod
    def _cost(key: str, blob: bytes) -> int:
        return len(key) + len(blob) + _RECORD_OVERHEAD

    async def get(self, key: str, token: int) -> bytes | None:
        self._check_open()
        check_record(key, token)
        blob: bytes | None = self._data.get((token, key))
        return blob

    async def put(self, key: str, token: int, blob: bytes) -> None:
        self._check_open()
        check_record(key, token, blob)
        old: bytes | None = self._data.get((token, key))
        if old is not None:
            self._bytes -= self._cost(key, old)
        self._data[(token, key)] = blob
        self._bytes += self._cost(key, blob)

    async def delete(self, key: str, token: int) -> None:
        self._check_open()
        check_record(key, token)
        old: bytes | None = self._data.pop((token, key), None)
        if old is not None:
            self._bytes -= self._cost(key, old)

    async def scan(
        self, start_token: int, end_token: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[Record]:
        self._check_open()
        assert isinstance(limit, int) and limit >= 0, f"limit must be a non-negative int: {limit!r}"
        out: list[Record] = []
        for lower, inclusive, upper_token in scan_segments(start_token, end_token, after):
            if len(out) >= limit:
                break
            # (upper_token + 1, "") exclusive == "token <= upper_token", whatever the key.
            keys = self._data.irange(lower, (upper_token + 1, ""), inclusive=(inclusive, False))
            for token, key in keys:
                out.append(Record(token, key, self._data[(token, key)]))
                if len(out) >= limit:
                    break
        return out

    async def meta_get(self, name: str) -> bytes | None:
        self._check_open()
        check_meta(name)
        return self._meta.get(name)

    async def meta_put(self, name: str, blob: bytes) -> None:
        self._check_open()
        check_meta(name, blob)
        self._meta[name] = blob

    async def count(self) -> int:
        self._check_open()
        return len(self._data)

    async def size_bytes(self) -> int:
        self._check_open()
        return self._bytes

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._data.clear()
            self._meta.clear()
            self._bytes = 0
