"""CASPaxos rules: a per-key linearizable register, as pure synchronous functions.

Theory of operation
-------------------
This module follows *CASPaxos: Replicated State Machines without logs*
(Denis Rystsov, 2018, arXiv:1802.07000).  Every key is an independent
single-register replicated state machine.  Instead of agreeing on a log of
commands, a proposer agrees on the *next state* of the register:

1. **Prepare** (phase 1).  The proposer picks a ballot ``b`` and asks the key's
   acceptors to promise not to take part in any ballot lower than ``b``.  Each
   acceptor that promises returns the ballot and value it last accepted.
2. The proposer takes the value of the highest accepted ballot among a
   majority of promises (``choose_value``) -- the current state, possibly
   written only partially by a proposer that crashed -- and applies its change
   function to it (``apply_change``).
3. **Accept** (phase 2).  The proposer asks the acceptors to accept the new
   state at ballot ``b``.  Once a majority accepted it, the new state is
   *chosen* and the operation is linearized.

The change function runs on the proposer, so any deterministic function of the
current state is a valid operation: read (identity), write, delete,
compare-and-set, put-if-absent.  A read also goes through phase 2 (it
re-commits the value it saw): otherwise a read could return a value accepted by
a minority that is later superseded, which is not linearizable.

What it guarantees (safety, whatever the message loss, reordering, duplication
and crashes): the chosen states of a key form one linear chain ordered by
ballot; every chosen state is the result of applying a change to the previously
chosen one.  Liveness needs a majority of the key's acceptors reachable and not
too much contention (dueling proposers are resolved by randomized backoff in
``kvstore.runtime.caspaxos``).

What it assumes: acceptors persist their state before replying (a restarted
acceptor must never forget a promise); ballots are unique per key, which holds
because a ballot includes the proposer's node id and one proposer never reuses
a counter (its counter is strictly increasing, and a proposer that restarts and
starts its counter from zero cannot re-issue an old ballot at a majority because
prepare requires a ballot *strictly* greater than the promise).

The one-round-trip fast path (paper §2.2.1) is described in ``on_accept``.

**Quorum reads without a write round** (``on_peek``, ``agreed_reads``).  The paper's read is the
identity change: a full round that re-commits the state, an fsync per acceptor.  We add a
read-only *peek*: each acceptor reports its accepted ballot and state and changes nothing (no
promise, no fsync).  If a majority reports the *same* accepted ballot ``b`` (each from its own
vote, see below), the peek answers ``b``'s state; otherwise the proposer falls back to the full
round.  This is the quorum-read argument of *Linearizable Quorum Reads in Paxos* (Charapko,
Ailijiang, Demirbas, HotStorage 2019) in the simple form where the replies must already agree
(no "rinse" phase: disagreement falls back to a CASPaxos round).  Why it is linearizable:

1. *The state is chosen.*  A majority M accepted ``(b, v)`` (a reply is sent after its state is
   durable, and acceptors never forget), which is Paxos's definition of ``v`` chosen at ``b``: by
   the classic invariant every proposal at a higher ballot builds on ``v``, so ``v`` is never
   lost, whatever happens after the read.  A value a *minority* accepted (a proposer that died
   mid-accept) can appear in at most a minority of replies, so a peek never returns it: it may
   still be superseded, and returning it is exactly what the paper's re-commit prevents.
2. *It is not stale.*  Let a change ``w`` complete before the read is invoked: a majority M'
   accepted its ballot ``b' `` before that.  M and M' share an acceptor, whose peek was answered
   after the invocation, so it reports an accepted ballot >= ``b' ``; all of M report ``b``, so
   ``b >= b' ``: ``v`` is ``w``'s state or one built on it.
3. *Reads are ordered.*  If read R1 completed (returning the state chosen at ``b1``) before read
   R2 was invoked, R2's majority shares an acceptor with R1's, which reports at least ``b1``.

The read's linearization point is its last counted reply.  Only acceptors' *own* votes count:
an acceptor that lost its storage rebuilds each key's state by merging its peers' states
(``merge_states``), and may then report an accepted ballot that only a minority ever voted for
-- possibly below a promise its lost incarnation gave -- so a merged state is flagged
``absorbed`` and its peek replies never count towards agreement (they still make the replies
disagree).  A peek counts the same quorums as a round (a majority of each acceptor set while
the key's replicas move) and is stamped and fenced like a prepare, so it sees what a prepare
at that moment would see.  Safety never depends on who runs the peek or on any lease.

**First writes without phase 1** (``ZERO``, ``is_zero``; a Fast Paxos "fast round", Lamport
2006, restricted to the register's first state).  Ballots with counter 0 (*zero ballots*, one per
proposer: ``(0, node)``) are never prepared; a proposer may send ``accept((0, P), f(absent))``
straight away.  An acceptor takes a zero ballot only while its state for the key is *empty*
(nothing promised, nothing accepted; ``on_accept``), so each acceptor accepts at most one zero
ballot per key, ever.  A state accepted at a zero ballot is *chosen* only when **every** acceptor
of the key accepted it (a fast quorum of N: any two fast quorums and a majority intersect), not
when a majority did.  Why the rest of the protocol stays safe unchanged:

* *Phase 1 keeps the highest-accepted rule.*  If ``v`` was chosen at a zero ballot Z, every
  acceptor accepted Z and, being non-empty since, never accepted another zero ballot; a later
  prepare's majority all report Z or a classic ballot above it (an acceptor that promised a
  classic ballot first would have refused Z), so phase 1 picks ``v`` or a state built on it.  If
  nothing was chosen at any zero ballot, any choice among them is safe.  Classic ballots are all
  above zero ballots (counters >= 1), so the classic induction is untouched: a state accepted at a
  zero ballot is below every classic ballot and never outranks a classic chosen state.
* *Ballots stay unique.*  The proposer's own acceptor must accept Z (durably) before the accept
  goes to any other acceptor (``kvstore.protocol.proposer``): that acceptor is then non-empty, so
  the same proposer -- later, after a restart, or in a concurrent proposal -- can never send a
  second state at Z.  (A lost disk rebuilds that state from every other replica before voting.)
* *Not during a membership change.*  An acceptor joining a key's set is empty until catch-up,
  so it could take a zero ballot that the old acceptors (holding a chosen zero-ballot state)
  refuse, and a later phase 1 meeting both zero ballots could pick the wrong one.  Proposers
  never send zero ballots in a joint configuration (``ProposerCore.start``), and catch-up
  re-commits every moving register at a classic ballot, which outranks any zero ballot.
* *Peeks need unanimity for a zero ballot* (``agreed_read``): a majority reporting Z may be
  outvoted by a competing first write's zero ballot at the remaining acceptor.
* *The fast path after it.*  The zero accept carries ``promise_next = c`` like any accept; if a
  majority took it, that majority's promise of ``c`` with ``(Z, v)`` as its highest accepted
  state is a classic phase 1 for ``c``, so a proposer short of unanimity re-commits ``v`` at
  ``c`` (its second round trip) instead of starting over.

An addition to the paper: each accepted state carries its *lineage*, the ballots at which
its last few changes were made (see ``change_status``).  It lets a proposer whose accept
reached only some acceptors find out, on retry, whether its change is already part of the
latest state, so that a retry neither applies a change twice nor reports as failed a change
that took effect.

Everything here is pure: no I/O, no clock, no global randomness (``backoff_s``
takes an injected ``random.Random``).  The asynchronous driver lives in
``kvstore.runtime.caspaxos``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the rng is injected; this pure module never draws from the global one
    import random

import msgpack

from kvstore.contract import etag_of

# --------------------------------------------------------------------------------------------
# Ballots and values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class Ballot:
    """A proposal number: ordered lexicographically by (counter, node).

    The node id breaks ties between proposers, so two proposers never share a ballot.
    """

    counter: int
    node: str

    def __post_init__(self) -> None:
        assert self.counter >= 0, "ballot counters are non-negative"
        assert self.node, "a ballot names its proposer"

    def to_wire(self) -> list[Any]:
        return [self.counter, self.node]

    @staticmethod
    def from_wire(obj: Any) -> Ballot:
        """Parse ``[counter, node]``; raises ``ValueError`` on anything else (untrusted input)."""
        if (
            not isinstance(obj, list | tuple)
            or len(obj) != 2
            or not isinstance(obj[0], int)
            or isinstance(obj[0], bool)
            or obj[0] < 0
            or not isinstance(obj[1], str)
            or not obj[1]
        ):
            raise ValueError(f"malformed ballot {obj!r}")
        return Ballot(obj[0], obj[1])


def ballot_to_wire(ballot: Ballot | None) -> list[Any] | None:
    return None if ballot is None else ballot.to_wire()


def ballot_from_wire(obj: Any) -> Ballot | None:
    return None if obj is None else Ballot.from_wire(obj)


@dataclass(frozen=True, slots=True)
class RegisterValue:
    """The state of one key's register.  ``value is None`` means absent (never written or deleted)."""

    value: bytes | None
    etag: str | None

    def __post_init__(self) -> None:
        # The etag is derived, never chosen: a mismatch is a programming error.
        assert (self.value is None and self.etag is None) or (
            self.value is not None and self.etag == etag_of(self.value)
        ), "etag must be etag_of(value) for a present value and None for an absent one"

    @staticmethod
    def of(value: bytes | None) -> RegisterValue:
        return RegisterValue(value, None if value is None else etag_of(value))

    @property
    def present(self) -> bool:
        return self.value is not None


