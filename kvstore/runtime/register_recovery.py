"""Acceptors that lost their storage: a new incarnation that votes only once it has recovered.

Theory of operation
-------------------
**The problem.**  Paxos is safe only if no acceptor forgets a promise or an accept
(``kvstore.runtime.caspaxos``).  A node whose Paxos store is lost -- a wiped or replaced disk, a directory
restored empty -- and that then answers from empty state breaks this: if a value was accepted
by {A, B} and B comes back empty, a proposer whose majority is {B, C} sees neither the value
nor B's promises, and a chosen value disappears (the CP twin of Riak's KV-679).

**Identity.**  Every acceptor has an *incarnation*: a random id drawn from the node's injected
``random.Random`` when its Paxos store is created, kept in that store's meta (so it is lost
exactly when the state is).  A store without one is *new*.  Each acceptor also keeps, durably
in the same store, a *registry* of the other members' incarnations (the current one and a few
retired ones per member), and attaches its incarnation and its *view* (the registry's entries
for the key's other acceptors) to every vote it sends.

**The rule.**  An acceptor whose store is new does not vote: it refuses every prepare and
accept with the typed error ``recovering`` (nothing done; proposers count a certain failure)
until, for the key's range, it has, with every *other* replica ``Y`` of the range:

1. *registered* its new incarnation at ``Y`` (``Y`` stores it durably before answering, and
   names it in its view from then on), and then
2. *scanned* ``Y``'s whole Paxos store (paged) and merged the state of every key it replicates
   into its own, durably (``paxos.merge_states``: the highest promise, and the highest
   accepted ballot with its value and lineage).

A range becomes votable once all its other replicas are done (``recovered_from``); with every
peer done the acceptor is ``active``.  Proposers drop any reply whose incarnation another reply
of the same round contradicts (``paxos.stale_acceptors``).

**Why it is safe.**  Let the lost incarnation ``x`` of acceptor X have promised or accepted in a
round whose majority M a proposer counted.  Every other member Y of M (one exists when N >= 2)
answered that round either *before* Y registered X's new incarnation -- then Y's promise or
accept was durable before X's scan of Y began, so X's merged state dominates it: X now refuses
every ballot below that promise and reports that accepted state (or a later one, which derives
from it), which is all ``x`` had promised -- or *after* -- then Y's reply names the new
incarnation, the proposer dropped ``x``'s reply, and ``x`` was not in the counted M.  So no
counted quorum relies on lost state.  Scanning *all* the other replicas is what makes this
hold for whichever majority ``x`` was part of; the view check covers a round still in flight
across the wipe (a proposer holding ``x``'s promise from before the wipe whose other promise
arrives after the scan: no scan can see a promise given later).

**Bootstrap** (``initial_cluster_state``, after etcd's flag of that name).  In a brand-new
cluster every store is new and there is nothing to recover, but requiring every peer's scan
would leave CP unavailable on every range of a node that is down at the first boot.  So:

* ``existing`` (the default, and what ``LocalCluster.restart`` writes): a new store means this
  node lost its state; it recovers as above.
* ``new`` (what ``LocalCluster.start`` writes for a cluster's first start): the node registers
  at its peers; once a majority of the cluster (itself included) answered and none of them had
  known an earlier incarnation of it, it votes at once (``fresh``).  If one had, the node was
  wiped and started with the wrong flag: it recovers like ``existing``.

The flag only matters for a new store: a node restarting with its Paxos store intact keeps its
incarnation and votes at once.  A store written before incarnations existed (state but no
identity) is intact by definition and gets an incarnation without recovering.

**A store that refuses the write.**  A change of the identity (the bootstrap decision, a
peer marked recovered) takes effect only once it is durable.  If the Paxos store refuses it (a
full disk, an I/O error) the acceptor acts on its previous identity -- so a recovering one
keeps refusing votes -- and retries the save with the same bounded randomized backoff until it
lands or the acceptor stops: a disk that frees up lets the acceptor vote without a restart.
(After an I/O error the write may have landed anyway; that is safe, since every change saved
this way was already earned -- a majority's answers, a merged scan -- and only its effect waits.)  The failure is logged at ERROR (again at most every ``SAVE_ERROR_LOG_EVERY_S`` of the
injected clock while it lasts) and shown in ``status()`` (``paxos_status``): failed attempts,
the last error and since when the change waits.  Only loading the identity at start-up is not
retried: a store that refuses it fails the node's start, loudly.

**Bounds.**  A scan page holds at most ``page_records`` records and about ``page_bytes``
bytes (the transport's frames stop at 16 MiB); the serving side sends only the keys the
requester replicates.  One recovery task per peer, retried with bounded randomized backoff
(from the injected rng).  The registry holds at most one current and ``MAX_RETIRED`` retired
incarnations per member, and only members can register.

**What it does not cover.**  A majority of a range's replicas losing their stores at once:
nothing is left to recover from, and that range's register state is lost (with N = 1, one lost
disk).  A wiped node started with ``new`` while every peer that knew it is unreachable: it
cannot tell that it was wiped (never start a node that was part of the cluster with ``new``).
A peer that lost its own store and has not recovered yet serves a scan from what it has (two
losses in one range of three).  While a node recovers, each range it replicates becomes
votable there only when all the range's other replicas have answered; meanwhile the range runs
on the others (with N = 3: unavailable if one of those two is down as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import msgpack

from kvstore.clock import Clock
from kvstore.config import INITIAL_CLUSTER_STATES as CLUSTER_STATES
from kvstore.protocol.messages import (
    PAGE_RECORDS,
    ErrorReply,
    PaxosRecoverScan,
    PaxosRecoverScanReply,
    PaxosRegister,
    PaxosRegisterReply,
    PaxosStatus,
    PaxosStatusReply,
    decode_reply,
    encode,
)
from kvstore.protocol.paxos import AcceptorState, backoff_s, majority
from kvstore.protocol.ring import TOKEN_MIN
from kvstore.runtime.caspaxos import PaxosAcceptor
from kvstore.runtime.identity import CorruptIdentity, new_incarnation
from kvstore.storage.base import Storage, StorageError
from kvstore.transport.base import Message, PeerUnavailable, RemoteError

log = logging.getLogger(__name__)

OP_REGISTER = PaxosRegister.OP
OP_RECOVER_SCAN = PaxosRecoverScan.OP
OP_STATUS = PaxosStatus.OP
ACCEPTOR_META = "acceptor_identity"
REGISTRY_META = "peer_incarnations"
MAX_RETIRED = 16
PAGE_BYTES = 4 * 1024 * 1024
_FORMAT = 1
SAVE_ERROR_LOG_EVERY_S = 60.0  # while an identity save keeps failing: one ERROR line per this much time
NS_PER_S = 1_000_000_000

Status = Literal["active", "recovering"]
Decision = Literal["fresh", "wiped", "undecided"]
Call = Callable[[str, Message, float], Awaitable[Message]]
Sleep = Callable[[float], Awaitable[None]]


class RetiredIncarnation(ValueError):
    """A registration named an incarnation a newer one already replaced (a stale message)."""


def _check_incarnation(raw: Any, what: str = "incarnation") -> str:
    """An incarnation read from our own store (messages are checked by the codec's ``Incarnation``)."""
    if not isinstance(raw, str) or not raw.isalnum() or len(raw) > 64:
        raise ValueError(f"{what} must be an alphanumeric id")
    return raw


@dataclass(frozen=True, slots=True)
class AcceptorIdentity:
    """Who this acceptor is and whether it may vote; stored in the Paxos store's meta."""

    incarnation: str
    status: Status
    bootstrap: str  # "new" | "existing": how a new store was to be treated (see the module doc)
    recovered_from: tuple[str, ...] = ()  # peers registered at and scanned, sorted

    def __post_init__(self) -> None:
        assert self.status in ("active", "recovering") and self.bootstrap in CLUSTER_STATES
        assert list(self.recovered_from) == sorted(set(self.recovered_from))

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "f": _FORMAT, "incarnation": self.incarnation, "status": self.status,
                "bootstrap": self.bootstrap, "recovered_from": list(self.recovered_from),
            },
            use_bin_type=True,
        )

    @staticmethod
    def decode(blob: bytes) -> AcceptorIdentity:
        try:
            obj = msgpack.unpackb(blob, raw=False)
            if not isinstance(obj, dict) or obj.get("f") != _FORMAT:
                raise ValueError("unknown acceptor identity format")
            done = obj["recovered_from"]
            if not isinstance(done, list) or not all(isinstance(m, str) for m in done):
                raise ValueError("recovered_from must be a list of member ids")
            status, bootstrap = obj["status"], obj["bootstrap"]
            if status not in ("active", "recovering") or bootstrap not in CLUSTER_STATES:
                raise ValueError(f"bad status {status!r} or bootstrap {bootstrap!r}")
            return AcceptorIdentity(_check_incarnation(obj["incarnation"]), status, bootstrap, tuple(sorted(set(done))))
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise CorruptIdentity(f"undecodable acceptor identity: {exc}") from exc


