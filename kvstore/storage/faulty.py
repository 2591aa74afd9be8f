"""A fault layer at the Storage seam: a full disk, a slow fsync, failing I/O, changed at run time.

Theory of operation
-------------------
``FaultyStorage`` wraps any ``Storage`` and consults a ``DiskFaults`` before each operation.  One
``DiskFaults`` stands for one node's disk, so a node shares it between its stores (data, hints,
Paxos): they live in one directory, and a full disk refuses all of them.  With no fault set, an
operation costs one attribute test more than the engine it wraps.

Faults, each set independently (``DiskFaults.configure``):

* ``disk_full``: every ``put``/``delete`` raises ``StorageFull`` *without* reaching the engine,
  as SQLite does on ``ENOSPC`` (it rolls the transaction back): the write is certainly not
  applied.  Reads still work, as on a real full disk.
* ``fsync_delay_ms``: every write is held that long before it reaches the engine, so it is
  neither durable nor visible until the hold ends: a slow fsync.  The held write then lands,
  whatever happened to its caller: like the sqlite engine, a write handed to the layer is applied
  even if the awaiting task is cancelled (the hold runs in its own task).  Clearing or changing
  the faults ends every hold at once, so a test (or a nemesis) decides when held writes land.
* ``read_delay_ms``: every ``get``/``scan`` is held that long (a slow disk for reads).
* ``write_error_rate`` / ``read_error_rate``: the probability that an operation fails with a
  plain ``StorageError`` (an I/O error) before reaching the engine, drawn from a
  ``random.Random`` seeded by ``seed``: reproducible for one sequence of operations.

``DiskFaults.stats`` counts what the layer did (writes refused, failed, held, landed after a
hold; reads delayed, failed) and how many writes are held *right now* (``writes_held``): a test
observes deterministically that an answer came while a write was still held, without measuring
time.

The chaos harness drives it through the authenticated admin route ``/admin/storage-faults``
(``kvstore.server.app``); a simulation can hold a ``DiskFaults`` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from kvstore.storage._common import StorageFull
from kvstore.storage.base import Record, Storage, StorageError, StorageWrapper

MAX_DELAY_MS = 600_000.0  # a hold longer than ten minutes is a typo, not a test


@dataclass(frozen=True)
class FaultSettings:
    """What a disk does wrong (all off by default)."""

    disk_full: bool = False
    fsync_delay_ms: float = 0.0
    read_delay_ms: float = 0.0
    write_error_rate: float = 0.0
    read_error_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("fsync_delay_ms", "read_delay_ms"):
            value = getattr(self, name)
            if not 0.0 <= value <= MAX_DELAY_MS:
                raise ValueError(f"{name} must be between 0 and {MAX_DELAY_MS:.0f}, got {value!r}")
        for name in ("write_error_rate", "read_error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")

    @property
    def active(self) -> bool:
        return bool(
            self.disk_full or self.fsync_delay_ms or self.read_delay_ms or self.write_error_rate
            or self.read_error_rate
        )

    @classmethod
    def from_json(cls, raw: Any) -> FaultSettings:
        """Parse an admin request body; raises ``ValueError`` naming the bad or unknown field."""
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object of disk fault settings")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "disk_full":
                if not isinstance(value, bool):
                    raise ValueError("disk_full must be true or false")
            elif name == "seed":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError("seed must be an integer")
            elif not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number")
            values[name] = value
        return cls(**values)


@dataclass
class FaultStats:
    writes_refused_full: int = 0
    writes_failed: int = 0
    writes_held_total: int = 0
    writes_held: int = 0  # held right now
    writes_landed_after_hold: int = 0
    reads_delayed: int = 0
    reads_failed: int = 0


@dataclass
class DiskFaults:
    """The faults of one node's disk, shared by every ``FaultyStorage`` over that disk."""

    settings: FaultSettings = field(default_factory=FaultSettings)
    stats: FaultStats = field(default_factory=FaultStats)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _release: asyncio.Event | None = field(default=None, repr=False)

    def configure(self, settings: FaultSettings) -> None:
        """Replace the settings; every hold in progress ends now (its write then lands)."""
        self.settings = settings
        self.rng = random.Random(settings.seed)
        if self._release is not None:
            self._release.set()
            self._release = None

    def clear(self) -> None:
        self.configure(FaultSettings())

    def to_json(self) -> dict[str, Any]:
        return {"faults": asdict(self.settings), "stats": asdict(self.stats)}

    # --- used by FaultyStorage --------------------------------------------------------------

    def check_write(self) -> None:
        s = self.settings
        if s.disk_full:
            self.stats.writes_refused_full += 1
            raise StorageFull("disk full (injected): the write was not applied")
        if s.write_error_rate and self.rng.random() < s.write_error_rate:
            self.stats.writes_failed += 1
            raise StorageError("I/O error (injected): the write was not applied")

    def check_read(self) -> None:
        s = self.settings
        if s.read_error_rate and self.rng.random() < s.read_error_rate:
            self.stats.reads_failed += 1
            raise StorageError("I/O error (injected) on read")

    async def hold(self, delay_ms: float) -> None:
        """Wait ``delay_ms``, or less if the settings change meanwhile."""
        if self._release is None:
            self._release = asyncio.Event()
        release = self._release
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), delay_ms / 1000.0)