ABSENT = RegisterValue(None, None)


# --------------------------------------------------------------------------------------------
# Lineage: which changes a register state contains
# --------------------------------------------------------------------------------------------
#
# Every change that modifies the register is applied by one proposer at one ballot, its
# *origin*; ballots are unique per key, so the origin names the change.  Along the chain of
# states, origins strictly increase (a change is computed at a ballot above the accepted
# ballot it read, which is at least the origin of the state it read).  Each accepted state
# carries the origins of its last ``LINEAGE_DEPTH`` changes, newest first; a state re-committed
# unchanged (a read, a failed precondition) keeps its lineage.
#
# Why: a proposer whose accept for a change reached only some acceptors must not retry that
# change blindly -- another proposer may already have picked the partial value up and built on
# it, and applying it again would apply it twice (a compare-and-set would then spuriously fail).
# ``change_status`` tells from the lineage of the latest state whether the change is in it.

ZERO = 0  # the counter of zero ballots: never prepared, taken only by empty acceptors


def is_zero(ballot: Ballot | None) -> bool:
    """A first-write ballot (see "First writes without phase 1" above)."""
    return ballot is not None and ballot.counter == ZERO


def zero_ballot(node: str) -> Ballot:
    return Ballot(ZERO, node)


LINEAGE_DEPTH = 8

