"""CASPaxos proposer core: one proposal as a pure, step-able state machine.

Theory of operation
-------------------
A ``ProposerCore`` runs one proposal (CASPaxos, Rystsov 2018, arXiv:1802.07000; the
rules are in ``kvstore.protocol.paxos``) without doing any I/O itself, in the style of
etcd-io/raft's ``Ready``/``Advance``: it is fed *inputs* and answers each one with a
batch of *effects* for its driver to carry out, in order, before the next input.
The production driver is ``kvstore.runtime.caspaxos.PaxosProposer`` (asyncio, the node's
``call``); the property test in ``tests/test_paxos_rules.py`` steps many cores
against pure acceptors under a seeded scheduler that delivers, drops, duplicates
and reorders messages -- the same code either way.

Inputs (``at`` is an ``Instant``: a reading of the node's Clock; the core never
reads time or global randomness -- backoff draws from the ``random.Random`` it is
given):

* ``start(at)`` -- once, first;
* ``on_answers(answers, at)`` -- answers to earlier ``Send``s, in the order they
  completed: ``Reply(call, message)`` (the wire reply, untrusted) or
  ``CallFailed(call, maybe_delivered, recovering)``: ``maybe_delivered`` when the
  request may have reached the acceptor (a timeout, a lost reply, a remote error),
  ``recovering`` for an acceptor's typed refusal because it lost its storage (nothing
  was done there: a certain failure).  The round is judged after the whole batch, so
  a driver passes every answer it already has (an answer at hand is then never
  counted as a call in flight); ``on_reply``/``on_failure`` are one-answer batches;
* ``on_timer(at)`` -- the timer of the last ``StartTimer`` fired.

Replies and failures for calls the core no longer waits for (abandoned, detached,
duplicated, or after the outcome) are ignored, so a driver may deliver them anyway.

Effects of one batch, always in this order:

1. ``Send(call, peer, message, timeout_at_ns)`` -- start a call (in replica-list
   order); its answer comes back as ``on_reply``/``on_failure`` with the same ``call``.
2. ``Abandon(calls)`` -- cancel these calls of a round that ended without them (their
   requests may still arrive: the core has counted them as maybe delivered); or
   ``Detach(calls)`` -- the calls of an accept round that succeeded without them: let
   them finish in the background so lagging acceptors take the chosen state (a
   driver may cancel them instead when it has too many; that only costs catch-up).
   Both come after the sends because a ``Detach`` may name a call sent in the same batch.
3. ``StartTimer(at_ns)`` -- at most one; it replaces any earlier timer.  In a round it
   is the proposal's deadline; between attempts it ends the backoff (a backoff timer
   may fire early: its length only spreads dueling proposers apart, safety never
   depends on it).
4. ``Done(result)`` or ``Failed(error)`` -- last, once; nothing follows it.

There is no "persist" effect: a proposer keeps nothing durable.  Acceptors persist
before they reply (``kvstore.runtime.caspaxos``), and ballot uniqueness across a proposer's restart
rests on prepares being strictly greater (``kvstore.protocol.paxos``).

What the core does, one attempt at a time: a prepare round to every replica
answered by a majority (the local node is a replica like any other), then an
accept round with the change applied to the highest accepted state.  A round ends
as soon as a majority said ok, success became impossible, or the deadline timer
fired; its still-undecided calls are then abandoned -- or, after a successful
accept, detached.  On failure the core jumps its ballot counter past every
conflict it saw and retries after randomized, bounded, exponential backoff, until
``max_attempts`` or the deadline.  Ok votes from an acceptor's lost incarnation
(``kvstore.protocol.paxos.stale_acceptors``, fed by the "inc"/"view" tags of replies) are
dropped from every count.

**Joint consensus** (Raft's §6 applied to CASPaxos; docs/membership.md).  While a
membership change moves a key's replicas, the core is given the key's *acceptor sets*
(the old and the new one; ``replicas`` is their union) and a round succeeds only with a
majority of *each* set (``kvstore.protocol.membership.quorum_reached``); it ends early once
that became impossible.  Every prepare and accept carries the caller's ``stamp`` (the
configuration version the sets came from): an acceptor that installed a newer version
answers ``stale_config``, a certain failure of that call like ``recovering``.  A fast-path
entry is kept per acceptor-set shape, so a promise made by majorities of one shape is never
used as the phase 1 of another.

**Shared per-node state** (``ProposerState``): one strictly increasing ballot
counter for all keys, never below the wall clock in milliseconds
(``clock_ballots``, like Cassandra's timestamp ballots, so a proposer new to a key
usually outbids the ballots there; any counter is safe), and the fast-path cache.

**Fast path** (CASPaxos §2.2.1).  Each accept also asks the acceptors to promise
the proposer's *next* ballot.  When a majority accepted that way, the state
remembers (bounded LRU) the key, that next ballot, the committed value and the
replica list; the next proposal on the key skips phase 1 (1 round trip and 1 fsync
per acceptor instead of 2).  An entry is taken (popped) by ``start``, so two
proposals can never both send an accept at one fast ballot.  If anyone else
prepared in between, the fast accept is rejected and the core falls back to the
full protocol.  A fast accept reaches the local acceptor only after a peer took it:
the local acceptor answers first and is the likeliest to hold a stale fast-path
promise, and a stale partial accept would be hard to trace on retry.

**Quorum reads** (``ProposerConfig.peek_reads``).  A read first sends a *peek* to every
replica: a read-only look at the acceptor's accepted state (no promise, no fsync).  If a
majority of every acceptor set reports one accepted ballot, each from its own vote, that state
is chosen and no later change had completed when the read began, so the read answers it: 1
round trip, no fsync, no promise taken -- the key's fast-path promise stays valid (the
argument is in ``kvstore.protocol.paxos``, "Quorum reads").  If the first quorum of replies does
not agree (a change in flight, a lagging or recovered acceptor), the read falls back to the full protocol
below (the identity change, re-committed), or, with ``fallback=False``, fails with
``PeekInconclusive`` (certain: a read changes nothing) so that its caller can hand it to the
key's proposer.  A peek needs no ballot and no lease: any node may run one.

**Outcomes.**  ``Done`` carries a ``ProposeResult``; a failed precondition is a
*successful* proposal re-committing the unchanged value (a linearizable
observation).  ``Failed`` carries ``ConsensusUnavailable``, *indeterminate* iff an
accept carrying a changed value may have been stored by some acceptor (a later
proposer may finish it).  A read never changes the value: a failed read is never
indeterminate.

A retry after an attempt whose changed value may have landed must neither apply
the change twice nor report as failed a change that took effect.  The core
remembers those attempts' *origins* (ballots) and looks them up in the *lineage*
of the state its next phase 1 finds (``paxos.change_status``): found -> re-commit
that state unchanged and report that attempt's outcome; provably absent -> apply
the change afresh (once this attempt commits, no pending value can ever be chosen
or built upon); trail lost (``LINEAGE_DEPTH`` changes in between) -> fail as
indeterminate.  After such an attempt the backoff is the shortest one, so the
trail is rarely lost.

Round trips and fsyncs per proposal: 2 and 2 per acceptor normally, 1 and 1 on
the fast path; every retry adds a full round.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the rng is injected; this pure module never draws from the global one
    import random

from kvstore.errors import QuorumUnavailable
from kvstore.protocol.calls import Abandon, Answer, CallFailed, Reply, Send, StartTimer
from kvstore.protocol.membership import STALE_CONFIG, quorum_possible, quorum_reached
from kvstore.protocol.paxos import (
    ABSENT,
    Accepted,
    Ballot,
    Change,
    ChangeOutcome,
    Lineage,
    Observed,
    OutcomeStatus,
    Promise,
    PutIfAbsent,
    Read,
    RegisterValue,
    Rejected,
    Write,
    agreed_read,
    agreement_possible,
    apply_change,
    backoff_s,
    change_status,
    extend_lineage,
    highest_accepted,
    majority,
    next_ballot,
    stale_acceptors,
    zero_agreement_pending,
    zero_ballot,
)
from kvstore.protocol.paxos_wire import (
    RECOVERING,
    accept_message,
    parse_accept_reply,
    parse_peek_reply,
    parse_prepare_reply,
    parse_tags,
    peek_message,
    prepare_message,
)
from kvstore.transport.base import Message

# --------------------------------------------------------------------------------------------
# Results and errors
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


class PeekInconclusive(ConsensusUnavailable):
    """A peek-only read (``fallback=False``) whose replies did not agree: nothing was decided,
    nothing changed (never indeterminate); the full protocol may still answer it."""


@dataclass(frozen=True, slots=True)
class ProposeResult:
    """A committed proposal.  ``value`` is the register state after it (never None: an absent
    key is ``RegisterValue(None, None)``); ``current_etag`` is that state's etag."""

    value: RegisterValue
    outcome: OutcomeStatus
    current_etag: str | None
    round_trips: int


