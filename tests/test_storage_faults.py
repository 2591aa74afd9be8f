"""The disk fault layer (``kvstore.storage.faulty``) and how the engines report a full disk.

A full disk must be told apart from other storage errors: ``StorageFull`` promises the write was
not applied (the node then answers 507 with ``indeterminate: false``, or fails over), any other
``StorageError`` promises nothing.  The sqlite check uses a real full filesystem (a tiny tmpfs)
when this process may mount one, and says why it skips otherwise.

The tests that hold a write or a read (a slow fsync, a slow read) run on virtual time
(``@simulated`` from tests/vtime.py): the 60 s holds, the sleeps and the ``wait_for`` bounds are
simulated, so how busy the machine is changes nothing and a hold's length can be asserted exactly.
The sqlite tests stay on a real loop: the engine works in executor threads, which a virtual loop
cannot wait for.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import kvstore.storage.sqlite as sqlite_mod
from kvstore.storage import MemoryStorage, SqliteStorage, StorageError, StorageFull
from kvstore.storage.faulty import DiskFaults, FaultSettings, FaultyStorage
from tests.disk_util import fill, tiny_tmpfs
from tests.vtime import CLOCK, elapsed_s, simulated


def faulty(**settings: Any) -> tuple[FaultyStorage, MemoryStorage, DiskFaults]:
    inner = MemoryStorage()
    disk = DiskFaults()
    disk.configure(FaultSettings(**settings))
    return FaultyStorage(inner, disk), inner, disk


async def test_full_disk_refuses_writes_without_touching_the_engine_and_still_reads() -> None:
    store, inner, disk = faulty()
    await store.put("a", 1, b"old")
    disk.configure(FaultSettings(disk_full=True))
    with pytest.raises(StorageFull):
        await store.put("a", 1, b"new")
    with pytest.raises(StorageFull):
        await store.delete("a", 1)
    assert await inner.get("a", 1) == b"old"  # neither write reached the engine
    assert await store.get("a", 1) == b"old"  # a full disk still reads
    assert [r.key for r in await store.scan(0, 0, 10)] == ["a"]
    assert disk.stats.writes_refused_full == 2
    disk.clear()
    await store.put("a", 1, b"new")
    assert await inner.get("a", 1) == b"new"


async def test_one_disk_is_shared_by_every_store_over_it() -> None:
    disk = DiskFaults()
    data, hints = FaultyStorage(MemoryStorage(), disk), FaultyStorage(MemoryStorage(), disk)
    disk.configure(FaultSettings(disk_full=True))
    for store in (data, hints):
        with pytest.raises(StorageFull):
            await store.put("k", 1, b"v")


@simulated
async def test_slow_fsync_holds_the_write_until_it_lands_and_clearing_ends_the_hold() -> None:
    store, inner, disk = faulty(fsync_delay_ms=60_000)
    put = asyncio.ensure_future(store.put("k", 1, b"v"))
    for _ in range(100):
        if disk.stats.writes_held:
            break
        await asyncio.sleep(0)
    assert disk.stats.writes_held == 1
    assert await inner.get("k", 1) is None  # not durable, not visible while held
    assert not put.done()
    disk.clear()  # the fsync "completes" now
    await asyncio.wait_for(put, 10)
    assert await inner.get("k", 1) == b"v"
    assert disk.stats.writes_held == 0
    assert disk.stats.writes_landed_after_hold == 1


@simulated
async def test_a_held_write_lands_by_itself_at_its_fsync_delay() -> None:
    store, inner, disk = faulty(fsync_delay_ms=60_000)
    started_ns = CLOCK.monotonic_ns()
    await store.put("k", 1, b"v")  # nobody clears the fault: the hold ends at its delay
    assert elapsed_s(started_ns) == pytest.approx(60.0, abs=1e-6)
    assert await inner.get("k", 1) == b"v"
    assert disk.stats.writes_landed_after_hold == 1


@simulated
async def test_a_held_write_lands_even_if_its_caller_gives_up() -> None:
    """Like the engines: a write handed to storage is applied even when the awaiting task is
    cancelled (a coordinator answering "timeout, indeterminate" relies on this being honest)."""
    store, inner, disk = faulty(fsync_delay_ms=60_000)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.put("k", 1, b"v"), 0.05)
    assert disk.stats.writes_held == 1
    disk.clear()
    for _ in range(1000):
        if await inner.get("k", 1) == b"v":
            break
        await asyncio.sleep(0.001)
    assert await inner.get("k", 1) == b"v"


@simulated
async def test_slow_reads_are_held_and_released_too() -> None:
    store, inner, disk = faulty()
    await store.put("k", 1, b"v")
    disk.configure(FaultSettings(read_delay_ms=60_000))
    read = asyncio.ensure_future(store.get("k", 1))
    await asyncio.sleep(0.01)
    assert not read.done()
    disk.clear()
    assert await asyncio.wait_for(read, 10) == b"v"
    assert disk.stats.reads_delayed == 1


async def test_error_rates_are_reproducible_from_the_seed() -> None:
    async def outcomes(seed: int) -> list[bool]:
        store, _inner, _disk = faulty(write_error_rate=0.5, read_error_rate=0.5, seed=seed)
        seen = []
        for i in range(40):
            try:
                await store.put(f"k{i}", i, b"v")
                await store.get(f"k{i}", i)
                seen.append(True)
            except StorageError as exc:
                assert not isinstance(exc, StorageFull)  # an I/O error promises nothing
                seen.append(False)
        return seen

    first = await outcomes(3)
    assert first == await outcomes(3)
    assert True in first and False in first


@simulated
async def test_close_drops_held_writes_like_a_crash() -> None:
    store, inner, disk = faulty(fsync_delay_ms=60_000)
    put = asyncio.ensure_future(store.put("k", 1, b"v"))
    await asyncio.sleep(0.01)
    await store.close()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert disk.stats.writes_held == 0


@pytest.mark.parametrize(
    "body, message",
    [
        ({"disk_ful": True}, "unknown field"),
        ({"disk_full": "yes"}, "disk_full"),
        ({"fsync_delay_ms": -1}, "fsync_delay_ms"),
        ({"fsync_delay_ms": True}, "fsync_delay_ms"),
        ({"write_error_rate": 1.5}, "write_error_rate"),
        ({"seed": 1.5}, "seed"),
        (["disk_full"], "JSON object"),
    ],
)
def test_settings_from_json_refuse_unknown_and_bad_fields(body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultSettings.from_json(body)


def test_settings_from_json_accept_every_field() -> None:
    raw = {"disk_full": True, "fsync_delay_ms": 3000, "read_delay_ms": 1.5, "write_error_rate": 0.1,
           "read_error_rate": 0, "seed": 9}
    settings = FaultSettings.from_json(raw)
    assert settings.active and settings.fsync_delay_ms == 3000 and settings.seed == 9
    assert not FaultSettings.from_json({}).active


# --- the sqlite engine on a full disk ----------------------------------------------------------


async def test_sqlite_on_a_really_full_disk_raises_storage_full_and_applies_nothing(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "disk") as disk:
        store = SqliteStorage(str(disk / "data.db"), "always")
        try:
            await store.put("before", 1, b"v")
            filler = fill(disk)
            with pytest.raises(StorageFull):
                for i in range(200):  # the WAL may still have a few free pages
                    await store.put(f"k{i}", i + 10, b"x" * 8192)
            written = await store.count()
            filler.unlink()  # space again: the store recovers
            await store.put("after", 2, b"v")
            assert await store.count() == written + 1
            assert await store.get("before", 1) == b"v"
        finally:
            await store.close()
        reopened = SqliteStorage(str(disk / "data.db"), "always")
        try:
            # Exactly the acknowledged writes survive: the refused one was rolled back.
            keys = [r.key for r in await reopened.scan(0, 0, 1000)]
            assert len(keys) == written + 1 and "after" in keys and "before" in keys
        finally:
            await reopened.close()


async def test_other_sqlite_errors_are_not_reported_as_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStorage(str(tmp_path / "data.db"), "always")
    try:
        monkeypatch.setattr(sqlite_mod, "_INSERT", "INSERT INTO no_such_table VALUES (?, ?, ?)")
        with pytest.raises(StorageError) as caught:
            await store.put("k", 1, b"v")
        assert not isinstance(caught.value, StorageFull)
    finally:
        monkeypatch.undo()
        await store.close()