Lineage = tuple[Ballot, ...]


def extend_lineage(lineage: Lineage, origin: Ballot) -> Lineage:
    """The lineage of the state a change at ``origin`` produces from a state with ``lineage``."""
    assert not lineage or origin > lineage[0], "origins increase along the chain"
    return (origin, *lineage[: LINEAGE_DEPTH - 1])


ChangeStatus = Literal["applied", "not_applied", "unknown"]


def change_status(origin: Ballot, lineage: Lineage, parent: Ballot | None = None) -> ChangeStatus:
    """Whether the change made at ``origin`` is part of the state whose lineage is ``lineage``.

    ``parent`` is the origin of the state the change was applied to (``lineage[0]`` of that
    state; None if it had no change yet or is not known).

    * ``applied``: the origin is in the lineage.
    * ``not_applied``: it is not, and the lineage proves it cannot be further back: either
      the lineage is complete (fewer than ``LINEAGE_DEPTH`` changes since the register was
      created), or its oldest entry is older than ``origin`` (every ancestor newer than that
      entry is listed, and origins increase along the chain), or the parent is listed with a
      different successor (the chain is linear: the parent has one successor, and the change
      could only have come right after its parent).
    * ``unknown``: at least ``LINEAGE_DEPTH`` changes happened since, the trail is lost.
    """
    if origin in lineage:
        return "applied"
    if len(lineage) < LINEAGE_DEPTH or lineage[-1] < origin:
        return "not_applied"
    if parent is not None and parent in lineage:
        return "not_applied"  # listed, and its successor (if any) is not ``origin``
    return "unknown"


