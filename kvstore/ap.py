"""AP machinery wired into a node: hinted handoff, read repair, anti-entropy, tombstone reaping.

Theory of operation
-------------------
Dynamo (§4.6-4.7) and Riak KV keep replicas converging by three independent
mechanisms, each cheap and each incomplete on its own (docs/consistency.md says
what each one guarantees and what it does not):

* **Hinted handoff.**  A fallback that took a write for an unreachable primary
  keeps it as a durable hint (``kvstore.hints.HintRecord``, bounded by the node's
  ``HintLedger``).  The replay loop reads a window of the hint store, lets the pure
  planner (``plan_replay``) pick what to send (oldest first, round-robin across
  targets, only to targets believed up, bounded rate and concurrency) and what to
  drop (beyond the hint window: counted and logged), and deletes a hint only after
  the owner acknowledged it *and* only if it was not coalesced with a newer write
  meanwhile (``Node.forget_hint``).  The window advances through the store with a
  cursor, so a backlog for a dead target cannot hide hints for a live one.
* **Read repair.**  After a read has its R replies the coordinator keeps
  listening (bounded time) for the others; every primary that answered with a
  stale, missing or conflicting version is sent the merged object.  Only keys
  that are read get repaired.
* **Anti-entropy.**  A round walks every ring range this node replicates and, per
  other owner, compares the range without sending keys: first a batched *summary*
  (count and flat hash of up to ``SUMMARY_BATCH`` ranges in one message), then,
  only for ranges that differ, the level-by-level Merkle exchange of
  ``kvstore.merkle`` with a depth chosen from the key count (about
  ``KEYS_PER_BUCKET`` keys per bucket; a depth-0 tree needs no level request, since
  the summary's hash is its root), then only the objects of differing keys: pulled from the
  peer, merged into our data store, and pushed back when the peer lacks the merge.
  Trees are built from the *data* store only, from a fresh scan each round (hints
  are handed off, not anti-entropied).  Rounds are periodic (jittered), one at a
  time, paced by a token bucket charged for every key scanned and exchanged
  (``anti_entropy_keys_per_s``), with ``AE_CONCURRENCY`` range exchanges in flight.
  This repairs keys nobody reads and hints that were lost or expired.
* **Tombstone reaping.**  The same scans collect all-tombstone objects past their
  grace period for which this node is the key's first primary.  The reaper asks
  every other primary whether its copy descends the tombstone
  (``tombstone_is_covered``); only if ``can_reap`` agrees does it ask them to
  delete their copy *if it is still exactly that tombstone*, then deletes its own
  under the key's lock.  Deleting on every primary together is what keeps the
  reap from being undone: a tombstone reaped on one replica only would be copied
  back by anti-entropy from the others (harmless, but it would never go away).

All repair paths only ever *merge* (``versions.sync`` via ``Node.apply_local``),
so they can run concurrently with client writes and with each other without
losing an acknowledged write.  A stale replica or a late hint cannot resurrect a
reaped delete: every primary descended the tombstone when it was reaped, and
hints older than the grace period are expired (config rule: grace >= hint window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore import versions
from kvstore.clock import Clock
from kvstore.hints import NS_PER_S, HintDecodeError, HintRecord, PendingHint, ReplayLimits, plan_replay
from kvstore.merkle import (
    BucketReply,
    BucketRequest,
    LevelReply,
    LevelRequest,
    MerkleError,
    MerkleExchange,
    MerkleTree,
    MerkleWireError,
    TreeShape,
    keys_to_exchange,
)
from kvstore.node import Node
from kvstore.ring import TOKEN_MIN, TokenRange, key_token
from kvstore.storage.base import StorageError
from kvstore.tombstones import reap_verdict, tombstone_is_covered, tombstone_written_at_ns
from kvstore.transport.base import Message, PeerUnavailable, RemoteError
from kvstore.versions import VersionedObject

log = logging.getLogger(__name__)

SCAN_PAGE = 500  # records per storage scan call

# Hinted handoff.
REPLAY_WINDOW = 1000  # hint records read (and planned over) per replay tick
REPLAY_IDLE_S = 0.25  # poll interval with nothing to send
REPLAY_BUSY_S = 0.02  # poll interval while sends are in flight or waiting for a slot

# Anti-entropy.
SUMMARY_BATCH = 128  # ranges per summary message
KEYS_PER_BUCKET = 16  # the exchange's tree depth aims at about this many keys per bucket
AE_MAX_DEPTH = 16  # 65536 buckets; also the deepest tree a peer may ask us to build
BUCKETS_PER_REQUEST = 64
OBJECTS_PER_MESSAGE = 256  # keys per pull/push/reap message
MESSAGE_BYTES_BUDGET = 4 * 1024 * 1024  # pull replies and pushes stop adding objects past this
AE_CONCURRENCY = 4  # range exchanges in flight in one round
AE_CALL_TIMEOUT_S = 10.0
PEER_TREE_CACHE = 64  # trees built for peers' exchanges, kept between their level requests
PEER_TREE_TTL_S = 30.0  # ... and never reused after this long
JITTER = 0.25  # a round starts every interval * [1 - JITTER, 1 + JITTER]

# Tombstone reaping.
MAX_REAP_CANDIDATES = 2000  # per round; the rest wait for the next round


class APProtocolError(Exception):
    """A peer's anti-entropy or reap message was malformed (answered as a remote error)."""


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
    """What one anti-entropy round did (logged, kept as ``APMachinery.last_round``)."""

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


