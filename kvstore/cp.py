"""CP mode driver: CASPaxos acceptor and proposer over the Transport and Storage seams.

Theory of operation
-------------------
Linearizable keys are single-register replicated state machines run with
CASPaxos (Rystsov 2018, arXiv:1802.07000); the rules themselves are pure
functions in ``kvstore.paxos``.  This module adds I/O, time and concurrency.

**Acceptor** (``PaxosAcceptor``).  Every node runs one, over a dedicated
``Storage`` opened with ``fsync="always"``.  A message's read-modify-write of
the key's acceptor state runs under a per-key lock and the new state is
durable (``await storage.put``) *before* the reply leaves: a promise or accept
that was ever observed by a proposer survives a crash, which is what Paxos's
safety rests on.  The critical section is shielded from cancellation so an
abandoned caller can never leave a half-finished write racing with the next
message for the key.  A rejected message changes nothing and costs no fsync.

**Proposer** (``PaxosProposer``).  Any node can propose for any key, given the
key's replica list (the acceptors; normally the ring's N primaries, fixed per
key -- a majority is counted over exactly this list, so it must not vary
between proposers).  ``propose`` runs prepare then accept, each sent to every
replica in parallel and answered by a majority; the local node is reached
through the same ``call`` (the node short-circuits calls to itself).  On a
rejection it jumps its ballot counter past the conflicting ballot and retries
after randomized, bounded, exponential backoff, until ``max_attempts`` or the
deadline.  Nothing waits beyond the deadline: every call's timeout ends there,
undecided calls of a failed round are cancelled, and the late accepts of a
successful round finish in the background (bounded) so replicas keep up.

Ballot counters are one strictly increasing counter per proposer, never below
the wall clock in milliseconds (``clock_ballots``, like Cassandra's timestamp
ballots): a proposer new to a key then usually outbids the ballots already
there instead of losing its first prepare.  Any counter is safe; only liveness
depends on it.

**Fast path** (CASPaxos §2.2.1).  Each accept also asks the acceptors to
promise the proposer's *next* ballot.  When a majority accepted that way, the
proposer remembers (in a bounded LRU) the key, that next ballot, the committed
value and the replica list; its next operation on the key skips phase 1 and
costs one round trip and one fsync per acceptor instead of two.  If anyone else
prepared in between, the fast accept is rejected and the proposer falls back
to the full protocol.  The safety argument is in ``kvstore.paxos.on_accept``.
A fast accept reaches the local acceptor only after a peer took it: the local
acceptor answers first and is the likeliest to hold a stale fast-path promise,
and a stale partial accept would be hard to trace on retry (see below).

**Outcomes.**  Success returns a ``ProposeResult``.  A failed precondition
(compare-and-set, put-if-absent) is a *successful* proposal that re-commits the
unchanged value and reports ``precondition_failed``: it is a linearizable
observation.  Failure raises ``ConsensusUnavailable``; it is *indeterminate*
iff an accept carrying a changed value may have been stored by some acceptor:
then a later proposer may finish it (the "recovery" of CASPaxos) and the change
may still appear, so the caller must not report a certain failure.  A read
never changes the value, so a failed read is never indeterminate.

Retrying after an attempt whose changed value may have landed must neither
apply the change twice nor report as failed a change that took effect (both
break linearizability: think of a compare-and-set).  The proposer remembers the
*origins* (ballots) of those attempts (``pending``) and, in the next phase 1,
looks them up in the *lineage* of the latest state (``paxos.change_status``):

* one of them is in it: the change took effect (maybe already built upon by
  other proposers); re-commit the latest state unchanged, so it is chosen, and
  report that attempt's outcome and resulting value;
* none is in it, and the lineage proves it: once this attempt commits, no
  pending value can ever be chosen or built upon (every later phase 1 sees this
  attempt's ballot or a descendant of its value); apply the change afresh --
  exactly once;
* the lineage is too short to tell (``LINEAGE_DEPTH`` other changes happened
  in between): fail as indeterminate.

Round trips and fsyncs per operation: 2 RTT and 2 fsyncs per acceptor normally,
1 RTT and 1 fsync per acceptor on the fast path; every retry adds a full round.

Assumptions: the node's ``call`` raises ``PeerUnavailable``/``RemoteError``
(or returns an error reply) on failure; time comes from the injected ``Clock``
and backoff randomness from the injected ``random.Random``.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore.clock import Clock
from kvstore.errors import Overloaded, QuorumUnavailable
from kvstore.locks import KeyLocks
from kvstore.membership import STALE_CONFIG, quorum_possible, quorum_reached
from kvstore.paxos import (
    ABSENT,
    EMPTY_STATE,
    Accepted,
    AcceptorState,
    Ballot,
    Change,
    ChangeOutcome,
    CorruptState,
    Lineage,
    OutcomeStatus,
    Promise,
    RegisterValue,
    Rejected,
    apply_change,
    backoff_s,
    ballot_from_wire,
    ballot_to_wire,
    change_status,
    extend_lineage,
    highest_accepted,
    lineage_from_wire,
    lineage_to_wire,
    majority,
    merge_states,
    next_ballot,
    on_accept,
    on_prepare,
    stale_acceptors,
)
from kvstore.storage.base import Storage, StorageError
from kvstore.transport.base import Message, PeerUnavailable, RemoteError

OP_PREPARE = "paxos_prepare"
OP_ACCEPT = "paxos_accept"

Call = Callable[[str, Message, float], Awaitable[Message]]
Sleep = Callable[[float], Awaitable[None]]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ConsensusUnavailable(QuorumUnavailable):
    """No majority of the key's replicas completed a round before the deadline (or attempts ran out).

    ``indeterminate``: an accept for a changed value may have been stored by some acceptor, so
    the change may still become visible.  Maps to HTTP 503 ``quorum_unavailable`` like the AP
    path's error (it subclasses ``QuorumUnavailable``).
    """

    def __init__(self, needed: int, acknowledged: int, indeterminate: bool, reason: str = "") -> None:
        super().__init__(needed, acknowledged, indeterminate, detail=reason)
        self.reason = reason


class ConsensusOverloaded(Overloaded):
    """Too many proposals in flight on this node (HTTP 503 ``overloaded``)."""


class PaxosMessageError(ValueError):
    """A malformed Paxos message (answered with a remote error, never applied)."""


# --------------------------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------------------------
#
# prepare: {"op": "paxos_prepare", "key": str, "token": int, "ballot": [counter, node],
#           "group": [member, ...] (the key's acceptors)}
#   reply: {"ok": True, "accepted": [counter, node] | None, "value": bytes | None,
#           "lineage": [[counter, node], ...], "inc": str, "view": {member: str}}
#        | {"ok": False, "conflict": [counter, node]}
# accept:  {"op": "paxos_accept", "key": str, "token": int, "ballot": [counter, node],
#           "value": bytes | None (None = absent/deleted), "promise_next": [counter, node] | None,
#           "lineage": [[counter, node], ...] (origins of the value's last changes, newest first),
#           "group": [member, ...]}
#   reply: {"ok": True, "promised_next": [counter, node] | None, "inc": str, "view": {member: str}}
#        | {"ok": False, "conflict": [counter, node]}
# "inc" is the answering acceptor's incarnation, "view" the incarnations it has registered for
# the other members of "group" (kvstore.cp_recovery); both absent when it has no identity.
# errors:  {"error": code, "message": str, "remote_error": True}  (the transport's convention);
#          code "recovering": the acceptor lost its storage and does not vote yet (nothing done).

MAX_GROUP = 64  # acceptors named in one message (a key has N of them)


def prepare_message(key: str, token: int, ballot: Ballot, group: Iterable[str] = ()) -> Message:
    message: Message = {"op": OP_PREPARE, "key": key, "token": token, "ballot": ballot.to_wire()}
    if group:
        message["group"] = list(group)
    return message


def accept_message(
    key: str,
    token: int,
    ballot: Ballot,
    value: RegisterValue,
    promise_next: Ballot | None,
    lineage: Lineage = (),
    group: Iterable[str] = (),
) -> Message:
    message: Message = {
        "op": OP_ACCEPT,
        "key": key,
        "token": token,
        "ballot": ballot.to_wire(),
        "value": value.value,
        "promise_next": ballot_to_wire(promise_next),
        "lineage": lineage_to_wire(lineage),
    }
    if group:
        message["group"] = list(group)
    return message


def _reply_to_wire(reply: Promise | Accepted | Rejected) -> Message:
    match reply:
        case Promise(accepted=accepted, value=value, lineage=lineage):
            return {
                "ok": True,
                "accepted": ballot_to_wire(accepted),
                "value": None if value is None else value.value,
                "lineage": lineage_to_wire(lineage),
            }
        case Accepted(promised_next=promised_next):
            return {"ok": True, "promised_next": ballot_to_wire(promised_next)}
        case Rejected(conflict=conflict):
            return {"ok": False, "conflict": conflict.to_wire()}
    raise AssertionError(f"unknown reply {reply!r}")


def _bytes_or_none(obj: Any, what: str) -> bytes | None:
    if obj is not None and not isinstance(obj, bytes):
        raise PaxosMessageError(f"{what} must be bytes or null")
    return obj


def _parse_prepare_reply(reply: Message, ballot: Ballot) -> Promise | Rejected:
    """Parse a peer's reply (untrusted); raises ValueError when malformed."""
    if reply.get("ok") is True:
        accepted = ballot_from_wire(reply.get("accepted"))
        raw = _bytes_or_none(reply.get("value"), "value")
        if accepted is None:
            return Promise(ballot, None, None)
        if "value" not in reply:
            raise ValueError("a promise with an accepted ballot must carry its value")
        lineage = lineage_from_wire(reply.get("lineage"))
        if lineage and lineage[0] > accepted:
            raise ValueError("a state's latest change cannot be newer than its accepted ballot")
        return Promise(ballot, accepted, RegisterValue.of(raw), lineage)
    if reply.get("ok") is False:
        return Rejected(Ballot.from_wire(reply.get("conflict")))
    raise ValueError(f"malformed prepare reply {reply!r}")