def _check_lineage(lineage: Lineage) -> bool:
    return len(lineage) <= LINEAGE_DEPTH and all(a > b for a, b in zip(lineage, lineage[1:], strict=False))


def lineage_to_wire(lineage: Lineage) -> list[Any]:
    return [ballot.to_wire() for ballot in lineage]


def lineage_from_wire(obj: Any) -> Lineage:
    """Parse a lineage (untrusted input); raises ``ValueError`` when malformed."""
    if obj is None:
        return ()
    if not isinstance(obj, list | tuple):
        raise ValueError(f"malformed lineage {obj!r}")
    lineage = tuple(Ballot.from_wire(item) for item in obj)
    if not _check_lineage(lineage):
        raise ValueError(f"lineage must be at most {LINEAGE_DEPTH} strictly decreasing ballots")
    return lineage


# --------------------------------------------------------------------------------------------
# Acceptor
# --------------------------------------------------------------------------------------------


class CorruptState(ValueError):
    """A stored acceptor state could not be decoded (or breaks an invariant)."""


_STATE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class AcceptorState:
    """One acceptor's durable state for one key.

    ``promised``: the highest ballot this acceptor promised (it takes part in no lower ballot).
    ``accepted``/``value``/``lineage``: the last accepted ballot, the register state accepted
    with it and that state's lineage; None (and empty) until the first accept.
    ``absorbed``: that accepted state came from a merge (recovery), not from a vote here.
    Invariant: ``accepted <= promised`` (an accept also promises its own ballot).
    """

    promised: Ballot | None = None
    accepted: Ballot | None = None
    value: RegisterValue | None = None
    lineage: Lineage = ()
    # The accepted state was merged in from other acceptors (recovery), not voted here: a peek
    # must not count it (see "Quorum reads" above).  Cleared by this acceptor's next accept.
    absorbed: bool = False

    def __post_init__(self) -> None:
        assert (self.accepted is None) == (self.value is None), "a value is accepted with a ballot"
        assert self.accepted is None or (self.promised is not None and self.promised >= self.accepted), (
            "an acceptor has always promised at least the ballot it accepted"
        )
        assert _check_lineage(self.lineage) and (not self.lineage or self.accepted is not None)

    def encode(self) -> bytes:
        wire_value = None if self.value is None else [self.value.value]
        obj: dict[str, Any] = {
            "f": _STATE_FORMAT,
            "p": ballot_to_wire(self.promised),
            "a": ballot_to_wire(self.accepted),
            # [bytes | None] when something was accepted (None inside = absent), else None.
            "v": wire_value,
            "l": lineage_to_wire(self.lineage),
        }
        if self.absorbed:
            obj["x"] = True  # only when set: states written before the flag existed decode as votes
        return msgpack.packb(obj, use_bin_type=True)

    @staticmethod
    def decode(blob: bytes) -> AcceptorState:
        try:
            obj = msgpack.unpackb(blob, raw=False)
            if not isinstance(obj, dict) or obj.get("f") != _STATE_FORMAT:
                raise ValueError("unknown acceptor state format")
            promised = ballot_from_wire(obj.get("p"))
            accepted = ballot_from_wire(obj.get("a"))
            wire_value = obj.get("v")
            value: RegisterValue | None = None
            if wire_value is not None:
                if not isinstance(wire_value, list) or len(wire_value) != 1:
                    raise ValueError("malformed accepted value")
                inner = wire_value[0]
                if inner is not None and not isinstance(inner, bytes):
                    raise ValueError("accepted value is not bytes")
                value = RegisterValue.of(inner)
            if (accepted is None) != (value is None):
                raise ValueError("accepted ballot and value must be both set or both unset")
            if accepted is not None and (promised is None or promised < accepted):
                raise ValueError("promised ballot is below the accepted ballot")
            lineage = lineage_from_wire(obj.get("l"))
            if lineage and accepted is None:
                raise ValueError("lineage without an accepted value")
            absorbed = obj.get("x", False)
            if not isinstance(absorbed, bool):
                raise ValueError("malformed absorbed flag")
            return AcceptorState(promised, accepted, value, lineage, absorbed)
        except CorruptState:
            raise
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise CorruptState(f"undecodable acceptor state: {exc}") from exc


