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

**Faults of one node's disk.**  The coordinator's own durable write comes first,
before any replica sees the new dot.  If its disk refuses it (``StorageFull``),
the write was certainly not applied anywhere: the coordinator answers 507
``insufficient_storage`` with ``indeterminate: false``, and a node that forwarded
the write to it (or that is itself that coordinator) fails over to the next
primary believed up.  Any other storage error after the write was issued may
have left it on disk: 503 ``storage_unavailable``, ``indeterminate: true``.

**Deadlines.**  Every await on a request's path ends at the request deadline
(``timeout_ms``): remote calls through the transport's timeout, the coordinator's
own read-modify-write (lock, read, durable write) and local calls by waiting for
them at most until then.  Work still running at the deadline is never cut
half-way (a storage write handed to the engine lands regardless); it finishes in
the background and the answer is 503 ``timeout`` -- ``indeterminate: true`` once
the durable write was issued, ``false`` while it was still waiting for the key's
lock or read.

**Collaborators.**  The mechanisms that keep replicas converging and the CP side are not
part of this class: hinted handoff (``kvstore.handoff``), read repair
(``kvstore.read_repair``), anti-entropy (``kvstore.anti_entropy``), the tombstone reaper
(``kvstore.reaper``) and the linearizable register (``kvstore.cp_node``).  The node receives
them as one ``NodeParts`` from ``kvstore.assembly.assemble_node`` (the one place that builds
a node, for the server and the simulator alike); its table of internal message handlers is
its own handlers plus theirs, and it starts and stops them with itself.

