"""Read repair: after a read has its R replies, bring the stale primaries up to the merge.

Theory of operation
-------------------
Dynamo (§4.7, "read repair") and Riak KV.  ``Node.get`` answers the client after R replies;
the remaining asks are handed to this mechanism (a ``PendingRepair``), which keeps listening
for them for a bounded time (``ap.read_repair_wait_ms``); the read's core
(``kvstore.protocol.coordinator.ReadCoordinatorCore``) then merges every reply (``versions.sync_all``)
and decides the repairs: the merged object (an ordinary ``replica_put``, which only merges)
to every *primary* that answered with a stale, missing or conflicting version.  This module
sends them, one after another.  A target that did not answer is left alone (its
state is unknown: anti-entropy's job), and so is a fallback (it holds hints, not data).  Only
keys that are read get repaired.

``ap.read_repair`` chooses when: ``async`` (the default) repairs in a bounded background task
and skips the repair when no background slot is free; ``blocking`` repairs before the answer,
but never past the read's deadline (the rest finishes in the background); ``off`` repairs
nothing.  Deadlines are on the node's injected clock (``Node.now_s``); waits are asyncio's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from kvstore.transport.base import Handler, PeerUnavailable, RemoteError

if TYPE_CHECKING:
    from kvstore.runtime.coordinator import PendingRepair
    from kvstore.runtime.node import Node


class ReadRepair:
    """Repairs the primaries a read found stale; no loop and no messages of its own."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg.ap

    def handlers(self) -> dict[str, Handler]:
        return {}  # a repair is an ordinary replica_put at the stale primary

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None  # repairs run as the node's background tasks, which the node stops

    async def after_read(self, pending: PendingRepair, deadline: float) -> None:
        """Called by ``Node.get`` once the read was answered, with its other replica reads still
        in flight; ``deadline`` is the read's, in seconds on ``Node.now_s``.  Which replicas to
        repair is the read's core's decision (``kvstore.protocol.coordinator``); this decides when."""
        mode = self.cfg.read_repair
        if mode == "off":
            pending.release()
            return
        job = self._repair(pending)
        if mode == "blocking":
            # Blocking, but never past the read's deadline: the rest finishes in the background.
            repair = asyncio.ensure_future(job)
            remaining = max(0.0, deadline - self.node.now_s())
            done, _ = await asyncio.wait({repair}, timeout=remaining)
            if not done:
                self.node._adopt([repair])
        elif self.node.spawn(job, name="read-repair") is None:
            job.close()  # background slots are full: skip this repair rather than queue it
            pending.cancel()

    async def _repair(self, pending: PendingRepair) -> None:
        repairs = await pending.repairs(int(self.cfg.read_repair_wait_ms * 1_000_000))
        for repair in repairs:  # one after another, as they were decided (target order)
            with contextlib.suppress(PeerUnavailable, RemoteError):
                await self.node.call(repair.peer, repair.message, repair.timeout_ns / 1e9)
                self.node.metrics.read_repairs.inc()
