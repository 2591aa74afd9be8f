"""Read repair: after a read has its R replies, bring the stale primaries up to the merge.

Theory of operation
-------------------
Dynamo (§4.7, "read repair") and Riak KV.  ``Node.get`` answers the client after R replies;
the remaining asks are handed to this mechanism, which keeps listening for them for a bounded
time (``ap.read_repair_wait_ms``), merges every reply (``versions.sync_all``) and sends the
merged object (an ordinary ``replica_put``, which only merges) to every *primary* that answered
with a stale, missing or conflicting version.  A target that did not answer is left alone (its
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
from typing import TYPE_CHECKING, Any

from kvstore import versions
from kvstore.transport.base import Handler, PeerUnavailable, RemoteError
from kvstore.versions import VersionedObject

if TYPE_CHECKING:
    from kvstore.node import Node


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

    async def after_read(
        self,
        key: str,
        token: int,
        targets: list[str],
        tasks: list[asyncio.Task[Any]],
        replies: dict[str, VersionedObject | None],
        merged: VersionedObject,
        deadline: float,
    ) -> None:
        """Called by ``Node.get`` once R replies arrived, with the asks still outstanding.

        ``replies`` keeps filling as those asks finish; ``deadline`` is the read's, in seconds
        on ``Node.now_s``.
        """
        mode = self.cfg.read_repair
        if mode == "off":
            self.node._adopt(t for t in tasks if not t.done())
            return
        job = self._repair(key, token, targets, tasks, replies, merged)
        if mode == "blocking":
            # Blocking, but never past the read's deadline: the rest finishes in the background.
            repair = asyncio.ensure_future(job)
            remaining = max(0.0, deadline - self.node.now_s())
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