Everything time- or randomness-dependent comes from the injected ``Clock`` and
``random.Random``: every deadline and elapsed time is a reading of ``clock.monotonic_ns``
(``now_s``), every wait an asyncio sleep or timeout (in the simulator the event loop's time
*is* that clock).  I/O goes through the ``Transport`` and ``Storage`` seams.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvstore import causal_context, versions
from kvstore.clock import Clock
from kvstore.config import NodeConfig
from kvstore.errors import (
    BadRequest,
    ConsistencyConflict,
    InsufficientStorage,
    NodeError,
    Overloaded,
    QuorumUnavailable,
    RequestTimeout,
    StorageUnavailable,
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
from kvstore.membership import STALE_CONFIG, Address, ClusterConfig, Placement, fence, write_quorum_reached
from kvstore.metrics import Metrics
from kvstore.quorum import QuorumTracker
from kvstore.ring import TOKEN_MIN, Ring, key_token
from kvstore.storage import StorageBusy, StorageFull
from kvstore.storage.base import Storage, StorageError
from kvstore.transport.base import Handler, Message, PeerUnavailable, RemoteError, Transport
from kvstore.versions import VersionedObject

if TYPE_CHECKING:  # the collaborators' modules import this one; assembly.py imports them all
    from kvstore.anti_entropy import AntiEntropy
    from kvstore.cp_node import LinearizableRegister
    from kvstore.handoff import HintedHandoff
    from kvstore.read_repair import ReadRepair
    from kvstore.reaper import TombstoneReaper
    from kvstore.reconfig import Reconfiguration

log = logging.getLogger(__name__)

HINT_SCAN_PAGE = 500
# Requests stamped with an older configuration version than the receiver's are refused
# (``stale_config``): they were planned on a placement that no longer holds.
FENCED_OPS = frozenset(
    {"replica_put", "replica_get", "coordinate_write", "paxos_prepare", "paxos_accept", "cp_propose"}
)
# A forwarded request gets this much less time than the forwarder, so the coordinator's own typed
# answer (e.g. a timeout with ``indeterminate``) can arrive before the forwarder's call times out.
FORWARD_MARGIN_MS = 20


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


@dataclass
class _LocalWrite:
    """How far the coordinator's own read-modify-write got (set by the step itself)."""

    writing: bool = False  # the durable write was handed to storage: it may land


class HintStoreFull(Overloaded):
    """A fallback refused a hint (its ledger's count or byte bound): it must not count toward W."""

    def __init__(self, admission: Admission) -> None:
        super().__init__(admission.message, reason=admission.reason)
        self.admission = admission


class Mechanism(Protocol):
    """What a node asks of each collaborator: the internal messages it answers, and a lifecycle."""

    def handlers(self) -> Mapping[str, Handler]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class NodeParts:
    """A node's collaborators (built by ``kvstore.assembly``), each given the node it serves."""

    handoff: HintedHandoff
    read_repair: ReadRepair
    anti_entropy: AntiEntropy
    reaper: TombstoneReaper
    register: LinearizableRegister
    reconfig: Reconfiguration

    def mechanisms(self) -> tuple[Mechanism, ...]:
        """In start order (``Node.stop`` stops them in reverse).  All of them start before the
        node's transport does, so the state they guard (the register's keys, the acceptor's
        identity) is loaded before any peer can reach them."""
        return (self.handoff, self.read_repair, self.anti_entropy, self.reaper, self.register, self.reconfig)


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
        parts: Callable[[Node], NodeParts],
    ) -> None:
        """``parts`` builds the collaborators for this node (they need it: its stores, its calls);
        it is called once, when every other field is set, and the handler table is built from
        the node's own handlers and theirs."""
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
        # The membership in force (kvstore.membership): version 0 is the TOML's member list; a
        # newer one is loaded at start (kvstore.reconfig) or learnt from a peer.  ``ring`` is the
        # placement's read ring (the old one while a range moves).
        self.config = ClusterConfig.initial(
            {m.id: Address(m.host, m.http_port, m.peer_port) for m in cfg.members}
        )
        self.placement = Placement(self.config, cfg.replicas, cfg.vnodes)
        self.ring: Ring = self.placement.read_ring
        self.n = cfg.replicas
        self.mode: versions.ConflictMode = "lww" if cfg.conflict_mode == "lww" else "siblings"
        self.peers = [m for m in cfg.member_ids if m != self.node_id]
        self.locks = KeyLocks()
        self._fallback_seq = itertools.count(1)
        # A store that may lose acknowledged dots (memory, or no fsync) gets a new incarnation at
        # every start; a durable one keeps its incarnation exactly as long as it keeps its data.
        # The store says which it is (its config could not speak for a simulator's disk).
        self.durable_data = data.durable
        self.identity: DataIdentity | None = None  # loaded by start(), before anything is served
        # A dict, not a set: iterated in insertion order (a set of tasks iterates by id).
        self._background: dict[asyncio.Task[Any], None] = {}
        self._background_slots = asyncio.Semaphore(cfg.limits.max_background_tasks)
        self._inflight = asyncio.Semaphore(cfg.limits.max_inflight_requests)
        self._loops: list[asyncio.Task[Any]] = []
        self.membership = self._make_membership()
        self.parts = parts(self)
        self.handlers: dict[str, Handler] = {
            "ping": self._on_ping,
            "replica_get": self._on_replica_get,
            "replica_put": self._on_replica_put,
            "coordinate_write": self._on_coordinate_write,
        }
        for mechanism in self.parts.mechanisms():
            for op, handler in mechanism.handlers().items():
                assert op not in self.handlers, f"two handlers for the internal op {op!r}"
                self.handlers[op] = handler

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
        for mechanism in self.parts.mechanisms():  # before any peer can reach us: they load state they guard
            await mechanism.start()
        await self.transport.start(self.handle_message)
        self._loops.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        self._loops.append(asyncio.create_task(self._loop_lag_monitor(), name="loop-lag"))

    async def stop(self) -> None:
        for mechanism in reversed(self.parts.mechanisms()):
            with contextlib.suppress(Exception):
                await mechanism.stop()
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
        self._track(task)
        return task

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._background[task] = None
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Task[Any]) -> None:
        self._background.pop(task, None)

    def now_s(self) -> float:
        """The injected clock's monotonic reading in seconds: the frame of every deadline here."""
        return self.clock.monotonic_ns() / NS_PER_S

    # --- membership ------------------------------------------------------------------------

    def install_config(self, config: ClusterConfig) -> None:
        """Switch to a newer membership version (kvstore.reconfig decides when; it persists it first)."""
        assert config.version > self.config.version, "configurations only move forward"
        self.config = config
        self.placement = Placement(config, self.n, self.cfg.vnodes)
        self.ring = self.placement.read_ring
        self.peers = [m for m in config.members if m != self.node_id]
        self.membership.set_members(config.members)
        self.transport.add_peers({m: (a.host, a.peer_port, a.http_port) for m, a in config.addresses})
        self.parts.register.proposer.forget_fast_path()  # a key's acceptor sets may have changed
        recovery = self.parts.register.recovery  # newcomers may register their acceptor's identity
        recovery.members = list(config.members)
        recovery.peers = list(self.peers)
        log.warning("node %s installed membership version %d (%s: %s -> %s)", self.node_id, config.version,
                    config.phase, list(config.old), list(config.new))

    def is_up(self, member: str) -> bool:
        if member == self.node_id:
            return True
        if member not in self.membership.members:
            return False  # no longer (or not yet) a member here
        return bool(self.membership.state(member, self.clock.monotonic_ns()) == "up")

    async def _heartbeat_loop(self) -> None:
        """One pinger per peer: a dead peer's timeouts must not delay the others' heartbeats
        (a stretched gap would look like a failure to the phi detector)."""
        pingers: dict[str, asyncio.Task[None]] = {}
        interval_s = self.cfg.ap.heartbeat_interval_ms / 1000.0
        try:
            while True:
                # The peers change with the membership: start and stop pingers to match.
                for peer in self.peers:
                    if peer not in pingers:
                        pingers[peer] = asyncio.create_task(self._pinger(peer), name=f"ping-{peer}")
                for peer in [p for p in pingers if p not in self.peers]:
                    pingers.pop(peer).cancel()
                for member, old, new in self.membership.transitions(self.clock.monotonic_ns()):
                    log.warning("failure detector: %s %s -> %s", member, old, new)
                    self.metrics.fd_transitions.labels(member=member, state=new).inc()
                await asyncio.sleep(interval_s)
        finally:
            for task in pingers.values():
                task.cancel()

    async def _pinger(self, peer: str) -> None:
        interval_s = self.cfg.ap.heartbeat_interval_ms / 1000.0
        while True:
            started_s = self.now_s()
            with contextlib.suppress(PeerUnavailable, RemoteError):
                reply = await self.transport.call(
                    peer, {"op": "ping", "cv": self.config.version}, max(0.05, interval_s * 2)
                )
                if peer in self.membership.members:
                    self.membership.heartbeat(peer, self.clock.monotonic_ns())
                self._gossip(peer, reply)
            await asyncio.sleep(max(0.0, interval_s - (self.now_s() - started_s)))

    # --- messaging -------------------------------------------------------------------------

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        """Send to a peer, or handle locally when the peer is this node (same code path).

        A local call behaves as a remote one does: an error reply raises ``RemoteError``, and a
        handler still running after ``timeout_s`` raises ``PeerUnavailable`` (maybe delivered)
        while it finishes in the background -- a slow local disk must not hold the caller.
        """
        if "cv" not in message:  # the version this message was planned on (see FENCED_OPS)
            message = {**message, "cv": self.config.version}
        if peer == self.node_id:
            work = asyncio.ensure_future(self.handle_message(self.node_id, message))
            try:
                reply = await asyncio.wait_for(asyncio.shield(work), max(0.0, timeout_s))
            except TimeoutError:
                self._adopt([work])
                raise PeerUnavailable(peer, "timeout (local handler)", maybe_delivered=True) from None
            except asyncio.CancelledError:
                self._adopt([work])  # the caller gave up; the handler finishes, as a remote one would
                raise
            if isinstance(reply, dict) and reply.get("remote_error"):
                raise RemoteError(peer, str(reply.get("error")), str(reply.get("message", "")))
            return reply
        try:
            reply = await self.transport.call(peer, message, timeout_s)
        except PeerUnavailable as exc:
            self.metrics.replica_errors.labels(peer=peer, reason="unavailable").inc()
            log.debug("call to %s failed: %s", peer, exc)
            raise
        except RemoteError as exc:
            if exc.code == STALE_CONFIG:
                self.parts.reconfig.learn_from(peer)  # it knows a newer membership: fetch it
            raise
        if peer in self.membership.members:
            self.membership.heartbeat(peer, self.clock.monotonic_ns())
        self._gossip(peer, reply)
        return reply

    def _gossip(self, peer: str, reply: Any) -> None:
        """A reply stamped with a newer configuration version makes this node fetch it."""
        version = reply.get("cv") if isinstance(reply, dict) else None
        if isinstance(version, int) and version > self.config.version:
            self.parts.reconfig.learn_from(peer)

    async def handle_message(self, sender: str, message: Message) -> Message:
        if not isinstance(message, dict):
            return {"error": "bad_request", "message": "an internal message is a map", "remote_error": True}
        op = message.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"error": "unknown_op", "message": f"unknown internal op {op!r}", "remote_error": True}
        version = message.get("cv")
        if isinstance(version, int) and sender != self.node_id:
            verdict = fence(version, self.config.version)
            if verdict == "newer":
                self.parts.reconfig.learn_from(sender)
            elif verdict == "stale" and op in FENCED_OPS:
                return {
                    "error": STALE_CONFIG, "remote_error": True, "cv": self.config.version,
                    "message": f"{op} planned on membership version {version}; {self.node_id} is at "
                    f"{self.config.version}",
                }
        elif isinstance(version, int) and op in FENCED_OPS and version < self.config.version:
            # Our own request, planned before we installed a newer version: refuse it the same way.
            return {"error": STALE_CONFIG, "remote_error": True, "cv": self.config.version,
                    "message": f"{op} planned on membership version {version}, now {self.config.version}"}
        try:
            return await handler(sender, message)
        except (KeyError, TypeError, ValueError) as exc:
            # A peer (or a holder of the secret) sent a message missing or mistyping a field:
            # refuse it clearly rather than failing inside the handler.
            log.warning("malformed %s message from %s: %r", op, sender, exc)
            return {"error": "bad_request", "message": f"malformed {op} message: {exc!r}", "remote_error": True}
        except StorageBusy as exc:
            return {"error": "overloaded", "message": str(exc), "remote_error": True}
        except StorageFull as exc:
            return {"error": "insufficient_storage", "message": str(exc), "remote_error": True}
        except StorageError as exc:
            return {"error": "storage", "message": str(exc), "remote_error": True}

    async def _on_ping(self, sender: str, message: Message) -> Message:
        if sender != self.node_id:
            # A non-member's ping raises UnknownMember (the HTTP route answers 400 unknown_member);
            # a member removed by a change learns it from the change's announcement instead.
            self.membership.heartbeat(sender, self.clock.monotonic_ns())
        return {"ok": True, "cv": self.config.version}  # cv: the pinger fetches a newer membership

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
        return await self.parts.register.has_register(key, token)

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
        """Client write entry point on any node: coordinate here if a primary, else forward to one.

        A primary that certainly refused (its own disk refused the write before any replica saw
        it: ``_refused_before_replicating``) is replaced by the next primary believed up; any
        answer that may mean "applied" ends the request (no hidden second attempt).
        """
        deadline = self.now_s() + timeout_s
        up, down, spare = self.write_targets(key, sloppy)
        if not sloppy and len(up) < w:
            raise QuorumUnavailable(w, 0, indeterminate=False, detail=f"primaries believed down: {down}")
        refusals: list[NodeError] = []
        candidates = ([self.node_id] if self.node_id in up else []) + [p for p in up if p != self.node_id]
        for primary in candidates:
            remaining = deadline - self.now_s()
            if remaining <= 0:
                break
            try:
                if primary == self.node_id:
                    return await self.coordinate_write(key, value, context, w, sloppy, deadline, as_fallback=False)
                outcome = await self._forward_write(primary, key, value, context, w, sloppy, remaining)
            except NodeError as exc:
                if not _refused_before_replicating(exc):
                    raise
                # Counted, not logged per write: a full disk refuses every write, and its own node logs it.
                self.metrics.replica_errors.labels(peer=primary, reason=exc.code).inc()
                log.debug("primary %s refused a write of %r (%s); trying the next primary", primary, key, exc.message)
                refusals.append(exc)
                continue
            if outcome is not None:
                return outcome
        if refusals:
            raise refusals[0]  # every primary tried refused for certain: nothing was applied
        if not sloppy:
            raise QuorumUnavailable(w, 0, indeterminate=False, detail="no primary reachable")
        if not self.write_targets(key, sloppy)[1]:
            # Every primary is still believed up but none took the forwarded write (a forward that
            # may have been delivered raised above): there is no down primary for this node to
            # stand in for as a fallback.  Nothing was written: a certain failure.
            if self.now_s() >= deadline:
                raise RequestTimeout("the deadline passed before a primary could be asked", indeterminate=False)
            raise QuorumUnavailable(w, 0, indeterminate=False, detail="no primary took the forwarded write")
        return await self.coordinate_write(key, value, context, w, sloppy, deadline, as_fallback=True)

    async def _forward_write(
        self,
        primary: str,
        key: str,
        value: bytes | None,
        context: dict[str, int],
        w: int,
        sloppy: bool,
        remaining: float,
    ) -> WriteOutcome | None:
        """Ask ``primary`` to coordinate the write.  None: it certainly never received it.

        Raises the primary's typed error (same status and body), or 503 ``quorum_unavailable``
        with ``indeterminate: true`` when the request may have reached it without an answer."""
        self.metrics.forwarded.inc()
        message = {
            "op": "coordinate_write", "key": key, "value": value,
            "context": sorted(context.items()), "w": w, "sloppy": sloppy,
            "timeout_ms": max(1, int(remaining * 1000) - FORWARD_MARGIN_MS),
        }
        try:
            reply = await self.call(primary, message, remaining)
        except PeerUnavailable as exc:
            if exc.maybe_delivered:
                raise QuorumUnavailable(
                    w, 0, indeterminate=True, detail=f"forward to {primary} timed out"
                ) from None
            return None
        except RemoteError as exc:
            raise _error_from_remote(exc, w) from None
        if reply.get("status") == "ok":
            return WriteOutcome(versions.decode(reply["obj"]), int(reply["acknowledged"]), reply.get("hinted", []))
        raise _error_from_body(reply["body"], reply.get("http"))

    async def _on_coordinate_write(self, sender: str, message: Message) -> Message:
        deadline = self.now_s() + int(message["timeout_ms"]) / 1000.0
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
        token = key_token(key)
        version, placement = self.config.version, self.placement  # every replica call is stamped with it
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
        # While a range moves (joint phase) the key's new owners get the write too, and it needs W
        # acknowledgements among them as well as among the old ones (membership.write_quorum_reached):
        # it then survives the commit whatever the transfer missed.
        old_owners = placement.old_owners(token)
        new_owners = placement.new_owners(token) if placement.joint else old_owners
        plan += [(m, None) for m in new_owners if m not in old_owners and m != self.node_id]
        tracker = QuorumTracker(needed=w, total=len(plan))
        owners_acked: set[str] = set()
        calls_left = [len(plan)]
        hinted: list[str] = []
        remote = [(m, hint) for m, hint in plan if m != self.node_id]
        unused_spares = list(spare_iter)
        done = asyncio.Event()
        obj = VersionedObject.empty()
        encoded = b""

        def satisfied() -> bool:
            if not placement.joint:
                return tracker.satisfied
            return tracker.satisfied and write_quorum_reached(owners_acked, old_owners, new_owners, w)

        def record(ok: bool, member: str, owner: str | None = None) -> None:
            if done.is_set():
                return  # the answer was already given; this completion is background work
            calls_left[0] -= 1
            if ok:
                tracker.ack(member)
                owners_acked.add(owner or member)
            else:
                tracker.fail()
            if satisfied() or tracker.impossible or calls_left[0] <= 0:
                done.set()

        async def replicate(member: str, hint_for: str | None) -> None:
            message = {"op": "replica_put", "key": key, "token": token, "obj": encoded, "cv": version}
            if hint_for is not None:
                message["hint_for"] = hint_for
            remaining = max(0.001, min(deadline - self.now_s(), self.cfg.limits.replica_timeout_ms / 1000.0))
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
                    await self.call(fallback, {**message, "hint_for": owner}, max(0.001, deadline - self.now_s()))
                    ok = True
                    hint_for = owner
                    member = fallback
                    hinted.append(fallback)
                except (PeerUnavailable, RemoteError):
                    ok = False
            elif ok and hint_for is not None:
                hinted.append(member)
            record(ok, member, hint_for)

        tasks: list[asyncio.Task[Any]] = []
        if as_fallback:
            assert self.identity is not None
            actor = self.identity.fallback_actor(self.node_id, next(self._fallback_seq))

            async def local_step(progress: _LocalWrite) -> VersionedObject:
                async with self.locks.hold(key):
                    base = await self.read_local(key, token)
                    updated = versions.update(base, context, actor, value, self.clock.wall_ns(), self.mode)
                    progress.writing = True
                    await self.store_hint(_hint_owner(plan, self.node_id), key, token, updated)
                return updated

            obj = await self._local_write_by(deadline, local_step)
            encoded = versions.encode(obj)
            hinted.append(self.node_id)
        else:

            async def local_step(progress: _LocalWrite) -> VersionedObject:
                async with self.locks.hold(key):
                    blob = await self.data.get(key, token)
                    base = versions.decode(blob) if blob is not None else VersionedObject.empty()
                    try:
                        # Its own counters it can check exactly: see causal_context.refuse_unissued.
                        causal_context.refuse_unissued(context, self.actor, base.vector())
                    except causal_context.BadContext as exc:
                        raise BadRequest("bad_context", str(exc)) from None
                    updated = versions.update(base, context, self.actor, value, self.clock.wall_ns(), self.mode)
                    # Durable here *before* any replica sees the new dot.  Replicating in parallel
                    # with this fsync would save a group-commit wait, but a crash in between would
                    # leave the dot on replicas and not here: after the restart this node would
                    # issue the same dot for another value, and a sync would silently keep only one
                    # of the two (Riak's KV-679).  Measured and reverted for that reason
                    # (docs/benchmarks.md).
                    progress.writing = True
                    await self.data.put(key, token, versions.encode(updated))
                return updated

            obj = await self._local_write_by(deadline, local_step)
            encoded = versions.encode(obj)
        record(True, self.node_id, _hint_owner(plan, self.node_id) if as_fallback else None)
        tasks = [asyncio.create_task(replicate(m, h)) for m, h in remote]

        if not done.is_set() and tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), max(0.0, deadline - self.now_s()))
        pending = [t for t in tasks if not t.done()]
        if pending:
            self._adopt(pending)
        if not satisfied():
            # Some target (the coordinator or a replica) may hold the write: indeterminate.
            raise QuorumUnavailable(
                w, tracker.acknowledged, indeterminate=True,
                detail="targets: " + ", ".join(m for m, _ in plan),
            )
        return WriteOutcome(obj, tracker.acknowledged, hinted)

    async def _local_write_by(
        self, deadline: float, step: Callable[[_LocalWrite], Awaitable[VersionedObject]]
    ) -> VersionedObject:
        """Run the coordinator's own read-modify-write of a key; answer by ``deadline`` at the latest.

        The step runs in its own task, so giving up at the deadline never interrupts it half-way:
        a write already handed to storage finishes in the background (and is then indeterminate);
        one still waiting for the key's lock or read is cancelled (certainly not applied).
        Storage errors become typed answers: a full disk is a certain refusal (507), anything
        else after the write was issued is indeterminate.
        """
        progress = _LocalWrite()
        task = asyncio.ensure_future(step(progress))
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - self.now_s()))
        except asyncio.CancelledError:
            self._abandon(task, progress)
            raise
        if not done:
            self._abandon(task, progress)
            if progress.writing:
                raise RequestTimeout(
                    f"{self.node_id}'s durable write did not finish within timeout_ms (slow disk); "
                    "it may still land and then spread to the other replicas", indeterminate=True,
                )
            raise RequestTimeout(
                f"{self.node_id} could not start the write within timeout_ms (the key is busy or its "
                "storage is slow); it was not applied", indeterminate=False,
            )
        try:
            return task.result()
        except StorageFull as exc:
            raise InsufficientStorage(
                f"{self.node_id}: disk full; the write was refused before any replica saw it ({exc})",
                indeterminate=False,
            ) from None
        except StorageBusy as exc:
            raise Overloaded(f"{self.node_id}: {exc}; retry later", indeterminate=False) from None
        except StorageError as exc:
            raise StorageUnavailable(f"{self.node_id}: storage error: {exc}", indeterminate=progress.writing) from None

    def _abandon(self, task: asyncio.Task[VersionedObject], progress: _LocalWrite) -> None:
        """Stop waiting for a local step: cancel it if it wrote nothing yet, else let it land."""
        if not progress.writing:
            task.cancel()
        task.add_done_callback(_consume_outcome)
        self._adopt([task])

    def _adopt(self, tasks: Iterable[asyncio.Task[Any]]) -> None:
        """Let replica writes still in flight finish after the reply (bounded: cancelled at stop)."""
        for task in tasks:
            self._track(task)

    # --- coordinator: reads ----------------------------------------------------------------

    def read_targets(self, key: str, sloppy: bool) -> list[str]:
        walk = self.ring.walk(key)
        primaries = [p for p in walk[: self.n] if self.is_up(p)]
        if sloppy and len(primaries) < self.n:
            extra = [f for f in walk[self.n :] if self.is_up(f)]
            primaries += extra[: self.n - len(primaries)]
        return primaries

    async def get(self, key: str, r: int, sloppy: bool, timeout_s: float) -> ReadOutcome:
        deadline = self.now_s() + timeout_s
        token = key_token(key)
        version = self.config.version  # a replica that installed a newer placement refuses the read
        targets = self.read_targets(key, sloppy)
        if len(targets) < r:
            raise QuorumUnavailable(r, 0, indeterminate=False, detail="not enough replicas believed up")
        tracker = QuorumTracker(needed=r, total=len(targets))
        replies: dict[str, VersionedObject | None] = {}
        done = asyncio.Event()

        async def ask(member: str) -> None:
            remaining = max(0.001, min(deadline - self.now_s(), self.cfg.limits.replica_timeout_ms / 1000.0))
            try:
                reply = await self.call(
                    member, {"op": "replica_get", "key": key, "token": token, "cv": version}, remaining
                )
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
            await asyncio.wait_for(done.wait(), max(0.0, deadline - self.now_s()))
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
        await self.parts.read_repair.after_read(key, token, targets, tasks, replies, merged, deadline)
        return ReadOutcome(merged, tracker.acknowledged, list(first))


