"""A kvstore node: coordinator for any key, replica for the keys the ring gives it.

Theory of operation
-------------------
The request paths follow Dynamo (DeCandia et al. 2007, §4.5-4.7) and Riak KV:

**Write.**  The node that receives a client write forwards it to a *primary*
(one of the key's N preference-list members) believed up, unless it is one
itself.  The coordinating primary applies the write to its local copy under a
per-key lock (``versions.update``: a new dotted sibling), persists it, then sends
the resulting object to the other N-1 targets in parallel; it answers once W
targets (itself included) stored it durably.  Coordinating at a replica is what
keeps dots unique: the coordinator holds every dot it ever issued for the key.
For the same reason it can refuse a context claiming more of its own counters than
it issued (a context from before the key's tombstone was reaped would otherwise
supersede the key's new writes: ``causal_context.refuse_unissued``).
The remaining targets complete in the background, bounded.

**Sloppy quorum.**  With ``sloppy`` on, a primary believed down (or failing the
call) is replaced by the next healthy fallback in the ring's order; the fallback
stores the object as a *hint* naming the intended owner, and it counts toward W.
When no primary is reachable at all, the receiving node coordinates as a
fallback, under a fresh one-shot actor id (``node!incarnation.boot.seq``): it
lacks the key's history, so only a never-reused actor keeps the dot unique.  With ``sloppy`` off only primaries count, and a
request that cannot reach W of them fails *before* writing anything.

**Identity.**  A primary issues dots as ``<node_id>.<incarnation>``; the
incarnation is stored in the data store's meta, so a node whose data is lost
(wiped disk, memory store) comes back under a new actor instead of re-issuing
dots the other replicas already hold (Riak's KV-679; see ``kvstore.identity``).
It is loaded in ``start``, before the node serves anything.

**Read.**  Ask the N targets, answer after R replies, merging their objects with
``versions.sync`` (concurrent siblings are all returned).  The rest of the
replies are awaited briefly afterwards for read repair.

**Outcomes.**  A write that reached fewer than W targets answers 503
``quorum_unavailable``; when any target may have stored it, the body says
``indeterminate: true``: the write may still become visible (Jepsen's ``info``).

Everything time- or randomness-dependent comes from the injected ``Clock`` and
``random.Random``; I/O goes through the ``Transport`` and ``Storage`` seams.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kvstore import causal_context, versions
from kvstore.clock import Clock
from kvstore.config import NodeConfig
from kvstore.errors import (
    BadRequest,
    ConsistencyConflict,
    NodeError,
    Overloaded,
    QuorumUnavailable,
    RequestTimeout,
)
from kvstore.hints import (
    NS_PER_S,
    Admission,
    HintDecodeError,
    HintLedger,
    HintPolicy,
    HintRecord,
    hint_storage_key,
)
from kvstore.identity import DataIdentity, open_identity
from kvstore.locks import KeyLocks
from kvstore.metrics import Metrics
from kvstore.quorum import QuorumTracker
from kvstore.ring import TOKEN_MIN, Ring, key_token
from kvstore.storage import StorageBusy
from kvstore.storage.base import Storage, StorageError
from kvstore.transport.base import Message, PeerUnavailable, RemoteError, Transport
from kvstore.versions import VersionedObject

log = logging.getLogger(__name__)

HINT_SCAN_PAGE = 500


@dataclass
class ReadOutcome:
    obj: VersionedObject
    replies: int
    responders: list[str] = field(default_factory=list)


@dataclass
class WriteOutcome:
    obj: VersionedObject
    acknowledged: int
    hinted: list[str] = field(default_factory=list)


class HintStoreFull(Overloaded):
    """A fallback refused a hint (its ledger's count or byte bound): it must not count toward W."""

    def __init__(self, admission: Admission) -> None:
        super().__init__(admission.message, reason=admission.reason)
        self.admission = admission


def hint_policy(cfg: NodeConfig) -> HintPolicy:
    """The hint bounds of a node's config (``ap.hint_max_*``), as the pure policy wants them."""
    ap = cfg.ap
    return HintPolicy(ap.hint_max_per_target, ap.hint_max_bytes, int(ap.hint_max_age_s * NS_PER_S))


class Node:
    def __init__(
        self,
        cfg: NodeConfig,
        *,
        transport: Transport,
        data: Storage,
        hints: Storage,
        paxos: Storage,
        clock: Clock,
        rng: random.Random,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.transport = transport
        self.data = data
        self.hints = hints
        self.hint_ledger = HintLedger(hint_policy(cfg))  # bounds of the hint store, rebuilt at start
        self.paxos_storage = paxos
        self.clock = clock
        self.rng = rng
        self.metrics = metrics or Metrics()
        self.ring = Ring(cfg.member_ids, cfg.vnodes)
        self.n = cfg.replicas
        self.mode: versions.ConflictMode = "lww" if cfg.conflict_mode == "lww" else "siblings"
        self.peers = [m for m in cfg.member_ids if m != self.node_id]
        self.locks = KeyLocks()
        self._fallback_seq = itertools.count(1)
        # A store that may lose acknowledged dots (memory, or no fsync) gets a new incarnation at
        # every start; a durable one keeps its incarnation exactly as long as it keeps its data.
        self.durable_data = cfg.storage == "sqlite" and cfg.fsync != "never"
        self.identity: DataIdentity | None = None  # loaded by start(), before anything is served
        self._background: set[asyncio.Task[Any]] = set()
        self._background_slots = asyncio.Semaphore(cfg.limits.max_background_tasks)
        self._inflight = asyncio.Semaphore(cfg.limits.max_inflight_requests)
        self._loops: list[asyncio.Task[Any]] = []
        self.handlers: dict[str, Callable[[str, Message], Awaitable[Message]]] = {
            "ping": self._on_ping,
            "replica_get": self._on_replica_get,
            "replica_put": self._on_replica_put,
            "coordinate_write": self._on_coordinate_write,
        }
        self.membership = self._make_membership()
        self.extensions: list[Any] = []  # AP/CP components that add handlers and loops

    # --- lifecycle -------------------------------------------------------------------------

    def _make_membership(self) -> Any:
        from kvstore.failure import MembershipView

        return MembershipView(
            self.cfg.member_ids,
            self.node_id,
            threshold=self.cfg.ap.phi_threshold,
            min_sample_interval_ms=self.cfg.ap.heartbeat_interval_ms / 2,
            first_heartbeat_estimate_ms=self.cfg.ap.heartbeat_interval_ms,
        )

    @property
    def actor(self) -> str:
        """The actor of the dots this node issues as a coordinating primary."""
        assert self.identity is not None, "the node issues dots only once started"
        return self.identity.actor(self.node_id)

    async def load_identity(self) -> DataIdentity:
        self.identity = await open_identity(self.data, self.rng, self.durable_data)
        log.info(
            "node %s writes as %s (%s incarnation, boot %d)", self.node_id, self.actor,
            "new" if self.identity.created else "existing", self.identity.boot,
        )
        return self.identity

    async def start(self) -> None:
        await self.load_identity()  # before any write can be coordinated here
        await self.load_hint_ledger()  # before any peer can send a hint
        for ext in self.extensions:  # before any peer can reach us: they load state they guard
            await ext.start()
        await self.transport.start(self.handle_message)
        self._loops.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        self._loops.append(asyncio.create_task(self._loop_lag_monitor(), name="loop-lag"))

    async def stop(self) -> None:
        for ext in reversed(self.extensions):
            with contextlib.suppress(Exception):
                await ext.stop()
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._background:
            await asyncio.wait(list(self._background), timeout=2.0)
        await self.transport.close()
        for store in (self.data, self.hints, self.paxos_storage):
            await store.close()

    async def _loop_lag_monitor(self, interval_s: float = 0.1) -> None:
        """How late the event loop wakes a 100 ms timer: blocking work on the loop shows up here
        (metric ``kvstore_event_loop_lag_seconds``)."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - expected))

    def spawn(self, coro: Awaitable[Any], name: str = "background") -> asyncio.Task[Any] | None:
        """Run ``coro`` in the background if a slot is free; None means the caller must await it."""
        if self._background_slots.locked():
            return None

        async def run() -> None:
            async with self._background_slots:
                try:
                    await coro
                except Exception:
                    log.exception("background task %s failed", name)

        task = asyncio.create_task(run(), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- membership ------------------------------------------------------------------------

    def is_up(self, member: str) -> bool:
        if member == self.node_id:
            return True
        return bool(self.membership.state(member, self.clock.monotonic_ns()) == "up")

    async def _heartbeat_loop(self) -> None:
        """One pinger per peer: a dead peer's timeouts must not delay the others' heartbeats
        (a stretched gap would look like a failure to the phi detector)."""
        pingers = [asyncio.create_task(self._pinger(peer), name=f"ping-{peer}") for peer in self.peers]
        interval_s = self.cfg.ap.heartbeat_interval_ms / 1000.0
        try:
            while True:
                for member, old, new in self.membership.transitions(self.clock.monotonic_ns()):
                    log.warning("failure detector: %s %s -> %s", member, old, new)
                    self.metrics.fd_transitions.labels(member=member, state=new).inc()
                await asyncio.sleep(interval_s)
        finally:
            for task in pingers:
                task.cancel()

    async def _pinger(self, peer: str) -> None:
        interval_s = self.cfg.ap.heartbeat_interval_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            with contextlib.suppress(PeerUnavailable, RemoteError):
                await self.transport.call(peer, {"op": "ping"}, max(0.05, interval_s * 2))
                self.membership.heartbeat(peer, self.clock.monotonic_ns())
            await asyncio.sleep(max(0.0, interval_s - (loop.time() - started)))

    # --- messaging -------------------------------------------------------------------------

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        """Send to a peer, or handle locally when the peer is this node (same code path)."""
        if peer == self.node_id:
            return await self.handle_message(self.node_id, message)
        try:
            reply = await self.transport.call(peer, message, timeout_s)
        except PeerUnavailable as exc:
            self.metrics.replica_errors.labels(peer=peer, reason="unavailable").inc()
            log.debug("call to %s failed: %s", peer, exc)
            raise
        self.membership.heartbeat(peer, self.clock.monotonic_ns())
        return reply

    async def handle_message(self, sender: str, message: Message) -> Message:
        if not isinstance(message, dict):
            return {"error": "bad_request", "message": "an internal message is a map", "remote_error": True}
        op = message.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"error": "unknown_op", "message": f"unknown internal op {op!r}", "remote_error": True}
        try:
            return await handler(sender, message)
        except (KeyError, TypeError, ValueError) as exc:
            # A peer (or a holder of the secret) sent a message missing or mistyping a field:
            # refuse it clearly rather than failing inside the handler.
            log.warning("malformed %s message from %s: %r", op, sender, exc)
            return {"error": "bad_request", "message": f"malformed {op} message: {exc!r}", "remote_error": True}
        except StorageBusy as exc:
            return {"error": "overloaded", "message": str(exc), "remote_error": True}
        except StorageError as exc:
            return {"error": "storage", "message": str(exc), "remote_error": True}

    async def _on_ping(self, sender: str, message: Message) -> Message:
        if sender != self.node_id:
            self.membership.heartbeat(sender, self.clock.monotonic_ns())
        return {"ok": True}

    # --- local replica operations ---------------------------------------------------------

    async def read_local(self, key: str, token: int) -> VersionedObject:
        """This node's knowledge of a key: its data plus any unexpired hints it holds for the key.

        A hint beyond the hint window is never served (the replay loop drops it, counted and
        logged): serving it could bring back a value whose tombstone was reaped meanwhile.
        """
        blob = await self.data.get(key, token)
        obj = versions.decode(blob) if blob is not None else VersionedObject.empty()
        if self.hint_ledger.total_bytes:
            now_ns = self.clock.wall_ns()
            for target in self.ring.walk_token(token)[: self.n]:
                hint_blob = await self.hints.get(hint_storage_key(target, key), token)
                if hint_blob is None:
                    continue
                try:
                    record = HintRecord.decode(hint_blob)
                except HintDecodeError:
                    continue  # dropped (counted) by store_hint or the next startup scan
                if not self.hint_ledger.policy.expired(record.created_at_ns, now_ns):
                    obj = versions.sync(obj, record.obj(), self.mode)
        return obj

    async def apply_local(self, key: str, token: int, incoming: VersionedObject) -> VersionedObject:
        """Merge an object into this node's data copy of a key (replica write, repair, handoff)."""
        async with self.locks.hold(key):
            blob = await self.data.get(key, token)
            current = versions.decode(blob) if blob is not None else VersionedObject.empty()
            merged = versions.sync(current, incoming, self.mode)
            if merged != current or blob is None:
                await self.data.put(key, token, versions.encode(merged))
            return merged

    async def store_hint(self, target: str, key: str, token: int, incoming: VersionedObject) -> None:
        """Keep ``incoming`` as a hint for ``target``, coalesced into the hint already held for the pair.

        Raises ``HintStoreFull`` when the ledger refuses it (count per target, total bytes): the
        replica handler answers an error, so the coordinator does not count this fallback toward
        W.  A hint is never dropped silently at admission.
        """
        hkey = hint_storage_key(target, key)
        async with self.locks.hold(hkey):
            now_ns = self.clock.wall_ns()
            record = HintRecord(target, key, token, now_ns, versions.encode(incoming))
            current_blob = await self.hints.get(hkey, token)
            if current_blob is not None:
                current = self._live_hint_locked(hkey, token, current_blob, now_ns)
                if current is None:
                    await self.hints.delete(hkey, token)
                    current_blob = None
                else:
                    record = current.coalesce(record, self.mode)
            blob = record.encode()
            replacing = len(current_blob) if current_blob is not None else None
            admission = self.hint_ledger.admit(target, len(blob), replacing)
            if not admission.ok:
                self.metrics.hints_dropped.labels(reason=str(admission.reason)).inc()
                log.warning("refused a hint for %s key %r: %s", target, key, admission.message)
                raise HintStoreFull(admission)
            try:
                await self.hints.put(hkey, token, blob)
            except Exception:
                self.hint_ledger.cancel(target, len(blob), replacing)
                raise
        self.metrics.hints_stored.labels(target=target).inc()

    def _live_hint_locked(self, hkey: str, token: int, blob: bytes, now_ns: int) -> HintRecord | None:
        """Decode a stored hint; None (ledger released, counted, logged) if corrupt or expired.

        The caller holds the hint's lock and deletes the record when this returns None: an
        expired hint must not be coalesced into a fresh one, which would extend its window.
        """
        try:
            record = HintRecord.decode(blob)
        except HintDecodeError as exc:
            self.metrics.hints_dropped.labels(reason="corrupt").inc()
            log.error("dropping an undecodable hint %r: %s", hkey, exc)
            return None  # load_hint_ledger never accounted it
        if self.hint_ledger.policy.expired(record.created_at_ns, now_ns):
            self.hint_ledger.remove(record.target, len(blob))
            self.metrics.hints_dropped.labels(reason="expired").inc()
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
        async with self.locks.hold(hkey):
            if await self.hints.get(hkey, record.token) != blob:
                return False
            await self.hints.delete(hkey, record.token)
            self.hint_ledger.remove(record.target, len(blob))
        if reason == "expired":
            self.metrics.hints_dropped.labels(reason="expired").inc()
            log.warning(
                "dropped a hint for %s key %r: older than the hint window; anti-entropy will repair it",
                record.target, record.key,
            )
        return True

    async def load_hint_ledger(self) -> int:
        """Account every stored hint in the ledger (hints survive restarts); returns their count.

        Undecodable records are deleted (counted, logged): they could never be delivered.
        """
        self.hint_ledger = HintLedger(hint_policy(self.cfg))
        after: tuple[int, str] | None = None
        while True:
            page = await self.hints.scan(TOKEN_MIN, TOKEN_MIN, HINT_SCAN_PAGE, after)
            for rec in page:
                try:
                    record = HintRecord.decode(rec.blob)
                except HintDecodeError as exc:
                    self.metrics.hints_dropped.labels(reason="corrupt").inc()
                    log.error("dropping an undecodable hint %r: %s", rec.key, exc)
                    await self.hints.delete(rec.key, rec.token)
                    continue
                self.hint_ledger.record_existing(record.target, len(rec.blob))
            if len(page) < HINT_SCAN_PAGE:
                return self.hint_ledger.total_hints
            after = (page[-1].token, page[-1].key)

    async def _on_replica_get(self, sender: str, message: Message) -> Message:
        key, token = message["key"], int(message["token"])
        obj = await self.read_local(key, token)
        reply: Message = {"obj": versions.encode(obj) if obj.siblings or obj.clock else None}
        if await self._holds_register(key, token):
            reply["cp"] = True  # this key is linearizable: the coordinator refuses the mixed access
        return reply

    async def _holds_register(self, key: str, token: int) -> bool:
        check = getattr(self, "has_register", None)
        return bool(check is not None and await check(key, token))

    async def _on_replica_put(self, sender: str, message: Message) -> Message:
        key, token = message["key"], int(message["token"])
        incoming = versions.decode(message["obj"])
        hint_for = message.get("hint_for")
        if hint_for and hint_for != self.node_id and self.node_id not in self.ring.walk_token(token)[: self.n]:
            try:
                await self.store_hint(hint_for, key, token, incoming)
            except Overloaded as exc:
                return {"error": "overloaded", "message": exc.message, "remote_error": True}
        else:
            await self.apply_local(key, token, incoming)
        return {"ok": True}

    # --- coordinator: writes ---------------------------------------------------------------

    def write_targets(self, key: str, sloppy: bool) -> tuple[list[str], list[str], list[str]]:
        """(primaries believed up, primaries believed down, healthy fallbacks in ring order)."""
        walk = self.ring.walk(key)
        primaries, fallbacks = walk[: self.n], walk[self.n :]
        up = [p for p in primaries if self.is_up(p)]
        down = [p for p in primaries if p not in up]
        spare = [f for f in fallbacks if self.is_up(f)] if sloppy else []
        return up, down, spare

    async def put(
        self,
        key: str,
        value: bytes | None,
        context: dict[str, int],
        w: int,
        sloppy: bool,
        timeout_s: float,
    ) -> WriteOutcome:
        """Client write entry point on any node: forward to a primary or coordinate here."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        up, down, spare = self.write_targets(key, sloppy)
        if not sloppy and len(up) < w:
            raise QuorumUnavailable(w, 0, indeterminate=False, detail=f"primaries believed down: {down}")
        if self.node_id in up:
            return await self.coordinate_write(key, value, context, w, sloppy, deadline, as_fallback=False)
        for primary in up:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self.metrics.forwarded.inc()
            try:
                reply = await self.call(
                    primary,
                    {
                        "op": "coordinate_write", "key": key, "value": value,
                        "context": sorted(context.items()), "w": w, "sloppy": sloppy,
                        "timeout_ms": int(remaining * 1000),
                    },
                    remaining,
                )
            except PeerUnavailable as exc:
                if exc.maybe_delivered:
                    raise QuorumUnavailable(
                        w, 0, indeterminate=True, detail=f"forward to {primary} timed out"
                    ) from None
                continue
            if reply.get("status") == "ok":
                return WriteOutcome(versions.decode(reply["obj"]), int(reply["acknowledged"]), reply.get("hinted", []))
            raise _error_from_body(reply["body"])
        if not sloppy:
            raise QuorumUnavailable(w, 0, indeterminate=False, detail="no primary reachable")
        if not down:
            # Every primary is believed up but none took the forward (nothing was delivered: a
            # maybe-delivered forward raised above), so there is no down primary for this node
            # to stand in for as a fallback: a certain failure, not an indeterminate one.
            if asyncio.get_running_loop().time() >= deadline:
                raise RequestTimeout("the deadline passed before a primary could be asked", indeterminate=False)
            raise QuorumUnavailable(w, 0, indeterminate=False, detail="no primary took the forwarded write")
        return await self.coordinate_write(key, value, context, w, sloppy, deadline, as_fallback=True)

    async def _on_coordinate_write(self, sender: str, message: Message) -> Message:
        deadline = asyncio.get_running_loop().time() + int(message["timeout_ms"]) / 1000.0
        try:
            outcome = await self.coordinate_write(
                message["key"], message["value"], dict(message["context"]), int(message["w"]),
                bool(message["sloppy"]), deadline, as_fallback=False,
            )
        except NodeError as exc:
            return {"status": "error", "body": exc.body(), "http": exc.status}
        return {
            "status": "ok", "obj": versions.encode(outcome.obj),
            "acknowledged": outcome.acknowledged, "hinted": outcome.hinted,
        }

    async def coordinate_write(
        self,
        key: str,
        value: bytes | None,
        context: dict[str, int],
        w: int,
        sloppy: bool,
        deadline: float,
        as_fallback: bool,
    ) -> WriteOutcome:
        loop = asyncio.get_running_loop()
        token = key_token(key)
        up, down, spare = self.write_targets(key, sloppy)
        # Who stores what: primaries believed up store data; each primary believed down is
        # replaced by the next spare fallback, which stores a hint naming it.
        plan: list[tuple[str, str | None]] = [(p, None) for p in up]
        spare_iter = iter([f for f in spare if f != self.node_id])
        if as_fallback:
            assert down, "a fallback coordinates only when a primary is unreachable"
            plan.append((self.node_id, down[0]))
            down = down[1:]
        for owner in down:
            fallback = next(spare_iter, None)
            if fallback is not None:
                plan.append((fallback, owner))
        if len(plan) < w:
            # Refuse before writing anything: this request is a certain failure, not indeterminate.
            raise QuorumUnavailable(w, 0, indeterminate=False, detail=f"only {len(plan)} healthy targets")

        if await self._holds_register(key, token):
            raise ConsistencyConflict(
                "this key is used with consistency=linearizable; an eventual/quorum write would bypass its register"
            )
        tracker = QuorumTracker(needed=w, total=len(plan))
        hinted: list[str] = []
        remote = [(m, hint) for m, hint in plan if m != self.node_id]
        unused_spares = list(spare_iter)
        done = asyncio.Event()
        obj = VersionedObject.empty()
        encoded = b""

        def record(ok: bool, member: str) -> None:
            if tracker.done:
                return  # the answer was already given; this completion is background work
            if ok:
                tracker.ack(member)
            else:
                tracker.fail()
            if tracker.done:
                done.set()

        async def replicate(member: str, hint_for: str | None) -> None:
            message = {"op": "replica_put", "key": key, "token": token, "obj": encoded}
            if hint_for is not None:
                message["hint_for"] = hint_for
            remaining = max(0.001, min(deadline - loop.time(), self.cfg.limits.replica_timeout_ms / 1000.0))
            try:
                await self.call(member, message, remaining)
                ok = True
            except (PeerUnavailable, RemoteError):
                ok = False
            if not ok and sloppy and unused_spares:
                # The primary did not answer in time: hand its copy to the next fallback.
                fallback = unused_spares.pop(0)
                owner = hint_for or member
                try:
                    await self.call(fallback, {**message, "hint_for": owner}, max(0.001, deadline - loop.time()))
                    ok = True
                    member = fallback
                    hinted.append(fallback)
                except (PeerUnavailable, RemoteError):
                    ok = False
            elif ok and hint_for is not None:
                hinted.append(member)
            record(ok, member)

        tasks: list[asyncio.Task[Any]] = []
        if as_fallback:
            assert self.identity is not None
            actor = self.identity.fallback_actor(self.node_id, next(self._fallback_seq))
            async with self.locks.hold(key):
                base = await self.read_local(key, token)
                obj = versions.update(base, context, actor, value, self.clock.wall_ns(), self.mode)
                encoded = versions.encode(obj)
                await self.store_hint(_hint_owner(plan, self.node_id), key, token, obj)
            hinted.append(self.node_id)
            record(True, self.node_id)
            tasks = [asyncio.create_task(replicate(m, h)) for m, h in remote]
        else:
            async with self.locks.hold(key):
                blob = await self.data.get(key, token)
                base = versions.decode(blob) if blob is not None else VersionedObject.empty()
                try:
                    # Its own counters it can check exactly: see causal_context.refuse_unissued.
                    causal_context.refuse_unissued(context, self.actor, base.vector())
                except causal_context.BadContext as exc:
                    raise BadRequest("bad_context", str(exc)) from None
                obj = versions.update(base, context, self.actor, value, self.clock.wall_ns(), self.mode)
                encoded = versions.encode(obj)
                # Durable here *before* any replica sees the new dot.  Replicating in parallel with
                # this fsync would save a group-commit wait, but a crash in between would leave the
                # dot on replicas and not here: after the restart this node would issue the same
                # dot for another value, and a sync would silently keep only one of the two
                # (Riak's KV-679).  Measured and reverted for that reason (docs/benchmarks.md).
                await self.data.put(key, token, encoded)
            record(True, self.node_id)
            tasks = [asyncio.create_task(replicate(m, h)) for m, h in remote]

        if not done.is_set() and not tracker.done and tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), max(0.0, deadline - loop.time()))
        pending = [t for t in tasks if not t.done()]
        if pending:
            self._adopt(pending)
        if not tracker.satisfied:
            # Some target (the coordinator or a replica) may hold the write: indeterminate.
            raise QuorumUnavailable(
                w, tracker.acknowledged, indeterminate=True,
                detail="targets: " + ", ".join(m for m, _ in plan),
            )
        return WriteOutcome(obj, tracker.acknowledged, hinted)

    def _adopt(self, tasks: Iterable[asyncio.Task[Any]]) -> None:
        """Let replica writes still in flight finish after the reply (bounded: cancelled at stop)."""
        for task in tasks:
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # --- coordinator: reads ----------------------------------------------------------------

    def read_targets(self, key: str, sloppy: bool) -> list[str]:
        walk = self.ring.walk(key)
        primaries = [p for p in walk[: self.n] if self.is_up(p)]
        if sloppy and len(primaries) < self.n:
            extra = [f for f in walk[self.n :] if self.is_up(f)]
            primaries += extra[: self.n - len(primaries)]
        return primaries

    async def get(self, key: str, r: int, sloppy: bool, timeout_s: float) -> ReadOutcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        token = key_token(key)
        targets = self.read_targets(key, sloppy)
        if len(targets) < r:
            raise QuorumUnavailable(r, 0, indeterminate=False, detail="not enough replicas believed up")
        tracker = QuorumTracker(needed=r, total=len(targets))
        replies: dict[str, VersionedObject | None] = {}
        done = asyncio.Event()

        async def ask(member: str) -> None:
            remaining = max(0.001, min(deadline - loop.time(), self.cfg.limits.replica_timeout_ms / 1000.0))
            try:
                reply = await self.call(member, {"op": "replica_get", "key": key, "token": token}, remaining)
            except (PeerUnavailable, RemoteError):
                if not tracker.done:
                    tracker.fail()
                    if tracker.done:
                        done.set()
                return
            replies[member] = versions.decode(reply["obj"]) if reply.get("obj") is not None else None
            if reply.get("cp"):
                mixed.append(member)
            if not tracker.done:
                tracker.ack(member)
                if tracker.done:
                    done.set()

        mixed: list[str] = []
        tasks = [asyncio.create_task(ask(m)) for m in targets]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), max(0.0, deadline - loop.time()))
        if mixed:
            raise ConsistencyConflict(
                "this key is used with consistency=linearizable; read it with consistency=linearizable"
            )
        if not tracker.satisfied:
            for t in tasks:
                t.cancel()
            raise QuorumUnavailable(r, tracker.acknowledged, indeterminate=False)
        first = dict(replies)
        merged = versions.sync_all((o for o in first.values() if o is not None), self.mode)
        repair = self.read_repair
        if repair is not None:
            await repair(key, token, targets, tasks, replies, merged, deadline)
        else:
            self._adopt(t for t in tasks if not t.done())
        return ReadOutcome(merged, tracker.acknowledged, list(first))

    # Set by the AP machinery: called after R replies with the outstanding asks.
    read_repair: Callable[..., Awaitable[None]] | None = None


def _hint_owner(plan: list[tuple[str, str | None]], node_id: str) -> str:
    for member, owner in plan:
        if member == node_id and owner is not None:
            return owner
    raise AssertionError("fallback coordinator without a hint slot")


def _error_from_body(body: dict[str, Any]) -> NodeError:
    code = body.get("error")
    if code == "quorum_unavailable":
        return QuorumUnavailable(
            int(body.get("needed", 0)), int(body.get("acknowledged", 0)), bool(body.get("indeterminate", True))
        )
    if code == "overloaded":
        return Overloaded(str(body.get("message", "")))
    if code == "consistency_conflict":
        return ConsistencyConflict(str(body.get("message", "")))
    if code == "bad_context":
        return BadRequest("bad_context", str(body.get("message", "")))
    err = NodeError(str(body.get("message", "")))
    err.code = str(code)
    err.status = 503
    return err