EMPTY_STATE = AcceptorState()


@dataclass(frozen=True, slots=True)
class Promise:
    """Phase-1 success: the acceptor promised ``ballot``; it reports its last accepted state."""

    ballot: Ballot
    accepted: Ballot | None
    value: RegisterValue | None
    lineage: Lineage = ()


@dataclass(frozen=True, slots=True)
class Accepted:
    """Phase-2 success: the acceptor accepted at ``ballot`` (and promised ``promised_next`` if asked)."""

    ballot: Ballot
    promised_next: Ballot | None


@dataclass(frozen=True, slots=True)
class Observed:
    """A peek's answer: the acceptor's accepted ballot, state and lineage, changed nothing.
    ``voted``: that state is this acceptor's own vote (False for a state merged in by recovery)."""

    accepted: Ballot | None
    value: RegisterValue | None
    lineage: Lineage = ()
    voted: bool = True


@dataclass(frozen=True, slots=True)
class Rejected:
    """The request's ballot was too low; ``conflict`` is the acceptor's higher ballot."""

    conflict: Ballot


PrepareReply = Promise | Rejected
AcceptReply = Accepted | Rejected


def _highest(state: AcceptorState) -> Ballot | None:
    candidates = [b for b in (state.promised, state.accepted) if b is not None]
    return max(candidates) if candidates else None


def on_prepare(state: AcceptorState, ballot: Ballot) -> tuple[AcceptorState, PrepareReply]:
    """Phase 1 at an acceptor.

    Promise iff ``ballot`` is strictly greater than both the promised and the accepted ballot.
    Strictness matters: a duplicate or replayed prepare (or one from a proposer that restarted
    and reuses a counter) must not obtain a second promise for the same ballot.  On reject the
    state is unchanged (nothing to persist) and the reply names the ballot to jump past.
    """
    if (state.promised is None or ballot > state.promised) and (
        state.accepted is None or ballot > state.accepted
    ):
        new_state = replace(state, promised=ballot)
        return new_state, Promise(ballot, state.accepted, state.value, state.lineage)
    conflict = _highest(state)
    assert conflict is not None and conflict >= ballot
    return state, Rejected(conflict)


def on_peek(state: AcceptorState) -> Observed:
    """A read-only look at an acceptor's state (see "Quorum reads" in the module docstring):
    nothing changes, so nothing is persisted."""
    return Observed(state.accepted, state.value, state.lineage, voted=not state.absorbed)


def agreed_read(
    replies: Iterable[tuple[str, Observed]], sets: tuple[tuple[str, ...], ...]
) -> Observed | None:
    """The state a majority of every acceptor set reports as accepted at one ballot, each from its
    own vote; None if there is none (yet).  ``replies`` are (acceptor, its peek answer)."""
    from kvstore.protocol.membership import quorum_reached  # membership imports this module

    by_ballot: dict[Ballot | None, set[str]] = {}
    first: dict[Ballot | None, Observed] = {}
    for acceptor, observed in replies:
        if not observed.voted:
            continue
        by_ballot.setdefault(observed.accepted, set()).add(acceptor)
        seen = first.setdefault(observed.accepted, observed)
        # One ballot carries one state (ballots are unique and accepts are strict).
        assert (seen.value, seen.lineage) == (observed.value, observed.lineage), "two values accepted at one ballot"
    everyone = set().union(*sets)
    for ballot, acceptors in by_ballot.items():
        if is_zero(ballot):
            if acceptors >= everyone:  # chosen at a zero ballot only by every acceptor
                return first[ballot]
        elif quorum_reached(acceptors, sets):
            return first[ballot]
    return None