@dataclass(frozen=True, slots=True)
class ReapCandidate:
    token: int
    key: str
    blob: bytes  # the stored tombstone object, exactly as checked


def _remote_error(code: str, message: str) -> Message:
    return {"error": code, "message": message, "remote_error": True}


def _token_key_list(raw: Any, what: str) -> list[tuple[int, str]]:
    if not isinstance(raw, list) or len(raw) > OBJECTS_PER_MESSAGE:
        raise APProtocolError(f"{what}: expected at most {OBJECTS_PER_MESSAGE} [token, key] pairs")
    out: list[tuple[int, str]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) >= 2 and type(item[0]) is int and isinstance(item[1], str)):
            raise APProtocolError(f"{what}: entries must start with [token: int, key: str]")
        out.append((item[0], item[1]))
    return out


class APMachinery:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg.ap
        self._loops: list[asyncio.Task[Any]] = []
        # Hinted handoff state.
        self._replay_limits = ReplayLimits(self.cfg.hint_replay_rate_per_s, self.cfg.hint_replay_concurrency)
        self._send_times_mono: deque[int] = deque(maxlen=self.cfg.hint_replay_rate_per_s)
        self._failed_at_mono: dict[str, int] = {}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._cursor: tuple[int, str] | None = None
        # Anti-entropy state.
        self._limiter = KeyRateLimiter(self.cfg.anti_entropy_keys_per_s, node.clock)
        self._round_task: asyncio.Task[RoundStats] | None = None
        self._peer_trees: OrderedDict[tuple[str, TreeShape], tuple[MerkleTree, int]] = OrderedDict()
        self.rounds_completed = 0
        self.last_round: RoundStats | None = None

    async def start(self) -> None:
        self._loops.append(asyncio.create_task(self._hint_loop(), name="hint-replay"))
        self._loops.append(asyncio.create_task(self._anti_entropy_loop(), name="anti-entropy"))

    async def stop(self) -> None:
        tasks = [*self._loops, *self._in_flight.values()]
        if self._round_task is not None:
            tasks.append(self._round_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def handlers(self) -> dict[str, Callable[[str, Message], Awaitable[Message]]]:
        return {
            "ae_summary": self._on_summary,
            "ae_level": self._on_level,
            "ae_buckets": self._on_buckets,
            "ae_pull": self._on_pull,
            "ae_push": self._on_push,
            "reap_check": self._on_reap_check,
            "reap": self._on_reap,
            "ae_status": self._on_status,
        }

    async def _call(self, peer: str, message: Message) -> Message:
        """``node.call`` that raises ``RemoteError`` for an error reply from this node itself too."""
        reply = await self.node.call(peer, message, AE_CALL_TIMEOUT_S)
        if reply.get("remote_error"):
            raise RemoteError(peer, str(reply.get("error")), str(reply.get("message", "")))
        return reply

    # --- hinted handoff ---------------------------------------------------------------------

    async def pending_hints(self) -> dict[str, int]:
        """Hints waiting per target (every peer listed, 0 when none), also exported as gauges."""
        counts = dict.fromkeys(self.node.peers, 0)
        counts.update(self.node.hint_ledger.snapshot())
        for target, count in counts.items():
            self.node.metrics.hints_pending.labels(target=target).set(count)
        return dict(sorted(counts.items()))

    async def _hint_loop(self) -> None:
        while True:
            try:
                delay_s = await self.replay_tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("hint replay tick failed")
                delay_s = REPLAY_IDLE_S * 4
            await asyncio.sleep(delay_s)

    async def _replay_window(self) -> list[tuple[HintRecord, bytes]]:
        """Up to ``REPLAY_WINDOW`` decodable hints from the cursor on, wrapping once."""
        hints = self.node.hints
        page = await hints.scan(TOKEN_MIN, TOKEN_MIN, REPLAY_WINDOW, self._cursor)
        if len(page) < REPLAY_WINDOW and self._cursor is not None:
            seen = {(r.token, r.key) for r in page}
            more = await hints.scan(TOKEN_MIN, TOKEN_MIN, REPLAY_WINDOW - len(page), None)
            page += [r for r in more if (r.token, r.key) not in seen]
        self._cursor = (page[-1].token, page[-1].key) if len(page) >= REPLAY_WINDOW else None
        out: list[tuple[HintRecord, bytes]] = []
        for rec in page:
            try:
                out.append((HintRecord.decode(rec.blob), rec.blob))
            except HintDecodeError:
                continue  # dropped, counted and logged by the next store_hint or restart
        return out

    async def replay_tick(self) -> float:
        """Drop expired hints and start the sends the planner allows; returns the next delay in seconds."""
        node = self.node
        if not node.hint_ledger.total_hints:
            return REPLAY_IDLE_S
        window = await self._replay_window()
        now_wall, now_mono = node.clock.wall_ns(), node.clock.monotonic_ns()

        def as_wall(mono_ns: int) -> int:
            # Send and failure times are kept on the monotonic clock (a wall-clock step must not
            # break the rate window) and translated into the planner's wall-clock frame.
            return now_wall - (now_mono - mono_ns)

        targets = {record.target for record, _ in window}
        plan = plan_replay(
            (PendingHint.of(record) for record, _ in window),
            now_ns=now_wall,
            policy=node.hint_ledger.policy,
            limits=self._replay_limits,
            targets_up={t for t in targets if node.is_up(t)},
            in_flight=self._in_flight.keys(),
            recent_send_times_ns=[as_wall(t) for t in self._send_times_mono],
            last_failure_ns={t: as_wall(m) for t, m in self._failed_at_mono.items()},
        )
        by_key = {record.storage_key: (record, blob) for record, blob in window}
        for hint in plan.expire:
            record, blob = by_key[hint.storage_key]
            await node.forget_hint(record, blob, "expired")
        for hint in plan.send:
            record, blob = by_key[hint.storage_key]
            self._send_times_mono.append(now_mono)
            task = asyncio.create_task(self._deliver(record, blob), name="hint-deliver")
            self._in_flight[hint.storage_key] = task
        await self.pending_hints()
        if plan.next_check_ns is not None:
            return min(1.0, max(REPLAY_BUSY_S, (plan.next_check_ns - now_wall) / NS_PER_S))
        if self._in_flight or plan.waiting:
            return REPLAY_BUSY_S
        return REPLAY_IDLE_S

    async def _deliver(self, record: HintRecord, blob: bytes) -> None:
        node = self.node
        try:
            message = {"op": "replica_put", "key": record.key, "token": record.token, "obj": record.object_blob}
            try:
                await node.call(record.target, message, node.cfg.limits.replica_timeout_ms / 1000.0)
            except (PeerUnavailable, RemoteError) as exc:
                self._failed_at_mono[record.target] = node.clock.monotonic_ns()
                log.debug("hint for %s key %r not delivered: %s", record.target, record.key, exc)
                return
            self._failed_at_mono.pop(record.target, None)
            node.metrics.hints_replayed.labels(target=record.target).inc()
            # Deleted only if unchanged: a newer write coalesced meanwhile stays for the next tick.
            await node.forget_hint(record, blob, "delivered")
        except StorageError:
            log.exception("hint store failed while delivering a hint for %s", record.target)
        finally:
            self._in_flight.pop(record.storage_key, None)

    # --- read repair ------------------------------------------------------------------------

    async def read_repair(
        self,
        key: str,
        token: int,
        targets: list[str],
        tasks: list[asyncio.Task[Any]],
        replies: dict[str, VersionedObject | None],
        merged: VersionedObject,
        deadline: float,
    ) -> None:
        mode = self.cfg.read_repair
        if mode == "off":
            self.node._adopt(t for t in tasks if not t.done())
            return
        job = self._repair(key, token, targets, tasks, replies, merged)
        if mode == "blocking":
            # Blocking, but never past the read's deadline: the rest finishes in the background.
            repair = asyncio.ensure_future(job)
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            done, _ = await asyncio.wait({repair}, timeout=remaining)
            if not done:
                self.node._adopt([repair])
        elif self.node.spawn(job, name="read-repair") is None:
            job.close()  # background slots are full: skip this repair rather than queue it
            for t in tasks:
                t.cancel()

    async def _repair(
        self,
        key: str,
        token: int,
        targets: list[str],
        tasks: list[asyncio.Task[Any]],
        replies: dict[str, VersionedObject | None],
        merged: VersionedObject,
    ) -> None:
        pending = [t for t in tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.cfg.read_repair_wait_ms / 1000.0)
            for t in pending:
                t.cancel()
        merged = versions.sync_all([merged, *(o for o in replies.values() if o is not None)], self.node.mode)
        primaries = self.node.ring.walk_token(token)[: self.node.n]
        digest = versions.digest(merged)
        blob = versions.encode(merged)
        for member in targets:
            if member not in primaries or member not in replies:
                continue  # no answer: unknown state, anti-entropy's job; fallbacks hold hints
            got = replies[member]
            if got is not None and versions.digest(got) == digest:
                continue
            with contextlib.suppress(PeerUnavailable, RemoteError):
                await self.node.call(
                    member, {"op": "replica_put", "key": key, "token": token, "obj": blob},
                    self.node.cfg.limits.replica_timeout_ms / 1000.0,
                )
                self.node.metrics.read_repairs.inc()

    # --- anti-entropy: scheduling -----------------------------------------------------------

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

    async def _on_status(self, sender: str, message: Message) -> Message:
        return self.status()

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
                leaves = [await self._local_leaves(r, candidates, stats) for r in chunk]
                peers = sorted({o for r in chunk for o in r.owners if o != node.node_id})
                await asyncio.gather(*(self._sync_with_peer(p, chunk, leaves, stats, slots) for p in peers))
            stats.tombstones_reaped = await self.reap(candidates)
        except Exception as exc:  # a background round must log, not vanish with its task
            node.metrics.ae_rounds.labels(result="error").inc()
            log.exception("anti-entropy round failed")
            stats.errors.append(repr(exc))
        stats.seconds = (node.clock.monotonic_ns() - started_ns) / NS_PER_S
        self.rounds_completed += 1
        self.last_round = stats
        log.info("anti-entropy round (%s) done: %s", reason, stats.as_dict())
        return stats

    # --- anti-entropy: initiator ------------------------------------------------------------

    async def _local_leaves(
        self, token_range: TokenRange, candidates: list[ReapCandidate], stats: RoundStats
    ) -> list[Leaf]:
        """Our (token, key, digest) leaves of a range (rate-limited); collects reap candidates."""
        node = self.node
        now_ns = node.clock.wall_ns()
        grace_ns = int(self.cfg.tombstone_grace_s * NS_PER_S)
        leaves: list[Leaf] = []
        after: tuple[int, str] | None = None
        while True:
            page = await node.data.scan(token_range.start, token_range.end, SCAN_PAGE, after)
            await self._limiter.acquire(len(page))
            for rec in page:
                obj = versions.decode(rec.blob)
                leaves.append((rec.token, rec.key, versions.digest(obj)))
                if (
                    obj.is_deleted
                    and len(candidates) < MAX_REAP_CANDIDATES
                    and tombstone_written_at_ns(obj) + grace_ns <= now_ns
                    and node.ring.walk_token(rec.token)[0] == node.node_id
                ):
                    candidates.append(ReapCandidate(rec.token, rec.key, rec.blob))
            if len(page) < SCAN_PAGE:
                break
            after = (page[-1].token, page[-1].key)
        stats.keys_scanned += len(leaves)
        return leaves

    async def _sync_with_peer(
        self,
        peer: str,
        chunk: list[TokenRange],
        chunk_leaves: list[list[Leaf]],
        stats: RoundStats,
        slots: asyncio.Semaphore,
    ) -> None:
        """Summaries of the chunk's ranges shared with ``peer``, then an exchange per differing range."""
        metrics = self.node.metrics
        shared = [(r, leaves) for r, leaves in zip(chunk, chunk_leaves, strict=True) if peer in r.owners]
        if not self.node.is_up(peer):
            stats.exchanges_failed += len(shared)
            metrics.ae_rounds.labels(result="peer_down").inc(len(shared))
            return
        try:
            reply = await self._call(peer, {"op": "ae_summary", "ranges": [[r.start, r.end] for r, _ in shared]})
            summaries = _parse_summaries(reply, len(shared))
        except (PeerUnavailable, RemoteError, APProtocolError) as exc:
            log.warning("anti-entropy summary with %s failed: %s", peer, exc)
            stats.exchanges_failed += len(shared)
            metrics.ae_rounds.labels(result="failed").inc(len(shared))
            return
        jobs = []
        for (token_range, leaves), (remote_count, remote_flat) in zip(shared, summaries, strict=True):
            if _flat_hash(token_range, leaves) == remote_flat:
                stats.exchanges_in_sync += 1
                metrics.ae_rounds.labels(result="in_sync").inc()
                continue
            exchange = self._exchange(peer, token_range, leaves, remote_count, remote_flat, stats)
            jobs.append(self._bounded(slots, exchange))
        await asyncio.gather(*jobs)

    @staticmethod
    async def _bounded(slots: asyncio.Semaphore, job: Awaitable[None]) -> None:
        async with slots:
            await job

    async def _exchange(
        self, peer: str, token_range: TokenRange, leaves: list[Leaf], remote_count: int, remote_flat: bytes,
        stats: RoundStats,
    ) -> None:
        """The Merkle exchange of one range with one peer, then the sync of the differing keys."""
        metrics = self.node.metrics
        try:
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
                exchange.receive(LevelReply.from_wire(await self._call(peer, {"op": "ae_level",
                                                                               **request.to_wire()}), request))
            assert exchange.done, "the level exchange did not finish within depth + 1 requests"
            differing = exchange.differing_buckets
            remote_items: list[tuple[str, bytes]] = []
            for offset in range(0, len(differing), BUCKETS_PER_REQUEST):
                buckets = BucketRequest(tree.shape, tuple(differing[offset : offset + BUCKETS_PER_REQUEST]))
                # Depth 0 skipped the level requests: the responder must build its tree now.
                reply = await self._call(peer, {"op": "ae_buckets", **buckets.to_wire(), "fresh": depth == 0})
                remote_items += BucketReply.from_wire(reply, buckets).items()
            local_items = exchange.local_items()
            keys = keys_to_exchange(local_items, remote_items)
            await self._sync_keys(peer, keys, dict(remote_items))
        except (PeerUnavailable, RemoteError, MerkleError, APProtocolError, StorageError) as exc:
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
                reply = await self._call(peer, {"op": "ae_pull", "keys": [[t, k] for t, k in wanted]})
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
            items: list[list[Any]] = [[t, k, b] for t, k, b in blobs if b is not None]
            for chunk in _byte_chunks(items, lambda o: len(o[1]) + len(o[2])):
                await self._call(peer, {"op": "ae_push", "objects": chunk})

    # --- anti-entropy: responder ------------------------------------------------------------

    def _owns(self, token: int) -> bool:
        return self.node.node_id in self.node.ring.walk_token(token)[: self.node.n]

    async def _scan_leaves(self, start: int, end: int) -> list[Leaf]:
        leaves: list[Leaf] = []
        after: tuple[int, str] | None = None
        while True:
            page = await self.node.data.scan(start, end, SCAN_PAGE, after)
            leaves += [(r.token, r.key, versions.digest(versions.decode(r.blob))) for r in page]
            if len(page) < SCAN_PAGE:
                return leaves
            after = (page[-1].token, page[-1].key)

    async def _on_summary(self, sender: str, message: Message) -> Message:
        raw = message.get("ranges")
        if not isinstance(raw, list) or len(raw) > SUMMARY_BATCH:
            return _remote_error("bad_request", f"ranges must be a list of at most {SUMMARY_BATCH}")
        summaries = []
        for item in raw:
            try:
                shape = TreeShape.from_wire([*item, 0]) if isinstance(item, list) else None
            except MerkleWireError as exc:
                return _remote_error("bad_request", str(exc))
            if shape is None:
                return _remote_error("bad_request", "each range is [start, end]")
            leaves = await self._scan_leaves(shape.start, shape.end)
            token_range = TokenRange(shape.start, shape.end, ())
            summaries.append([len(leaves), _flat_hash(token_range, leaves)])
        return {"summaries": summaries}

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

    async def _on_level(self, sender: str, message: Message) -> Message:
        try:
            request = LevelRequest.from_wire(message)
            tree = await self._peer_tree(sender, request.shape, fresh=request.level == 0)
            return tree.answer(request).to_wire()
        except MerkleError as exc:
            return _remote_error("bad_request", str(exc))

    async def _on_buckets(self, sender: str, message: Message) -> Message:
        try:
            request = BucketRequest.from_wire(message)
            tree = await self._peer_tree(sender, request.shape, fresh=bool(message.get("fresh")))
            return tree.answer_buckets(request).to_wire()
        except MerkleError as exc:
            return _remote_error("bad_request", str(exc))

    async def _on_pull(self, sender: str, message: Message) -> Message:
        """Our data-store objects of the asked keys, in order, up to the message byte budget."""
        try:
            wanted = _token_key_list(message.get("keys"), "ae_pull")
        except APProtocolError as exc:
            return _remote_error("bad_request", str(exc))
        objects: list[list[Any]] = []
        size = 0
        for token, key in wanted:
            blob = await self.node.data.get(key, token)
            objects.append([key, blob])
            size += len(key) + (len(blob) if blob is not None else 0)
            if size >= MESSAGE_BYTES_BUDGET:
                break  # the caller asks again for the rest
        return {"objects": objects}

    async def _on_push(self, sender: str, message: Message) -> Message:
        raw = message.get("objects")
        try:
            entries = _token_key_list(raw, "ae_push")
            assert isinstance(raw, list)
            blobs = [item[2] for item in raw]
            if not all(isinstance(b, bytes) for b in blobs) or any(key_token(k) != t for t, k in entries):
                raise APProtocolError("ae_push: entries are [token, key, object: bytes] with the key's token")
        except APProtocolError as exc:
            return _remote_error("bad_request", str(exc))
        owned = [(t, k, versions.decode(b)) for (t, k), b in zip(entries, blobs, strict=True) if self._owns(t)]
        await asyncio.gather(*(self.node.apply_local(k, t, obj) for t, k, obj in owned))
        return {"applied": len(owned), "refused": len(entries) - len(owned)}

    # --- tombstone reaping ------------------------------------------------------------------

    async def reap(self, candidates: Sequence[ReapCandidate]) -> int:
        """Reap the candidates every primary confirms; returns how many local copies were deleted."""
        reaped = 0
        for offset in range(0, len(candidates), OBJECTS_PER_MESSAGE):
            reaped += await self._reap_batch(candidates[offset : offset + OBJECTS_PER_MESSAGE])
        return reaped

    async def _reap_batch(self, batch: Sequence[ReapCandidate]) -> int:
        node = self.node
        primaries = {c.key: tuple(node.ring.walk_token(c.token)[: node.n]) for c in batch}
        holding: dict[str, set[str]] = {c.key: {node.node_id} for c in batch}
        peers = sorted({p for ps in primaries.values() for p in ps if p != node.node_id})

        async def ask(peer: str) -> None:
            mine = [c for c in batch if peer in primaries[c.key]]
            try:
                reply = await self._call(peer, {"op": "reap_check", "keys": [[c.token, c.key, c.blob] for c in mine]})
            except (PeerUnavailable, RemoteError):
                return  # an unreachable primary cannot confirm: it blocks the reap
            covered = reply.get("covered")
            if isinstance(covered, list) and len(covered) == len(mine):
                for c, ok in zip(mine, covered, strict=True):
                    if ok is True:
                        holding[c.key].add(peer)

        await asyncio.gather(*(ask(p) for p in peers))
        now_ns = node.clock.wall_ns()
        grace_ns = int(self.cfg.tombstone_grace_s * NS_PER_S)
        approved: list[ReapCandidate] = []
        for c in batch:
            obj = versions.decode(c.blob)
            verdict = reap_verdict(obj, tombstone_written_at_ns(obj), now_ns, grace_ns, holding[c.key], primaries[c.key])
            if verdict.reap:
                approved.append(c)
            else:
                log.debug("tombstone %r not reaped: %s %s", c.key, verdict.blocker, verdict.missing_primaries)
        if not approved:
            return 0
        remote_ok: dict[str, bool] = {c.key: True for c in approved}

        async def order(peer: str) -> None:
            mine = [c for c in approved if peer in primaries[c.key]]
            if not mine:
                return
            message = {"op": "reap", "keys": [[c.token, c.key, c.blob, list(primaries[c.key])] for c in mine]}
            try:
                reply = await self._call(peer, message)
                done = reply.get("reaped")
            except (PeerUnavailable, RemoteError):
                done = None
            for i, c in enumerate(mine):
                if not (isinstance(done, list) and len(done) == len(mine) and done[i] in ("reaped", "absent")):
                    remote_ok[c.key] = False

        await asyncio.gather(*(order(p) for p in peers))
        count = 0
        for c in approved:
            # If a peer kept its copy (a write raced the check), keep ours too: the key stays a
            # tombstone everywhere and is retried next round, rather than bouncing back via repair.
            if remote_ok[c.key] and await self._delete_if_unchanged(c.key, c.token, c.blob):
                count += 1
        return count

    async def _delete_if_unchanged(self, key: str, token: int, blob: bytes) -> bool:
        async with self.node.locks.hold(key):
            if await self.node.data.get(key, token) != blob:
                return False  # a write or repair changed it since the check
            await self.node.data.delete(key, token)
        self.node.metrics.tombstones_reaped.inc()
        log.info("reaped the tombstone of %r", key)
        return True

    async def _on_reap_check(self, sender: str, message: Message) -> Message:
        """Per key: does our copy descend the reaper's tombstone (``tombstone_is_covered``)?"""
        raw = message.get("keys")
        try:
            entries = _token_key_list(raw, "reap_check")
            assert isinstance(raw, list)
            tombs = [_tombstone_of(item) for item in raw]
        except APProtocolError as exc:
            return _remote_error("bad_request", str(exc))
        covered = []
        for (token, key), tomb in zip(entries, tombs, strict=True):
            blob = await self.node.data.get(key, token)
            covered.append(blob is not None and tombstone_is_covered(versions.decode(blob), tomb))
        return {"covered": covered}

    async def _on_reap(self, sender: str, message: Message) -> Message:
        """Delete our copy of each key if it is exactly the reaper's tombstone and ``can_reap`` agrees."""
        raw = message.get("keys")
        try:
            entries = _token_key_list(raw, "reap")
            assert isinstance(raw, list)
            tombs = [_tombstone_of(item) for item in raw]
            confirmed = [item[3] if len(item) > 3 and isinstance(item[3], list) else [] for item in raw]
        except APProtocolError as exc:
            return _remote_error("bad_request", str(exc))
        node = self.node
        grace_ns = int(self.cfg.tombstone_grace_s * NS_PER_S)
        results = []
        for (token, key), tomb, holding in zip(entries, tombs, confirmed, strict=True):
            primaries = tuple(node.ring.walk_token(token)[: node.n])
            async with node.locks.hold(key):
                blob = await node.data.get(key, token)
                if blob is None:
                    results.append("absent")
                    continue
                obj = versions.decode(blob)
                verdict = reap_verdict(
                    obj, tombstone_written_at_ns(tomb), node.clock.wall_ns(), grace_ns, set(holding), primaries
                ) if obj.is_deleted else None
                if versions.digest(obj) != versions.digest(tomb) or verdict is None or not verdict.reap:
                    results.append("kept")
                    continue
                await node.data.delete(key, token)
            node.metrics.tombstones_reaped.inc()
            results.append("reaped")
        return {"reaped": results}


# --- helpers ------------------------------------------------------------------------------


def _flat_hash(token_range: TokenRange, leaves: Iterable[Leaf]) -> bytes:
    """The root of a depth-0 tree of the range: one hash of every (key, digest) pair."""
    return MerkleTree.build(token_range.start, token_range.end, leaves, 0).root


def _parse_summaries(reply: Message, count: int) -> list[tuple[int, bytes]]:
    raw = reply.get("summaries")
    if not isinstance(raw, list) or len(raw) != count:
        raise APProtocolError(f"expected {count} range summaries")
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and isinstance(item[1], bytes)):
            raise APProtocolError("a range summary is [count: int, hash: bytes]")
        out.append((item[0], item[1]))
    return out


