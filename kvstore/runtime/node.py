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
dots the other replicas already hold (Riak's KV-679; see ``kvstore.runtime.identity``).
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

**Coordinator cores.**  Every decision of a coordinated write or read -- the sloppy-quorum
plan and its stand-ins, the W/R arithmetic, the local read-modify-write, the sibling merge,
which replicas read repair brings up to date, and each outcome's status and ``indeterminate``
-- is made by the pure, step-able ``kvstore.protocol.coordinator.WriteCoordinatorCore`` /
``ReadCoordinatorCore`` (inputs in, effects out, in the manner of etcd-io/raft's
``Ready``/``Advance``).  ``coordinate_write`` and ``get`` are their thin asyncio driver
(``_drive``): they carry out the effects in order through the seams -- ``CheckRegister``,
``PersistLocal`` (the lock, read and durable write, bounded by the deadline), ``Send`` (a task
running ``call``), ``Abandon``, ``StartTimer`` -- and feed the answers back in the order the
calls completed.  After a write's answer its remaining replica calls are driven in the
background; after a read's, ``PendingRepair`` hands them to read repair.  Which node
coordinates a client write (here, forwarded to a primary, the next primary after a certain
refusal, or here as a fallback) is the ``WriteRouterCore``'s decision; ``put`` drives it.

**Collaborators.**  The mechanisms that keep replicas converging and the CP side are not
part of this class: hinted handoff (``kvstore.runtime.handoff``), read repair
(``kvstore.runtime.read_repair``), anti-entropy (``kvstore.runtime.anti_entropy``), the tombstone reaper
(``kvstore.runtime.reaper``) and the linearizable register (``kvstore.runtime.register``).  The node receives
them as one ``NodeParts`` from ``kvstore.runtime.assembly.assemble_node`` (the one place that builds
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
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvstore.clock import Clock
from kvstore.config import NodeConfig
from kvstore.errors import NodeError, Overloaded
from kvstore.protocol import causal_context, versions
from kvstore.protocol.coordinator import (
    FORWARD_MARGIN_MS as FORWARD_MARGIN_MS,  # for kvstore.runtime.register
)
from kvstore.protocol.coordinator import (
    MIN_CALL_TIMEOUT_NS,
    REFUSED_REMOTE_CODES,
    Abandon,
    Answer,
    CallFailed,
    CheckRegister,
    CoordinateHere,
    Done,
    Effect,
    Failed,
    JointOwners,
    LocalFailed,
    LocalResult,
    LocalWritten,
    NoteRefusal,
    PersistLocal,
    ReadCoordinatorCore,
    ReadMembership,
    ReadOutcome,
    RemoteFailed,
    Repair,
    Reply,
    Send,
    StartTimer,
    WriteCoordinatorCore,
    WriteOutcome,
    WriteRouterCore,
    WriteTargets,
    error_from_body,
    error_from_remote,
    plan_write,
    read_targets,
    write_targets,
)
from kvstore.protocol.hints import (
    NS_PER_S,
    Admission,
    HintDecodeError,
    HintLedger,
    HintPolicy,
    HintRecord,
    hint_storage_key,
)
from kvstore.protocol.membership import STALE_CONFIG, Address, ClusterConfig, Placement, fence
from kvstore.protocol.ring import TOKEN_MIN, Ring, key_token
from kvstore.protocol.versions import VersionedObject
from kvstore.runtime.identity import DataIdentity, open_identity
from kvstore.runtime.locks import KeyLocks
from kvstore.runtime.metrics import Metrics
from kvstore.storage import StorageBusy, StorageFull
from kvstore.storage.base import Storage, StorageError, scan_pages
from kvstore.transport.base import Handler, Message, PeerUnavailable, RemoteError, Transport

if TYPE_CHECKING:  # the collaborators' modules import this one; assembly.py imports them all
    from kvstore.runtime.anti_entropy import AntiEntropy
    from kvstore.runtime.handoff import HintedHandoff
    from kvstore.runtime.read_repair import ReadRepair
    from kvstore.runtime.reaper import TombstoneReaper
    from kvstore.runtime.reconfig import Reconfiguration
    from kvstore.runtime.register import LinearizableRegister

log = logging.getLogger(__name__)

HINT_SCAN_PAGE = 500
# Requests stamped with an older configuration version than the receiver's are refused
# (``stale_config``): they were planned on a placement that no longer holds.
FENCED_OPS = frozenset(
    {"replica_put", "replica_get", "coordinate_write", "paxos_prepare", "paxos_accept", "paxos_peek", "cp_propose"}
)


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
    """A node's collaborators (built by ``kvstore.runtime.assembly``), each given the node it serves."""

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
        # The membership in force (kvstore.protocol.membership): version 0 is the TOML's member list; a
        # newer one is loaded at start (kvstore.runtime.reconfig) or learnt from a peer.  ``ring`` is the
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
        from kvstore.protocol.failure import MembershipView

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
        """Switch to a newer membership version (kvstore.runtime.reconfig decides when; it persists it first)."""
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
        links = getattr(self.transport, "links", None)
        if links is not None and links.outgoing_blocked(member):
            return False  # our handshake with it is refused: nothing can reach it, whatever phi says
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
        async for page in scan_pages(self.hints, TOKEN_MIN, TOKEN_MIN, HINT_SCAN_PAGE):
            for rec in page:
                try:
                    record = HintRecord.decode(rec.blob)
                except HintDecodeError as exc:
                    self.metrics.hints_dropped.labels(reason="corrupt").inc()
                    log.error("dropping an undecodable hint %r: %s", rec.key, exc)
                    await self.hints.delete(rec.key, rec.token)
                    continue
                self.hint_ledger.record_existing(record.target, len(rec.blob))
        return self.hint_ledger.total_hints

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

    def write_targets(self, key: str, sloppy: bool) -> WriteTargets:
        """The key's primaries believed up and down, and its healthy fallbacks in ring order."""
        return write_targets(self.ring.walk(key), self.n, self.is_up, sloppy)

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

        Which node coordinates is the ``WriteRouterCore``'s decision (a primary that certainly
        refused is replaced by the next; any answer that may mean "applied" ends the request, no
        hidden second attempt); this carries out its steps one at a time.
        """
        deadline = self.now_s() + timeout_s
        router = WriteRouterCore(
            node_id=self.node_id, key=key, value=value, context=context, w=w, sloppy=sloppy,
            targets=self.write_targets(key, sloppy), deadline_ns=int(deadline * NS_PER_S),
        )
        at_ns = self.clock.monotonic_ns()
        steps = deque(router.start(at_ns))
        while steps:
            match steps.popleft():
                case CoordinateHere(as_fallback=as_fallback):
                    coordinated: WriteOutcome | NodeError
                    try:
                        coordinated = await self.coordinate_write(
                            key, value, context, w, sloppy, deadline, as_fallback=as_fallback
                        )
                    except NodeError as exc:
                        coordinated = exc
                    at_ns = self.clock.monotonic_ns()
                    steps.extend(router.on_coordinated(coordinated, at_ns))
                case Send() as forward:
                    answer = await self._forward_write(forward, at_ns)
                    at_ns = self.clock.monotonic_ns()
                    steps.extend(router.on_answer(answer, at_ns))
                case NoteRefusal(peer=peer, error=error):
                    # Counted, not logged per write: a full disk refuses every write, and its own node logs it.
                    self.metrics.replica_errors.labels(peer=peer, reason=error.code).inc()
                    log.debug("primary %s refused a write of %r (%s); trying the next primary", peer, key, error.message)
                case ReadMembership():
                    targets = self.write_targets(key, sloppy)
                    at_ns = self.clock.monotonic_ns()
                    steps.extend(router.on_membership(targets, at_ns))
                case Done(result=outcome):
                    assert isinstance(outcome, WriteOutcome)
                    return outcome
                case Failed(error=error):
                    raise error
        raise AssertionError("the write router ended without an outcome")

    async def _forward_write(self, forward: Send, at_ns: int) -> Reply | CallFailed | RemoteFailed:
        """Ask a primary to coordinate the write, until the request's deadline."""
        self.metrics.forwarded.inc()
        try:
            reply = await self.call(forward.peer, forward.message, (forward.timeout_at_ns - at_ns) / NS_PER_S)
        except PeerUnavailable as exc:
            return CallFailed(forward.call, exc.maybe_delivered)
        except RemoteError as exc:
            return RemoteFailed(forward.call, exc)
        return Reply(forward.call, reply)

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
        """Coordinate a write here: drive a ``WriteCoordinatorCore`` (every decision is the
        core's; this carries out its effects through the node's seams)."""
        token = key_token(key)
        # The plan and every replica call are stamped with the membership version in force now;
        # while a range moves the key's new owners get the write too (docs/membership.md).
        version, placement = self.config.version, self.placement
        joint = JointOwners(placement.old_owners(token), placement.new_owners(token)) if placement.joint else None
        core = WriteCoordinatorCore(
            node_id=self.node_id, key=key, token=token, value=value, context=context, w=w,
            sloppy=sloppy, plan=plan_write(self.write_targets(key, sloppy), self.node_id, as_fallback, joint),
            as_fallback=as_fallback, deadline_ns=int(deadline * NS_PER_S),
            replica_timeout_ns=self.cfg.limits.replica_timeout_ms * 1_000_000, mode=self.mode,
            config_version=version,
        )
        calls = _CoreCalls(self)
        outcome = await self._drive(core, calls, core.start(self.clock.monotonic_ns()))
        if not core.settled:
            # Replica writes still in flight finish in the background (a failed one may still
            # be handed to a spare fallback); bounded by their timeouts, tracked until stop.
            self._track(asyncio.create_task(self._finish_write(core, calls), name="write-background"))
        if isinstance(outcome, Failed):
            raise outcome.error
        assert isinstance(outcome.result, WriteOutcome)
        return outcome.result

    async def _drive(
        self, core: WriteCoordinatorCore | ReadCoordinatorCore, calls: _CoreCalls, effects: list[Effect]
    ) -> Done | Failed:
        """Carry out a coordinator core's effects in order, feeding it its inputs, until its outcome."""
        timer_at_ns: int | None = None
        try:
            while True:
                queue = deque(effects)
                while queue:
                    match queue.popleft():
                        case CheckRegister(key=key, token=token):
                            assert isinstance(core, WriteCoordinatorCore)
                            holds = await self._holds_register(key, token)
                            queue.extend(core.on_register(holds, self.clock.monotonic_ns()))
                        case PersistLocal() as persist:
                            assert isinstance(core, WriteCoordinatorCore)
                            result = await self._persist_local(core, persist)
                            queue.extend(core.on_local(result, self.clock.monotonic_ns()))
                        case Send() as send:
                            calls.send(send)
                        case Abandon(calls=abandoned):
                            calls.abandon(abandoned)
                        case StartTimer(at_ns=at_ns):
                            timer_at_ns = at_ns
                        case Done() | Failed() as outcome:
                            return outcome
                        case other:
                            raise AssertionError(f"unexpected coordinator effect {other!r}")
                assert timer_at_ns is not None, "a core waiting for answers has a deadline timer"
                answers = await calls.wait(timer_at_ns)
                now_ns = self.clock.monotonic_ns()
                effects = core.on_timer(now_ns) if answers is None else core.on_answers(answers, now_ns)
        except BaseException:
            calls.release()  # cancelled (or a bug): calls in flight finish on their own, tracked
            raise

    async def _finish_write(self, core: WriteCoordinatorCore, calls: _CoreCalls) -> None:
        """After the answer: feed the write's remaining replica calls to its core until settled."""
        while not core.settled:
            answers = await calls.wait(None)
            if not answers:
                break
            for effect in core.on_answers(answers, self.clock.monotonic_ns()):
                assert isinstance(effect, Send), f"only hand-offs follow a write's outcome, not {effect!r}"
                calls.send(effect)

    async def _persist_local(self, core: WriteCoordinatorCore, persist: PersistLocal) -> LocalResult:
        """The coordinator's own read-modify-write of a key, answered by ``persist.timeout_at_ns``.

        The step runs in its own task, so giving up at the deadline never interrupts it half-way:
        a write already handed to storage finishes in the background (and is then indeterminate);
        one still waiting for the key's lock or read is cancelled (certainly not applied).
        """
        key, token, hint_for = persist.key, persist.token, persist.hint_for
        if hint_for is None:
            actor = self.actor
        else:
            assert self.identity is not None
            # A fallback lacks the key's history: only a never-reused actor keeps its dot unique.
            actor = self.identity.fallback_actor(self.node_id, next(self._fallback_seq))
        progress = _LocalWrite()

        async def step() -> VersionedObject:
            async with self.locks.hold(key):
                if hint_for is None:
                    blob = await self.data.get(key, token)
                    base = versions.decode(blob) if blob is not None else VersionedObject.empty()
                else:
                    base = await self.read_local(key, token)
                updated = core.local_update(base, actor, self.clock.wall_ns())
                # Durable here *before* any replica sees the new dot.  Replicating in parallel
                # with this fsync would save a group-commit wait, but a crash in between would
                # leave the dot on replicas and not here: after the restart this node would
                # issue the same dot for another value, and a sync would silently keep only one
                # of the two (Riak's KV-679).  Measured and reverted for that reason
                # (docs/benchmarks.md).
                progress.writing = True
                if hint_for is None:
                    await self.data.put(key, token, versions.encode(updated))
                else:
                    await self.store_hint(hint_for, key, token, updated)
            return updated

        task = asyncio.ensure_future(step())
        timeout_s = max(0.0, (persist.timeout_at_ns - self.clock.monotonic_ns()) / NS_PER_S)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
        except asyncio.CancelledError:
            self._abandon(task, progress)
            raise
        if not done:
            self._abandon(task, progress)
            return LocalFailed("timeout", progress.writing)
        try:
            return LocalWritten(task.result())
        except causal_context.BadContext as exc:
            return LocalFailed("bad_context", progress.writing, str(exc))
        except StorageFull as exc:
            return LocalFailed("storage_full", progress.writing, str(exc))
        except StorageBusy as exc:
            return LocalFailed("storage_busy", progress.writing, str(exc))
        except StorageError as exc:
            return LocalFailed("storage_error", progress.writing, str(exc))
        except NodeError as exc:  # a typed refusal of the step (a full hint store)
            return LocalFailed("refused", progress.writing, exc.message, exc)

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
        return read_targets(self.ring.walk(key), self.n, self.is_up, sloppy)

    async def get(self, key: str, r: int, sloppy: bool, timeout_s: float) -> ReadOutcome:
        """Coordinate a read here: drive a ``ReadCoordinatorCore``, then hand the rest of its
        replies to read repair (whose policy decides whether and how to repair)."""
        deadline = self.now_s() + timeout_s
        token = key_token(key)
        core = ReadCoordinatorCore(
            key=key, token=token, r=r, targets=self.read_targets(key, sloppy),
            primaries=self.ring.walk_token(token)[: self.n], deadline_ns=int(deadline * NS_PER_S),
            replica_timeout_ns=self.cfg.limits.replica_timeout_ms * 1_000_000, mode=self.mode,
            config_version=self.config.version,  # a replica that installed a newer one refuses
        )
        calls = _CoreCalls(self)
        outcome = await self._drive(core, calls, core.start(self.clock.monotonic_ns()))
        if isinstance(outcome, Failed):
            raise outcome.error
        assert isinstance(outcome.result, ReadOutcome)
        await self.parts.read_repair.after_read(PendingRepair(self, core, calls), deadline)
        return outcome.result


class _CoreCalls:
    """The calls a coordinator core started (its ``Send`` effects), answered back to it in the
    order they completed: queued by the futures' done callbacks, never by iterating a set of
    futures (whose order depends on object ids)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.futures: dict[int, asyncio.Task[Message]] = {}
        self.completed: deque[int] = deque()
        self.wake = asyncio.Event()

    def send(self, send: Send) -> None:
        timeout_ns = max(MIN_CALL_TIMEOUT_NS, send.timeout_at_ns - self.node.clock.monotonic_ns())
        task = asyncio.ensure_future(self.node.call(send.peer, send.message, timeout_ns / NS_PER_S))
        task.add_done_callback(_consume_outcome)
        task.add_done_callback(self._completed(send.call))
        self.futures[send.call] = task

    def _completed(self, call: int) -> Callable[[asyncio.Future[Message]], None]:
        def done(_: asyncio.Future[Message]) -> None:
            self.completed.append(call)
            self.wake.set()

        return done

    def abandon(self, calls: Iterable[int]) -> None:
        for call in calls:
            task = self.futures.pop(call, None)
            if task is not None:
                task.cancel()

    def release(self) -> None:
        """Stop listening: the calls still in flight finish on their own (tracked by the node)."""
        self.node._adopt(self.futures.values())
        self.futures.clear()

    def cancel(self) -> None:
        self.abandon(list(self.futures))

    def _drain(self) -> list[Answer]:
        answers: list[Answer] = []
        while self.completed:
            call = self.completed.popleft()
            task = self.futures.pop(call, None)
            if task is not None:  # else abandoned since it completed
                answers.append(_answer(call, task))
        # Calls that completed but whose done callback has not run yet: in send order, so an
        # answer at hand is never taken for a call still in flight.
        for call in [call for call, task in self.futures.items() if task.done()]:
            answers.append(_answer(call, self.futures.pop(call)))
        return answers

    async def wait(self, timer_at_ns: int | None) -> list[Answer] | None:
        """The answers in so far, in completion order; None when the timer fired first; [] when
        there is no timer and nothing in flight."""
        while True:
            answers = self._drain()
            if answers:
                return answers
            if timer_at_ns is None:
                if not self.futures:
                    return []
                self.wake.clear()
                await self.wake.wait()
                continue
            remaining_s = (timer_at_ns - self.node.clock.monotonic_ns()) / NS_PER_S
            if remaining_s <= 0:
                return None
            self.wake.clear()
            try:
                async with asyncio.timeout(remaining_s):
                    await self.wake.wait()
            except TimeoutError:
                return self._drain() or None


class PendingRepair:
    """A read answered after R replies, with its other replica reads still in flight: what read
    repair (``kvstore.runtime.read_repair``) gets to decide on."""

    def __init__(self, node: Node, core: ReadCoordinatorCore, calls: _CoreCalls) -> None:
        self.node = node
        self.core = core
        self.calls = calls

    def release(self) -> None:
        """No repair: let the remaining reads finish unobserved."""
        self.calls.release()

    def cancel(self) -> None:
        """No repair: cancel the remaining reads."""
        self.calls.cancel()

    async def repairs(self, wait_ns: int) -> list[Repair]:
        """Wait up to ``wait_ns`` for the remaining replies; the repairs the core decided on."""
        core, calls = self.core, self.calls
        effects = core.begin_repair(self.node.clock.monotonic_ns(), wait_ns)
        timer_at_ns: int | None = None
        repairs: list[Repair] = []
        try:
            while True:
                for effect in effects:
                    match effect:
                        case StartTimer(at_ns=at_ns):
                            timer_at_ns = at_ns
                        case Abandon(calls=abandoned):
                            calls.abandon(abandoned)
                        case Repair() as repair:
                            repairs.append(repair)
                        case other:
                            raise AssertionError(f"unexpected read-repair effect {other!r}")
                if core.settled:
                    return repairs
                assert timer_at_ns is not None
                answers = await calls.wait(timer_at_ns)
                now_ns = self.node.clock.monotonic_ns()
                effects = core.on_timer(now_ns) if answers is None else core.on_answers(answers, now_ns)
        finally:
            calls.cancel()  # nothing outlives the repair wait


def _answer(call: int, task: asyncio.Future[Message]) -> Answer:
    if task.cancelled():
        return CallFailed(call, maybe_delivered=True)
    exc = task.exception()
    if exc is None:
        return Reply(call, task.result())
    if isinstance(exc, PeerUnavailable):
        return CallFailed(call, maybe_delivered=exc.maybe_delivered)
    if isinstance(exc, RemoteError):
        return CallFailed(call, maybe_delivered=exc.code not in REFUSED_REMOTE_CODES)
    log.error("a coordinator's call %d failed unexpectedly", call, exc_info=exc)
    return CallFailed(call, maybe_delivered=True)


# For kvstore.runtime.register, which forwards linearizable operations the same way.
_error_from_body = error_from_body
_error_from_remote = error_from_remote


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    # An abandoned local step that fails later must not log "exception was never retrieved".
    if not task.cancelled():
        task.exception()
