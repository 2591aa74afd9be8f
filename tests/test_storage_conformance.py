"""One conformance suite for every storage engine (memory; sqlite under each fsync policy).

Each test runs against every engine through the ``Storage`` interface only, and checks scans
against a reference model (a plain dict filtered and sorted in Python), so the engines are
held to the same semantics, not merely to self-consistency.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import kvstore.storage.sqlite as sqlite_mod
from kvstore.runtime.identity import IDENTITY_META, DataIdentity, open_identity
from kvstore.storage import (
    MemoryStorage,
    Record,
    SqliteStorage,
    Storage,
    StorageBusy,
    StorageClosed,
    StorageError,
    open_storage,
)
from kvstore.storage._common import MAX_TOKEN, MIN_TOKEN
from kvstore.storage.faulty import DiskFaults, FaultyStorage

# "faulty-memory": the disk fault layer with no fault set must be a transparent Storage.
ENGINE_SPECS = ["memory", "faulty-memory", "sqlite-always", "sqlite-batch", "sqlite-never"]

Factory = Callable[..., Any]


@pytest.fixture(params=ENGINE_SPECS)
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """A factory for stores of the parametrized engine; every store made is closed afterwards."""
    spec: str = request.param
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        if spec in ("memory", "faulty-memory"):
            if kwargs:
                pytest.skip(f"memory engine has no {sorted(kwargs)}")
            store: Any = MemoryStorage()
            if spec == "faulty-memory":
                store = FaultyStorage(store, DiskFaults())
        else:
            policy = spec.split("-", 1)[1]
            store = SqliteStorage(str(tmp_path / f"{policy}-{len(made)}.db"), policy, **kwargs)  # type: ignore[arg-type]
        made.append(store)
        return store

    make.spec = spec  # type: ignore[attr-defined]
    yield make
    for store in made:
        await store.close()


@pytest.fixture
async def store(make_store: Factory) -> Storage:
    s: Storage = make_store()
    return s


def ring_scan(model: dict[tuple[int, str], bytes], start: int, end: int) -> list[Record]:
    """Reference semantics of Storage.scan without limit/after."""
    items = [Record(t, k, b) for (t, k), b in sorted(model.items())]
    if start < end:
        return [r for r in items if start < r.token <= end]
    return [r for r in items if r.token > start] + [r for r in items if r.token <= end]


async def scan_all_pages(store: Storage, start: int, end: int, limit: int) -> list[Record]:
    out: list[Record] = []
    after: tuple[int, str] | None = None
    for _ in range(100_000):
        page = await store.scan(start, end, limit, after)
        assert len(page) <= limit
        if not page:
            return out
        out.extend(page)
        after = (page[-1].token, page[-1].key)
    raise AssertionError("paging did not terminate")


# --- point operations ------------------------------------------------------------------------


async def test_get_put_replace_delete(store: Storage) -> None:
    assert await store.get("a", 1) is None
    await store.put("a", 1, b"one")
    assert await store.get("a", 1) == b"one"
    await store.put("a", 1, b"uno")
    assert await store.get("a", 1) == b"uno"
    assert await store.count() == 1
    # (token, key) is the identity: same key under another token is another record.
    await store.put("a", 2, b"two")
    assert await store.get("a", 2) == b"two"
    assert await store.get("a", 1) == b"uno"
    assert await store.count() == 2
    await store.delete("a", 1)
    assert await store.get("a", 1) is None
    assert await store.get("a", 2) == b"two"
    await store.delete("a", 1)  # deleting a missing record is a no-op
    await store.delete("nope", 7)
    assert await store.count() == 1


async def test_edge_values_round_trip(store: Storage) -> None:
    cases = [
        ("", 0, b""),
        ("k\x00nul", MIN_TOKEN, b"\x00\xff" * 100),
        ("ünïcødé 中文 😀", MAX_TOKEN, bytes(range(256))),
        ("big", -1, b"x" * 1_000_000),
    ]
    for key, token, blob in cases:
        await store.put(key, token, blob)
    for key, token, blob in cases:
        got = await store.get(key, token)
        assert got == blob and isinstance(got, bytes)
    assert await store.count() == len(cases)


async def test_key_that_is_not_utf8_is_a_storage_error(store: Storage) -> None:
    with pytest.raises(StorageError):
        await store.put("lone \ud800 surrogate", 1, b"x")
    await store.put("fine", 1, b"x")  # the store is unaffected
    assert await store.count() == 1


async def test_read_your_writes_after_each_ack(store: Storage) -> None:
    for i in range(50):
        await store.put("k", 5, b"v%d" % i)
        assert await store.get("k", 5) == b"v%d" % i
        await store.delete("k", 5)
        assert await store.get("k", 5) is None


async def test_writes_of_one_key_apply_in_issue_order(store: Storage) -> None:
    # Issued back to back without awaiting in between: the queue must keep their order.
    for round_ in range(20):
        ops = []
        for i in range(10):
            ops.append(asyncio.ensure_future(store.put("same", 9, b"%d-%d" % (round_, i))))
            ops.append(asyncio.ensure_future(store.delete("same", 9)))
        final = b"final-%d" % round_
        ops.append(asyncio.ensure_future(store.put("same", 9, final)))
        await asyncio.gather(*ops)
        assert await store.get("same", 9) == final
    assert await store.count() == 1


# --- scans -----------------------------------------------------------------------------------


async def fill_random(store: Storage, rng: random.Random, n: int) -> dict[tuple[int, str], bytes]:
    model: dict[tuple[int, str], bytes] = {}
    tokens = [rng.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(n // 2)]
    tokens += [MIN_TOKEN, MAX_TOKEN, 0, -1, 1]
    for i in range(n):
        # Repeat tokens so that the key order inside one token matters too.
        token = rng.choice(tokens)
        key = rng.choice(["a", "b", "B", "é", "z", "中", "😀", ""]) + str(rng.randint(0, 30))
        blob = b"%d" % i
        model[(token, key)] = blob
    # Insert in random order so the engine, not insertion order, produces the ordering.
    items = list(model.items())
    rng.shuffle(items)
    await asyncio.gather(*(store.put(k, t, b) for (t, k), b in items))
    return model


async def test_scan_order_and_ranges_match_the_model(store: Storage) -> None:
    rng = random.Random(1)
    model = await fill_random(store, rng, 400)
    tokens = sorted({t for t, _ in model})
    probes = [MIN_TOKEN, MAX_TOKEN, 0, -1, 1, *rng.sample(tokens, 10)]
    probes += [rng.randint(MIN_TOKEN, MAX_TOKEN) for _ in range(10)]
    for start in probes:
        for end in probes:
            got = await store.scan(start, end, 10_000)
            assert got == ring_scan(model, start, end), (start, end)


async def test_scan_without_wrap(store: Storage) -> None:
    for token in (5, 10, 15, 20):
        await store.put(f"k{token}", token, b"v")
        await store.put(f"j{token}", token, b"v")
    got = await store.scan(5, 15, 100)
    # start is exclusive, end inclusive; keys ordered inside one token.
    assert [(r.token, r.key) for r in got] == [(10, "j10"), (10, "k10"), (15, "j15"), (15, "k15")]
    assert await store.scan(20, 100, 100) == []
    assert await store.scan(5, 15, 0) == []


async def test_scan_wraps_around_when_start_ge_end(store: Storage) -> None:
    for token in (MIN_TOKEN, -100, -1, 0, 1, 100, MAX_TOKEN):
        await store.put("k", token, b"%d" % token)
    got = [r.token for r in await store.scan(1, -1, 100)]
    # Tokens above start first (up to the top of the space), then from the bottom up to end.
    assert got == [100, MAX_TOKEN, MIN_TOKEN, -100, -1]
    # start == end: the whole ring, beginning just after start.
    assert [r.token for r in await store.scan(0, 0, 100)] == [1, 100, MAX_TOKEN, MIN_TOKEN, -100, -1, 0]
    # Nothing lies strictly above MAX_TOKEN: a wrap from the top starts at the bottom.
    assert [r.token for r in await store.scan(MAX_TOKEN, -100, 100)] == [MIN_TOKEN, -100]
    assert [r.token for r in await store.scan(MAX_TOKEN, MAX_TOKEN, 100)][0] == MIN_TOKEN


@pytest.mark.parametrize("limit", [1, 2, 3, 7, 50])
async def test_scan_paging_returns_every_record_exactly_once(store: Storage, limit: int) -> None:
    rng = random.Random(limit)
    model = await fill_random(store, rng, 150)
    tokens = sorted({t for t, _ in model})
    ranges = [(0, 0), (MAX_TOKEN, MAX_TOKEN), (MIN_TOKEN, MAX_TOKEN), (tokens[10], tokens[-10])]
    ranges += [(tokens[-10], tokens[10]), (tokens[40], tokens[40]), (MAX_TOKEN, MIN_TOKEN)]
    for start, end in ranges:
        expected = ring_scan(model, start, end)
        got = await scan_all_pages(store, start, end, limit)
        assert got == expected, (start, end, limit)
        assert len({(r.token, r.key) for r in got}) == len(got)


async def test_paging_survives_writes_between_pages(store: Storage) -> None:
    for i in range(20):
        await store.put(f"k{i:02d}", i, b"v")
    page = await store.scan(-1, 100, 5)
    # Delete the record the cursor points at and add one behind and one ahead of it.
    await store.delete(page[-1].key, page[-1].token)
    await store.put("behind", 0, b"v")
    await store.put("ahead", 50, b"v")
    rest = await store.scan(-1, 100, 1000, after=(page[-1].token, page[-1].key))
    assert [r.token for r in rest] == [*range(5, 20), 50]


# --- accounting and lifecycle ---------------------------------------------------------------


async def test_count_and_size_bytes(store: Storage) -> None:
    assert await store.count() == 0
    for i in range(100):
        await store.put(f"k{i}", i, b"x" * 100)
    assert await store.count() == 100
    assert await store.size_bytes() > 100 * 100 // 2
    for i in range(0, 100, 2):
        await store.put(f"k{i}", i, b"y")  # replacing does not change the count
        await store.delete(f"k{i + 1}", i + 1)
    assert await store.count() == 50
    assert len(await store.scan(0, 0, 1000)) == 50


async def test_close_is_idempotent_and_use_after_close_raises(store: Storage) -> None:
    await store.put("k", 1, b"v")
    await store.close()
    await store.close()
    await asyncio.gather(store.close(), store.close())
    for call in (
        store.get("k", 1),
        store.put("k", 1, b"v"),
        store.delete("k", 1),
        store.scan(0, 0, 10),
        store.count(),
        store.size_bytes(),
    ):
        with pytest.raises(StorageError):
            await call


async def test_many_concurrent_puts_are_all_readable(store: Storage) -> None:
    n = 2000
    await asyncio.gather(*(store.put(f"key-{i}", i * 7919 - 10**6, b"blob-%d" % i) for i in range(n)))
    assert await store.count() == n
    blobs = await asyncio.gather(*(store.get(f"key-{i}", i * 7919 - 10**6) for i in range(n)))
    assert blobs == [b"blob-%d" % i for i in range(n)]
    assert len(await store.scan(0, 0, 10 * n)) == n


async def test_close_flushes_pending_writes(make_store: Factory, tmp_path: Path) -> None:
    store = make_store()
    puts = [asyncio.ensure_future(store.put(f"k{i}", i, b"v")) for i in range(500)]
    await asyncio.sleep(0)  # every put is submitted, few if any committed
    await store.close()
    await asyncio.gather(*puts)  # all acknowledged, none failed
    if make_store.spec.startswith("sqlite"):
        reopened = SqliteStorage(store.path, "always")
        try:
            assert await reopened.count() == 500
        finally:
            await reopened.close()


# --- sqlite-specific behaviour, still run per engine (memory skips) -------------------------


def block_writer(store: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the writer thread stall before applying its next batch, until `gate` is set."""
    gate, entered = threading.Event(), threading.Event()
    original = store._apply

    def stalled_apply(cur: Any, batch: Any) -> Any:
        entered.set()
        assert gate.wait(30), "test never released the writer"
        return original(cur, batch)

    monkeypatch.setattr(store, "_apply", stalled_apply)
    return gate, entered