def _parse_pulled(reply: Message, wanted: list[tuple[int, str]]) -> tuple[int, list[tuple[int, str, bytes]]]:
    """(how many of ``wanted`` the reply answered, the (token, key, blob) of those the peer holds)."""
    raw = reply.get("objects")
    if not isinstance(raw, list) or not 1 <= len(raw) <= len(wanted):
        raise APProtocolError("ae_pull: the reply must answer a non-empty prefix of the keys asked")
    present = []
    for (token, key), item in zip(wanted, raw, strict=False):
        if not (isinstance(item, list) and len(item) == 2 and item[0] == key):
            raise APProtocolError("ae_pull: replies are [key, object | None] in the order asked")
        if isinstance(item[1], bytes):
            present.append((token, key, item[1]))
    return len(raw), present


def _tombstone_of(item: list[Any]) -> VersionedObject:
    """The tombstone object of a reap message entry ``[token, key, blob, ...]``."""
    blob = item[2] if len(item) > 2 else None
    if not isinstance(blob, bytes):
        raise APProtocolError("reap entries are [token, key, tombstone: bytes, ...]")
    try:
        tomb = versions.decode(blob)
    except (ValueError, TypeError) as exc:
        raise APProtocolError(f"undecodable tombstone: {exc}") from None
    if not tomb.is_deleted:
        raise APProtocolError("a reap entry's object is not a tombstone")
    return tomb


def _byte_chunks(items: list[list[Any]], size_of: Callable[[list[Any]], int]) -> list[list[list[Any]]]:
    """Split ``items`` into chunks of at most ``MESSAGE_BYTES_BUDGET`` bytes (each at least one item)."""
    chunks: list[list[list[Any]]] = []
    current: list[list[Any]] = []
    size = 0
    for item in items:
        item_size = size_of(item)
        if current and size + item_size > MESSAGE_BYTES_BUDGET:
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        chunks.append(current)
    return chunks


def install(node: Node) -> APMachinery:
    ap = APMachinery(node)
    node.extensions.append(ap)
    node.read_repair = ap.read_repair
    node.pending_hints = ap.pending_hints  # type: ignore[attr-defined]
    node.trigger_repair = ap.trigger_repair  # type: ignore[attr-defined]
    node.handlers.update(ap.handlers())
    return ap
