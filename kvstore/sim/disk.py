"""Simulated durable disks: a node's stores that outlive a crash of the node (or not, when it says so).

Theory of operation
-------------------
A ``SimDisk`` is one node's disk: three ordered in-memory stores (``data``, ``hints``, ``paxos``,
each a ``MemoryStorage``) and one ``DiskFaults`` (a full disk, a slow fsync, I/O errors: the
same fault layer the real node wraps around sqlite, ``kvstore.storage.faulty``).  It belongs to
the simulated cluster, not to the node: a crash that keeps state hands the same disk to the next
boot; a crash that loses state replaces it with a new, empty one.

Each boot of a node sees the disk through ``StoreHandle``s, which are what the node holds.  When
the node crashes, its handles are *fenced*: the cancelled tasks of the dead process may still run
their ``finally`` blocks, and nothing they do may reach the disk the next boot will read.

Durability model (``durable = True``): a write is durable the moment it is applied, and it is
applied after a simulated write latency (``write_latency_s``, drawn from the simulation's rng),
in the order the writes were issued (each one completes strictly after the one before it on the
same disk, as a group-committing engine does).  As with the real engines, a write handed to the
store lands even if its caller stops waiting (it runs in its own task, of the node's process);
if the node crashes before it lands, it never does -- it was never acknowledged.  Reads are
instant and see exactly the writes applied so far.

The injected durability bug (test-only, ``unsafe_writeback_s``; set by ``kvstore sim
--unsafe-skip-fsync-before-ack``, never reachable from a node's configuration): the disk
acknowledges every write at once, into a volatile page cache the node reads back, and makes it
durable only at the next periodic write-back (every ``unsafe_writeback_s`` of simulated time),
as an engine that skipped its fsync and left the pages to the OS.  A crash loses every write
not yet written back -- including writes the node already acknowledged to a client or to a
coordinator.  It exists to show the simulator and ``--shrink`` finding a real broken promise.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import Callable, Coroutine
from typing import Any

from kvstore.sim.vloop import CURRENT_HOST, Host
from kvstore.storage._common import StorageClosed
from kvstore.storage.base import Record
from kvstore.storage.faulty import DiskFaults, FaultyStorage
from kvstore.storage.memory import MemoryStorage

_NO_HOST = contextvars.Context()  # the write's timer belongs to the disk, not to a process

STORE_NAMES = ("data", "hints", "paxos")


class SimDisk:
    """One node's durable disk: its stores and its faults."""

    def __init__(
        self, node_id: str, generation: int, write_latency_s: Callable[[], float],
        unsafe_writeback_s: float | None = None,
    ) -> None:
        assert unsafe_writeback_s is None or unsafe_writeback_s > 0
        self.node_id = node_id
        self.generation = generation  # 0 for the first disk; +1 each time the disk is lost
        self.stores = {name: MemoryStorage("always") for name in STORE_NAMES}
        self.faults = DiskFaults()
        self.write_latency_s = write_latency_s
        self.busy_until_ns = 0  # the completion instant of the last write issued (FIFO order)
        self._handles: list[StoreHandle] = []
        # The injected bug (module docstring): writes acknowledged but not yet durable, in order.
        self.unsafe_writeback_s = unsafe_writeback_s
        self.unsynced: list[tuple[MemoryStorage, str, tuple[Any, ...]]] = []
        self._writeback_due = False

    def open(self) -> dict[str, FaultyStorage]:
        """The stores of a new boot of the node (data, hints, paxos), behind the fault layer."""
        if self.unsafe_writeback_s is not None:
            # A new boot reads what was written back; its page cache starts as a copy of it.
            handles = {name: StoreHandle(self, _copy(store), durable_store=store)
                       for name, store in self.stores.items()}
        else:
            handles = {name: StoreHandle(self, store) for name, store in self.stores.items()}
        self._handles.extend(handles.values())
        return {name: FaultyStorage(handle, self.faults) for name, handle in handles.items()}

    def fence(self) -> None:
        """The node crashed: whatever its old boot still tries is refused."""
        for handle in self._handles:
            handle.fenced = True
        self._handles.clear()
        self.unsynced.clear()  # the page cache dies with the node

    def note_unsynced(self, store: MemoryStorage, op: str, args: tuple[Any, ...]) -> None:
        assert self.unsafe_writeback_s is not None
        self.unsynced.append((store, op, args))
        if not self._writeback_due:
            self._writeback_due = True
            # Owned by no node process: the write-back is the OS's; a crash empties what it flushes.
            asyncio.get_running_loop().call_later(self.unsafe_writeback_s, self._write_back,
                                                  context=contextvars.Context())

    def _write_back(self) -> None:
        self._writeback_due = False
        pending, self.unsynced = self.unsynced, []
        for store, op, args in pending:
            _run_now(getattr(store, op)(*args))