def _parse_accept_reply(reply: Message, ballot: Ballot) -> Accepted | Rejected:
    if reply.get("ok") is True:
        return Accepted(ballot, ballot_from_wire(reply.get("promised_next")))
    if reply.get("ok") is False:
        return Rejected(Ballot.from_wire(reply.get("conflict")))
    raise ValueError(f"malformed accept reply {reply!r}")


# --------------------------------------------------------------------------------------------
# Acceptor
# --------------------------------------------------------------------------------------------


@dataclass
class AcceptorStats:
    prepares: int = 0
    accepts: int = 0
    rejects: int = 0
    writes: int = 0  # durable state writes (one fsync each under fsync="always")
    malformed: int = 0
    refused_recovering: int = 0  # messages refused because the acceptor has not recovered yet
    absorbed: int = 0  # states merged in from other acceptors by recovery


class AcceptorGate(Protocol):
    """Whether this acceptor may vote, and who it is (``kvstore.cp_recovery.AcceptorRecovery``)."""

    @property
    def incarnation(self) -> str: ...

    def votable(self, token: int) -> bool:
        """False while the acceptor lost state it has not recovered for this token's range."""
        ...

    def view(self, members: Iterable[str]) -> dict[str, str]:
        """The incarnations registered here for those members (itself and unknown ones left out)."""
        ...


