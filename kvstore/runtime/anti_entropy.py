"""Anti-entropy: replicas of a range compare Merkle trees and merge the keys that differ.

Theory of operation
-------------------
Dynamo (§4.7, "replica synchronization") and Riak's active anti-entropy.  Read repair only
fixes keys that are read and hinted handoff only what a fallback held; this repairs the rest,
including hints that were lost or expired.

A round walks every ring range this node replicates and, per other owner, compares the range
without sending keys: first a batched *summary* (count and flat hash of up to
``SUMMARY_BATCH`` ranges in one message), then, only for ranges that differ, the
level-by-level Merkle exchange of ``kvstore.protocol.merkle`` with a depth chosen from the key count
(about ``KEYS_PER_BUCKET`` keys per bucket; a depth-0 tree needs no level request, since the
summary's hash is its root), then only the objects of differing keys: pulled from the peer,
merged into our data store, and pushed back when the peer lacks the merge.  Trees are built
from the *data* store only (hints are handed off, not anti-entropied).

Summaries are cached.  Each vnode range's count, flat hash, tombstones (for the reaper) and,
when few, leaves are kept (``SummaryCache``) and dropped when a write or delete lands in the
range (the node's data store reports each by token: ``kvstore.storage.tracked``), when the ring
changes, and after ``SUMMARY_MAX_ROUNDS`` rounds; a scan that a write raced is not kept.  So a
round over unchanged ranges costs no scan and no hash, both for our own summaries and for the
answers to a peer's; what is compared is exactly what a fresh scan would give.  A range that
differs is rescanned for its exchange unless its leaves were kept.  The responder side keeps the tree a peer's exchange is walking for that
exchange's deeper levels (bounded in number and age), so one exchange sees one snapshot.

Rounds are periodic (every ``ap.anti_entropy_interval_s``, jittered by the node's injected
rng so that nodes drift apart), one at a time, paced by a token bucket on the injected clock
charged for every key scanned and exchanged (``ap.anti_entropy_keys_per_s``), with
``AE_CONCURRENCY`` range exchanges in flight.  ``POST /admin/repair`` starts one at once
(``trigger_repair``).  The same scans collect tombstones for the reaper (``kvstore.runtime.reaper``),
which runs at the end of each round.

All repair only ever *merges* (``versions.sync`` via ``Node.apply_local``), so it runs
concurrently with client writes, read repair and handoff without losing an acknowledged
write.  Every wait is asyncio's (``sleep``, ``wait``); every reading of time is the clock's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.clock import Clock
from kvstore.protocol import versions
from kvstore.protocol.hints import NS_PER_S
from kvstore.protocol.merkle import (
    BucketReply,
    BucketRequest,
    LevelReply,
    MerkleError,
    MerkleExchange,
    MerkleTree,
    MerkleWireError,
    TreeShape,
    flat_root,
    keys_to_exchange,
)
from kvstore.protocol.messages import (
    SUMMARY_BATCH,
    AeBuckets,
    AeBucketsReply,
    AeLevel,
    AeLevelReply,
    AePull,
    AePullReply,
    AePush,
    AePushReply,
    AeStatus,
    AeStatusReply,
    AeSummary,
    AeSummaryReply,
    ErrorReply,
    MessageError,
    decode_reply,
    encode,
    serve,
)
from kvstore.protocol.ring import Ring, TokenRange, key_token
from kvstore.protocol.versions import VersionedObject
from kvstore.runtime.reaper import MAX_REAP_CANDIDATES, ReapCandidate, TombstoneReaper
from kvstore.runtime.repair_messages import (
    MESSAGE_BYTES_BUDGET,
    OBJECTS_PER_MESSAGE,
    SCAN_PAGE,
    RepairProtocolError,
    byte_chunks,
    call_peer,
)
from kvstore.storage.base import StorageError, scan_pages
from kvstore.transport.base import Handler, Message, PeerUnavailable, RemoteError

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

log = logging.getLogger(__name__)

KEYS_PER_BUCKET = 16  # the exchange's tree depth aims at about this many keys per bucket
AE_MAX_DEPTH = 16  # 65536 buckets; also the deepest tree a peer may ask us to build
BUCKETS_PER_REQUEST = 64
AE_CONCURRENCY = 4  # range exchanges in flight in one round
PEER_TREE_CACHE = 64  # trees built for peers' exchanges, kept between their level requests
PEER_TREE_TTL_S = 30.0  # ... and never reused after this long
JITTER = 0.25  # a round starts every interval * [1 - JITTER, 1 + JITTER]
SUMMARY_MAX_ROUNDS = 8  # a cached summary is rescanned after this many rounds (see SummaryCache)
CACHED_LEAVES_MAX = 2 * KEYS_PER_BUCKET  # a summary keeps its range's leaves up to this many
CACHED_TOMBSTONES_MAX = 64  # a range with more tombstones than this is not cached (bounds memory)

Leaf = tuple[int, str, bytes]  # (token, key, versions.digest)


def choose_depth(keys: int) -> int:
    """The smallest depth giving about ``KEYS_PER_BUCKET`` keys per bucket, at most ``AE_MAX_DEPTH``."""
    depth = 0
    while depth < AE_MAX_DEPTH and keys > KEYS_PER_BUCKET << depth:
        depth += 1
    return depth


class KeyRateLimiter:
    """A token bucket in keys per second on the monotonic clock, with debt instead of a wait loop.

    ``acquire(n)`` takes ``n`` tokens at once, possibly going negative, then sleeps until the
    debt would be repaid; later callers see the debt and wait for it too, so the long-run rate
    is bounded by ``rate_per_s`` whatever the batch sizes.  Bursts are limited to one second.
    """

    def __init__(self, rate_per_s: int, clock: Clock) -> None:
        assert rate_per_s > 0
        self.rate = float(rate_per_s)
        self.clock = clock
        self.tokens = self.rate
        self.updated_ns = clock.monotonic_ns()

    async def acquire(self, n: int) -> None:
        if n <= 0:
            return
        now_ns = self.clock.monotonic_ns()
        self.tokens = min(self.rate, self.tokens + (now_ns - self.updated_ns) * self.rate / NS_PER_S)
        self.updated_ns = now_ns
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


@dataclass
class RoundStats:
    """What one anti-entropy round did (logged, kept as ``AntiEntropy.last_round``)."""

    ranges: int = 0
    exchanges_in_sync: int = 0
    exchanges_repaired: int = 0
    exchanges_failed: int = 0
    keys_scanned: int = 0
    keys_exchanged: int = 0
    tombstones_reaped: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ranges": self.ranges, "in_sync": self.exchanges_in_sync, "repaired": self.exchanges_repaired,
            "failed": self.exchanges_failed, "keys_scanned": self.keys_scanned,
            "keys_exchanged": self.keys_exchanged, "tombstones_reaped": self.tombstones_reaped,
            "seconds": round(self.seconds, 3),
        }


@dataclass(slots=True)
class RangeSummary:
    """What a scan of one range gives anti-entropy: its key count and flat hash (the summary), its
    tombstones in scan order (the reaper's candidates are chosen from them each round, on that
    round's clock), and its leaves when there are few (``None`` otherwise: rescanned if needed)."""

    count: int
    flat: bytes
    leaves: list[Leaf] | None
    tombstones: list[tuple[int, str, bytes, VersionedObject]]
    round: int  # the round counter when scanned
    cacheable: bool = True


class SummaryCache:
    """Range summaries of one ring's vnode ranges, by ``(start, end)``, dropped when their range changes.

    Only exact vnode ranges of the ring in force are cached (a range asked for under another
    ring, or a custom range, is scanned each time).  ``invalidate`` (a write or delete landed at a
    token) drops that token's range and stamps it, so a scan that started before the stamp is
    not stored (``put`` with the ``seq`` read when the scan began).  Bounded by the ring's vnodes.

    A write whose caller was cancelled may land after it was reported (kvstore.storage.tracked);
    summaries older than ``SUMMARY_MAX_ROUNDS`` rounds are rescanned, which bounds how long such a
    write can hide from anti-entropy.
    """

    def __init__(self) -> None:
        self._ring: Ring | None = None
        self._entries: dict[tuple[int, int], RangeSummary] = {}
        self._touched: dict[tuple[int, int], int] = {}  # range -> seq of the last change in it
        self.seq = 0
        self._ring_since = 0  # seq when the ring in use was adopted: older scans are not kept

    def _use(self, ring: Ring) -> None:
        if ring is not self._ring:  # a ring never changes in place: a new one is a new member set
            self._ring = ring
            self._entries.clear()
            self._touched.clear()
            self.seq += 1
            self._ring_since = self.seq

    def get(self, ring: Ring, start: int, end: int, now_round: int) -> RangeSummary | None:
        if ring is not self._ring:
            self._use(ring)
        entry = self._entries.get((start, end))  # only vnode ranges of this ring are ever put
        if entry is None or now_round - entry.round >= SUMMARY_MAX_ROUNDS:
            return None
        return entry

    def put(self, ring: Ring, start: int, end: int, entry: RangeSummary, seq: int) -> None:
        """Keep ``entry``, scanned under ``ring`` from a scan that began at ``seq``, unless it cannot be trusted."""
        if (
            ring is not self._ring or not entry.cacheable or self._touched.get((start, end), 0) > seq
            or seq < self._ring_since or not ring.is_vnode_range(start, end)
        ):
            return
        self._entries[(start, end)] = entry

    def invalidate(self, token: int) -> None:
        ring = self._ring
        if ring is None:
            return
        self.seq += 1
        token_range = ring.vnode_range_of(token)
        self._entries.pop(token_range, None)
        self._touched[token_range] = self.seq


class AntiEntropy:
    """Periodic (or triggered) Merkle rounds of one node, and the answers to its peers' rounds."""

    def __init__(self, node: Node, reaper: TombstoneReaper) -> None:
        self.node = node
        self.reaper = reaper
        self.cfg = node.cfg.ap
        self._loop: asyncio.Task[None] | None = None
        self._limiter = KeyRateLimiter(self.cfg.anti_entropy_keys_per_s, node.clock)
        self._round_task: asyncio.Task[RoundStats] | None = None
        self._peer_trees: OrderedDict[tuple[str, TreeShape], tuple[MerkleTree, int]] = OrderedDict()
        self.summaries = SummaryCache()
        node.data.add_listener(self.summaries.invalidate)
        self.rounds_completed = 0
        self.last_round: RoundStats | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            "ae_summary": serve(AeSummary, self._on_summary),
            "ae_level": serve(AeLevel, self._on_level),
            "ae_buckets": serve(AeBuckets, self._on_buckets),
            "ae_pull": serve(AePull, self._on_pull),
            "ae_push": serve(AePush, self._on_push),
            "ae_status": serve(AeStatus, self._on_status),
        }

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._anti_entropy_loop(), name="anti-entropy")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop, self._round_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- scheduling -------------------------------------------------------------------------

    def my_ranges(self) -> list[TokenRange]:
        return self.node.ring.ranges_of(self.node.node_id, self.node.n)

    async def trigger_repair(self) -> dict[str, Any]:
        """Start a round now unless one is running (``POST /admin/repair``); returns at once."""
        ranges = len(self.my_ranges())
        running = self._round_task is not None and not self._round_task.done()
        if not running:
            self._round_task = asyncio.create_task(self.run_round("trigger"), name="anti-entropy-round")
        return {"ranges": ranges, "already_running": running, "rounds_completed": self.rounds_completed}

    def status(self) -> dict[str, Any]:
        """Whether a round is running, how many finished, and what the last one did."""
        return {
            "running": self._round_task is not None and not self._round_task.done(),
            "rounds_completed": self.rounds_completed,
            "last_round": self.last_round.as_dict() if self.last_round is not None else None,
        }

    async def _on_status(self, sender: str, message: AeStatus) -> AeStatusReply:
        return AeStatusReply(**self.status())

    async def _anti_entropy_loop(self) -> None:
        interval_s = self.cfg.anti_entropy_interval_s
        while True:
            await asyncio.sleep(interval_s * (1.0 - JITTER + 2 * JITTER * self.node.rng.random()))
            if self._round_task is not None and not self._round_task.done():
                continue  # a triggered round is running: this tick is covered
            self._round_task = asyncio.create_task(self.run_round("periodic"), name="anti-entropy-round")
            with contextlib.suppress(Exception):
                await asyncio.shield(self._round_task)

    async def run_round(self, reason: str = "manual") -> RoundStats:
        """One anti-entropy pass over every range this node replicates, then a reap pass.

        Ranges go in chunks of ``SUMMARY_BATCH``: scan the chunk's leaves once, sync them with
        every other owner (one summary message per peer, concurrently), drop them.  Memory is
        bounded by one chunk's leaves, not by the store.
        """
        node = self.node
        started_ns = node.clock.monotonic_ns()
        stats = RoundStats()
        ranges = self.my_ranges()
        stats.ranges = len(ranges)
        candidates: list[ReapCandidate] = []
        slots = asyncio.Semaphore(AE_CONCURRENCY)
        try:
            for offset in range(0, len(ranges), SUMMARY_BATCH):
                chunk = ranges[offset : offset + SUMMARY_BATCH]
                summaries = [await self._local_summary(r, candidates, stats) for r in chunk]
                peers = sorted({o for r in chunk for o in r.owners if o != node.node_id})
                await asyncio.gather(*(self._sync_with_peer(p, chunk, summaries, stats, slots) for p in peers))
            stats.tombstones_reaped = await self.reaper.reap(candidates)
        except Exception as exc:  # a background round must log, not vanish with its task
            node.metrics.ae_rounds.labels(result="error").inc()
            log.exception("anti-entropy round failed")
            stats.errors.append(repr(exc))
        stats.seconds = (node.clock.monotonic_ns() - started_ns) / NS_PER_S
        self.rounds_completed += 1
        self.last_round = stats
        log.info("anti-entropy round (%s) done: %s", reason, stats.as_dict())
        return stats

    async def sync_ranges(self, peer: str, ranges: list[TokenRange]) -> RoundStats:
        """The Merkle exchange of the given ranges with one peer, now (a membership change streams
        a moving range to its new owner this way: kvstore.runtime.reconfig).  Merges both ways, like a
        round; ``exchanges_failed`` says whether every range was compared."""
        stats = RoundStats()
        stats.ranges = len(ranges)
        slots = asyncio.Semaphore(AE_CONCURRENCY)
        for offset in range(0, len(ranges), SUMMARY_BATCH):
            chunk = [TokenRange(r.start, r.end, (self.node.node_id, peer)) for r in ranges[offset : offset + SUMMARY_BATCH]]
            unused: list[ReapCandidate] = []  # reaping is left to the periodic rounds
            summaries = [await self._local_summary(r, unused, stats) for r in chunk]
            await self._sync_with_peer(peer, chunk, summaries, stats, slots)
        return stats

    # --- initiator --------------------------------------------------------------------------

    async def _local_summary(
        self, token_range: TokenRange, candidates: list[ReapCandidate], stats: RoundStats
    ) -> RangeSummary:
        """Our summary of a range (cached, or scanned rate-limited); collects reap candidates."""
        now_ns = self.node.clock.wall_ns()  # before a scan, which may wait for the rate limiter
        summary = self.summaries.get(self.node.ring, token_range.start, token_range.end, self.rounds_completed)
        if summary is None:
            summary = await self._summary(token_range.start, token_range.end, stats)
        if not summary.tombstones:
            return summary
        for token, key, blob, obj in summary.tombstones:
            if len(candidates) >= MAX_REAP_CANDIDATES:
                break
            if self.reaper.is_candidate(token, obj, now_ns):
                candidates.append(ReapCandidate(token, key, blob))
        return summary

    async def _summary(self, start: int, end: int, stats: RoundStats | None) -> RangeSummary:
        """The range's summary from the cache, or from a scan (kept when it can be trusted).  A
        round's own scans (``stats`` given) are charged to the rate limiter; a peer's are not."""
        ring = self.node.ring
        cached = self.summaries.get(ring, start, end, self.rounds_completed)
        if cached is not None:
            return cached
        seq = self.summaries.seq
        leaves: list[Leaf] = []
        tombstones: list[tuple[int, str, bytes, VersionedObject]] = []
        async for page in scan_pages(self.node.data, start, end, SCAN_PAGE):
            if stats is not None:
                await self._limiter.acquire(len(page))
            for rec in page:
                obj = versions.decode(rec.blob)
                leaves.append((rec.token, rec.key, versions.digest(obj)))
                if obj.is_deleted:
                    tombstones.append((rec.token, rec.key, rec.blob, obj))
        if stats is not None:
            stats.keys_scanned += len(leaves)
        summary = RangeSummary(
            count=len(leaves),
            flat=flat_root(start, end, leaves),
            leaves=leaves if len(leaves) <= CACHED_LEAVES_MAX else None,
            tombstones=tombstones,
            round=self.rounds_completed,
            cacheable=len(tombstones) <= CACHED_TOMBSTONES_MAX,
        )
        self.summaries.put(ring, start, end, summary, seq)
        if summary.leaves is None:
            return RangeSummary(summary.count, summary.flat, leaves, tombstones, summary.round, False)
        return summary

    async def _sync_with_peer(
        self,
        peer: str,
        chunk: list[TokenRange],
        chunk_summaries: list[RangeSummary],
        stats: RoundStats,
        slots: asyncio.Semaphore,
    ) -> None:
        """Summaries of the chunk's ranges shared with ``peer``, then an exchange per differing range."""
        metrics = self.node.metrics
        shared = [(r, s) for r, s in zip(chunk, chunk_summaries, strict=True) if peer in r.owners]
        if not self.node.is_up(peer):
            stats.exchanges_failed += len(shared)
            metrics.ae_rounds.labels(result="peer_down").inc(len(shared))
            return
        try:
            reply = await call_peer(self.node, peer, encode(AeSummary([(r.start, r.end) for r, _ in shared])))
            summaries = _parse_summaries(reply, len(shared))
        except (PeerUnavailable, RemoteError, RepairProtocolError, MessageError) as exc:
            log.warning("anti-entropy summary with %s failed: %s", peer, exc)
            stats.exchanges_failed += len(shared)
            metrics.ae_rounds.labels(result="failed").inc(len(shared))
            return
        jobs = []
        in_sync = 0
        for (token_range, local), (remote_count, remote_flat) in zip(shared, summaries, strict=True):
            if local.flat == remote_flat:
                in_sync += 1
                continue
            exchange = self._exchange(peer, token_range, local, remote_count, remote_flat, stats)
            jobs.append(_bounded(slots, exchange))
        if in_sync:  # counted once per summary message (most ranges agree; the total is the same)
            stats.exchanges_in_sync += in_sync
            metrics.ae_rounds.labels(result="in_sync").inc(in_sync)
        await asyncio.gather(*jobs)

    async def _exchange(
        self, peer: str, token_range: TokenRange, local: RangeSummary, remote_count: int, remote_flat: bytes,
        stats: RoundStats,
    ) -> None:
        """The Merkle exchange of one range with one peer, then the sync of the differing keys."""
        metrics = self.node.metrics
        try:
            leaves = local.leaves
            if leaves is None:  # too many to keep: scan again (later, so no older than the summary)
                leaves = await self._scan_leaves(token_range.start, token_range.end)
            depth = choose_depth(max(len(leaves), remote_count))
            tree = MerkleTree.build(token_range.start, token_range.end, leaves, depth)
            exchange = MerkleExchange(tree)
            if depth == 0:
                # The summary's flat hash *is* the root of a depth-0 tree: skip that round trip.
                request = exchange.next_request()
                assert request is not None
                exchange.receive(LevelReply((remote_flat,)))
            for _ in range(depth + 1):  # the exchange needs at most depth + 1 level requests
                request = exchange.next_request()
                if request is None:
                    break
                reply = await call_peer(self.node, peer, encode(AeLevel(request)))
                exchange.receive(LevelReply.from_wire(reply, request))
            assert exchange.done, "the level exchange did not finish within depth + 1 requests"
            differing = exchange.differing_buckets
            remote_items: list[tuple[str, bytes]] = []
            for offset in range(0, len(differing), BUCKETS_PER_REQUEST):
                buckets = BucketRequest(tree.shape, tuple(differing[offset : offset + BUCKETS_PER_REQUEST]))
                # Depth 0 skipped the level requests: the responder must build its tree now.
                reply = await call_peer(self.node, peer, encode(AeBuckets(buckets, fresh=depth == 0)))
                remote_items += BucketReply.from_wire(reply, buckets).items()
            local_items = exchange.local_items()
            keys = keys_to_exchange(local_items, remote_items)
            await self._sync_keys(peer, keys, dict(remote_items))
        except (PeerUnavailable, RemoteError, MerkleError, RepairProtocolError, MessageError, StorageError) as exc:
            log.warning("anti-entropy of (%d, %d] with %s failed: %s", token_range.start, token_range.end, peer, exc)
            stats.exchanges_failed += 1
            metrics.ae_rounds.labels(result="failed").inc()
            return
        stats.keys_exchanged += len(keys)
        if keys:
            stats.exchanges_repaired += 1
            metrics.ae_rounds.labels(result="repaired").inc()
            metrics.ae_keys.inc(len(keys))
        else:
            stats.exchanges_in_sync += 1  # a stale summary: the keys agreed by the time we looked
            metrics.ae_rounds.labels(result="in_sync").inc()

    async def _sync_keys(self, peer: str, keys: list[str], remote: dict[str, bytes]) -> None:
        """Merge the differing keys both ways: pull the peer's objects, merge, push what it lacks."""
        node = self.node
        await self._limiter.acquire(len(keys))
        to_push: list[tuple[int, str]] = [(key_token(k), k) for k in keys if k not in remote]
        to_pull = [(key_token(k), k) for k in keys if k in remote]
        for offset in range(0, len(to_pull), OBJECTS_PER_MESSAGE):
            wanted = to_pull[offset : offset + OBJECTS_PER_MESSAGE]
            for _ in range(len(wanted)):  # each reply carries at least one object
                if not wanted:
                    break
                reply = await call_peer(node, peer, encode(AePull(wanted)))
                answered, objects = _parse_pulled(reply, wanted)
                merged = await asyncio.gather(
                    *(node.apply_local(key, token, versions.decode(blob)) for token, key, blob in objects)
                )
                for (token, key, _), obj in zip(objects, merged, strict=True):
                    if versions.digest(obj) != remote[key]:
                        to_push.append((token, key))  # the peer lacks part of the merge
                wanted = wanted[answered:]
        for offset in range(0, len(to_push), OBJECTS_PER_MESSAGE):
            batch = to_push[offset : offset + OBJECTS_PER_MESSAGE]
            blobs = [(t, k, await node.data.get(k, t)) for t, k in batch]
            items = [(t, k, b) for t, k, b in blobs if b is not None]
            for chunk in byte_chunks(items, lambda o: len(o[1]) + len(o[2])):
                await call_peer(node, peer, encode(AePush(chunk)))

    # --- responder --------------------------------------------------------------------------

    def _owns(self, token: int) -> bool:
        # While a range moves its new owners own it too (they are being streamed it).
        return self.node.placement.owns(self.node.node_id, token)

    async def _scan_leaves(self, start: int, end: int) -> list[Leaf]:
        leaves: list[Leaf] = []
        async for page in scan_pages(self.node.data, start, end, SCAN_PAGE):
            leaves += [(r.token, r.key, versions.digest(versions.decode(r.blob))) for r in page]
        return leaves

    async def _on_summary(self, sender: str, message: AeSummary) -> AeSummaryReply | ErrorReply:
        summaries = []
        cached, ring, rounds = self.summaries.get, self.node.ring, self.rounds_completed
        for start, end in message.ranges:
            # A cached range is one of our ring's vnode ranges: valid bounds, no check needed.
            summary = cached(ring, start, end, rounds) if type(start) is int and type(end) is int else None
            if summary is None:
                try:
                    shape = TreeShape.from_wire([start, end, 0])
                except MerkleWireError as exc:
                    return ErrorReply("bad_request", str(exc))
                summary = await self._summary(shape.start, shape.end, None)
            summaries.append((summary.count, summary.flat))
        return AeSummaryReply(summaries)

    async def _peer_tree(self, sender: str, shape: TreeShape, fresh: bool) -> MerkleTree:
        """The tree a peer's exchange is walking: rebuilt when the exchange starts (``fresh``: its
        level 0, or its bucket request when the summary stood in for the levels), then reused
        for its deeper levels so that one exchange sees one snapshot.  Entries are bounded in
        number and age, so a tree from an earlier round is never answered from."""
        if shape.depth > AE_MAX_DEPTH:
            raise MerkleWireError(f"depth {shape.depth} exceeds {AE_MAX_DEPTH}")
        cache_key = (sender, shape)
        now_ns = self.node.clock.monotonic_ns()
        cached = None if fresh else self._peer_trees.get(cache_key)
        if cached is not None and now_ns - cached[1] <= PEER_TREE_TTL_S * NS_PER_S:
            self._peer_trees.move_to_end(cache_key)
            return cached[0]
        leaves = await self._scan_leaves(shape.start, shape.end)
        tree = MerkleTree.build(shape.start, shape.end, leaves, shape.depth)
        self._peer_trees[cache_key] = (tree, now_ns)
        self._peer_trees.move_to_end(cache_key)
        while len(self._peer_trees) > PEER_TREE_CACHE:
            self._peer_trees.popitem(last=False)
        return tree

    async def _on_level(self, sender: str, message: AeLevel) -> AeLevelReply | ErrorReply:
        request = message.request
        try:
            tree = await self._peer_tree(sender, request.shape, fresh=request.level == 0)
            return AeLevelReply(list(tree.answer(request).hashes))
        except MerkleError as exc:
            return ErrorReply("bad_request", str(exc))

    async def _on_buckets(self, sender: str, message: AeBuckets) -> AeBucketsReply | ErrorReply:
        request = message.request
        try:
            tree = await self._peer_tree(sender, request.shape, fresh=message.fresh)
            return AeBucketsReply(tree.answer_buckets(request).to_wire()["buckets"])
        except MerkleError as exc:
            return ErrorReply("bad_request", str(exc))

    async def _on_pull(self, sender: str, message: AePull) -> AePullReply:
        """Our data-store objects of the asked keys, in order, up to the message byte budget."""
        objects: list[tuple[str, bytes | None]] = []
        size = 0
        for token, key in message.keys:
            blob = await self.node.data.get(key, token)
            objects.append((key, blob))
            size += len(key) + (len(blob) if blob is not None else 0)
            if size >= MESSAGE_BYTES_BUDGET:
                break  # the caller asks again for the rest
        return AePullReply(objects)

    async def _on_push(self, sender: str, message: AePush) -> AePushReply | ErrorReply:
        entries = message.objects
        if any(key_token(k) != t for t, k, _ in entries):
            return ErrorReply("bad_request", "ae_push: entries are [token, key, object: bytes] with the key's token")
        owned = [(t, k, versions.decode(b)) for t, k, b in entries if self._owns(t)]
        await asyncio.gather(*(self.node.apply_local(k, t, obj) for t, k, obj in owned))
        return AePushReply(len(owned), len(entries) - len(owned))


# --- helpers ------------------------------------------------------------------------------


async def _bounded(slots: asyncio.Semaphore, job: Awaitable[None]) -> None:
    async with slots:
        await job


def _parse_summaries(reply: Message, count: int) -> list[tuple[int, bytes]]:
    summaries = decode_reply(reply, AeSummaryReply, AeSummary.OP).summaries
    if len(summaries) != count:
        raise RepairProtocolError(f"expected {count} range summaries")
    return summaries


def _parse_pulled(reply: Message, wanted: list[tuple[int, str]]) -> tuple[int, list[tuple[int, str, bytes]]]:
    """(how many of ``wanted`` the reply answered, the (token, key, blob) of those the peer holds)."""
    objects = decode_reply(reply, AePullReply, AePull.OP).objects
    if not 1 <= len(objects) <= len(wanted):
        raise RepairProtocolError("ae_pull: the reply must answer a non-empty prefix of the keys asked")
    present = []
    for (token, key), (answered_key, blob) in zip(wanted, objects, strict=False):
        if answered_key != key:
            raise RepairProtocolError("ae_pull: replies are [key, object | None] in the order asked")
        if blob is not None:
            present.append((token, key, blob))
    return len(objects), present