@dataclass
class ProposerStats:
    proposals: int = 0
    committed: int = 0
    failed: int = 0
    retries: int = 0
    fast_path_hits: int = 0  # fast accept committed
    fast_path_misses: int = 0  # fast accept rejected: fell back to the full protocol
    peek_hits: int = 0  # reads answered by a peek (1 round trip, no fsync)
    peek_misses: int = 0  # peeks whose replies did not agree (fell back, or inconclusive)
    first_write_hits: int = 0  # first writes chosen at a zero ballot (1 round trip, no prepare)
    first_write_misses: int = 0  # zero-ballot accepts short of unanimity (re-committed, or retried)
    overloaded: int = 0


# --------------------------------------------------------------------------------------------
# Inputs and effects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instant:
    """One reading of the node's Clock: monotonic time (deadlines) and wall time (ballot floors)."""

    monotonic_ns: int
    wall_ns: int




@dataclass(frozen=True, slots=True)
class Detach:
    """Let these calls finish in the background (the round succeeded without them)."""

    calls: tuple[int, ...]



@dataclass(frozen=True, slots=True)
class Done:
    result: ProposeResult


@dataclass(frozen=True, slots=True)
class Failed:
    error: ConsensusUnavailable


Effect = Send | Abandon | Detach | StartTimer | Done | Failed