class StoreHandle:
    """One boot's view of one store of a ``SimDisk`` (a ``Storage``)."""

    durable = True

    def __init__(self, disk: SimDisk, store: MemoryStorage, durable_store: MemoryStorage | None = None) -> None:
        self.disk = disk
        self.store = store
        self.durable_store = durable_store  # set only under the injected bug: ``store`` is then the page cache
        self.fenced = False

    def _check(self) -> None:
        if self.fenced:
            raise StorageClosed("the node crashed: this boot's storage is gone")

    async def _write(self, op: str, *args: Any) -> None:
        self._check()
        if self.durable_store is not None:
            # The injected bug: acknowledged now, durable at the next write-back (or never).
            await getattr(self.store, op)(*args)
            self.disk.note_unsynced(self.durable_store, op, args)
            return

        loop = asyncio.get_running_loop()
        now_ns = int(loop.time() * 1e9)
        done_ns = max(now_ns + int(self.disk.write_latency_s() * 1e9), self.disk.busy_until_ns + 1)
        self.disk.busy_until_ns = done_ns
        # The write lands from a timer, not from the caller: a caller that stops waiting does not
        # stop it, a crash of the node does (the handle is fenced), and a paused node's write lands
        # only once it resumes (the landing is scheduled in its process, which holds it meanwhile).
        landed: asyncio.Future[None] = loop.create_future()
        loop.call_later(max(0.0, (done_ns - now_ns) / 1e9), self._land_soon, landed, op, args,
                        CURRENT_HOST.get(), context=_NO_HOST)
        await landed

    def _land_soon(self, landed: asyncio.Future[None], op: str, args: tuple[Any, ...], host: Host | None) -> None:
        if host is not None and host.paused:
            asyncio.get_running_loop().call_soon(self._land, landed, op, args, context=host.context())
        else:
            self._land(landed, op, args)

    def _land(self, landed: asyncio.Future[None], op: str, args: tuple[Any, ...]) -> None:
        try:
            if not self.fenced:
                _run_now(getattr(self.store, op)(*args))
        except Exception as exc:
            if not landed.done():
                landed.set_exception(exc)
            return
        if not landed.done():
            landed.set_result(None)

    async def get(self, key: str, token: int) -> bytes | None:
        self._check()
        return await self.store.get(key, token)

    async def put(self, key: str, token: int, blob: bytes) -> None:
        await self._write("put", key, token, blob)

    async def delete(self, key: str, token: int) -> None:
        await self._write("delete", key, token)

    async def scan(
        self, start_token: int, end_token: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[Record]:
        self._check()
        return await self.store.scan(start_token, end_token, limit, after)

    async def meta_get(self, name: str) -> bytes | None:
        self._check()
        return await self.store.meta_get(name)

    async def meta_put(self, name: str, blob: bytes) -> None:
        await self._write("meta_put", name, blob)

    async def count(self) -> int:
        self._check()
        return await self.store.count()

    async def size_bytes(self) -> int:
        self._check()
        return await self.store.size_bytes()

    async def close(self) -> None:
        # The node stopping closes its view; the disk itself (the MemoryStorage) stays.
        self.fenced = True


def latency_sampler(rng: random.Random, low_ms: float, high_ms: float) -> Callable[[], float]:
    """Uniform latencies in seconds between ``low_ms`` and ``high_ms`` drawn from ``rng``."""
    assert 0 <= low_ms <= high_ms
    return lambda: rng.uniform(low_ms, high_ms) / 1000.0


def _copy(store: MemoryStorage) -> MemoryStorage:
    """A page cache over ``store``: an independent copy of its records and meta."""
    cache = MemoryStorage(store.fsync, durable=store.durable)
    cache._data = store._data.copy()
    cache._meta = dict(store._meta)
    cache._bytes = store._bytes
    return cache


def _run_now(step: Coroutine[Any, Any, None]) -> None:
    """Run a ``MemoryStorage`` operation to completion now: it never awaits (see its docstring)."""
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise AssertionError("a MemoryStorage operation awaited")