RECOVERING = "recovering"


class PaxosAcceptor:
    """Answers ``paxos_prepare`` / ``paxos_accept`` for every key, persisting before replying.

    With a ``gate``, it refuses (error ``recovering``, nothing done) every message for a token
    the gate says it may not vote on yet, and tags each reply with its incarnation and its view
    of the group's incarnations, which lets proposers drop replies of a lost incarnation
    (``kvstore.paxos.stale_acceptors``).  Without one (simulations of acceptors whose storage
    is never lost) it always votes and tags nothing.
    """

    def __init__(self, storage: Storage, gate: AcceptorGate | None = None) -> None:
        self.storage = storage
        self.gate = gate
        self.locks = KeyLocks()
        self.stats = AcceptorStats()

    async def handle(self, message: Message) -> Message:
        """Answer one Paxos message.  Malformed messages get an error reply; storage failures
        (including an undecodable stored state) raise ``StorageError`` -- never a reply that
        could forget a promise."""
        try:
            op, key, token, ballot, value, promise_next, lineage = _parse_request(message)
            group = _parse_group(message.get("group"))
        except (PaxosMessageError, ValueError) as exc:
            self.stats.malformed += 1
            return {"error": "bad_request", "message": str(exc), "remote_error": True}
        if self.gate is not None and not self.gate.votable(token):
            # Our storage was lost and this key's range is not recovered yet: a vote from empty
            # state could contradict a promise or accept the lost state held.
            self.stats.refused_recovering += 1
            return {
                "error": RECOVERING,
                "message": "this acceptor lost its storage and is recovering the key's state from its peers",
                "remote_error": True,
            }
        # Shielded: if the caller gives up (a cancelled straggler, a local call abandoned at the
        # deadline), the read-modify-write still finishes under the lock.  Without this, a put
        # still running in a storage thread could land after a later message's put and roll back
        # a promise that was already replied.
        work = asyncio.ensure_future(self._apply(op, key, token, ballot, value, promise_next, lineage, group))
        work.add_done_callback(_consume_outcome)  # abandoned by a cancelled caller: no warning
        return await asyncio.shield(work)

    async def _apply(
        self,
        op: str,
        key: str,
        token: int,
        ballot: Ballot,
        value: RegisterValue | None,
        promise_next: Ballot | None,
        lineage: Lineage,
        group: tuple[str, ...] = (),
    ) -> Message:
        async with self.locks.hold(key):
            state = await self.load(key, token)
            reply: Promise | Accepted | Rejected
            if op == OP_PREPARE:
                self.stats.prepares += 1
                new_state, reply = on_prepare(state, ballot)
            else:
                assert value is not None
                self.stats.accepts += 1
                new_state, reply = on_accept(state, ballot, value, promise_next=promise_next, lineage=lineage)
            if isinstance(reply, Rejected):
                self.stats.rejects += 1
                assert new_state == state
            else:
                # Durable before the reply leaves: the promise/accept is now unforgettable.
                await self.storage.put(key, token, new_state.encode())
                self.stats.writes += 1
            wire = _reply_to_wire(reply)
            if self.gate is not None:
                # The view is read after the state is durable, with no await in between: if it
                # does not show a peer's newer incarnation yet, that peer registered after this
                # state was stored, hence its recovery scan sees it (kvstore.cp_recovery).
                wire["inc"] = self.gate.incarnation
                wire["view"] = self.gate.view(group)
            return wire

    async def absorb(self, key: str, token: int, remote: AcceptorState) -> bool:
        """Merge another acceptor's state for a key into ours (recovery); True if it changed.

        Runs under the key's lock like a vote, shielded from cancellation, durable on return.
        Raises ``ValueError`` for a state that contradicts ours at one ballot."""
        work = asyncio.ensure_future(self._absorb(key, token, remote))
        work.add_done_callback(_consume_outcome)
        return await asyncio.shield(work)

    async def _absorb(self, key: str, token: int, remote: AcceptorState) -> bool:
        async with self.locks.hold(key):
            local = await self.load(key, token)
            merged = merge_states(local, remote)
            if merged == local:
                return False
            await self.storage.put(key, token, merged.encode())
            self.stats.writes += 1
            self.stats.absorbed += 1
            return True

    async def load(self, key: str, token: int) -> AcceptorState:
        blob = await self.storage.get(key, token)
        if blob is None:
            return EMPTY_STATE
        try:
            return AcceptorState.decode(blob)
        except CorruptState as exc:
            # Answering from an empty state would break promises: refuse instead.
            raise StorageError(f"corrupt paxos state for key {key!r}: {exc}") from exc


