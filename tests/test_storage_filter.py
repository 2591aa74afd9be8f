"""The sqlite engine's filter of records in the file: reads of records it never saw skip the reader
thread, and it never answers "absent" for a record the file holds (across growth, saturation of its
memory bound, deletes and reopens), checked against a plain dict model."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvstore.storage import StorageError
from kvstore.storage.keyfilter import KeyFilter, bloom_bits, bloom_capacity
from kvstore.storage.sqlite import SqliteStorage


def records(n: int, prefix: str = "k") -> list[tuple[int, str]]:
    return [((i * 11400714819323198485) % 2**64 - 2**63, f"{prefix}{i}") for i in range(n)]


# --- KeyFilter alone ---------------------------------------------------------------------------


@pytest.mark.parametrize("expected,max_bytes,added", [
    (0, 8 * 1024 * 1024, 1_000),  # one layer, far from full
    (0, 8 * 1024 * 1024, 50_000),  # min_capacity 64: many layers
    (0, 2048, 20_000),  # the memory bound stops growth: the newest layer overfills
    (10_000, 4096, 10_000),  # the first layer itself is sized down to the bound
])
def test_filter_never_forgets_and_stays_within_its_bound(
    expected: int, max_bytes: int, added: int
) -> None:
    key_filter = KeyFilter(expected, max_bytes=max_bytes, min_capacity=64)
    present = records(added)
    for record in present:
        key_filter.add(record)
    assert all(key_filter.may_contain(r) for r in present), "a false 'absent'"
    assert key_filter.size_bytes <= max_bytes


def test_filter_grows_in_layers_and_keeps_its_false_positive_rate() -> None:
    key_filter = KeyFilter(0, false_positive_rate=0.01, min_capacity=1000)
    present = records(30_000)
    for record in present:
        key_filter.add(record)
    assert key_filter.layers == 5 and not key_filter.saturated  # 1000 + 2000 + 4000 + 8000 + 16000 >= 30000
    absent = records(20_000, prefix="absent")
    false_positives = sum(key_filter.may_contain(r) for r in absent)
    # Expected <= 1% (200); 600 is > 25 standard deviations away: never a flake, always a real fault.
    assert false_positives < 600, false_positives


def test_saturated_filter_says_maybe_rather_than_absent() -> None:
    key_filter = KeyFilter(0, max_bytes=1024, min_capacity=64)
    present = records(5_000)
    for record in present:
        key_filter.add(record)
    assert key_filter.saturated
    assert all(key_filter.may_contain(r) for r in present)


def test_fill_adds_what_the_open_scan_found() -> None:
    key_filter = KeyFilter(3000)
    present = records(3000)
    key_filter.fill(iter(present), len(present))
    assert key_filter.layers == 1 and all(key_filter.may_contain(r) for r in present)


def test_re_adding_a_record_uses_no_capacity() -> None:
    key_filter = KeyFilter(0, min_capacity=10)
    for _ in range(100):
        key_filter.add((1, "same"))
    assert key_filter.layers == 1


@pytest.mark.parametrize("capacity,rate", [(1, 0.5), (1000, 0.01), (123_457, 0.001)])
def test_capacity_and_bits_are_inverse(capacity: int, rate: float) -> None:
    assert bloom_capacity(bloom_bits(capacity, rate), rate) >= capacity


def test_filter_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        KeyFilter(false_positive_rate=1.0)
    with pytest.raises(ValueError):
        KeyFilter(max_bytes=10)
    with pytest.raises(ValueError):
        SqliteStorage("/nonexistent-dir/never-opened.db", "always", filter_bytes=0)


# --- SqliteStorage with its filter -------------------------------------------------------------


def count_reads(store: SqliteStorage, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    original = store._read

    async def counting_read(fn: Any, *args: Any) -> Any:
        calls.append(args)
        return await original(fn, *args)

    monkeypatch.setattr(store, "_read", counting_read)
    return calls


async def test_absent_records_are_answered_without_the_reader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "a.db")
    store = SqliteStorage(path, "batch", cache_entries=1)
    try:
        await store.put("old", 1, b"v")
        await store.put("other", 2, b"w")  # evicts "old" from the one-entry cache
        reads = count_reads(store, monkeypatch)
        assert await store.get("never-written", 5) is None
        assert reads == [], "a record the filter never saw is answered on the loop"
        assert await store.get("old", 1) == b"v"
        assert len(reads) == 1, "a record in the file (not cached) is read from the file"
    finally:
        await store.close()
    reopened = SqliteStorage(path, "batch", cache_entries=1)
    try:
        reads = count_reads(reopened, monkeypatch)
        assert await reopened.get("old", 1) == b"v", "the filter is rebuilt from the file at open"
        assert await reopened.get("never-written", 5) is None
        assert len(reads) == 1
    finally:
        await reopened.close()


async def test_a_read_concurrent_with_a_put_sees_none_or_the_put(tmp_path: Path) -> None:
    """Whenever the read lands relative to the commit, never an answer the file did not hold."""
    store = SqliteStorage(str(tmp_path / "c.db"), "batch", batch_window_ms=1.0)
    try:
        for i in range(200):
            put = asyncio.ensure_future(store.put(f"k{i}", i, b"v"))
            for _ in range(i % 4):
                await asyncio.sleep(0)
            assert await store.get(f"k{i}", i) in (None, b"v")
            await put
            assert await store.get(f"k{i}", i) == b"v", "an acknowledged put is seen"
    finally:
        await store.close()


EDGE_KEYS = ["", "\x00", "a\x00b", "ключ", "🔑", "e\u0301", "é", "k" * 2000]


@pytest.mark.parametrize("seed", range(6))
async def test_random_puts_deletes_and_reopens_match_a_model(tmp_path: Path, seed: int) -> None:
    """Random operations on a few keys, with a tiny cache and a tiny filter (so every path is taken:
    cache hits, filter answers, thread reads, layer growth, saturation), compared with a dict."""
    rng = random.Random(seed)
    path = str(tmp_path / f"m{seed}.db")
    options: dict[str, Any] = {"cache_entries": rng.choice([1, 4, 64]), "filter_bytes": rng.choice([1024, 1 << 20])}
    model: dict[tuple[int, str], bytes] = {}
    universe = [(rng.randrange(-(2**63), 2**63), f"key-{i}") for i in range(300)]
    # Keys whose round trip through the file could differ from the str the filter hashed.
    universe += [(rng.randrange(-(2**63), 2**63), key) for key in EDGE_KEYS]
    store = SqliteStorage(path, rng.choice(["always", "batch", "never"]), **options)
    try:
        for step in range(1500):
            token, key = rng.choice(universe)
            roll = rng.random()
            if roll < 0.35:
                blob = f"{step}".encode()
                await store.put(key, token, blob)
                model[(token, key)] = blob
            elif roll < 0.5:
                await store.delete(key, token)
                model.pop((token, key), None)
            elif roll < 0.51:
                await store.close()
                store = SqliteStorage(path, rng.choice(["always", "batch", "never"]), **options)
            else:
                assert await store.get(key, token) == model.get((token, key)), (step, key)
        for token, key in universe:
            assert await store.get(key, token) == model.get((token, key)), key
        assert await store.count() == len(model)
    finally:
        await store.close()


async def test_a_large_file_is_filtered_from_its_open_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "big.db")
    present = records(5000)
    store = SqliteStorage(path, "never")
    try:
        await asyncio.gather(*(store.put(key, token, b"x") for token, key in present))
    finally:
        await store.close()
    reopened = SqliteStorage(path, "never", cache_entries=1)
    try:
        assert await reopened.count() == len(present)
        assert all([await reopened.get(key, token) == b"x" for token, key in present[::50]])
        reads = count_reads(reopened, monkeypatch)
        absent = records(2000, prefix="absent")
        assert all([await reopened.get(key, token) is None for token, key in absent])
        assert len(reads) < 100, f"{len(reads)} of 2000 absent reads went to the file (1% expected)"
    finally:
        await reopened.close()


# --- one writer per file: what the cache and the filter rest on ----------------------------------


async def test_a_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "owned.db")
    first = SqliteStorage(path, "always")
    try:
        await first.put("k", 1, b"v")
        with pytest.raises(StorageError, match="another store"):
            SqliteStorage(path, "always")
        child = subprocess.run(
            [sys.executable, "-c", CHILD_OPENS, path], capture_output=True, text=True, timeout=60,
            cwd=REPO_ROOT,
        )
        assert child.returncode == 3, (child.returncode, child.stderr)
        assert await first.get("k", 1) == b"v", "the refused opener changed nothing"
    finally:
        await first.close()
    second = SqliteStorage(path, "always")  # closed: the file is free again
    try:
        assert await second.get("k", 1) == b"v"
    finally:
        await second.close()


async def test_a_killed_owner_leaves_the_file_free(tmp_path: Path) -> None:
    path = str(tmp_path / "killed.db")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLDS, path], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "open"
        with pytest.raises(StorageError, match="another store"):
            SqliteStorage(path, "always")
    finally:
        child.kill()
        child.wait(timeout=60)
    reopened = SqliteStorage(path, "always")  # the kernel released the dead owner's lock
    try:
        assert await reopened.get("held", 1) == b"v"
    finally:
        await reopened.close()


REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_OPENS = r"""
import sys
from kvstore.storage import StorageError
from kvstore.storage.sqlite import SqliteStorage
try:
    SqliteStorage(sys.argv[1], "always")
except StorageError:
    sys.exit(3)
sys.exit(0)
"""
CHILD_HOLDS = r"""
import asyncio, sys, time
from kvstore.storage.sqlite import SqliteStorage
async def main():
    store = SqliteStorage(sys.argv[1], "always")
    await store.put("held", 1, b"v")
    print("open", flush=True)
    time.sleep(120)  # killed by the test long before
asyncio.run(main())
"""
