"""Tombstone reaping: remove a delete's tombstone once every primary holds it and grace passed.

Theory of operation
-------------------
A delete is a tombstone (a sibling without a value) so that it can supersede the values it
covers on every replica; kept for ever, tombstones would grow without bound.  Riak's
``delete_mode`` and Cassandra's ``gc_grace_seconds`` remove them after a grace period; here
the rules are the pure ``kvstore.protocol.tombstones`` and this mechanism does the I/O.

Anti-entropy's scans (``kvstore.runtime.anti_entropy``) collect all-tombstone objects past their
grace period for which this node is the key's *first* primary (so one node reaps each key).
The reaper asks every other primary whether its copy descends the tombstone
(``reap_check``: ``tombstone_is_covered``); only if ``reap_verdict`` agrees does it ask them to
delete their copy *if it is still exactly that tombstone* (``reap``), then deletes its own
under the key's lock, again only if unchanged.  Deleting on every primary together is what
keeps the reap from being undone: a tombstone reaped on one replica only would be copied back
by anti-entropy from the others (harmless, but it would never go away).  If any primary kept
its copy (a write raced the check), the reaper keeps its own too and retries next round.

Why it cannot lose a write or resurrect a delete: a write racing the reap changes the stored
object, and every delete is conditional on the exact tombstone; every primary descended the
tombstone when it was reaped, and hints older than the grace period are expired (config rule:
grace >= hint window), so no stale copy can bring the deleted value back.  Grace is measured
on the node's injected wall clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kvstore.protocol import versions
from kvstore.protocol.hints import NS_PER_S
from kvstore.protocol.messages import (
    ErrorReply,
    MessageError,
    Reap,
    ReapCheck,
    ReapCheckReply,
    ReapReply,
    decode_reply,
    encode,
    serve,
)
from kvstore.protocol.tombstones import reap_verdict, tombstone_is_covered, tombstone_written_at_ns
from kvstore.protocol.versions import VersionedObject
from kvstore.runtime.repair_messages import (
    OBJECTS_PER_MESSAGE,
    RepairProtocolError,
    call_peer,
)
from kvstore.transport.base import Handler, PeerUnavailable, RemoteError

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

log = logging.getLogger(__name__)

MAX_REAP_CANDIDATES = 2000  # per anti-entropy round; the rest wait for the next round


@dataclass(frozen=True, slots=True)
class ReapCandidate:
    token: int
    key: str
    blob: bytes  # the stored tombstone object, exactly as checked


class TombstoneReaper:
    """Reaps the candidates anti-entropy finds; answers other reapers' checks and orders."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg.ap

    def handlers(self) -> dict[str, Handler]:
        return {"reap_check": serve(ReapCheck, self._on_reap_check), "reap": serve(Reap, self._on_reap)}

    async def start(self) -> None:
        return None  # driven by anti-entropy's rounds

    async def stop(self) -> None:
        return None

    def is_candidate(self, token: int, obj: VersionedObject, now_ns: int) -> bool:
        """Whether a scanned object is this node's to try to reap now (grace on ``now_ns``)."""
        grace_ns = int(self.cfg.tombstone_grace_s * NS_PER_S)
        return (
            obj.is_deleted
            and tombstone_written_at_ns(obj) + grace_ns <= now_ns
            and self.node.ring.walk_token(token)[0] == self.node.node_id
        )

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
                reply = await call_peer(node, peer, encode(ReapCheck([(c.token, c.key, c.blob) for c in mine])))
                covered = decode_reply(reply, ReapCheckReply, ReapCheck.OP).covered
            except (PeerUnavailable, RemoteError, MessageError):
                return  # an unreachable (or illegible) primary cannot confirm: it blocks the reap
            if len(covered) == len(mine):
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
            message = encode(Reap([(c.token, c.key, c.blob, list(primaries[c.key])) for c in mine]))
            done: list[str] | None
            try:
                reply = await call_peer(node, peer, message)
                done = list(decode_reply(reply, ReapReply, Reap.OP).reaped)
            except (PeerUnavailable, RemoteError, MessageError):
                done = None
            for i, c in enumerate(mine):
                if not (done is not None and len(done) == len(mine) and done[i] in ("reaped", "absent")):
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

    async def _on_reap_check(self, sender: str, message: ReapCheck) -> ReapCheckReply | ErrorReply:
        """Per key: does our copy descend the reaper's tombstone (``tombstone_is_covered``)?"""
        try:
            tombs = [_tombstone_of(blob) for _, _, blob in message.keys]
        except RepairProtocolError as exc:
            return ErrorReply("bad_request", str(exc))
        covered = []
        for (token, key, _), tomb in zip(message.keys, tombs, strict=True):
            blob = await self.node.data.get(key, token)
            covered.append(blob is not None and tombstone_is_covered(versions.decode(blob), tomb))
        return ReapCheckReply(covered)

    async def _on_reap(self, sender: str, message: Reap) -> ReapReply | ErrorReply:
        """Delete our copy of each key if it is exactly the reaper's tombstone and ``can_reap`` agrees."""
        try:
            tombs = [_tombstone_of(blob) for _, _, blob, _ in message.keys]
        except RepairProtocolError as exc:
            return ErrorReply("bad_request", str(exc))
        node = self.node
        grace_ns = int(self.cfg.tombstone_grace_s * NS_PER_S)
        results: list[Literal["reaped", "absent", "kept"]] = []
        for (token, key, _, holding), tomb in zip(message.keys, tombs, strict=True):
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
        return ReapReply(results)


def _tombstone_of(blob: bytes) -> VersionedObject:
    """The tombstone object of a reap message entry ``[token, key, blob, ...]``."""
    try:
        tomb = versions.decode(blob)
    except (ValueError, TypeError) as exc:
        raise RepairProtocolError(f"undecodable tombstone: {exc}") from None
    if not tomb.is_deleted:
        raise RepairProtocolError("a reap entry's object is not a tombstone")
    return tomb
