"""AP machinery wired into a node: hinted handoff, read repair, anti-entropy, tombstone reaping.

Theory of operation
-------------------
Dynamo (§4.6-4.7) and Riak KV keep replicas converging by three independent
mechanisms, each cheap and each incomplete on its own:

* **Hinted handoff.**  A fallback that took a write for an unreachable primary
  keeps it as a durable hint.  A replay loop delivers hints to their owner once
  the failure detector sees it up, with bounded concurrency and rate, and deletes
  a hint only after the owner acknowledged it durably *and* only if the hint was
  not updated meanwhile.  Hints older than the hint window are dropped (counted
  and logged); anti-entropy repairs those keys.
* **Read repair.**  After a read has its R replies the coordinator keeps
  listening (bounded time) for the others; every primary that answered with a
  stale, missing or conflicting version is sent the merged object.  Only keys
  that are read get repaired.
* **Anti-entropy.**  Periodically (rate-limited), each node compares, range by
  range, a Merkle tree of (key, version digest) with every other replica of that
  range, and exchanges only the keys of differing leaves, merging both ways.
  This repairs keys nobody reads and hints that were lost or expired.

All three only ever *merge* (``versions.sync``), so they can run concurrently
with client writes and with each other without losing an acknowledged write.
Deletes are tombstones; a tombstone is reaped only after a grace period and
only when every primary holds it (see ``kvstore.tombstones``), so a stale
replica or a late hint cannot resurrect a deleted value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from kvstore import versions
from kvstore.node import Node, decode_hint, hint_storage_key
from kvstore.ring import TOKEN_MIN
from kvstore.transport.base import PeerUnavailable, RemoteError
from kvstore.versions import VersionedObject

log = logging.getLogger(__name__)

SCAN_PAGE = 500


class APMachinery:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg.ap
        self._loops: list[asyncio.Task[Any]] = []
        self._replay_slots = asyncio.Semaphore(self.cfg.hint_replay_concurrency)
        self.pending_by_target: dict[str, int] = {}

    async def start(self) -> None:
        self._loops.append(asyncio.create_task(self._hint_loop(), name="hint-replay"))

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- hinted handoff ---------------------------------------------------------------------

    async def _all_hints(self) -> list[tuple[int, str, bytes]]:
        """Every hint record (token, storage key, blob), paged; bounded by the hint store's bound."""
        records: list[tuple[int, str, bytes]] = []
        after: tuple[int, str] | None = None
        while True:
            page = await self.node.hints.scan(TOKEN_MIN, TOKEN_MIN, SCAN_PAGE, after)
            records += [(r.token, r.key, r.blob) for r in page]
            if len(page) < SCAN_PAGE:
                return records
            after = (page[-1].token, page[-1].key)

    async def pending_hints(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, blob in await self._all_hints():
            target = decode_hint(blob)[0]
            counts[target] = counts.get(target, 0) + 1
        for target in self.node.peers:
            counts.setdefault(target, 0)
        for target, count in counts.items():
            self.node.metrics.hints_pending.labels(target=target).set(count)
        return dict(sorted(counts.items()))

    async def _hint_loop(self) -> None:
        while True:
            try:
                await self.replay_hints_once()
            except Exception:
                log.exception("hint replay round failed")
            await asyncio.sleep(0.5)

    async def replay_hints_once(self) -> int:
        """Deliver every due hint whose owner is up; returns how many were delivered."""
        node = self.node
        now_ns = node.clock.wall_ns()
        max_age_ns = int(self.cfg.hint_max_age_s * 1e9)
        interval_s = 1.0 / max(1, self.cfg.hint_replay_rate_per_s)
        delivered = 0
        tasks = []
        for token, storage_key, blob in await self._all_hints():
            target, key, created_at_ns, obj = decode_hint(blob)
            if now_ns - created_at_ns > max_age_ns:
                await self._drop_expired(storage_key, token, target, key, created_at_ns)
                continue
            if not node.is_up(target):
                continue
            await self._replay_slots.acquire()
            tasks.append(asyncio.create_task(self._deliver(storage_key, token, target, key, obj, blob)))
            await asyncio.sleep(interval_s)  # the replay rate bound
        for ok in await asyncio.gather(*tasks):
            delivered += int(ok)
        return delivered

    async def _drop_expired(self, storage_key: str, token: int, target: str, key: str, created_at_ns: int) -> None:
        async with self.node.locks.hold(storage_key):
            await self.node.hints.delete(storage_key, token)
        self.node.metrics.hints_dropped.labels(reason="expired").inc()
        log.warning("dropped hint for %s key %r: older than the hint window; anti-entropy will repair it", target, key)

    async def _deliver(self, storage_key: str, token: int, target: str, key: str, obj: VersionedObject,
                       blob: bytes) -> bool:
        node = self.node
        try:
            try:
                await node.call(
                    target,
                    {"op": "replica_put", "key": key, "token": token, "obj": versions.encode(obj)},
                    node.cfg.limits.replica_timeout_ms / 1000.0,
                )
            except (PeerUnavailable, RemoteError):
                return False
            async with node.locks.hold(storage_key):
                # Delete only the version we delivered: a newer hint for the same key stays.
                if await node.hints.get(storage_key, token) == blob:
                    await node.hints.delete(storage_key, token)
            node.metrics.hints_replayed.labels(target=target).inc()
            return True
        finally:
            self._replay_slots.release()

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
            return
        job = self._repair(key, token, targets, tasks, replies, merged)
        if mode == "blocking":
            await job
        elif self.node.spawn(job, name="read-repair") is None:
            job.close()  # background slots are full: skip this repair rather than queue it

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

    # --- messages ---------------------------------------------------------------------------

    def handlers(self) -> dict[str, Any]:
        return {}



def install(node: Node) -> APMachinery:
    ap = APMachinery(node)
    node.extensions.append(ap)
    node.read_repair = ap.read_repair
    node.pending_hints = ap.pending_hints  # type: ignore[attr-defined]
    node.handlers.update(ap.handlers())
    node.hint_key = hint_storage_key  # type: ignore[attr-defined]
    return ap
