"""The sqlite engine's write-through read cache: hits skip the reader thread, and it never serves
anything the file does not hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvstore.storage import StorageError
from kvstore.storage import sqlite as sqlite_mod
from kvstore.storage.sqlite import SqliteStorage, _WriteCache


def no_reads(store: SqliteStorage, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []

    async def counting_read(fn: Any, *args: Any) -> Any:
        calls.append(args)
        return await original(fn, *args)

    original = store._read
    monkeypatch.setattr(store, "_read", counting_read)
    return calls


async def test_committed_writes_are_read_without_the_reader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStorage(str(tmp_path / "c.db"), "batch")
    try:
        reads = no_reads(store, monkeypatch)
        await store.put("a", 1, b"one")
        await store.put("a", 1, b"two")
        assert await store.get("a", 1) == b"two"
        await store.delete("a", 1)
        assert await store.get("a", 1) is None
        assert reads == [], "hits never leave the loop"
        assert await store.get("never-written", 5) is None
        assert reads == [], "nor does a record never written (the key filter: tests/test_storage_filter.py)"
    finally:
        await store.close()


async def test_cache_agrees_with_the_file_after_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    store = SqliteStorage(path, "always", cache_entries=4)
    for i in range(20):
        await store.put(f"k{i}", i, f"v{i}".encode())
    await store.delete("k3", 3)
    cached = {i: await store.get(f"k{i}", i) for i in range(20)}
    await store.close()
    reopened = SqliteStorage(path, "always")
    try:
        assert {i: await reopened.get(f"k{i}", i) for i in range(20)} == cached
    finally:
        await reopened.close()


async def test_failed_commit_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStorage(str(tmp_path / "f.db"), "always")
    try:
        await store.put("k", 1, b"good")
        monkeypatch.setattr(sqlite_mod, "_INSERT", "INSERT INTO no_such_table VALUES (?, ?, ?)")
        with pytest.raises(StorageError):
            await store.put("k", 1, b"never-committed")
        assert await store.get("k", 1) == b"good", "the failed write must not be served from the cache"
    finally:
        await store.close()


@pytest.mark.parametrize("entries,max_bytes,writes,expected_len", [
    (3, 10_000, 10, 3),  # entry bound
    (100, 25, 10, 2),  # byte bound: 10-byte blobs
])
def test_cache_bounds(entries: int, max_bytes: int, writes: int, expected_len: int) -> None:
    cache = _WriteCache(entries, max_bytes)
    for i in range(writes):
        cache.set((i, f"k{i}"), b"x" * 10)
    assert len(cache.entries) == expected_len and cache.bytes <= max_bytes
    assert cache.get((writes - 1, f"k{writes - 1}")) == (True, b"x" * 10), "the newest survives"
    assert cache.get((0, "k0")) == (False, None), "the oldest was evicted"
    cache.set((writes - 1, f"k{writes - 1}"), None)
    assert cache.get((writes - 1, f"k{writes - 1}")) == (True, None)
