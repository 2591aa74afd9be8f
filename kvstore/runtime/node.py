"""A kvstore node: coordinator for any key, replica for the keys the ring gives it.

Theory of operation
-------------------
The request paths follow Dynamo (DeCandia et al. 2007, §4.5-4.7) and Riak KV:

**Routing.**  A node is a coordinator for any key and a replica for the keys the ring gives
it.  Both are mechanisms of their own: the coordinator's asyncio driver of the pure cores
(``kvstore.runtime.coordinator``: client writes and reads, ``coordinate_write``) and the local
copy with its hints (``kvstore.runtime.replica``: ``replica_get``, ``replica_put``).  This class
owns what they share -- the seams, the membership in force and its failure detector, the
background tasks, the lifecycle -- and routes every internal message to its mechanism's handler,
after fencing it against the membership version (``FENCED_OPS``).

**Identity.**  A primary issues dots as ``<node_id>.<incarnation>``; the
incarnation is stored in the data store's meta, so a node whose data is lost
(wiped disk, memory store) comes back under a new actor instead of re-issuing
dots the other replicas already hold (Riak's KV-679; see ``kvstore.runtime.identity``).
It is loaded in ``start``, before the node serves anything.

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
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvstore.clock import Clock
from kvstore.config import NodeConfig
from kvstore.protocol import versions
from kvstore.protocol.coordinator import (
    FORWARD_MARGIN_MS as FORWARD_MARGIN_MS,  # for kvstore.runtime.register
)
from kvstore.protocol.coordinator import (
    ReadOutcome,
    WriteOutcome,
    WriteTargets,
    error_from_body,
    error_from_remote,
)
from kvstore.protocol.hints import NS_PER_S, HintLedger, HintRecord
from kvstore.protocol.membership import STALE_CONFIG, Address, ClusterConfig, Placement, fence
from kvstore.protocol.messages import ErrorReply, MessageError, Ping, PingReply, encode, serve
from kvstore.protocol.ring import Ring
from kvstore.protocol.versions import VersionedObject
from kvstore.runtime.coordinator import Coordinator
from kvstore.runtime.coordinator import PendingRepair as PendingRepair  # for kvstore.runtime.read_repair
from kvstore.runtime.identity import DataIdentity, open_identity
from kvstore.runtime.locks import KeyLocks
from kvstore.runtime.metrics import Metrics
from kvstore.runtime.replica import HintStoreFull as HintStoreFull  # raised by Node.store_hint
from kvstore.runtime.replica import Replica, hint_policy
from kvstore.storage import StorageBusy, StorageFull
from kvstore.storage.base import Storage, StorageError
from kvstore.storage.tracked import TrackedStorage
from kvstore.transport.base import Handler, Message, PeerUnavailable, RemoteError, Transport

if TYPE_CHECKING:  # the collaborators' modules import this one; assembly.py imports them all
    from kvstore.runtime.anti_entropy import AntiEntropy
    from kvstore.runtime.handoff import HintedHandoff
    from kvstore.runtime.read_repair import ReadRepair
    from kvstore.runtime.reaper import TombstoneReaper
    from kvstore.runtime.reconfig import Reconfiguration
    from kvstore.runtime.register import LinearizableRegister

log = logging.getLogger(__name__)

# Requests stamped with an older configuration version than the receiver's are refused
# (``stale_config``): they were planned on a placement that no longer holds.
FENCED_OPS = frozenset(
    {"replica_put", "replica_get", "coordinate_write", "paxos_prepare", "paxos_accept", "paxos_peek", "cp_propose"}
)


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
        # Record writes and deletes are reported by token, so anti-entropy can keep range summaries
        # cached; ``data_engine`` is the seam as given (its fault layer, if any).
        self.data_engine = data
        self.data = TrackedStorage(data)
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
            {m.id: Address(m.host, m.http_port, m.peer_port, m.machine) for m in cfg.members}
        )
        self.placement = Placement(self.config, cfg.replicas, cfg.vnodes)
        self.ring: Ring = self.placement.read_ring
        self.n = cfg.replicas
        self.mode: versions.ConflictMode = "lww" if cfg.conflict_mode == "lww" else "siblings"
        self.peers = [m for m in cfg.member_ids if m != self.node_id]
        self.locks = KeyLocks()
        # A store that may lose acknowledged dots (memory, or no fsync) gets a new incarnation at
        # every start; a durable one keeps its incarnation exactly as long as it keeps its data.
        # The store says which it is (its config could not speak for a simulator's disk).
        self.durable_data = data.durable
        self.identity: DataIdentity | None = None  # loaded by start(), before anything is served
        # A dict, not a set: iterated in insertion order (a set of tasks iterates by id).
        self._background: dict[asyncio.Future[Any], None] = {}
        self._background_slots = asyncio.Semaphore(cfg.limits.max_background_tasks)
        self._inflight = asyncio.Semaphore(cfg.limits.max_inflight_requests)
        self._loops: list[asyncio.Task[Any]] = []
        self.membership = self._make_membership()
        self.replica = Replica(self)
        self.coordinator = Coordinator(self)
        # A transport that can resolve a call's future itself saves the coordinator a task per call.
        self._start_remote: Callable[[str, Message, float], asyncio.Future[Message] | None] | None = getattr(
            transport, "start_call", None
        )
        self.parts = parts(self)
        self.handlers: dict[str, Handler] = {
            "ping": serve(Ping, self._on_ping), **self.replica.handlers(), **self.coordinator.handlers()
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

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._background[task] = None
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Future[Any]) -> None:
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
                    peer, encode(Ping(cv=self.config.version)), max(0.05, interval_s * 2)
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
            return await self._call_local(message, timeout_s)
        return await self._call_remote(peer, message, timeout_s)

    def start_call(self, peer: str, message: Message, timeout_s: float) -> asyncio.Future[Message]:
        """``call`` as a future, for a caller waiting for many calls at once (the coordinator).

        The outcomes are ``call``'s, and cancelling the future gives up on the call as cancelling
        ``call`` does.  It costs no task where none is needed: a transport that resolves a call's
        future itself (``StreamTransport.start_call``) and a local call need only their futures;
        any other call runs ``call``'s coroutine in a task.
        """
        if "cv" not in message:
            message = {**message, "cv": self.config.version}
        if peer == self.node_id:
            return self._call_local(message, timeout_s)
        fut = self._start_remote(peer, message, timeout_s) if self._start_remote is not None else None
        if fut is None:
            return asyncio.ensure_future(self._call_remote(peer, message, timeout_s))
        fut.add_done_callback(functools.partial(self._remote_done, peer))
        return fut

    async def _call_remote(self, peer: str, message: Message, timeout_s: float) -> Message:
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

    def _remote_done(self, peer: str, fut: asyncio.Future[Message]) -> None:
        """What ``_call_remote`` does with an outcome, for a call made by ``start_call``."""
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            if peer in self.membership.members:
                self.membership.heartbeat(peer, self.clock.monotonic_ns())
            self._gossip(peer, fut.result())
        elif isinstance(exc, PeerUnavailable):
            self.metrics.replica_errors.labels(peer=peer, reason="unavailable").inc()
            log.debug("call to %s failed: %s", peer, exc)
        elif isinstance(exc, RemoteError) and exc.code == STALE_CONFIG:
            self.parts.reconfig.learn_from(peer)

    def _call_local(self, message: Message, timeout_s: float) -> asyncio.Future[Message]:
        """This node's handler as a call: a future settled by the handler's task or its deadline.

        At the deadline, or when the caller cancels the future, the handler is not interrupted:
        it finishes in the background (tracked), as a remote handler would.
        """
        loop = asyncio.get_running_loop()
        work = loop.create_task(self.handle_message(self.node_id, message))
        outcome: asyncio.Future[Message] = loop.create_future()
        timer = loop.call_later(max(0.0, timeout_s), self._local_timeout, outcome)
        work.add_done_callback(functools.partial(self._local_done, outcome, timer))
        outcome.add_done_callback(functools.partial(self._local_given_up, work))
        return outcome

    def _local_timeout(self, outcome: asyncio.Future[Message]) -> None:
        if not outcome.done():
            outcome.set_exception(PeerUnavailable(self.node_id, "timeout (local handler)", maybe_delivered=True))

    def _local_done(self, outcome: asyncio.Future[Message], timer: asyncio.TimerHandle, work: asyncio.Task[Message]) -> None:
        timer.cancel()
        if outcome.done():
            return  # timed out or given up: the handler was adopted
        if work.cancelled():
            outcome.cancel()
            return
        exc = work.exception()
        if exc is not None:
            outcome.set_exception(exc)
            return
        reply = work.result()
        if isinstance(reply, dict) and reply.get("remote_error"):
            outcome.set_exception(RemoteError(self.node_id, str(reply.get("error")), str(reply.get("message", ""))))
        else:
            outcome.set_result(reply)

    def _local_given_up(self, work: asyncio.Task[Message], _: asyncio.Future[Message]) -> None:
        if not work.done():
            self._adopt([work])  # the caller gave up (or its deadline passed); the handler finishes

    def _gossip(self, peer: str, reply: Any) -> None:
        """A reply stamped with a newer configuration version makes this node fetch it."""
        version = reply.get("cv") if isinstance(reply, dict) else None
        if isinstance(version, int) and version > self.config.version:
            self.parts.reconfig.learn_from(peer)

    async def handle_message(self, sender: str, message: Message) -> Message:
        if not isinstance(message, dict):
            return encode(ErrorReply("bad_request", "an internal message is a map"))
        op = message.get("op")
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            return encode(ErrorReply("unknown_op", f"unknown internal op {op!r}"))
        version = message.get("cv")
        if isinstance(version, int) and sender != self.node_id:
            verdict = fence(version, self.config.version)
            if verdict == "newer":
                self.parts.reconfig.learn_from(sender)
            elif verdict == "stale" and op in FENCED_OPS:
                return encode(ErrorReply(
                    STALE_CONFIG, f"{op} planned on membership version {version}; {self.node_id} is at "
                    f"{self.config.version}", cv=self.config.version,
                ))
        elif isinstance(version, int) and op in FENCED_OPS and version < self.config.version:
            # Our own request, planned before we installed a newer version: refuse it the same way.
            return encode(ErrorReply(
                STALE_CONFIG, f"{op} planned on membership version {version}, now {self.config.version}",
                cv=self.config.version,
            ))
        try:
            return await handler(sender, message)
        except MessageError as exc:
            # A peer (or a holder of the secret) sent a message missing or mistyping a field: the
            # codec refused it before the handler saw any of it (kvstore.protocol.messages).
            log.warning("%s from %s", exc, sender)
            return encode(ErrorReply("bad_request", str(exc)))
        except (KeyError, TypeError, ValueError) as exc:
            # The same refusal for the handlers that still parse their own maps.
            log.warning("malformed %s message from %s: %r", op, sender, exc)
            return encode(ErrorReply("bad_request", f"malformed {op} message: {exc!r}"))
        except StorageBusy as exc:
            return encode(ErrorReply("overloaded", str(exc)))
        except StorageFull as exc:
            return encode(ErrorReply("insufficient_storage", str(exc)))
        except StorageError as exc:
            return encode(ErrorReply("storage", str(exc)))

    async def _on_ping(self, sender: str, message: Ping) -> PingReply:
        if sender != self.node_id:
            # A non-member's ping raises UnknownMember (the HTTP route answers 400 unknown_member);
            # a member removed by a change learns it from the change's announcement instead.
            self.membership.heartbeat(sender, self.clock.monotonic_ns())
        return PingReply(True, self.config.version)  # cv: the pinger fetches a newer membership

    async def holds_register(self, key: str, token: int) -> bool:
        """Whether the key is linearizable here (the register's): AP access to it is refused."""
        return await self.parts.register.has_register(key, token)

    def _adopt(self, tasks: Iterable[asyncio.Future[Any]]) -> None:
        """Let replica writes still in flight finish after the reply (bounded: cancelled at stop)."""
        for task in tasks:
            self._track(task)

    # --- the replica and the coordinator (kvstore.runtime.replica, kvstore.runtime.coordinator) ----

    async def read_local(self, key: str, token: int) -> VersionedObject:
        return await self.replica.read_local(key, token)

    async def apply_local(self, key: str, token: int, incoming: VersionedObject) -> VersionedObject:
        return await self.replica.apply_local(key, token, incoming)

    async def store_hint(self, target: str, key: str, token: int, incoming: VersionedObject) -> None:
        await self.replica.store_hint(target, key, token, incoming)

    async def forget_hint(self, record: HintRecord, blob: bytes, reason: str) -> bool:
        return await self.replica.forget_hint(record, blob, reason)

    async def load_hint_ledger(self) -> int:
        return await self.replica.load_hint_ledger()

    def write_targets(self, key: str, sloppy: bool) -> WriteTargets:
        return self.coordinator.write_targets(key, sloppy)

    def read_targets(self, key: str, sloppy: bool) -> list[str]:
        return self.coordinator.read_targets(key, sloppy)

    async def put(
        self, key: str, value: bytes | None, context: dict[str, int], w: int, sloppy: bool, timeout_s: float
    ) -> WriteOutcome:
        return await self.coordinator.put(key, value, context, w, sloppy, timeout_s)

    async def coordinate_write(
        self, key: str, value: bytes | None, context: dict[str, int], w: int, sloppy: bool, deadline: float,
        as_fallback: bool,
    ) -> WriteOutcome:
        return await self.coordinator.coordinate_write(key, value, context, w, sloppy, deadline, as_fallback)

    async def get(self, key: str, r: int, sloppy: bool, timeout_s: float) -> ReadOutcome:
        return await self.coordinator.get(key, r, sloppy, timeout_s)


# For kvstore.runtime.register, which forwards linearizable operations the same way.
_error_from_body = error_from_body
_error_from_remote = error_from_remote