def _parse_group(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_GROUP or not all(isinstance(m, str) and m for m in raw):
        raise PaxosMessageError(f"group must be a list of at most {MAX_GROUP} member ids")
    return tuple(raw)


def _parse_tags(reply: Message) -> tuple[str | None, dict[str, str]]:
    """The (incarnation, view) a reply carries; ValueError when malformed (untrusted input)."""
    incarnation = reply.get("inc")
    view = reply.get("view") or {}
    if incarnation is not None and not isinstance(incarnation, str):
        raise ValueError("inc must be a string")
    if not isinstance(view, dict) or len(view) > MAX_GROUP:
        raise ValueError("view must be a map of member ids to incarnations")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in view.items()):
        raise ValueError("view must map member ids to incarnation strings")
    return incarnation, view


def _parse_request(
    message: Message,
) -> tuple[str, str, int, Ballot, RegisterValue | None, Ballot | None, Lineage]:
    op = message.get("op")
    if op not in (OP_PREPARE, OP_ACCEPT):
        raise PaxosMessageError(f"not a paxos op: {op!r}")
    key = message.get("key")
    token = message.get("token")
    if not isinstance(key, str):
        raise PaxosMessageError("key must be a string")
    if not isinstance(token, int) or isinstance(token, bool):
        raise PaxosMessageError("token must be an integer")
    ballot = Ballot.from_wire(message.get("ballot"))
    if op == OP_PREPARE:
        return op, key, token, ballot, None, None, ()
    if "value" not in message:
        raise PaxosMessageError("accept needs a value (null = absent)")
    value = RegisterValue.of(_bytes_or_none(message.get("value"), "value"))
    promise_next = ballot_from_wire(message.get("promise_next"))
    if promise_next is not None and not (promise_next > ballot and promise_next.node == ballot.node):
        raise PaxosMessageError("promise_next must be a later ballot of the same proposer")
    lineage = lineage_from_wire(message.get("lineage"))
    if lineage and lineage[0] > ballot:
        raise PaxosMessageError("a value's latest change cannot be newer than its accept ballot")
    return op, key, token, ballot, value, promise_next, lineage