def zero_agreement_pending(
    replies: Iterable[tuple[str, Observed]], waiting: Iterable[str], sets: tuple[tuple[str, ...], ...]
) -> bool:
    """Whether a quorum reported one zero ballot and the acceptors still to answer could make it
    unanimous (``agreed_read``): a peek may then wait for them a little."""
    from kvstore.protocol.membership import quorum_reached

    everyone = set().union(*sets)
    waiting_set = set(waiting)
    by_ballot: dict[Ballot, set[str]] = {}
    for acceptor, observed in replies:
        if observed.voted and observed.accepted is not None and is_zero(observed.accepted):
            by_ballot.setdefault(observed.accepted, set()).add(acceptor)
    return any(
        quorum_reached(acceptors, sets) and acceptors | waiting_set >= everyone for acceptors in by_ballot.values()
    )


def agreement_possible(
    replies: Iterable[tuple[str, Observed]], waiting: Iterable[str], sets: tuple[tuple[str, ...], ...]
) -> bool:
    """Whether the acceptors still to answer could still make ``agreed_read`` succeed."""
    from kvstore.protocol.membership import quorum_possible

    waiting_set = set(waiting)
    by_ballot: dict[Ballot | None, set[str]] = {}
    for acceptor, observed in replies:
        if observed.voted:
            by_ballot.setdefault(observed.accepted, set()).add(acceptor)
    everyone = set().union(*sets)
    if any(is_zero(ballot) and acceptors | waiting_set >= everyone for ballot, acceptors in by_ballot.items()):
        return True
    candidates = [a for ballot, a in by_ballot.items() if not is_zero(ballot)]
    candidates.append(set())  # set(): a classic ballot none of the answers reported yet
    return any(quorum_possible(acceptors, waiting_set, sets) for acceptors in candidates)


def on_accept(
    state: AcceptorState,
    ballot: Ballot,
    value: RegisterValue,
    *,
    promise_next: Ballot | None,
    lineage: Lineage = (),
) -> tuple[AcceptorState, AcceptReply]:
    """Phase 2 at an acceptor, optionally fused with the proposer's next phase 1.

    Accept iff ``ballot >= promised`` (it is the ballot promised, or a higher one: accepting a
    higher ballot than promised is the classic Paxos rule) and ``ballot > accepted`` (strictly:
    CASPaxos's rule, so one ballot can never carry two different values at one acceptor, even if
    the accept message is duplicated).

    **One-round-trip fast path** (CASPaxos §2.2.1).  With ``promise_next = b'`` (the proposer's
    next ballot, ``b' > b``), the acceptor also promises ``b'`` in the same atomic, durable state
    change.  If a majority M accepted ``(b, v)`` this way, then at that instant every acceptor of
    M has promised ``b'`` and reports ``(b, v)`` as its highest accepted state: that is exactly a
    successful phase 1 for ``b'`` whose chosen value is ``v``.  So the same proposer may later
    send ``accept(b', f(v))`` without a prepare.

    Why it is safe.  Paxos's phase 2 at ballot ``b'`` is safe as long as some majority promised
    ``b'`` and the value sent is derived from the highest value that majority had accepted
    below ``b'``.  Because the promise of ``b'`` is given *atomically with* the accept of ``b``,
    no acceptor of M can accept any ballot in ``(b, b')`` in between (any such accept is below
    its promise), and ballot ``b'`` itself belongs to this proposer alone.  Hence M's report,
    ``(b, v)``, stays the correct phase-1 result for ``b'`` for ever.  If another proposer Q
    wants to run in between, its prepare must exceed ``b'`` at a majority to win; every such
    acceptor then rejects the fast accept at ``b'`` (``b' < promised``), and the proposer falls
    back to the full protocol.  Q's phase 1 sees ``(b, v)`` (or anything later), so Q's state is
    derived from ``v`` and the chain stays linear.  Acceptors outside M may accept ``(b', f(v))``
    too: a phase-2 message may go to any acceptor once phase 1 succeeded somewhere.
    """
    assert promise_next is None or (promise_next > ballot and promise_next.node == ballot.node), (
        "promise_next must be a later ballot of the same proposer"
    )
    assert _check_lineage(lineage) and (not lineage or lineage[0] <= ballot), "a change precedes its accept"
    if is_zero(ballot) and (state.promised is not None or state.accepted is not None):
        # A zero ballot skipped phase 1: only an acceptor that never voted on the key may take it.
        conflict = _highest(state)
        assert conflict is not None
        return state, Rejected(conflict)
    if (state.promised is None or ballot >= state.promised) and (
        state.accepted is None or ballot > state.accepted
    ):
        promised = promise_next if promise_next is not None else ballot
        new_state = AcceptorState(promised=promised, accepted=ballot, value=value, lineage=lineage)
        return new_state, Accepted(ballot, promise_next)
    conflict = _highest(state)
    assert conflict is not None and conflict >= ballot
    return state, Rejected(conflict)