def bootstrap_decision(previous: dict[str, str | None], own: str, needed: int) -> Decision:
    """What a node started with ``new`` on a new store concludes from its peers' registrations.

    ``previous`` maps each peer that answered to the incarnation it had registered for this
    node before (None: none).  Any earlier incarnation known anywhere means this node was wiped;
    ``needed`` answers without one mean a brand-new cluster (see the module docstring).
    """
    assert needed >= 0
    if any(p is not None and p != own for p in previous.values()):
        return "wiped"
    return "fresh" if len(previous) >= needed else "undecided"


def may_vote(identity: AcceptorIdentity, node_id: str, replicas: Iterable[str]) -> bool:
    """An active acceptor votes everywhere; a recovering one only where every other replica of
    the range has been registered at and scanned."""
    return identity.status == "active" or all(m in identity.recovered_from for m in replicas if m != node_id)


class Registry:
    """Other members' acceptor incarnations as this acceptor knows them (pure; persisted by the caller)."""

    def __init__(self) -> None:
        self.current: dict[str, str] = {}
        self.retired: dict[str, list[str]] = {}

    def register(self, member: str, incarnation: str) -> tuple[bool, str | None]:
        """The member says it is ``incarnation`` now: (changed, the incarnation it replaces)."""
        if incarnation in self.retired.get(member, ()):
            raise RetiredIncarnation(f"{member} incarnation {incarnation} was replaced already")
        previous = self.current.get(member)
        if previous == incarnation:
            return False, previous
        if previous is not None:
            retired = self.retired.setdefault(member, [])
            retired.append(previous)
            del retired[:-MAX_RETIRED]
        self.current[member] = incarnation
        return True, previous

    def learn(self, member: str, incarnation: str) -> bool:
        """A member's incarnation heard second-hand (a registration reply): kept only if nothing is
        known yet, so that a late reply can never overwrite a newer registration."""
        if member in self.current or incarnation in self.retired.get(member, ()):
            return False
        self.current[member] = incarnation
        return True

    def view(self, members: Iterable[str]) -> dict[str, str]:
        return {m: self.current[m] for m in members if m in self.current}

    def encode(self) -> bytes:
        return msgpack.packb(
            {"f": _FORMAT, "current": dict(sorted(self.current.items())),
             "retired": {m: list(r) for m, r in sorted(self.retired.items())}},
            use_bin_type=True,
        )

    @staticmethod
    def decode(blob: bytes) -> Registry:
        try:
            obj = msgpack.unpackb(blob, raw=False)
            if not isinstance(obj, dict) or obj.get("f") != _FORMAT:
                raise ValueError("unknown registry format")
            registry = Registry()
            for member, incarnation in obj["current"].items():
                registry.current[str(member)] = _check_incarnation(incarnation)
            for member, retired in obj["retired"].items():
                registry.retired[str(member)] = [_check_incarnation(r) for r in retired][-MAX_RETIRED:]
            return registry
        except Exception as exc:
            raise CorruptIdentity(f"undecodable incarnation registry: {exc}") from exc


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    """A recovery task ends only by finishing or by ``stop``; any other end (a programmer error it
    does not retry) would leave the acceptor recovering for good with nothing in the log, so say so."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s ended by %r: this acceptor may stay recovering", task.get_name(), task.exception())


class AcceptorRecovery:
    """The acceptor's identity, its vote gate (``cp.AcceptorGate``) and the recovery protocol."""

    def __init__(
        self,
        node_id: str,
        members: Sequence[str],
        storage: Storage,
        rng: random.Random,
        call: Call,
        replicas_of: Callable[[int], Sequence[str]],
        cluster_state: str = "existing",
        *,
        clock: Clock,
        on_key: Callable[[str], None] | None = None,
        sleep: Sleep = asyncio.sleep,
        page_records: int = PAGE_RECORDS,
        page_bytes: int = PAGE_BYTES,
        call_timeout_s: float = 10.0,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 2.0,
    ) -> None:
        assert node_id in members and cluster_state in CLUSTER_STATES
        assert 1 <= page_records <= PAGE_RECORDS and 1 <= page_bytes <= PAGE_BYTES
        self.node_id = node_id
        self.members = list(members)
        self.peers = [m for m in members if m != node_id]
        self.storage = storage
        self.rng = rng
        self.clock = clock
        self.call = call
        self.replicas_of = replicas_of
        self.cluster_state = cluster_state
        self.on_key = on_key
        self.sleep = sleep
        self.page_records = page_records
        self.page_bytes = page_bytes
        self.call_timeout_s = call_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.acceptor: PaxosAcceptor | None = None  # set by the owner: recovery merges through it
        self.identity: AcceptorIdentity | None = None
        self.registry = Registry()
        self.answers: dict[str, str | None] = {}  # peer -> our incarnation it knew before (bootstrap)
        self.decision: Decision = "undecided"
        self.decided = asyncio.Event()
        self.active = asyncio.Event()
        self._registry_lock = asyncio.Lock()
        self._identity_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # An identity change the store refused (module docstring): visible in status() until saved.
        self.save_failures = 0  # failed identity saves since start
        self.save_error: str | None = None  # the last one's error, while a change waits to be saved
        self._save_failing_since_ns: int | None = None
        self._save_error_logged_ns: int | None = None

    # --- the gate the acceptor asks (cp.AcceptorGate) -----------------------------------------

    @property
    def incarnation(self) -> str:
        assert self.identity is not None, "load() first"
        return self.identity.incarnation

    def votable(self, token: int) -> bool:
        identity = self.identity
        return identity is not None and may_vote(identity, self.node_id, self.replicas_of(token))

    def view(self, members: Iterable[str]) -> dict[str, str]:
        return self.registry.view(m for m in members if m != self.node_id)

    # --- lifecycle ----------------------------------------------------------------------------

    async def load(self) -> AcceptorIdentity:
        """Read (or create) this acceptor's identity and registry; call before serving anything."""
        registry_blob = await self.storage.meta_get(REGISTRY_META)
        registry_lost = False
        if registry_blob is not None:
            try:
                self.registry = Registry.decode(registry_blob)
            except CorruptIdentity as exc:
                # Without the peers' incarnations our votes could not flag a peer's lost one:
                # recover (re-register everywhere, relearning them) before voting again.
                log.error("%s; recovering from the peers before voting", exc)
                registry_lost = True
        blob = await self.storage.meta_get(ACCEPTOR_META)
        identity: AcceptorIdentity | None = None
        if registry_lost:
            identity = AcceptorIdentity(new_incarnation(self.rng), "recovering", "existing")
        elif blob is not None:
            try:
                identity = AcceptorIdentity.decode(blob)
            except CorruptIdentity as exc:
                # Not knowing whether we recovered: recovering again is always safe.
                log.error("%s; recovering the acceptor state from the peers", exc)
                identity = AcceptorIdentity(new_incarnation(self.rng), "recovering", "existing")
        elif await self.storage.count() > 0:
            # State written before incarnations existed: intact, nothing was lost.
            identity = AcceptorIdentity(new_incarnation(self.rng), "active", "existing")
        else:
            identity = AcceptorIdentity(new_incarnation(self.rng), "recovering", self.cluster_state)
            if self.cluster_state == "existing":
                log.warning(
                    "acceptor %s: new Paxos store and initial_cluster_state=existing: this node lost its "
                    "state; it votes on a key range only after recovering it from every other replica",
                    self.node_id,
                )
        if not self.peers and identity.status == "recovering":
            log.warning("acceptor %s has no peers: nothing to recover from", self.node_id)
            identity = replace(identity, status="active")
        await self._save_identity(identity)
        if identity.status == "active":
            self.active.set()
            self.decision = "fresh"
            self.decided.set()
        elif identity.bootstrap == "existing":
            self.decision = "wiped"
            self.decided.set()
        log.info(
            "acceptor %s incarnation %s: %s (bootstrap %s, recovered from %s)", self.node_id,
            identity.incarnation, identity.status, identity.bootstrap, list(identity.recovered_from),
        )
        return identity

    def start(self) -> None:
        """Register at every peer (and recover from it, if needed) in the background."""
        assert self.identity is not None and self.acceptor is not None
        self._maybe_decide()
        for peer in self.peers:
            task = asyncio.create_task(self._peer_task(peer), name=f"paxos-recovery-{peer}")
            task.add_done_callback(_log_unexpected_end)
            self._tasks.append(task)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def status(self) -> dict[str, Any]:
        assert self.identity is not None
        status: dict[str, Any] = {
            "incarnation": self.identity.incarnation, "status": self.identity.status,
            "bootstrap": self.identity.bootstrap, "decision": self.decision,
            "recovered_from": list(self.identity.recovered_from), "peers": list(self.peers),
        }
        if self.save_failures:
            since_ns = self._save_failing_since_ns
            status.update(
                identity_save_failures=self.save_failures, identity_save_error=self.save_error,
                identity_unsaved_ms=None if since_ns is None else (self.clock.monotonic_ns() - since_ns) // 1_000_000,
            )
        return status

    # --- the recovering side ------------------------------------------------------------------

    async def _peer_task(self, peer: str) -> None:
        attempt = 0
        while True:
            try:
                await self._register_at(peer)
                await self.decided.wait()
                assert self.identity is not None
                if self.decision == "fresh" or peer in self.identity.recovered_from:
                    return
                await self._scan(peer)
                await self._mark_recovered(peer)
                return
            except (PeerUnavailable, RemoteError, ValueError, StorageError) as exc:
                attempt += 1
                log.debug("acceptor recovery with %s: %s (attempt %d)", peer, exc, attempt)
                await self.sleep(backoff_s(min(attempt, 8), self.rng, self.backoff_base_s, self.backoff_cap_s))

    async def _register_at(self, peer: str) -> None:
        raw = await self.call(peer, encode(PaxosRegister(self.incarnation)), self.call_timeout_s)
        reply = decode_reply(raw, PaxosRegisterReply, OP_REGISTER)  # MessageError is a ValueError: retried
        previous = reply.previous
        async with self._registry_lock:
            if self.registry.learn(peer, reply.incarnation):
                await self.storage.meta_put(REGISTRY_META, self.registry.encode())
        self.answers[peer] = None if previous == self.incarnation else previous
        if self.answers[peer] is not None and self.decision == "fresh" and self.identity is not None \
                and self.identity.bootstrap == "new":
            # Too late: we decided "new cluster" on the first answers and have voted since.
            log.error(
                "acceptor %s: peer %s knew an earlier incarnation %s of this node, which started with "
                "initial_cluster_state=new and is already voting: it lost its state; stop it, delete its "
                "directory and restart it with initial_cluster_state=existing", self.node_id, peer, previous,
            )
        self._maybe_decide()

    def _maybe_decide(self) -> None:
        if self.decision != "undecided":
            return
        assert self.identity is not None
        decision = bootstrap_decision(self.answers, self.identity.incarnation, majority(len(self.members)) - 1)
        if decision == "undecided":
            return
        self.decision = decision
        if decision == "fresh":
            log.info("acceptor %s: a new cluster (no peer knew an earlier incarnation): voting", self.node_id)
            self._spawn_update(lambda identity: replace(identity, status="active"))
        else:
            knew = sorted(p for p, inc in self.answers.items() if inc is not None)
            log.error(
                "acceptor %s was started with initial_cluster_state=new but %s knew an earlier incarnation: "
                "it lost its state; recovering from every other replica before voting", self.node_id, knew,
            )
            # From now on a restart must recover too, whatever its flag says.
            self._spawn_update(lambda identity: replace(identity, bootstrap="existing"))

    def _spawn_update(self, change: Callable[[AcceptorIdentity], AcceptorIdentity]) -> None:
        async def save() -> None:
            identity = await self._update_identity_until_saved(change)
            if identity.status == "active":
                self.active.set()
            self.decided.set()  # only once durable: a fresh start must survive a restart as fresh

        task = asyncio.create_task(save(), name="paxos-identity")
        task.add_done_callback(_log_unexpected_end)
        self._tasks.append(task)

    async def _scan(self, peer: str) -> None:
        acceptor = self.acceptor
        assert acceptor is not None
        after: tuple[int, str] | None = None
        pages = 0
        merged = 0
        while True:
            request = PaxosRecoverScan(self.incarnation, after, self.page_records, self.page_bytes)
            raw = await self.call(peer, encode(request), self.call_timeout_s)
            page = decode_reply(raw, PaxosRecoverScanReply, OP_RECOVER_SCAN)  # a MessageError is retried
            records, cursor, done = page.records, page.next, page.done
            if not done and (cursor is None or cursor == after):
                raise ValueError("a recovery scan page that does not advance")
            pages += 1
            mine = [(t, k, b) for t, k, b in records if self.node_id in self.replicas_of(t)]
            states = [(t, k, AcceptorState.decode(b)) for t, k, b in mine]  # CorruptState is a ValueError
            # One page at a time, its keys in parallel: they share the store's group commit.
            changed = await asyncio.gather(*(acceptor.absorb(k, t, state) for t, k, state in states))
            merged += sum(changed)
            if self.on_key is not None:
                for _, key, _ in mine:
                    self.on_key(key)
            if done:
                log.info("acceptor %s scanned %s: %d pages, %d states merged", self.node_id, peer, pages, merged)
                return
            after = cursor

    async def _mark_recovered(self, peer: str) -> None:
        def add(identity: AcceptorIdentity) -> AcceptorIdentity:
            done = tuple(sorted({*identity.recovered_from, peer}))
            status: Status = "active" if all(p in done for p in self.peers) else identity.status
            return replace(identity, recovered_from=done, status=status)

        # Retried here, not by the peer task: the merged state is durable, only this record is missing.
        identity = await self._update_identity_until_saved(add)
        if identity.status == "active" and not self.active.is_set():
            log.warning("acceptor %s recovered from every peer: voting on every range again", self.node_id)
            self.active.set()

    async def _update_identity(self, change: Callable[[AcceptorIdentity], AcceptorIdentity]) -> AcceptorIdentity:
        async with self._identity_lock:
            assert self.identity is not None
            identity = change(self.identity)
            await self._save_identity(identity)
            return identity

    async def _update_identity_until_saved(
        self, change: Callable[[AcceptorIdentity], AcceptorIdentity]
    ) -> AcceptorIdentity:
        """``_update_identity``, retried with bounded randomized backoff while the store refuses it
        (ends only saved or cancelled by ``stop``); ``change`` is applied to the identity in force
        at each attempt, so a change saved meanwhile by another task is kept."""
        attempt = 0
        while True:
            try:
                identity = await self._update_identity(change)
            except StorageError as exc:
                attempt += 1
                self._note_save_failure(exc)
                await self.sleep(backoff_s(min(attempt, 8), self.rng, self.backoff_base_s, self.backoff_cap_s))
                continue
            if self._save_failing_since_ns is not None:
                log.warning(
                    "acceptor %s saved its identity (%s) after %.1f s of failed attempts", self.node_id,
                    identity.status, (self.clock.monotonic_ns() - self._save_failing_since_ns) / NS_PER_S,
                )
                self.save_error = None
                self._save_failing_since_ns = self._save_error_logged_ns = None
            return identity

    def _note_save_failure(self, exc: StorageError) -> None:
        now_ns = self.clock.monotonic_ns()
        self.save_failures += 1
        self.save_error = f"{type(exc).__name__}: {exc}"
        if self._save_failing_since_ns is None:
            self._save_failing_since_ns = now_ns
        logged_ns = self._save_error_logged_ns
        if logged_ns is None or now_ns - logged_ns >= SAVE_ERROR_LOG_EVERY_S * NS_PER_S:
            self._save_error_logged_ns = now_ns
            assert self.identity is not None
            log.error(
                "acceptor %s cannot save its identity (%s; %d failed attempts over %.1f s): it stays %s "
                "until the save lands, retrying", self.node_id, self.save_error, self.save_failures,
                (now_ns - self._save_failing_since_ns) / NS_PER_S, self.identity.status,
            )

    async def _save_identity(self, identity: AcceptorIdentity) -> None:
        # Durable before it takes effect: votes are only allowed from a state that is on disk.
        await self.storage.meta_put(ACCEPTOR_META, identity.encode())
        self.identity = identity

    # --- the serving side ---------------------------------------------------------------------

    async def on_register(self, sender: str, request: PaxosRegister) -> PaxosRegisterReply | ErrorReply:
        if sender not in self.peers:
            return ErrorReply("bad_request", f"{sender!r} is not a peer of {self.node_id}")
        incarnation = request.incarnation
        async with self._registry_lock:
            try:
                changed, previous = self.registry.register(sender, incarnation)
            except RetiredIncarnation as exc:
                return ErrorReply("retired_incarnation", str(exc))
            if changed:
                # Durable before the reply: the registering node scans us only after it, and our
                # votes name the new incarnation from now on (see the module docstring).
                await self.storage.meta_put(REGISTRY_META, self.registry.encode())
        if changed and previous is not None:
            log.warning("peer %s has a new acceptor incarnation %s (was %s)", sender, incarnation, previous)
        return PaxosRegisterReply(True, previous, self.incarnation)

    async def on_scan(self, sender: str, request: PaxosRecoverScan) -> PaxosRecoverScanReply | ErrorReply:
        if sender not in self.peers:
            return ErrorReply("bad_request", f"{sender!r} is not a peer of {self.node_id}")
        if self.registry.current.get(sender) != request.incarnation:
            return ErrorReply("not_registered", "register this incarnation before scanning")
        after = request.after
        limit, max_bytes = min(request.limit, PAGE_RECORDS), min(request.max_bytes, PAGE_BYTES)
        page = await self.storage.scan(TOKEN_MIN, TOKEN_MIN, limit, after)
        records: list[tuple[int, str, bytes]] = []
        size = 0
        cursor = after
        complete = True
        for record in page:
            cursor = (record.token, record.key)
            if sender in self.replicas_of(record.token):
                records.append((record.token, record.key, record.blob))
                size += len(record.blob) + len(record.key) + 32
                if size >= max_bytes:
                    complete = False
                    break
        return PaxosRecoverScanReply(records, cursor, complete and len(page) < limit)

    async def on_status(self, sender: str, request: PaxosStatus) -> PaxosStatusReply:
        return PaxosStatusReply(**self.status())