class FaultyStorage(StorageWrapper):
    """A ``Storage`` that passes every operation to ``inner`` unless ``faults`` say otherwise."""

    def __init__(self, inner: Storage, faults: DiskFaults) -> None:
        super().__init__(inner)
        self.faults = faults
        # A dict, not a set: cancelled in the order they were held (a set of tasks iterates by id).
        self._held: dict[asyncio.Task[None], None] = {}

    async def get(self, key: str, token: int) -> bytes | None:
        if self.faults.settings.active:
            await self._before_read()
        return await self.inner.get(key, token)

    async def put(self, key: str, token: int, blob: bytes) -> None:
        if self.faults.settings.active:
            await self._write(self.inner.put(key, token, blob))
            return
        await self.inner.put(key, token, blob)

    async def delete(self, key: str, token: int) -> None:
        if self.faults.settings.active:
            await self._write(self.inner.delete(key, token))
            return
        await self.inner.delete(key, token)

    async def scan(
        self, start_token: int, end_token: int, limit: int, after: tuple[int, str] | None = None
    ) -> list[Record]:
        if self.faults.settings.active:
            await self._before_read()
        return await self.inner.scan(start_token, end_token, limit, after)

    async def meta_get(self, name: str) -> bytes | None:
        if self.faults.settings.active:
            await self._before_read()
        return await self.inner.meta_get(name)

    async def meta_put(self, name: str, blob: bytes) -> None:
        # Same durability as put, so the same faults: a full disk also refuses the identity record.
        if self.faults.settings.active:
            await self._write(self.inner.meta_put(name, blob))
            return
        await self.inner.meta_put(name, blob)

    async def close(self) -> None:
        for task in list(self._held):
            task.cancel()  # a held write never reached the engine: closing drops it, like a crash
        await self.inner.close()

    # --- faults ---------------------------------------------------------------------------

    async def _before_read(self) -> None:
        faults = self.faults
        faults.check_read()
        delay_ms = faults.settings.read_delay_ms
        if delay_ms:
            faults.stats.reads_delayed += 1
            await faults.hold(delay_ms)

    async def _write(self, operation: Any) -> None:
        faults = self.faults
        try:
            faults.check_write()
        except StorageError:
            operation.close()  # never started: the engine did not see it
            raise
        delay_ms = faults.settings.fsync_delay_ms
        if not delay_ms:
            await operation
            return
        task = asyncio.ensure_future(self._held_write(operation, delay_ms))
        self._held[task] = None
        task.add_done_callback(self._release)
        task.add_done_callback(_consume)
        # Shielded: a caller giving up does not stop the write, as with the engines themselves.
        await asyncio.shield(task)

    def _release(self, task: asyncio.Task[None]) -> None:
        self._held.pop(task, None)

    async def _held_write(self, operation: Any, delay_ms: float) -> None:
        stats = self.faults.stats
        stats.writes_held_total += 1
        stats.writes_held += 1
        try:
            await self.faults.hold(delay_ms)
        except BaseException:
            operation.close()
            raise
        finally:
            stats.writes_held -= 1
        await operation
        stats.writes_landed_after_hold += 1


def _consume(task: asyncio.Task[None]) -> None:
    # An abandoned held write that fails later must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()