# --------------------------------------------------------------------------------------------
# Acceptors that lost their storage (see kvstore.runtime.register_recovery)
# --------------------------------------------------------------------------------------------


def merge_states(a: AcceptorState, b: AcceptorState) -> AcceptorState:
    """The union of two acceptors' states for one key: the highest promise, the highest accepted
    ballot with its value and lineage.

    An acceptor that lost its storage rebuilds each key's state as this merge over the states of
    *all* the key's other acceptors, before it votes again.  Every promise or accept it gave and
    that a counted quorum relied on is then dominated (see ``kvstore.runtime.register_recovery``), and every
    (ballot, state) it reports was really accepted at that ballot by someone, which is all phase 1
    needs.  Commutative, associative, idempotent.  Raises ``ValueError`` when the two states
    claim different values at one ballot (impossible between correct acceptors).  The result is
    not flagged ``absorbed``: the merging acceptor sets that flag (``PaxosAcceptor.absorb``).
    """
    promises = [x for x in (a.promised, b.promised) if x is not None]
    promised = max(promises) if promises else None
    source = a
    if b.accepted is not None and (a.accepted is None or b.accepted > a.accepted):
        source = b
    elif a.accepted is not None and a.accepted == b.accepted and (a.value, a.lineage) != (b.value, b.lineage):
        raise ValueError(f"two states accepted at ballot {a.accepted.to_wire()}")
    # promised >= accepted holds on each side, so the max promise covers the chosen accepted.
    return AcceptorState(promised, source.accepted, source.value, source.lineage)


def stale_acceptors(tags: dict[str, tuple[str | None, dict[str, str]]]) -> frozenset[str]:
    """Acceptors whose reply in a round came from an incarnation another reply says is gone.

    ``tags`` maps each acceptor that answered ok to (its incarnation, its view: member -> the
    incarnation it last had registered for that member).  An acceptor ``x`` answering as ``t``
    is stale iff some other acceptor's view names a different incarnation for ``x``: a new
    incarnation of ``x`` registered there, so the reply may come from state that was lost.
    Dropping a reply is always safe (a round only counts fewer oks); a view that predates the
    registration of ``x``'s current incarnation can make this drop a good reply, which costs a
    retry, never safety.  Unknown incarnations (None) contradict nothing.
    """
    stale = set()
    for member, (incarnation, _) in tags.items():
        if incarnation is None:
            continue
        for other, (_, view) in tags.items():
            seen = view.get(member)
            if other != member and seen is not None and seen != incarnation:
                stale.add(member)
                break
    return frozenset(stale)


# --------------------------------------------------------------------------------------------
# Proposer helpers
# --------------------------------------------------------------------------------------------


