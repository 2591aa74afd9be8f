"""Anti-entropy's cached range summaries agree with fresh scans (kvstore.runtime.anti_entropy).

A seeded random walk of writes, tombstones, deletes (reaps) and ring changes over one node's
data store; between steps the summaries are read (filling the cache, from the node's own round
and from a peer's request) and every one, cached or not, is compared with a summary recomputed
from a fresh scan.  The same walk against a store that does not report its writes shows that
the comparison catches a stale cache.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest

from kvstore.clock import ManualClock
from kvstore.config import APSettings
from kvstore.protocol import versions
from kvstore.protocol.merkle import flat_root
from kvstore.protocol.ring import Ring, key_token
from kvstore.runtime.anti_entropy import SUMMARY_MAX_ROUNDS, AntiEntropy, RangeSummary, SummaryCache
from kvstore.storage.base import scan_pages
from kvstore.storage.memory import MemoryStorage
from kvstore.storage.tracked import TrackedStorage

ME = "n1"
KEYS = [f"k{i}" for i in range(80)]


class UntrackedStorage(TrackedStorage):
    """A store that never reports a write: what the cache would see if a write path bypassed it."""

    def _changed(self, token: int) -> None:
        pass


def stub_node(data: TrackedStorage, ring: Ring) -> Any:
    return SimpleNamespace(
        cfg=SimpleNamespace(ap=APSettings()), clock=ManualClock(), data=data, ring=ring, node_id=ME, n=3,
    )


async def fresh(data: TrackedStorage, start: int, end: int) -> tuple[int, bytes, list[tuple[int, str]]]:
    """(count, flat hash, tombstones' (token, key)) of a range, from a scan of the store."""
    leaves, tombstones = [], []
    async for page in scan_pages(data, start, end, 7):
        for rec in page:
            obj = versions.decode(rec.blob)
            leaves.append((rec.token, rec.key, versions.digest(obj)))
            if obj.is_deleted:
                tombstones.append((rec.token, rec.key))
    return len(leaves), flat_root(start, end, leaves), tombstones


def seen(summary: RangeSummary) -> tuple[int, bytes, list[tuple[int, str]]]:
    return summary.count, summary.flat, [(t, k) for t, k, _, _ in summary.tombstones]


async def random_walk(seed: int, data: TrackedStorage, steps: int) -> int:
    """Runs the walk, comparing after every step; returns how many summaries disagreed."""
    rng = random.Random(seed)
    members = ["n1", "n2", "n3", "n4"]
    node = stub_node(data, Ring(members, vnodes=8))
    ae = AntiEntropy(node, reaper=SimpleNamespace())
    clock = 0
    joined = 4
    mismatches = 0
    for _ in range(steps):
        action = rng.random()
        key = rng.choice(KEYS)
        token = key_token(key)
        if action < 0.55:  # a write or a delete: a new version (a tombstone for a delete)
            blob = await data.get(key, token)
            stored = versions.decode(blob) if blob is not None else versions.VersionedObject.empty()
            clock += 1
            value = None if rng.random() < 0.3 else f"v{clock}".encode()
            await data.put(key, token, versions.encode(versions.update(stored, {}, ME, value, clock)))
        elif action < 0.7:  # a reap (or a handoff's removal): the record goes
            await data.delete(key, token)
        elif action < 0.78:  # a membership change: a new ring
            if len(members) > 3 and rng.random() < 0.5:
                members.remove(rng.choice([m for m in members if m != ME]))
            else:
                joined += 1
                members.append(f"n{joined}")
            node.ring = Ring(members, vnodes=8)
        elif action < 0.82:  # a round ends: summaries age
            ae.rounds_completed += 1
        # Read summaries as a round and a peer would, then compare every one with a fresh scan.
        ring = node.ring
        mine = ring.ranges_of(ME, 3)
        for token_range in mine:
            summary = await ae._summary(token_range.start, token_range.end, None)
            mismatches += seen(summary) != await fresh(data, token_range.start, token_range.end)
        odd_start, odd_end = sorted(rng.sample(range(-(2**62), 2**62, 2**50), 2))  # not a vnode range
        summary = await ae._summary(odd_start, odd_end, None)
        mismatches += seen(summary) != await fresh(data, odd_start, odd_end)
    return mismatches


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_cached_summaries_equal_recomputed_ones_after_random_writes_deletes_and_ring_changes(seed: int) -> None:
    data = TrackedStorage(MemoryStorage())
    assert asyncio.run(random_walk(seed, data, steps=300)) == 0


def test_the_comparison_catches_a_cache_that_misses_writes() -> None:
    data = UntrackedStorage(MemoryStorage())
    assert asyncio.run(random_walk(1, data, steps=300)) > 0


def test_a_scan_raced_by_a_write_in_its_range_is_not_kept() -> None:
    ring = Ring(["a", "b", "c"], vnodes=4)
    token_range = ring.ranges(1)[0]
    cache = SummaryCache()
    assert cache.get(ring, token_range.start, token_range.end, 0) is None
    entry = RangeSummary(0, b"x", [], [], 0)
    seq = cache.seq  # the scan begins
    cache.invalidate(token_range.end)  # a write lands in the range before the scan ends
    cache.put(ring, token_range.start, token_range.end, entry, seq)
    assert cache.get(ring, token_range.start, token_range.end, 0) is None
    seq = cache.seq  # a clean scan is kept ...
    cache.put(ring, token_range.start, token_range.end, entry, seq)
    assert cache.get(ring, token_range.start, token_range.end, 0) is entry
    # ... until it is too old, or the ring changes
    assert cache.get(ring, token_range.start, token_range.end, SUMMARY_MAX_ROUNDS) is None
    assert cache.get(Ring(["a", "b", "c"], vnodes=4), token_range.start, token_range.end, 0) is None


def test_a_ring_caches_its_range_lists_and_answers_as_before() -> None:
    ring = Ring(["a", "b", "c", "d"], vnodes=16, walk_cache_size=0)
    again = Ring(["a", "b", "c", "d"], vnodes=16, walk_cache_size=0)
    for n in (1, 2, 3):
        assert ring.ranges(n) == again.ranges(n) == ring.ranges(n)
        for member in ring.members:
            assert ring.ranges_of(member, n) == [r for r in again.ranges(n) if member in r.owners]
            ring.ranges_of(member, n).clear()  # callers get their own list
            assert ring.ranges_of(member, n) == again.ranges_of(member, n)
    for r in ring.ranges(1):
        assert ring.is_vnode_range(r.start, r.end)
        assert not ring.is_vnode_range(r.start + 1, r.end)
