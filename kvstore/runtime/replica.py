"""A replica: this node's copy of the keys the ring gives it, and the hints it holds for others.

Theory of operation
-------------------
Dynamo (DeCandia et al. 2007, §4.5-4.6) and Riak KV.  A replica serves two internal messages:
``replica_get`` (its knowledge of a key) and ``replica_put`` (merge an object into its copy).
Every write here only *merges* (``versions.sync`` under the key's lock, ``apply_local``), so a
replica write, a read repair, a handoff delivery and an anti-entropy push can run in any order
without losing an acknowledged write; an unchanged merge is not written again.

A ``replica_put`` naming an intended owner (``hint_for``) at a node that is not one of the key's
primaries is kept as a durable *hint* instead (``kvstore.protocol.hints.HintRecord``, coalesced
with the hint already held for the pair), bounded by the node's ``HintLedger`` (count per target,
total bytes): a refused hint answers ``overloaded``, so the coordinator does not count this
fallback toward W; a hint is never dropped silently at admission.  A hint beyond the hint window
is never served nor coalesced into (its tombstone may have been reaped meanwhile); the ledger is
rebuilt from the hint store at start (``load_hint_ledger``).  A ``replica_get`` answers the data
copy merged with the unexpired hints held for the key, and says when the key is linearizable
(``cp``): the coordinator then refuses the mixed access.

Time comes from the node's injected ``Clock`` (``wall_ns`` for hint ages); I/O goes through its
``Storage`` seams (``data`` and ``hints``).  Hinted handoff (``kvstore.runtime.handoff``) delivers the
hints; this module only keeps them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvstore.config import NodeConfig
from kvstore.errors import Overloaded
from kvstore.protocol import versions
from kvstore.protocol.hints import (
    NS_PER_S,
    Admission,
    HintDecodeError,
    HintLedger,
    HintPolicy,
    HintRecord,
    hint_storage_key,
)
from kvstore.protocol.messages import OK, ErrorReply, Ok, ReplicaGet, ReplicaGetReply, ReplicaPut, serve
from kvstore.protocol.ring import TOKEN_MIN
from kvstore.protocol.versions import VersionedObject
from kvstore.storage.base import scan_pages
from kvstore.transport.base import Handler

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

log = logging.getLogger(__name__)

HINT_SCAN_PAGE = 500


class HintStoreFull(Overloaded):
    """A fallback refused a hint (its ledger's count or byte bound): it must not count toward W."""

    def __init__(self, admission: Admission) -> None:
        super().__init__(admission.message, reason=admission.reason)
        self.admission = admission


def hint_policy(cfg: NodeConfig) -> HintPolicy:
    """The hint bounds of a node's config (``ap.hint_max_*``), as the pure policy wants them."""
    ap = cfg.ap
    return HintPolicy(ap.hint_max_per_target, ap.hint_max_bytes, int(ap.hint_max_age_s * NS_PER_S))


class Replica:
    """One node's local copy: merge, read, hint; and the answers to ``replica_get``/``replica_put``."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def handlers(self) -> dict[str, Handler]:
        return {"replica_get": serve(ReplicaGet, self._on_replica_get), "replica_put": serve(ReplicaPut, self._on_replica_put)}

    async def read_local(self, key: str, token: int) -> VersionedObject:
        """This node's knowledge of a key: its data plus any unexpired hints it holds for the key.

        A hint beyond the hint window is never served (the replay loop drops it, counted and
        logged): serving it could bring back a value whose tombstone was reaped meanwhile.
        """
        blob = await self.node.data.get(key, token)
        obj = versions.decode(blob) if blob is not None else VersionedObject.empty()
        if self.node.hint_ledger.total_bytes:
            now_ns = self.node.clock.wall_ns()
            for target in self.node.ring.walk_token(token)[: self.node.n]:
                hint_blob = await self.node.hints.get(hint_storage_key(target, key), token)
                if hint_blob is None:
                    continue
                try:
                    record = HintRecord.decode(hint_blob)
                except HintDecodeError:
                    continue  # dropped (counted) by store_hint or the next startup scan
                if not self.node.hint_ledger.policy.expired(record.created_at_ns, now_ns):
                    obj = versions.sync(obj, record.obj(), self.node.mode)
        return obj

    async def apply_local(self, key: str, token: int, incoming: VersionedObject) -> VersionedObject:
        """Merge an object into this node's data copy of a key (replica write, repair, handoff)."""
        async with self.node.locks.hold(key):
            blob = await self.node.data.get(key, token)
            current = versions.decode(blob) if blob is not None else VersionedObject.empty()
            merged = versions.sync(current, incoming, self.node.mode)
            if merged != current or blob is None:
                await self.node.data.put(key, token, versions.encode(merged))
            return merged

    async def store_hint(self, target: str, key: str, token: int, incoming: VersionedObject) -> None:
        """Keep ``incoming`` as a hint for ``target``, coalesced into the hint already held for the pair.

        Raises ``HintStoreFull`` when the ledger refuses it (count per target, total bytes): the
        replica handler answers an error, so the coordinator does not count this fallback toward
        W.  A hint is never dropped silently at admission.
        """
        hkey = hint_storage_key(target, key)
        async with self.node.locks.hold(hkey):
            now_ns = self.node.clock.wall_ns()
            record = HintRecord(target, key, token, now_ns, versions.encode(incoming))
            current_blob = await self.node.hints.get(hkey, token)
            if current_blob is not None:
                current = self._live_hint_locked(hkey, token, current_blob, now_ns)
                if current is None:
                    await self.node.hints.delete(hkey, token)
                    current_blob = None
                else:
                    record = current.coalesce(record, self.node.mode)
            blob = record.encode()
            replacing = len(current_blob) if current_blob is not None else None
            admission = self.node.hint_ledger.admit(target, len(blob), replacing)
            if not admission.ok:
                self.node.metrics.hints_dropped.labels(reason=str(admission.reason)).inc()
                log.warning("refused a hint for %s key %r: %s", target, key, admission.message)
                raise HintStoreFull(admission)
            try:
                await self.node.hints.put(hkey, token, blob)
            except Exception:
                self.node.hint_ledger.cancel(target, len(blob), replacing)
                raise
        self.node.metrics.hints_stored.labels(target=target).inc()

    def _live_hint_locked(self, hkey: str, token: int, blob: bytes, now_ns: int) -> HintRecord | None:
        """Decode a stored hint; None (ledger released, counted, logged) if corrupt or expired.

        The caller holds the hint's lock and deletes the record when this returns None: an
        expired hint must not be coalesced into a fresh one, which would extend its window.
        """
        try:
            record = HintRecord.decode(blob)
        except HintDecodeError as exc:
            self.node.metrics.hints_dropped.labels(reason="corrupt").inc()
            log.error("dropping an undecodable hint %r: %s", hkey, exc)
            return None  # load_hint_ledger never accounted it
        if self.node.hint_ledger.policy.expired(record.created_at_ns, now_ns):
            self.node.hint_ledger.remove(record.target, len(blob))
            self.node.metrics.hints_dropped.labels(reason="expired").inc()
            log.warning(
                "dropped a hint for %s key %r: older than the hint window; anti-entropy will repair it",
                record.target, record.key,
            )
            return None
        return record

    async def forget_hint(self, record: HintRecord, blob: bytes, reason: str) -> bool:
        """Delete a hint only if the stored record is still ``blob`` (delivered or expired).

        A newer write may have been coalesced into it meanwhile; then it stays.  ``reason``
        "expired" counts and logs the drop.
        """
        hkey = record.storage_key
        async with self.node.locks.hold(hkey):
            if await self.node.hints.get(hkey, record.token) != blob:
                return False
            await self.node.hints.delete(hkey, record.token)
            self.node.hint_ledger.remove(record.target, len(blob))
        if reason == "expired":
            self.node.metrics.hints_dropped.labels(reason="expired").inc()
            log.warning(
                "dropped a hint for %s key %r: older than the hint window; anti-entropy will repair it",
                record.target, record.key,
            )
        return True

    async def load_hint_ledger(self) -> int:
        """Account every stored hint in the ledger (hints survive restarts); returns their count.

        Undecodable records are deleted (counted, logged): they could never be delivered.
        """
        self.node.hint_ledger = HintLedger(hint_policy(self.node.cfg))
        async for page in scan_pages(self.node.hints, TOKEN_MIN, TOKEN_MIN, HINT_SCAN_PAGE):
            for rec in page:
                try:
                    record = HintRecord.decode(rec.blob)
                except HintDecodeError as exc:
                    self.node.metrics.hints_dropped.labels(reason="corrupt").inc()
                    log.error("dropping an undecodable hint %r: %s", rec.key, exc)
                    await self.node.hints.delete(rec.key, rec.token)
                    continue
                self.node.hint_ledger.record_existing(record.target, len(rec.blob))
        return self.node.hint_ledger.total_hints

    async def _on_replica_get(self, sender: str, message: ReplicaGet) -> ReplicaGetReply:
        key, token = message.key, message.token
        obj = await self.read_local(key, token)
        # cp: this key is linearizable; the coordinator refuses the mixed access.
        return ReplicaGetReply(
            versions.encode(obj) if obj.siblings or obj.clock else None, await self.node.holds_register(key, token)
        )

    async def _on_replica_put(self, sender: str, message: ReplicaPut) -> Ok | ErrorReply:
        key, token = message.key, message.token
        incoming = versions.decode(message.obj)
        hint_for = message.hint_for
        node = self.node
        if hint_for and hint_for != node.node_id and node.node_id not in node.ring.walk_token(token)[: node.n]:
            try:
                await self.store_hint(hint_for, key, token, incoming)
            except Overloaded as exc:
                return ErrorReply("overloaded", exc.message)
        else:
            await self.apply_local(key, token, incoming)
        return OK