def _hint_owner(plan: list[tuple[str, str | None]], node_id: str) -> str:
    for member, owner in plan:
        if member == node_id and owner is not None:
            return owner
    raise AssertionError("fallback coordinator without a hint slot")


def _error_from_body(body: dict[str, Any], http_status: Any = None) -> NodeError:
    """The typed error a peer answered (a forwarded write or proposal), with its status and body."""
    code = str(body.get("error") or "internal")
    message = str(body.get("message", ""))
    err: NodeError
    if code == "quorum_unavailable":
        err = QuorumUnavailable(
            int(body.get("needed", 0)), int(body.get("acknowledged", 0)), bool(body.get("indeterminate", True))
        )
    elif code == "overloaded":
        err = Overloaded(message)
    elif code == "consistency_conflict":
        err = ConsistencyConflict(message)
    elif code == "bad_context":
        err = BadRequest("bad_context", message)
    else:
        err = NodeError(message)
        err.code = code
        err.status = 503
    # Pass the peer's answer on as it was: its message (with details) and every field of its body.
    err.message = message
    err.extra = {k: v for k, v in body.items() if k not in ("error", "message")}
    if isinstance(http_status, int) and 400 <= http_status <= 599:
        err.status = http_status
    return err


# RemoteError codes that a peer answers before doing anything (the request was not applied).
_REFUSED_REMOTE_CODES = ("bad_request", "unknown_op", "overloaded", "insufficient_storage")


def _error_from_remote(exc: RemoteError, needed: int) -> NodeError:
    """A peer's handler failed outside its typed answers (``RemoteError``): say what is known."""
    if exc.code == "insufficient_storage":
        return InsufficientStorage(f"{exc.peer}: {exc.message}", indeterminate=False)
    if exc.code == "overloaded":
        return Overloaded(f"{exc.peer}: {exc.message}; retry later", indeterminate=False)
    detail = f"{exc.peer} answered {exc.code}: {exc.message}"
    # A refused message was not applied; any other failure (a storage error, a bug) may have been.
    return QuorumUnavailable(needed, 0, indeterminate=exc.code not in _REFUSED_REMOTE_CODES, detail=detail)


def _refused_before_replicating(exc: NodeError) -> bool:
    """The coordinator's own disk refused the write before any replica saw it: nothing was
    applied anywhere, and another primary (another disk) may well succeed."""
    return exc.code in ("insufficient_storage", "storage_unavailable") and exc.extra.get("indeterminate") is False


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    # An abandoned local step that fails later must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()