# --------------------------------------------------------------------------------------------
# Per-node state shared by the node's proposals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FastPath:
    ballot: Ballot  # promised by a majority together with their accept of ``value``
    value: RegisterValue
    lineage: Lineage
    replicas: tuple[str, ...]
    acceptor_sets: tuple[tuple[str, ...], ...] = ()  # () : the replicas alone


class ProposerState:
    """One node's ballot counter and fast-path entries, shared by all its proposals."""

    def __init__(self, node_id: str, fast_path_capacity: int = 10_000) -> None:
        assert node_id and fast_path_capacity >= 0
        self.node_id = node_id
        self.fast_path_capacity = fast_path_capacity
        # One counter for all keys: strictly increasing, so this proposer never reuses a ballot
        # for any key (ballots only need to be unique per key; a shared counter is simpler).
        self.last: Ballot | None = None
        self.seen_counter = 0
        self.fast: OrderedDict[str, FastPath] = OrderedDict()

    def observe(self, counter: int) -> None:
        """A ballot counter seen elsewhere (a conflict): the next ballot jumps past it."""
        self.seen_counter = max(self.seen_counter, counter)

    def new_ballot(self, wall_ns: int | None) -> Ballot:
        """The next ballot; with ``wall_ns``, its counter is at least the wall clock in ms (as
        Cassandra's LWT ballots are timestamps): a proposer new to a key then usually beats the
        ballots already there.  Any counter is safe; a skewed clock costs only a retry."""
        seen = self.seen_counter
        if wall_ns is not None:
            seen = max(seen, wall_ns // 1_000_000 - 1)
        ballot = next_ballot(self.last, seen, self.node_id)
        self.last = ballot
        return ballot

    def take_fast(
        self, key: str, replicas: tuple[str, ...], acceptor_sets: tuple[tuple[str, ...], ...] = ()
    ) -> FastPath | None:
        """Pop the key's fast-path entry (single use), if it was promised by quorums of these
        acceptor sets (a membership change may keep the replicas and change the sets)."""
        entry = self.fast.pop(key, None)
        if entry is None or entry.replicas != replicas or entry.acceptor_sets != acceptor_sets:
            return None  # promised by a majority of another replica set: not a phase 1 for this one
        return entry

    def remember_fast(self, key: str, entry: FastPath) -> None:
        if self.fast_path_capacity == 0:
            return
        existing = self.fast.get(key)
        # Proposals on one key can finish out of ballot order; an older entry would only be
        # rejected by the acceptors, so keep the newest.
        if existing is None or entry.ballot > existing.ballot:
            self.fast[key] = entry
        self.fast.move_to_end(key)
        while len(self.fast) > self.fast_path_capacity:
            self.fast.popitem(last=False)

    def holds_fast_path(self, key: str) -> bool:
        return key in self.fast

    def forget_fast_path(self, key: str | None = None) -> None:
        if key is None:
            self.fast.clear()
        else:
            self.fast.pop(key, None)


@dataclass(frozen=True, slots=True)
class ProposerConfig:
    max_attempts: int = 20
    backoff_base_s: float = 0.005
    backoff_cap_s: float = 0.2
    fast_path: bool = True
    clock_ballots: bool = True
    peek_reads: bool = True
    first_writes: bool = True  # zero-ballot first writes when the caller believes the key new
    # How long a zero-ballot accept (or a peek of a zero-ballot state) waits for the last
    # acceptors once a majority answered (at most a third of the time left): unanimity is what
    # makes a zero-ballot state chosen.  After it the write re-commits at its next ballot (one
    # more round trip), the read falls back to the full protocol -- both cost CPU, while waiting
    # for a reply that is only late costs nothing, so the wait is generous.  Not at all when the
    # caller says a replica is believed down (``all_up=False``).
    unanimity_wait_s: float = 0.5

    def __post_init__(self) -> None:
        assert self.max_attempts >= 1 and self.backoff_base_s >= 0 and self.backoff_cap_s >= 0
        assert self.unanimity_wait_s >= 0


# --------------------------------------------------------------------------------------------
# The core
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pending:
    """A change of this proposal whose accept may have been stored somewhere (keyed by origin)."""

    value: RegisterValue  # the state right after the change
    outcome: ChangeOutcome
    parent: Ballot | None  # origin of the state the change was applied to
    # A zero-ballot attempt whose local acceptor did not say it took it: its origin (this node's
    # zero ballot) may then be another proposal's of this node, so finding it proves nothing.
    ambiguous: bool = False


@dataclass
class _Round:
    phase: Literal["prepare", "accept", "peek"]
    ballot: Ballot | None  # None for a peek
    message: Message
    undecided: dict[int, str] = field(default_factory=dict)  # call -> peer, in send order
    deferred: tuple[str, ...] = ()  # sent only once another replica said ok
    unanimous: bool = False  # a zero-ballot accept: chosen only if every acceptor took it
    waiting_since_ns: int | None = None  # a majority answered; waiting a little for the rest
    # (acceptor, Promise or Accepted, its incarnation, its view of the group's incarnations)
    replies: list[tuple[str, Any, str | None, dict[str, str]]] = field(default_factory=list)
    conflicts: list[Ballot] = field(default_factory=list)
    # Calls whose request may have reached the acceptor without us seeing the answer: lost
    # replies, timeouts, remote errors, abandoned calls.
    maybe_delivered: int = 0
    failures: int = 0
    recovering: int = 0  # refused by an acceptor that lost its storage (nothing done there)

    @property
    def oks(self) -> list[Any]:
        """The ok replies that count: those of an incarnation no other reply says is gone."""
        return [ok for _, ok in self.ok_peers]

    @property
    def ok_peers(self) -> list[tuple[str, Any]]:
        """(acceptor, reply) of the ok replies that count (see ``oks``)."""
        stale = stale_acceptors({peer: (inc, view) for peer, _, inc, view in self.replies})
        return [(peer, ok) for peer, ok, _, _ in self.replies if peer not in stale]

    def reason(self, need: int) -> str:
        oks = len(self.oks)
        parts = [f"{self.phase}: {oks}/{need} ok"]
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} rejected (highest {max(self.conflicts).to_wire()})")
        if self.recovering:
            parts.append(f"{self.recovering} recovering lost storage")
        if self.failures - self.recovering:
            parts.append(f"{self.failures - self.recovering} unreachable")
        if len(self.replies) > oks:
            parts.append(f"{len(self.replies) - oks} from a lost incarnation")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class _AcceptPlan:
    """What the current accept round carries and what to report if it succeeds."""

    current: RegisterValue  # the state phase 1 found
    new_value: RegisterValue
    new_lineage: Lineage
    outcome: ChangeOutcome
    reported: RegisterValue
    parent: Ballot | None  # origin of the state phase 1 found (lineage[0])
    applied: _Pending | None  # an earlier attempt found in the state: re-committed, not re-applied
    used_fast: bool
    promise_next: Ballot | None
    zero: bool = False  # sent at this proposer's zero ballot (a first write without phase 1)