# --------------------------------------------------------------------------------------------
# Proposer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProposeResult:
    """A committed proposal.  ``value`` is the register state after it (never None: an absent
    key is ``RegisterValue(None, None)``); ``current_etag`` is that state's etag."""

    value: RegisterValue
    outcome: OutcomeStatus
    current_etag: str | None
    round_trips: int


@dataclass(frozen=True, slots=True)
class _FastPath:
    ballot: Ballot  # promised by a majority together with their accept of ``value``
    value: RegisterValue
    lineage: Lineage
    replicas: tuple[str, ...]
    acceptor_sets: tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class _Pending:
    """A change of this request whose accept may have been stored somewhere (keyed by origin)."""

    value: RegisterValue  # the state right after the change
    outcome: ChangeOutcome
    parent: Ballot | None  # origin of the state the change was applied to


@dataclass
class _Round:
    # (acceptor, Promise or Accepted, its incarnation, its view of the group's incarnations)
    replies: list[tuple[str, Any, str | None, dict[str, str]]] = field(default_factory=list)
    conflicts: list[Ballot] = field(default_factory=list)
    # Calls whose request may have reached the acceptor without us seeing the answer: lost
    # replies, timeouts, remote errors, cancelled stragglers.
    maybe_delivered: int = 0
    failures: int = 0
    recovering: int = 0  # refused by an acceptor that lost its storage (nothing done there)

    @property
    def oks(self) -> list[Any]:
        """The ok replies that count: those of an incarnation no other reply says is gone."""
        stale = stale_acceptors({peer: (inc, view) for peer, _, inc, view in self.replies})
        return [ok for peer, ok, _, _ in self.replies if peer not in stale]

    @property
    def ok_peers(self) -> list[tuple[str, Any]]:
        """(acceptor, reply) of the ok replies that count (see ``oks``)."""
        stale = stale_acceptors({peer: (inc, view) for peer, _, inc, view in self.replies})
        return [(peer, ok) for peer, ok, _, _ in self.replies if peer not in stale]

    @property
    def discarded(self) -> int:
        return len(self.replies) - len(self.oks)


@dataclass
class ProposerStats:
    proposals: int = 0
    committed: int = 0
    failed: int = 0
    retries: int = 0
    fast_path_hits: int = 0  # fast accept committed
    fast_path_misses: int = 0  # fast accept rejected: fell back to the full protocol
    overloaded: int = 0