async def test_bounded_queue_refuses_with_storage_busy(
    make_store: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(max_pending=4)
    gate, entered = block_writer(store, monkeypatch)
    first = [asyncio.ensure_future(store.put(f"k{i}", i, b"v")) for i in range(4)]
    await asyncio.sleep(0)  # all four submitted: pending == max_pending (queued or in commit)
    try:
        for _ in range(3):
            with pytest.raises(StorageBusy):
                await store.put("extra", 99, b"v")
            with pytest.raises(StorageBusy):
                await store.delete("k0", 0)
        assert issubclass(StorageBusy, StorageError)
    finally:
        gate.set()
    await asyncio.gather(*first)
    assert entered.is_set()
    await store.put("extra", 99, b"v")  # capacity is back once the batch is acknowledged
    assert await store.count() == 5


async def test_failed_commit_fails_its_batch_and_the_store_recovers(
    make_store: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(max_pending=100)
    await store.put("before", 1, b"v")
    monkeypatch.setattr(sqlite_mod, "_INSERT", "INSERT INTO no_such_table VALUES (?, ?, ?)")
    results = await asyncio.gather(*(store.put(f"k{i}", i, b"v") for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results), results
    monkeypatch.undo()
    await store.put("after", 2, b"v")
    assert await store.count() == 2
    assert [r.key for r in await store.scan(0, 0, 100)] == ["before", "after"]


async def test_dead_writer_fails_writes_instead_of_hanging(
    make_store: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(max_pending=100)
    await store.put("k", 1, b"v")

    def broken(cur: Any, batch: Any) -> Any:
        raise RuntimeError("bug in the writer")

    monkeypatch.setattr(store, "_apply", broken)
    with pytest.raises(StorageError):
        await asyncio.wait_for(store.put("k2", 2, b"v"), 10)
    with pytest.raises(StorageClosed):
        await store.put("k3", 3, b"v")
    assert await store.get("k", 1) == b"v"  # reads still work
    await asyncio.wait_for(store.close(), 10)


async def test_sqlite_reopen_keeps_records_and_count(make_store: Factory) -> None:
    store = make_store(max_pending=100)
    for i in range(30):
        await store.put(f"k{i}", i, b"v%d" % i)
    await store.delete("k3", 3)
    await store.close()
    reopened = SqliteStorage(store.path, "batch")
    try:
        assert await reopened.count() == 29
        assert await reopened.get("k7", 7) == b"v7"
        assert await reopened.get("k3", 3) is None
    finally:
        await reopened.close()


# --- open_storage -----------------------------------------------------------------------------


async def test_open_storage_picks_engines_and_rejects_bad_arguments(tmp_path: Path) -> None:
    mem = open_storage("memory", None)
    assert isinstance(mem, MemoryStorage)
    await mem.close()
    path = tmp_path / "deep" / "er" / "data.db"
    db = open_storage("sqlite", str(path), "always", 1.0)
    assert isinstance(db, SqliteStorage) and path.exists()
    await db.put("k", 1, b"v")
    await db.close()
    with pytest.raises(ValueError, match="unknown storage engine"):
        open_storage("rocksdb", str(path))
    with pytest.raises(ValueError, match="path"):
        open_storage("sqlite", None)
    with pytest.raises(ValueError, match="fsync"):
        open_storage("sqlite", str(path), "sometimes")  # type: ignore[arg-type]
    with pytest.raises(StorageError):
        SqliteStorage(str(tmp_path / "missing-dir" / "x.db"), "always")


# --- meta blobs and the node identity kept in them ------------------------------------------


async def test_meta_blobs_round_trip_and_are_not_records(store: Storage) -> None:
    assert await store.meta_get("node_identity") is None  # a new store has none
    await store.meta_put("node_identity", b"one")
    assert await store.meta_get("node_identity") == b"one"
    await store.meta_put("node_identity", b"two")  # replace
    assert await store.meta_get("node_identity") == b"two"
    assert await store.count() == 0
    assert await store.scan(0, 0, 100) == []  # the whole ring: no scan, hence no Merkle tree, sees it
    await store.put("node_identity", 7, b"a record with the same name")
    assert await store.meta_get("node_identity") == b"two"
    assert await store.get("node_identity", 7) == b"a record with the same name"
    assert [r.key for r in await store.scan(0, 0, 100)] == ["node_identity"]
    assert await store.count() == 1


async def test_meta_put_is_ordered_with_record_writes(store: Storage) -> None:
    writes = [store.put(f"k{i}", i, b"v") for i in range(100)]
    await asyncio.gather(*writes, store.meta_put("boot", b"1"), store.put("last", 1, b"v"))
    assert await store.meta_get("boot") == b"1"
    assert await store.count() == 101


async def test_meta_survives_reopen_and_is_lost_with_the_file(make_store: Factory, tmp_path: Path) -> None:
    store = make_store(max_pending=100)  # the memory engine skips: it keeps nothing anyway
    await store.meta_put("node_identity", b"kept")
    await store.close()
    reopened = SqliteStorage(store.path, "always")
    try:
        assert await reopened.meta_get("node_identity") == b"kept"
    finally:
        await reopened.close()
    for suffix in ("", "-wal", "-shm"):
        Path(store.path + suffix).unlink(missing_ok=True)
    wiped = SqliteStorage(store.path, "always")
    try:
        assert await wiped.meta_get("node_identity") is None
    finally:
        await wiped.close()


async def test_identity_is_kept_exactly_as_long_as_the_data(make_store: Factory) -> None:
    """A durable store keeps its incarnation across starts; a new (wiped) store gets a new one."""
    rng = random.Random(1)
    store = make_store()
    first = await open_identity(store, rng, durable=True)
    assert first.created and first.boot == 1
    again = await open_identity(store, rng, durable=True)  # the next start, same data
    assert (again.incarnation, again.boot, again.created) == (first.incarnation, 2, False)
    assert again.actor("n1") == first.actor("n1") == f"n1.{first.incarnation}"
    # One-shot fallback actors never repeat across starts, although seq restarts at 1.
    assert first.fallback_actor("n1", 1) != again.fallback_actor("n1", 1)
    if make_store.spec.startswith("sqlite"):
        await store.close()
        reopened = SqliteStorage(store.path, store.fsync)
        try:
            third = await open_identity(reopened, rng, durable=True)
            assert (third.incarnation, third.boot) == (first.incarnation, 3)
        finally:
            await reopened.close()
    wiped = make_store()  # an empty store: what a node finds after losing its data
    fresh = await open_identity(wiped, rng, durable=True)
    assert fresh.created and fresh.boot == 1 and fresh.incarnation != first.incarnation
    assert fresh.actor("n1") != first.actor("n1")


async def test_non_durable_store_gets_a_new_incarnation_every_start(store: Storage) -> None:
    rng = random.Random(2)
    seen = {(await open_identity(store, rng, durable=False)).incarnation for _ in range(5)}
    assert len(seen) == 5
    assert await store.meta_get(IDENTITY_META) is None  # never read back, so never written


async def test_identity_comes_from_the_injected_rng(store: Storage) -> None:
    a = await open_identity(store, random.Random(7), durable=False)
    b = await open_identity(store, random.Random(7), durable=False)
    c = await open_identity(store, random.Random(8), durable=False)
    assert a.incarnation == b.incarnation != c.incarnation
    assert len(a.incarnation) == 16 and int(a.incarnation, 16) >= 0


async def test_corrupt_identity_starts_a_new_incarnation(store: Storage) -> None:
    rng = random.Random(3)
    first = await open_identity(store, rng, durable=True)
    await store.meta_put(IDENTITY_META, b"\xc1 not msgpack")
    second = await open_identity(store, rng, durable=True)
    assert second.created and second.incarnation != first.incarnation
    assert DataIdentity.decode(await store.meta_get(IDENTITY_META) or b"") == DataIdentity(
        second.incarnation, 1, created=False
    )