class ProposerCore:
    """One proposal of ``change`` to ``key``'s register on ``replicas``; see the module docstring."""

    def __init__(
        self,
        state: ProposerState,
        config: ProposerConfig,
        rng: random.Random,
        key: str,
        token: int,
        replicas: tuple[str, ...],
        change: Change,
        deadline_ns: int,
        stats: ProposerStats | None = None,
        *,
        acceptor_sets: tuple[tuple[str, ...], ...] | None = None,
        stamp: Message | None = None,
        fallback: bool = True,
        peek: bool = True,
        first_write: bool = False,
        all_up: bool = True,
    ) -> None:
        """``first_write``: the caller believes the key has no state (no acceptor saw it): a
        write or put-if-absent is then first tried at the proposer's zero ballot, without phase 1
        (``kvstore.protocol.paxos``, "First writes without phase 1"); a wrong belief costs one
        rejected round trip.  ``all_up``: the caller believes every replica up, so waiting a little
        for the last one (``ProposerConfig.unanimity_wait_s``) is worth it.  ``fallback=False``: a read whose peek is inconclusive fails with ``PeekInconclusive``
        instead of running the full protocol (see the module docstring).  ``peek=False``: a read
        runs the full protocol and so re-commits the state (membership catch-up needs exactly
        that: the state accepted anew by joint quorums).  ``acceptor_sets`` (default: ``replicas`` alone) are the sets each phase needs a majority
        of: during a membership change the key's old and new acceptor sets (joint consensus,
        ``kvstore.protocol.membership``); ``replicas`` must be their union.  ``stamp`` is merged
        into every prepare and accept (``{"cv": version}``: the configuration version the sets were
        computed from, so an acceptor that installed a newer one refuses the round with
        ``stale_config`` instead of voting in it)."""
        assert replicas and len(set(replicas)) == len(replicas), "replicas must be distinct"
        sets = acceptor_sets if acceptor_sets is not None else (tuple(replicas),)
        assert sets and all(sets), "every acceptor set has members"
        assert set().union(*sets) == set(replicas), "the replicas are the union of the acceptor sets"
        self.state = state
        self.config = config
        self.rng = rng
        self.key = key
        self.token = token
        self.group = replicas
        self.change = change
        self.deadline_ns = deadline_ns
        self.stats = stats if stats is not None else ProposerStats()
        self.sets = sets
        self.joint = len(sets) > 1
        self.stamp: Message = dict(stamp or {})
        self.fallback = fallback
        self.peek = peek and config.peek_reads
        self.first_write = first_write and config.first_writes
        self.all_up = all_up
        # For reporting only (the error's ``needed``): a joint quorum is a majority of each set.
        self.need = majority(len(replicas)) if not self.joint else sum(majority(len(s)) for s in sets)
        self.attempt = 0
        self.round_trips = 0
        self.acknowledged = 0
        self.reason = "no majority answered"
        self.pending: dict[Ballot, _Pending] = {}
        self.finished = False
        self._started = False
        self._fast: FastPath | None = None
        self._round: _Round | None = None
        self._plan: _AcceptPlan | None = None
        self._backing_off = False
        self._calls = itertools.count()

    # --- inputs ---------------------------------------------------------------------------

    def start(self, at: Instant) -> list[Effect]:
        assert not self._started, "a core runs one proposal"
        self._started = True
        if isinstance(self.change, Read) and self.peek:
            return self._peek(at)  # the fast-path entry is left for the next change (or a fallback)
        # Popped here, before any effect: a concurrent proposal on this node cannot take it too.
        self._fast = self.state.take_fast(self.key, self.group, self.sets if self.joint else ())
        if (
            self._fast is None
            and self.first_write
            and not self.joint
            and self.state.node_id in self.group
            and len(self.group) > 1
            and isinstance(self.change, Write | PutIfAbsent)
        ):
            return self._zero_accept(at)
        return self._attempt(at)

    def on_answers(self, answers: Iterable[Answer], at: Instant) -> list[Effect]:
        """Answers to earlier sends, in the order they completed.  A driver passes together all
        the answers it has at hand: the round is judged once, after all of them, so an answer
        already in is never counted as a call still in flight."""
        r = self._round
        if self.finished or r is None:
            return []
        took = False
        for answer in answers:
            peer = r.undecided.pop(answer.call, None)
            if peer is None:
                continue  # abandoned, detached, duplicated or of an earlier round
            took = True
            match answer:
                case Reply(message=reply):
                    self._classify(r, peer, reply)
                case CallFailed(maybe_delivered=maybe_delivered, recovering=recovering):
                    r.failures += 1
                    if recovering:
                        r.recovering += 1
                    elif maybe_delivered:
                        r.maybe_delivered += 1
        return self._progress(at) if took else []

    def on_reply(self, call: int, reply: Message, at: Instant) -> list[Effect]:
        return self.on_answers([Reply(call, reply)], at)

    def on_failure(self, call: int, at: Instant, *, maybe_delivered: bool, recovering: bool = False) -> list[Effect]:
        return self.on_answers([CallFailed(call, maybe_delivered, recovering)], at)

    def on_timer(self, at: Instant) -> list[Effect]:
        if self.finished:
            return []
        if self._backing_off:
            self._backing_off = False
            return self._attempt(at)
        assert self._round is not None, "a timer only runs during a round or a backoff"
        return self._end_round(at)  # the deadline passed, or the wait for unanimity ended

    # --- attempts -------------------------------------------------------------------------

    def _attempt(self, at: Instant) -> list[Effect]:
        if self._remaining_ns(at) <= 0:
            return self._fail(bool(self.pending), f"timed out: {self.reason}")
        self.attempt += 1
        if self._fast is not None:
            # Phase 1 for fast.ballot was done by our previous accept (see paxos.on_accept).
            assert not self.pending
            fast, self._fast = self._fast, None
            return self._accept(at, fast.ballot, fast.value, fast.lineage, None, used_fast=True)
        ballot = self._new_ballot(at)
        self.round_trips += 1
        message = {**prepare_message(self.key, self.token, ballot, self.group), **self.stamp}
        return self._start_round("prepare", ballot, message)

    def _zero_accept(self, at: Instant) -> list[Effect]:
        """A first write at this proposer's zero ballot, no phase 1: to the local acceptor
        first, to the others once it took it (that durable vote is what keeps the zero ballot
        single-use: the local acceptor never takes it again, after a restart neither)."""
        self.attempt += 1
        ballot = zero_ballot(self.state.node_id)
        new_value, outcome = apply_change(self.change, ABSENT)
        assert new_value != ABSENT, "only writes that create a value use the zero ballot"
        new_lineage = extend_lineage((), ballot)
        # Always asked: with it a majority short of unanimity is still a phase 1 for the next ballot.
        promise_next = self._reserve_next(ballot, at)
        self._plan = _AcceptPlan(ABSENT, new_value, new_lineage, outcome, new_value, None, None, False, promise_next, True)
        self.round_trips += 1
        node = self.state.node_id
        message = {
            **accept_message(self.key, self.token, ballot, new_value, promise_next, new_lineage, self.group),
            **self.stamp,
        }
        others = tuple(peer for peer in self.group if peer != node)
        return self._start_round("accept", ballot, message, others, unanimous=True)

    def _peek(self, at: Instant) -> list[Effect]:
        if self._remaining_ns(at) <= 0:
            return self._fail(False, "timed out before the read started")
        self.round_trips += 1
        message = {**peek_message(self.key, self.token, self.group), **self.stamp}
        return self._start_round("peek", None, message)

    def _after_peek(self, r: _Round, at: Instant) -> list[Effect]:
        self.acknowledged = len(r.oks)
        agreed = agreed_read(r.ok_peers, self.sets)
        if agreed is not None:
            self.stats.peek_hits += 1
            self.finished = True
            value = ABSENT if agreed.value is None else agreed.value
            return [Done(ProposeResult(value, "ok", value.etag, self.round_trips))]
        self.stats.peek_misses += 1
        self.reason = f"{r.reason(self.need)}, no majority reported one accepted state"
        if not self.fallback:
            self.finished = True
            return [Failed(PeekInconclusive(self.need, self.acknowledged, False, self.reason))]
        # Taken only now: a read answered by its peek leaves the key's promise for the next change.
        self._fast = self.state.take_fast(self.key, self.group, self.sets if self.joint else ())
        return self._attempt(at)

    def _after_prepare(self, r: _Round, at: Instant) -> list[Effect]:
        oks = r.oks
        self.acknowledged = len(oks)
        if not self._quorum(r):
            self.reason = r.reason(self.need)
            return self._retry(at)
        best = highest_accepted(oks)
        current = ABSENT if best is None or best.value is None else best.value
        lineage = () if best is None else best.lineage
        statuses = {origin: change_status(origin, lineage, p.parent) for origin, p in self.pending.items()}
        found = [self.pending[origin] for origin, status in statuses.items() if status == "applied"]
        if any(p.ambiguous for p in found):
            return self._fail(
                True, "a first write of this request may have been taken by its own acceptor, "
                "and another change of this node at the same zero ballot is in the state",
            )
        # Two attempts of one proposal are never both in one chain: each fresh attempt was made
        # only after proving the earlier ones absent from the state it extended.  So one found
        # applied settles it, even if older attempts' trails are lost.
        assert len(found) <= 1, "a change applied twice"
        if not found and "unknown" in statuses.values():
            return self._fail(
                True,
                "an attempt of this request was partially accepted and too many changes "
                "followed to tell whether it took effect",
            )
        assert r.ballot is not None
        return self._accept(at, r.ballot, current, lineage, found[0] if found else None, used_fast=False)

    def _accept(
        self,
        at: Instant,
        ballot: Ballot,
        current: RegisterValue,
        lineage: Lineage,
        applied: _Pending | None,
        *,
        used_fast: bool,
    ) -> list[Effect]:
        if applied is not None:
            # Our change took effect (possibly built upon since): make that state chosen.
            new_value, new_lineage, outcome, reported = current, lineage, applied.outcome, applied.value
        else:
            new_value, outcome = apply_change(self.change, current)
            new_lineage = extend_lineage(lineage, ballot) if new_value != current else lineage
            reported = new_value
        if self._remaining_ns(at) <= 0:
            # Nothing sent in this attempt: only earlier attempts can make this indeterminate.
            return self._fail(bool(self.pending), f"timed out: {self.reason}")
        promise_next = self._reserve_next(ballot, at) if self.config.fast_path else None
        parent = lineage[0] if lineage else None
        self._plan = _AcceptPlan(
            current, new_value, new_lineage, outcome, reported, parent, applied, used_fast, promise_next
        )
        self.round_trips += 1
        node = self.state.node_id
        message = {
            **accept_message(self.key, self.token, ballot, new_value, promise_next, new_lineage, self.group),
            **self.stamp,
        }
        # A fast accept goes to the local acceptor only once a peer took it.  The local acceptor
        # answers first and is the one most likely to hold a stale fast-path promise (it is
        # outside the majorities other proposers used meanwhile); if it alone took a stale fast
        # accept, that partial value's origin would be far behind the chain and a retry could
        # not tell whether it took effect.
        defer = (node,) if used_fast and node in self.group and len(self.group) > 1 else ()
        return self._start_round("accept", ballot, message, defer)

    def _after_accept(self, r: _Round, at: Instant) -> list[Effect]:
        plan = self._plan
        assert plan is not None
        self.acknowledged = len(r.oks)
        if plan.zero:
            return self._after_zero_accept(r, plan, at)
        if self._quorum(r):
            if plan.used_fast:
                self.stats.fast_path_hits += 1
            if plan.promise_next is not None:
                promised = {peer for peer, ok in r.ok_peers if ok.promised_next == plan.promise_next}
                if quorum_reached(promised, self.sets):
                    entry = FastPath(
                        plan.promise_next, plan.new_value, plan.new_lineage, self.group,
                        self.sets if self.joint else (),
                    )
                    self.state.remember_fast(self.key, entry)
            self.finished = True
            result = ProposeResult(plan.reported, plan.outcome.status, plan.outcome.current_etag, self.round_trips)
            return [Done(result)]
        if plan.used_fast:
            self.stats.fast_path_misses += 1
        self.reason = r.reason(self.need)
        # Every acceptor that took the accept counts here, a discarded (stale) one too: it stored it.
        if plan.applied is None and plan.new_value != plan.current and (r.replies or r.maybe_delivered):
            # Some acceptor may hold the changed value: anyone's phase 1 may still pick it up.
            # Remember its origin so that a retry can tell whether it took effect.
            assert r.ballot is not None
            self.pending[r.ballot] = _Pending(plan.new_value, plan.outcome, plan.parent)
        return self._retry(at)

    def _after_zero_accept(self, r: _Round, plan: _AcceptPlan, at: Instant) -> list[Effect]:
        assert r.ballot is not None and plan.promise_next is not None
        acked = {peer for peer, _ in r.ok_peers}
        if acked >= set(self.group):
            # Every acceptor took it: chosen (a zero ballot's quorum is all of them).
            self.stats.first_write_hits += 1
            promised = {peer for peer, ok in r.ok_peers if ok.promised_next == plan.promise_next}
            if self.config.fast_path and quorum_reached(promised, self.sets):
                self.state.remember_fast(
                    self.key, FastPath(plan.promise_next, plan.new_value, plan.new_lineage, self.group)
                )
            self.finished = True
            return [Done(ProposeResult(plan.reported, plan.outcome.status, plan.outcome.current_etag, self.round_trips))]
        self.stats.first_write_misses += 1
        self.reason = r.reason(self.need)
        # Not chosen (yet): some acceptors may hold it, so it is pending like any partial accept.
        # The zero ballot names this node, not this proposal: only when the local acceptor took
        # it (it takes one zero ballot per key, ever) is a state with that origin surely ours.
        if r.replies or r.maybe_delivered:
            local_took = any(peer == self.state.node_id for peer, _, _, _ in r.replies)
            self.pending[r.ballot] = _Pending(plan.new_value, plan.outcome, None, ambiguous=not local_took)
        promised = {peer for peer, ok in r.ok_peers if ok.promised_next == plan.promise_next}
        if quorum_reached(promised, self.sets):
            # That majority promised promise_next together with accepting (zero, v), each from an
            # empty state: a phase 1 for promise_next whose highest accepted state is ours.  Make
            # it chosen there (it is our change, applied: re-committed, not applied again).
            applied = self.pending[r.ballot]
            return self._accept(at, plan.promise_next, plan.new_value, plan.new_lineage, applied, used_fast=False)
        return self._retry(at)

    def _retry(self, at: Instant) -> list[Effect]:
        self.stats.retries += 1
        if self.attempt >= self.config.max_attempts:
            return self._fail(bool(self.pending), f"gave up after {self.attempt} attempts: {self.reason}")
        remaining_ns = self._remaining_ns(at)
        if remaining_ns <= 0:
            return self._fail(bool(self.pending), f"timed out: {self.reason}")
        # With a change of ours possibly stored somewhere, look again soon: the longer we wait,
        # the more changes pile up after it and the likelier its trail in the lineage is lost (an
        # indeterminate answer).  Still randomized, so dueling proposers still break their symmetry.
        step = 0 if self.pending else self.attempt - 1
        delay_s = backoff_s(step, self.rng, self.config.backoff_base_s, self.config.backoff_cap_s)
        self._backing_off = True
        return [StartTimer(at.monotonic_ns + min(remaining_ns, int(delay_s * 1e9)))]

    def _fail(self, indeterminate: bool, reason: str) -> list[Effect]:
        self.finished = True
        return [Failed(ConsensusUnavailable(self.need, self.acknowledged, indeterminate, reason))]

    # --- rounds ---------------------------------------------------------------------------

    def _start_round(
        self,
        phase: Literal["prepare", "accept", "peek"],
        ballot: Ballot | None,
        message: Message,
        defer: tuple[str, ...] = (),
        *,
        unanimous: bool = False,
    ) -> list[Effect]:
        assert self._round is None and set(defer) <= set(self.group) and len(defer) < len(self.group)
        r = self._round = _Round(phase, ballot, message, deferred=defer, unanimous=unanimous)
        effects: list[Effect] = [self._send(r, peer) for peer in self.group if peer not in defer]
        effects.append(StartTimer(self.deadline_ns))
        return effects

    def _send(self, r: _Round, peer: str) -> Send:
        call = next(self._calls)
        r.undecided[call] = peer
        return Send(call, peer, r.message, self.deadline_ns)

    def _classify(self, r: _Round, peer: str, reply: Message) -> None:
        if isinstance(reply, dict) and reply.get("error") in (RECOVERING, STALE_CONFIG):
            # A typed refusal sent before anything was done: a certain failure of this call.
            r.failures += 1
            r.recovering += 1
            return
        try:
            if not isinstance(reply, dict) or reply.get("error"):
                raise ValueError(f"error reply {reply!r}")
            parsed: Promise | Accepted | Rejected | Observed
            if r.ballot is None:
                parsed = parse_peek_reply(reply)
            elif r.phase == "prepare":
                parsed = parse_prepare_reply(reply, r.ballot)
            else:
                parsed = parse_accept_reply(reply, r.ballot)
            incarnation, view = parse_tags(reply)
        except ValueError:
            # Malformed or an error: it may have been applied before the answer went wrong.
            r.failures += 1
            r.maybe_delivered += 1
            return
        if isinstance(parsed, Rejected):
            r.conflicts.append(parsed.conflict)
            self.state.observe(parsed.conflict.counter)
        else:
            r.replies.append((peer, parsed, incarnation, view))

    def _progress(self, at: Instant) -> list[Effect]:
        """After an answer: end the round if it is decided, else maybe send the deferred accept."""
        r = self._round
        assert r is not None
        outstanding = set(r.undecided.values()) | set(r.deferred)
        if r.phase == "peek":
            # Decided once a quorum answered (agreeing or not): waiting for more replies could
            # only wait on an unreachable replica until the deadline, leaving no time to fall back.
            # Except a zero-ballot state a quorum reported: it needs every acceptor, so wait for
            # the rest a little (then the read falls back to the full protocol).
            peeked = r.ok_peers
            if agreed_read(peeked, self.sets) is not None or not agreement_possible(peeked, outstanding, self.sets):
                return self._end_round(at)
            if quorum_reached({peer for peer, _ in peeked}, self.sets):
                if zero_agreement_pending(peeked, outstanding, self.sets):
                    return self._wait_for_unanimity(r, at)
                return self._end_round(at)
            return []
        acked = {peer for peer, _ in r.ok_peers}
        if r.unanimous:
            if acked >= set(self.group) or not quorum_possible(acked, outstanding, self.sets):
                return self._end_round(at)
            if r.deferred and acked:
                deferred, r.deferred = r.deferred, ()
                return [self._send(r, peer) for peer in deferred]
            if not r.undecided and not acked:
                return self._end_round(at)  # the local acceptor refused: nothing else is sent
            if quorum_reached(acked, self.sets):
                if acked | outstanding >= set(self.group):
                    return self._wait_for_unanimity(r, at)
                return self._end_round(at)  # someone refused or failed: unanimity is out of reach
            return []
        if quorum_reached(acked, self.sets) or not quorum_possible(acked, outstanding, self.sets):
            return self._end_round(at)
        if r.deferred and acked:
            deferred, r.deferred = r.deferred, ()
            return [self._send(r, peer) for peer in deferred]
        if not r.undecided and not acked:
            return self._end_round(at)  # nothing in flight, and the deferred calls wait for an ok
        return []

    def _wait_for_unanimity(self, r: _Round, at: Instant) -> list[Effect]:
        """A majority answered, every acceptor is needed: the rest get ``unanimity_wait_s``, at most
        a third of the time left (the rest is for the fallback), none if one is believed down."""
        if r.waiting_since_ns is not None:
            return []
        r.waiting_since_ns = at.monotonic_ns
        wait_ns = min(int(self.config.unanimity_wait_s * 1e9), self._remaining_ns(at) // 3) if self.all_up else 0
        if wait_ns <= 0:
            return self._end_round(at)
        return [StartTimer(at.monotonic_ns + wait_ns)]

    def _end_round(self, at: Instant) -> list[Effect]:
        r = self._round
        assert r is not None
        sends: list[Effect] = []
        release: list[Effect] = []
        if r.phase == "accept" and self._quorum(r):
            # The round succeeded without them: bring them up to date all the same.
            sends.extend(self._send(r, peer) for peer in r.deferred)
            r.deferred = ()
            if r.undecided:
                release.append(Detach(tuple(r.undecided)))
        elif r.undecided:
            r.maybe_delivered += len(r.undecided)  # in flight: it may have been applied
            release.append(Abandon(tuple(r.undecided)))
        self._round = None
        if r.phase == "peek":
            after = self._after_peek(r, at)
        elif r.phase == "prepare":
            after = self._after_prepare(r, at)
        else:
            after = self._after_accept(r, at)
        # The documented order: sends, then this round's calls released, then timer / outcome.
        sends.extend(e for e in after if isinstance(e, Send))
        return [*sends, *release, *(e for e in after if not isinstance(e, Send))]

    def _quorum(self, r: _Round) -> bool:
        """A majority of every acceptor set said ok (one set: a majority of the replicas)."""
        return quorum_reached({peer for peer, _ in r.ok_peers}, self.sets)

    # --- ballots ----------------------------------------------------------------------------

    def _new_ballot(self, at: Instant) -> Ballot:
        return self.state.new_ballot(at.wall_ns if self.config.clock_ballots else None)

    def _reserve_next(self, ballot: Ballot, at: Instant) -> Ballot:
        """The ballot the acceptors promise with this accept; never used for anything else."""
        nxt = self._new_ballot(at)
        assert nxt > ballot
        return nxt

    def _remaining_ns(self, at: Instant) -> int:
        return self.deadline_ns - at.monotonic_ns
