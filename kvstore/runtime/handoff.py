"""Hinted handoff: a fallback delivers the hints it holds once their owner is back.

Theory of operation
-------------------
Dynamo (§4.6) and Cassandra: a fallback that took a write for an unreachable primary keeps it
as a durable hint (``kvstore.protocol.hints.HintRecord``, stored and bounded by the node: ``Node.store_hint``
and its ``HintLedger``).  This mechanism sends them home.  The replay loop reads a window of
the hint store, lets the pure planner (``kvstore.protocol.hints.plan_replay``) pick what to send (oldest
first, round-robin across targets, only to targets believed up, bounded rate and concurrency)
and what to drop (beyond the hint window: counted and logged), and deletes a hint only after
the owner acknowledged it *and* only if it was not coalesced with a newer write meanwhile
(``Node.forget_hint``).  The window advances through the store with a cursor, so a backlog for
a dead target cannot hide hints for a live one.

A delivered hint is an ordinary ``replica_put`` at the owner, which only ever *merges*
(``versions.sync``): a late or repeated delivery cannot lose an acknowledged write.  A hint
older than the hint window is never delivered (nor served by ``Node.read_local``): the tombstone
grace period is longer than the window, so a late hint cannot resurrect a reaped delete.

Time: send and failure times are kept on the injected clock's monotonic reading (a wall-clock
step must not break the rate window); hint ages on its wall clock (hints outlive restarts).
Every wait is an ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from kvstore.protocol.hints import (
    NS_PER_S,
    HintDecodeError,
    HintRecord,
    PendingHint,
    ReplayLimits,
    plan_replay,
)
from kvstore.protocol.messages import ReplicaPut, encode
from kvstore.protocol.ring import TOKEN_MIN
from kvstore.storage.base import StorageError
from kvstore.transport.base import Handler, PeerUnavailable, RemoteError

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

log = logging.getLogger(__name__)

REPLAY_WINDOW = 1000  # hint records read (and planned over) per replay tick
REPLAY_IDLE_S = 0.25  # poll interval with nothing to send
REPLAY_BUSY_S = 0.02  # poll interval while sends are in flight or waiting for a slot


class HintedHandoff:
    """The hint replay loop of one node, and the count of hints it holds per target."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg.ap
        self._loop: asyncio.Task[None] | None = None
        self._replay_limits = ReplayLimits(self.cfg.hint_replay_rate_per_s, self.cfg.hint_replay_concurrency)
        self._send_times_mono: deque[int] = deque(maxlen=self.cfg.hint_replay_rate_per_s)
        self._failed_at_mono: dict[str, int] = {}
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._cursor: tuple[int, str] | None = None

    def handlers(self) -> dict[str, Handler]:
        return {}  # a delivery is an ordinary replica_put at the owner

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._hint_loop(), name="hint-replay")

    async def stop(self) -> None:
        tasks = [*([self._loop] if self._loop is not None else []), *self._in_flight.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

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

        targets = sorted({record.target for record, _ in window})
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
            message = encode(ReplicaPut(record.key, record.token, record.object_blob))
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