def majority(n: int) -> int:
    """Smallest number of acceptors such that any two such sets of ``n`` intersect."""
    assert n >= 1, "a register needs at least one acceptor"
    return n // 2 + 1


def highest_accepted(promises: Iterable[Promise]) -> Promise | None:
    """The promise reporting the highest accepted ballot (its value and lineage), or None."""
    best: Promise | None = None
    best_ballot: Ballot | None = None
    for promise in promises:
        if promise.accepted is None:
            continue
        assert promise.value is not None
        if best is None or best_ballot is None or promise.accepted > best_ballot:
            best, best_ballot = promise, promise.accepted
        elif promise.accepted == best_ballot:
            # One ballot carries one state (ballots are unique and accepts are strict).
            assert (promise.value, promise.lineage) == (best.value, best.lineage), (
                "two values accepted at one ballot"
            )
    return best


def choose_value(promises: Iterable[Promise]) -> RegisterValue | None:
    """The current register state per a majority of promises: the highest accepted value."""
    best = highest_accepted(promises)
    return None if best is None else best.value


def next_ballot(last: Ballot | None, seen_max_counter: int, node: str) -> Ballot:
    """A ballot of ``node`` above both its own last ballot and every counter it has seen."""
    assert seen_max_counter >= 0
    assert last is None or last.node == node, "a proposer only advances its own ballots"
    base = max(last.counter if last is not None else 0, seen_max_counter)
    ballot = Ballot(base + 1, node)
    assert last is None or ballot > last
    return ballot


def backoff_s(attempt: int, rng: random.Random, base_s: float, cap_s: float) -> float:
    """Randomized bounded exponential backoff ("full jitter"): uniform in [0, min(cap, base*2^attempt)].

    Randomization is what breaks the symmetry of dueling proposers (each one's prepare
    invalidating the other's accept); the cap bounds the added latency.
    """
    assert attempt >= 0 and base_s >= 0 and cap_s >= 0
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 62)))
    delay = rng.uniform(0.0, ceiling)
    assert 0.0 <= delay <= cap_s
    return delay


# --------------------------------------------------------------------------------------------
# Change functions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """Linearizable read: the identity change (re-commits the current state)."""


@dataclass(frozen=True, slots=True)
class Write:
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    pass


@dataclass(frozen=True, slots=True)
class CompareAndSet:
    """Replace the value iff its current etag is ``expected_etag`` (``new_value=None`` deletes)."""

    expected_etag: str
    new_value: bytes | None


@dataclass(frozen=True, slots=True)
class PutIfAbsent:
    value: bytes


Change = Read | Write | Delete | CompareAndSet | PutIfAbsent

OutcomeStatus = Literal["ok", "precondition_failed"]


@dataclass(frozen=True, slots=True)
class ChangeOutcome:
    """What a change did.  ``current_etag`` is the register's etag after the change
    (for ``precondition_failed``: the unchanged current etag the client should have sent)."""

    status: OutcomeStatus
    current_etag: str | None


def apply_change(change: Change, current: RegisterValue | None) -> tuple[RegisterValue, ChangeOutcome]:
    """Apply a change to the current register state (None = never written = absent).

    A failed precondition leaves the state unchanged; the proposer still commits it, which makes
    the failure a linearizable observation of the current state.
    """
    cur = current if current is not None else ABSENT
    new: RegisterValue
    match change:
        case Read():
            new = cur
        case Write(value=value):
            new = RegisterValue.of(value)
        case Delete():
            new = ABSENT
        case CompareAndSet(expected_etag=expected, new_value=new_value):
            if cur.etag is None or cur.etag != expected:
                return cur, ChangeOutcome("precondition_failed", cur.etag)
            new = RegisterValue.of(new_value)
        case PutIfAbsent(value=value):
            if cur.present:
                return cur, ChangeOutcome("precondition_failed", cur.etag)
            new = RegisterValue.of(value)
        case _:
            raise AssertionError(f"unknown change {change!r}")
    return new, ChangeOutcome("ok", new.etag)