class PaxosProposer:
    """Runs CASPaxos proposals for this node; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        call: Call,
        clock: Clock,
        rng: random.Random,
        *,
        max_attempts: int = 20,
        backoff_base_s: float = 0.005,
        backoff_cap_s: float = 0.2,
        max_in_flight: int = 256,
        fast_path: bool = True,
        clock_ballots: bool = True,
        fast_path_capacity: int = 10_000,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        assert node_id and max_attempts >= 1 and max_in_flight >= 1 and fast_path_capacity >= 0
        self.node_id = node_id
        self.call = call
        self.clock = clock
        self.rng = rng
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_in_flight = max_in_flight
        self.fast_path = fast_path
        self.clock_ballots = clock_ballots
        self.fast_path_capacity = fast_path_capacity
        self.sleep = sleep
        self.stats = ProposerStats()
        self.in_flight = 0
        # One counter for all keys: strictly increasing, so this proposer never reuses a ballot
        # for any key (ballots only need to be unique per key; a shared counter is simpler).
        self._last: Ballot | None = None
        self._seen_counter = 0
        self._fast: OrderedDict[str, _FastPath] = OrderedDict()
        self._stragglers: set[asyncio.Future[Message]] = set()

    # --- public ---------------------------------------------------------------------------

    async def propose(
        self,
        key: str,
        token: int,
        replicas: list[str],
        change: Change,
        timeout_s: float,
        *,
        acceptor_sets: tuple[tuple[str, ...], ...] | None = None,
        stamp: Message | None = None,
    ) -> ProposeResult:
        """Linearizably apply ``change`` to ``key``'s register replicated on ``replicas``.

        ``acceptor_sets`` (default: ``replicas`` alone) are the sets each phase needs a majority
        of: during a membership change the key's old and new acceptor sets (joint consensus,
        ``kvstore.membership``); ``replicas`` must be their union.  ``stamp`` is merged into every
        prepare and accept (the configuration version the sets were computed from, so an
        acceptor that knows a newer one refuses the round instead of counting in it).

        Raises ``ConsensusUnavailable`` (see ``indeterminate``) or ``ConsensusOverloaded``.
        """
        assert replicas and len(set(replicas)) == len(replicas), "replicas must be distinct"
        sets = acceptor_sets if acceptor_sets is not None else (tuple(replicas),)
        assert set().union(*sets) == set(replicas), "the replicas are the union of the acceptor sets"
        assert timeout_s > 0
        if self.in_flight >= self.max_in_flight:
            self.stats.overloaded += 1
            raise ConsensusOverloaded(f"{self.in_flight} consensus proposals already in flight")
        self.in_flight += 1
        self.stats.proposals += 1
        try:
            result = await self._propose(key, token, tuple(replicas), change, timeout_s, sets, stamp or {})
        except ConsensusUnavailable:
            self.stats.failed += 1
            raise
        finally:
            self.in_flight -= 1
        self.stats.committed += 1
        return result

    def holds_fast_path(self, key: str) -> bool:
        return key in self._fast

    def forget_fast_path(self, key: str | None = None) -> None:
        """Drop fast-path entries (e.g. when the ring changes the key's replicas)."""
        if key is None:
            self._fast.clear()
        else:
            self._fast.pop(key, None)

    # --- protocol -------------------------------------------------------------------------

    async def _propose(
        self,
        key: str,
        token: int,
        group: tuple[str, ...],
        change: Change,
        timeout_s: float,
        sets: tuple[tuple[str, ...], ...],
        stamp: Message,
    ) -> ProposeResult:
        deadline_ns = self.clock.monotonic_ns() + int(timeout_s * 1e9)
        need = majority(len(group)) if len(sets) == 1 else sum(majority(len(s)) for s in sets)
        pending: dict[Ballot, _Pending] = {}
        round_trips = 0
        acknowledged = 0
        reason = "no majority answered"
        # Single use: popped before any await, so two concurrent proposals on this node can never
        # both send an accept at the same fast ballot (with possibly different values).
        fast = self._fast.pop(key, None)
        if fast is not None and (fast.replicas != group or fast.acceptor_sets != sets):
            fast = None  # promised by a majority of another replica set: not a phase 1 for this one
        attempt = 0
        while True:
            if attempt > 0:
                self.stats.retries += 1
                if attempt >= self.max_attempts:
                    raise ConsensusUnavailable(
                        need, acknowledged, bool(pending), f"gave up after {attempt} attempts: {reason}"
                    )
                remaining = self._remaining_s(deadline_ns)
                if remaining > 0:
                    # With a change of ours possibly stored somewhere, look again soon: the longer
                    # we wait, the more changes pile up after it and the likelier its trail in the
                    # lineage is lost (an indeterminate answer).  Still randomized, so dueling
                    # proposers still break their symmetry.
                    step = 0 if pending else attempt - 1
                    delay = backoff_s(step, self.rng, self.backoff_base_s, self.backoff_cap_s)
                    await self.sleep(min(remaining, delay))
            if self._remaining_s(deadline_ns) <= 0:
                raise ConsensusUnavailable(need, acknowledged, bool(pending), f"timed out: {reason}")
            attempt += 1

            current: RegisterValue
            lineage: Lineage
            applied: _Pending | None = None  # a pending change found in the latest state
            if fast is not None:
                # Phase 1 for fast.ballot was done by our previous accept (see paxos.on_accept).
                assert not pending
                ballot, current, lineage = fast.ballot, fast.value, fast.lineage
                fast = None
                used_fast = True
            else:
                used_fast = False
                ballot = self._new_ballot()
                round_trips += 1
                prepared = await self._round(
                    group,
                    {**prepare_message(key, token, ballot, group), **stamp},
                    sets,
                    deadline_ns,
                    ballot,
                    _parse_prepare_reply,
                )
                acknowledged = len(prepared.oks)
                if not quorum_reached({peer for peer, _ in prepared.ok_peers}, sets):
                    reason = self._reason("prepare", prepared, need)
                    continue
                best = highest_accepted(prepared.oks)
                current = ABSENT if best is None or best.value is None else best.value
                lineage = () if best is None else best.lineage
                statuses = {
                    origin: change_status(origin, lineage, attempt_state.parent)
                    for origin, attempt_state in pending.items()
                }
                found = [pending[origin] for origin, status in statuses.items() if status == "applied"]
                # Two attempts of one request are never both in one chain: each fresh attempt was
                # made only after proving the earlier ones absent from the state it extended.  So
                # one found applied settles it, even if older attempts' trails are lost.
                assert len(found) <= 1, "a change applied twice"
                if found:
                    applied = found[0]
                elif "unknown" in statuses.values():
                    raise ConsensusUnavailable(
                        need,
                        acknowledged,
                        True,
                        "an attempt of this request was partially accepted and too many changes "
                        "followed to tell whether it took effect",
                    )

            if applied is not None:
                # Our change took effect (possibly built upon since): make that state chosen.
                new_value, new_lineage, outcome, reported = current, lineage, applied.outcome, applied.value
            else:
                new_value, outcome = apply_change(change, current)
                changed = new_value != current
                new_lineage = extend_lineage(lineage, ballot) if changed else lineage
                reported = new_value

            if self._remaining_s(deadline_ns) <= 0:
                # Nothing sent in this attempt: only earlier attempts can make this indeterminate.
                raise ConsensusUnavailable(need, acknowledged, bool(pending), f"timed out: {reason}")
            promise_next = self._reserve_next(ballot) if self.fast_path else None
            round_trips += 1
            accepted = await self._round(
                group,
                {**accept_message(key, token, ballot, new_value, promise_next, new_lineage, group), **stamp},
                sets,
                deadline_ns,
                ballot,
                _parse_accept_reply,
                # A fast accept goes to the local acceptor only once a peer took it.  The local
                # acceptor answers first and is the one most likely to hold a stale fast-path
                # promise (it is outside the majorities other proposers used meanwhile); if it
                # alone took a stale fast accept, that partial value's origin would be far behind
                # the chain and a retry could not tell whether it took effect.
                defer=self.node_id if used_fast and self.node_id in group and len(group) > 1 else None,
                keep_stragglers=True,
            )
            acknowledged = len(accepted.oks)
            if quorum_reached({peer for peer, _ in accepted.ok_peers}, sets):
                if used_fast:
                    self.stats.fast_path_hits += 1
                if promise_next is not None:
                    promised = {peer for peer, ok in accepted.ok_peers if ok.promised_next == promise_next}
                    if quorum_reached(promised, sets):
                        self._remember_fast(key, _FastPath(promise_next, new_value, new_lineage, group, sets))
                return ProposeResult(reported, outcome.status, outcome.current_etag, round_trips)
            if used_fast:
                self.stats.fast_path_misses += 1
            reason = self._reason("accept", accepted, need)
            # Every acceptor that took the accept counts here, a discarded (stale) one too: it stored it.
            if applied is None and new_value != current and (accepted.replies or accepted.maybe_delivered):
                # Some acceptor may hold the changed value: anyone's phase 1 may still pick it up.
                # Remember its origin so that a retry can tell whether it took effect.
                pending[ballot] = _Pending(new_value, outcome, lineage[0] if lineage else None)

    async def _round(
        self,
        group: tuple[str, ...],
        message: Message,
        sets: tuple[tuple[str, ...], ...],
        deadline_ns: int,
        ballot: Ballot,
        parse: Callable[[Message, Ballot], Any],
        *,
        defer: str | None = None,
        keep_stragglers: bool = False,
    ) -> _Round:
        """Send ``message`` to every replica; return once a majority of every one of ``sets``
        accepted, success became impossible, or the deadline passed.

        Calls still undecided then are cancelled, unless ``keep_stragglers`` and the round
        succeeded: then they finish in the background (bounded: each call's timeout ends at the
        deadline, and at most ``4 * max_in_flight`` are kept), so that every reachable replica
        takes the accepted value and its acceptor does not fall behind.

        ``defer`` names a replica contacted only after another replica said ok (so if everyone
        else rejects, it never receives the message at all)."""
        assert defer is None or defer in group
        result = _Round()

        peer_of: dict[asyncio.Future[Message], str] = {}

        def send(peer: str) -> asyncio.Future[Message]:
            task = asyncio.ensure_future(self.call(peer, message, self._remaining_s(deadline_ns)))
            task.add_done_callback(_consume_outcome)
            peer_of[task] = peer
            return task

        waiting: set[asyncio.Future[Message]] = {send(peer) for peer in group if peer != defer}
        deferred = defer
        try:
            while True:
                acked = {peer for peer, _ in result.ok_peers}
                outstanding = {peer_of[w] for w in waiting} | ({deferred} if deferred is not None else set())
                if quorum_reached(acked, sets) or not quorum_possible(acked, outstanding, sets):
                    break
                if deferred is not None and (result.oks or not waiting):
                    if not result.oks:
                        break  # everyone else refused: the deferred replica is left alone
                    waiting.add(send(deferred))
                    deferred = None
                remaining = self._remaining_s(deadline_ns)
                if remaining <= 0 or not waiting:
                    break
                done, waiting = await asyncio.wait(
                    waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break
                for finished in done:
                    self._classify(finished, peer_of[finished], result, ballot, parse)
        finally:
            keep = keep_stragglers and quorum_reached({peer for peer, _ in result.ok_peers}, sets)
            if deferred is not None and keep:
                waiting.add(send(deferred))  # the round succeeded without it: bring it up to date
            for straggler in waiting:
                if keep and len(self._stragglers) < 4 * self.max_in_flight:
                    self._stragglers.add(straggler)
                    straggler.add_done_callback(self._stragglers.discard)
                elif straggler.cancel():
                    result.maybe_delivered += 1  # it was in flight: it may have been applied
        for conflict in result.conflicts:
            self._seen_counter = max(self._seen_counter, conflict.counter)
        return result

    @staticmethod
    def _classify(
        task: asyncio.Future[Message],
        peer: str,
        result: _Round,
        ballot: Ballot,
        parse: Callable[[Message, Ballot], Any],
    ) -> None:
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        if isinstance(exc, RemoteError) and exc.code in (RECOVERING, STALE_CONFIG):
            # A typed refusal sent before anything was done: a certain failure of this call.
            result.failures += 1
            result.recovering += 1
            return
        if exc is not None:
            result.failures += 1
            if not isinstance(exc, PeerUnavailable) or exc.maybe_delivered:
                # Timeouts, lost replies and remote errors (e.g. a storage error mid-write)
                # may have been applied; only a refused connection certainly was not.
                result.maybe_delivered += 1
            return
        reply = task.result()
        if isinstance(reply, dict) and reply.get("error") in (RECOVERING, STALE_CONFIG):
            # A typed refusal sent before anything was done: a certain failure of this call.
            result.failures += 1
            result.recovering += 1
            return
        try:
            if not isinstance(reply, dict) or reply.get("error"):
                raise ValueError(f"error reply {reply!r}")
            parsed = parse(reply, ballot)
            incarnation, view = _parse_tags(reply)
        except ValueError:
            result.failures += 1
            result.maybe_delivered += 1
            return
        if isinstance(parsed, Rejected):
            result.conflicts.append(parsed.conflict)
        else:
            result.replies.append((peer, parsed, incarnation, view))

    @staticmethod
    def _reason(phase: str, result: _Round, need: int) -> str:
        parts = [f"{phase}: {len(result.oks)}/{need} ok"]
        if result.conflicts:
            parts.append(f"{len(result.conflicts)} rejected (highest {max(result.conflicts).to_wire()})")
        if result.recovering:
            parts.append(f"{result.recovering} recovering lost storage")
        if result.failures - result.recovering:
            parts.append(f"{result.failures - result.recovering} unreachable")
        if result.discarded:
            parts.append(f"{result.discarded} from a lost incarnation")
        return ", ".join(parts)

    # --- ballots and the fast-path cache --------------------------------------------------

    def _new_ballot(self) -> Ballot:
        seen = self._seen_counter
        if self.clock_ballots:
            # Counters at least the wall clock in ms (as Cassandra's LWT ballots are timestamps):
            # a proposer new to a key then usually beats the ballots already there instead of
            # losing its first prepare.  Any counter is safe; a skewed clock costs only a retry.
            seen = max(seen, self.clock.wall_ns() // 1_000_000 - 1)
        ballot = next_ballot(self._last, seen, self.node_id)
        self._last = ballot
        return ballot

    def _reserve_next(self, ballot: Ballot) -> Ballot:
        """The ballot the acceptors promise with this accept; never used for anything else."""
        nxt = self._new_ballot()
        assert nxt > ballot
        return nxt

    def _remember_fast(self, key: str, entry: _FastPath) -> None:
        if self.fast_path_capacity == 0:
            return
        existing = self._fast.get(key)
        # Replies can complete out of ballot order under concurrency; an older entry would only
        # be rejected by the acceptors, so keep the newest.
        if existing is None or entry.ballot > existing.ballot:
            self._fast[key] = entry
        self._fast.move_to_end(key)
        while len(self._fast) > self.fast_path_capacity:
            self._fast.popitem(last=False)

    def _remaining_s(self, deadline_ns: int) -> float:
        return (deadline_ns - self.clock.monotonic_ns()) / 1e9


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    # A straggler that fails after its round was decided must not log "exception never retrieved".
    if not task.cancelled():
        task.exception()
