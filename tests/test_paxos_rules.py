"""Tables for the pure CASPaxos rules (kvstore.protocol.paxos), and the production proposer core
(kvstore.protocol.proposer) stepped under a seeded scheduler, judged by the linearizability checker."""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest

from kvstore.checker import check
from kvstore.protocol.membership import quorum_reached
from kvstore.protocol.paxos import (
    ABSENT,
    EMPTY_STATE,
    LINEAGE_DEPTH,
    Accepted,
    AcceptorState,
    Ballot,
    Change,
    ChangeOutcome,
    CompareAndSet,
    CorruptState,
    Delete,
    Lineage,
    Observed,
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
    choose_value,
    etag_of,
    extend_lineage,
    highest_accepted,
    is_zero,
    lineage_from_wire,
    lineage_to_wire,
    majority,
    next_ballot,
    on_accept,
    on_peek,
    on_prepare,
    zero_agreement_pending,
)
from kvstore.protocol.paxos_wire import parse_peek, parse_request, reply_to_wire
from kvstore.protocol.proposer import (
    Abandon,
    Answer,
    CallFailed,
    ConsensusUnavailable,
    Detach,
    Done,
    Effect,
    Failed,
    Instant,
    ProposerConfig,
    ProposerCore,
    ProposeResult,
    ProposerState,
    ProposerStats,
    Reply,
    Send,
    StartTimer,
)
from kvstore.transport.base import Message


def B(counter: int, node: str = "a") -> Ballot:
    return Ballot(counter, node)


def V(value: bytes | None) -> RegisterValue:
    return RegisterValue.of(value)


def S(
    promised: Ballot | None = None, accepted: Ballot | None = None, value: bytes | None | str = "-"
) -> AcceptorState:
    """State shorthand: value "-" means nothing accepted."""
    if accepted is None:
        return AcceptorState(promised, None, None)
    assert not isinstance(value, str)
    return AcceptorState(promised, accepted, V(value))


# --- ballots and values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        (B(1, "a"), B(2, "a")),
        (B(1, "b"), B(2, "a")),  # counter first
        (B(2, "a"), B(2, "b")),  # node breaks ties
        (B(0, "z"), B(1, "a")),
        (B(9, "n1"), B(10, "n1")),  # numeric, not string, counter order
    ],
)
def test_ballot_order(lower: Ballot, higher: Ballot) -> None:
    assert lower < higher and higher > lower and lower != higher
    assert max(lower, higher) == higher


@pytest.mark.parametrize("ballot", [B(0, "a"), B(7, "node-3"), B(2**40, "x")])
def test_ballot_wire_round_trip(ballot: Ballot) -> None:
    wire = msgpack.unpackb(msgpack.packb(ballot.to_wire()), raw=False)
    assert Ballot.from_wire(wire) == ballot


@pytest.mark.parametrize(
    "wire", [None, [], [1], [1, 2], ["1", "a"], [-1, "a"], [1, ""], [True, "a"], "1a", [1, "a", 2]]
)
def test_ballot_from_wire_rejects_malformed(wire: object) -> None:
    with pytest.raises(ValueError):
        Ballot.from_wire(wire)


@pytest.mark.parametrize("value", [b"", b"x", b"hello world", bytes(range(256))])
def test_etag_of(value: bytes) -> None:
    tag = etag_of(value)
    assert tag.startswith('"') and tag.endswith('"') and len(tag) == 18
    assert tag == etag_of(bytes(value))
    assert RegisterValue.of(value) == RegisterValue(value, tag)


def test_etag_distinguishes_values_and_absent() -> None:
    assert etag_of(b"a") != etag_of(b"b")
    assert etag_of(b"") != etag_of(b"\x00")
    assert RegisterValue.of(None) == ABSENT == RegisterValue(None, None)
    assert not ABSENT.present and V(b"").present


def test_register_value_rejects_wrong_etag() -> None:
    with pytest.raises(AssertionError):
        RegisterValue(b"x", '"0000000000000000"')
    with pytest.raises(AssertionError):
        RegisterValue(None, etag_of(b"x"))


# --- acceptor state persistence --------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        EMPTY_STATE,
        S(B(3)),
        S(B(3), B(3), b"v"),
        S(B(5, "b"), B(3), b"v"),  # fast-path promise above the accepted ballot
        S(B(4), B(4), None),  # accepted a deletion
        S(B(4), B(4), b""),  # accepted an empty (present) value
        AcceptorState(B(9), B(8), V(b"v"), (B(8), B(5, "b"), B(2))),  # with a lineage
    ],
)
def test_acceptor_state_round_trip(state: AcceptorState) -> None:
    blob = state.encode()
    assert isinstance(blob, bytes)
    assert AcceptorState.decode(blob) == state


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"f": 99, "p": None, "a": None, "v": None}),
        msgpack.packb({"f": 1, "p": [1, "a"], "a": [2, "a"], "v": [b"x"]}),  # promised < accepted
        msgpack.packb({"f": 1, "p": [1, "a"], "a": [1, "a"], "v": None}),  # ballot without value
        msgpack.packb({"f": 1, "p": [1, "a"], "a": None, "v": [b"x"]}),  # value without ballot
        msgpack.packb({"f": 1, "p": [1, "a"], "a": [1, "a"], "v": ["str"]}),
        msgpack.packb({"f": 1, "p": "zz", "a": None, "v": None}),
    ],
)
def test_acceptor_state_decode_rejects_corruption(blob: bytes) -> None:
    with pytest.raises(CorruptState):
        AcceptorState.decode(blob)


# --- phase 1 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "ballot", "expect_promise", "conflict"),
    [
        (EMPTY_STATE, B(1), True, None),
        (S(B(1)), B(2), True, None),
        (S(B(2)), B(2), False, B(2)),  # equal: a replayed prepare gets no second promise
        (S(B(3)), B(2), False, B(3)),
        (S(B(2, "a")), B(2, "b"), True, None),  # node id breaks the tie
        (S(B(2, "b")), B(2, "a"), False, B(2, "b")),
        (S(B(3), B(3), b"v"), B(4), True, None),
        (S(B(3), B(3), b"v"), B(3), False, B(3)),
        (S(B(5), B(3), b"v"), B(4), False, B(5)),  # fast-path promise blocks
        (S(B(5), B(3), b"v"), B(6, "b"), True, None),
    ],
)
def test_on_prepare(
    state: AcceptorState, ballot: Ballot, expect_promise: bool, conflict: Ballot | None
) -> None:
    new_state, reply = on_prepare(state, ballot)
    if expect_promise:
        assert reply == Promise(ballot, state.accepted, state.value)
        assert new_state == AcceptorState(ballot, state.accepted, state.value)
    else:
        assert reply == Rejected(conflict)  # type: ignore[arg-type]
        assert new_state == state
        assert conflict is not None and conflict >= ballot


# --- phase 2 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "ballot", "promise_next", "expect_accept", "conflict"),
    [
        (EMPTY_STATE, B(1), None, True, None),  # accept without prepare: fine, nothing promised
        (S(B(2)), B(2), None, True, None),  # the promised ballot
        (S(B(2)), B(3), None, True, None),  # higher than promised
        (S(B(3)), B(2), None, False, B(3)),  # below the promise
        (S(B(2), B(2), b"v"), B(2), None, False, B(2)),  # strictly above accepted: no re-accept
        (S(B(4), B(2), b"v"), B(4), None, True, None),
        (S(B(2)), B(2), B(3), True, None),  # fast-path promise granted with the accept
        (S(B(3), B(2), b"v"), B(3), B(4), True, None),  # using the fast-path promise
        (S(B(4, "b"), B(2), b"v"), B(3), B(5), False, B(4, "b")),  # fast path invalidated
        (S(B(3, "b"), B(3, "b"), b"v"), B(3, "a"), None, False, B(3, "b")),
    ],
)
def test_on_accept(
    state: AcceptorState,
    ballot: Ballot,
    promise_next: Ballot | None,
    expect_accept: bool,
    conflict: Ballot | None,
) -> None:
    value = V(b"new")
    new_state, reply = on_accept(state, ballot, value, promise_next=promise_next)
    if expect_accept:
        assert reply == Accepted(ballot, promise_next)
        assert new_state == AcceptorState(promise_next or ballot, ballot, value)
    else:
        assert reply == Rejected(conflict)  # type: ignore[arg-type]
        assert new_state == state


@pytest.mark.parametrize("promise_next", [B(1), B(2), B(3, "b")])
def test_on_accept_refuses_bad_promise_next(promise_next: Ballot) -> None:
    with pytest.raises(AssertionError):
        on_accept(EMPTY_STATE, B(2), V(b"x"), promise_next=promise_next)


def test_accepted_deletion_is_a_value() -> None:
    state, reply = on_accept(S(B(1)), B(1), ABSENT, promise_next=None)
    assert isinstance(reply, Accepted)
    _, promise = on_prepare(state, B(2))
    assert promise == Promise(B(2), B(1), ABSENT)
    assert choose_value([promise]) == ABSENT


# --- proposer helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "quorum"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)])
def test_majority(n: int, quorum: int) -> None:
    assert majority(n) == quorum
    assert 2 * majority(n) > n  # any two majorities intersect


@pytest.mark.parametrize(
    ("promises", "expected"),
    [
        ([], None),
        ([Promise(B(9), None, None), Promise(B(9), None, None)], None),
        ([Promise(B(9), B(3), V(b"x")), Promise(B(9), None, None)], V(b"x")),
        ([Promise(B(9), B(3), V(b"x")), Promise(B(9), B(5), V(b"y"))], V(b"y")),
        ([Promise(B(9), B(5, "a"), V(b"x")), Promise(B(9), B(5, "b"), V(b"y"))], V(b"y")),
        ([Promise(B(9), B(5), V(b"y")), Promise(B(9), B(5), V(b"y")), Promise(B(9), B(1), V(b"z"))], V(b"y")),
        ([Promise(B(9), B(7), ABSENT), Promise(B(9), B(5), V(b"y"))], ABSENT),
    ],
)
def test_choose_value(promises: list[Promise], expected: RegisterValue | None) -> None:
    assert choose_value(promises) == expected
    best = highest_accepted(promises)
    assert (best is None) == (expected is None)
    if best is not None:
        assert best.accepted == max(p.accepted for p in promises if p.accepted is not None)


def test_choose_value_detects_two_values_at_one_ballot() -> None:
    with pytest.raises(AssertionError):
        choose_value([Promise(B(9), B(5), V(b"x")), Promise(B(9), B(5), V(b"y"))])


@pytest.mark.parametrize(
    ("last", "seen", "expected"),
    [
        (None, 0, B(1)),
        (B(1), 0, B(2)),
        (B(4), 2, B(5)),
        (B(4), 9, B(10)),  # jump past a conflict
        (None, 41, B(42)),
    ],
)
def test_next_ballot(last: Ballot | None, seen: int, expected: Ballot) -> None:
    assert next_ballot(last, seen, "a") == expected


def test_next_ballot_strictly_increases() -> None:
    rng = random.Random(1)
    last: Ballot | None = None
    for _ in range(1000):
        ballot = next_ballot(last, rng.randrange(0, 50), "a")
        assert last is None or ballot > last
        last = ballot


@pytest.mark.parametrize(("base", "cap"), [(0.005, 0.2), (0.001, 0.001), (0.0, 1.0), (1.0, 0.5)])
def test_backoff_bounded_and_randomized(base: float, cap: float) -> None:
    rng = random.Random(7)
    for attempt in range(0, 100):
        delay = backoff_s(attempt, rng, base, cap)
        assert 0.0 <= delay <= min(cap, base * 2**attempt)
    samples = {backoff_s(5, rng, base, cap) for _ in range(20)}
    assert len(samples) > 1 or min(cap, base) == 0.0


def test_backoff_reproducible_from_seed() -> None:
    a = [backoff_s(i % 8, random.Random(3), 0.005, 0.2) for i in range(10)]
    b = [backoff_s(i % 8, random.Random(3), 0.005, 0.2) for i in range(10)]
    assert a == b


# --- change functions -------------------------------------------------------------------------

X, Y = b"x", b"y"


@pytest.mark.parametrize(
    ("change", "current", "new", "outcome"),
    [
        (Read(), None, ABSENT, ChangeOutcome("ok", None)),
        (Read(), V(X), V(X), ChangeOutcome("ok", etag_of(X))),
        (Write(Y), None, V(Y), ChangeOutcome("ok", etag_of(Y))),
        (Write(Y), V(X), V(Y), ChangeOutcome("ok", etag_of(Y))),
        (Delete(), V(X), ABSENT, ChangeOutcome("ok", None)),
        (Delete(), None, ABSENT, ChangeOutcome("ok", None)),
        (CompareAndSet(etag_of(X), Y), V(X), V(Y), ChangeOutcome("ok", etag_of(Y))),
        (CompareAndSet(etag_of(X), None), V(X), ABSENT, ChangeOutcome("ok", None)),  # conditional delete
        (CompareAndSet(etag_of(Y), Y), V(X), V(X), ChangeOutcome("precondition_failed", etag_of(X))),
        (CompareAndSet(etag_of(X), Y), None, ABSENT, ChangeOutcome("precondition_failed", None)),
        (CompareAndSet(etag_of(X), Y), ABSENT, ABSENT, ChangeOutcome("precondition_failed", None)),
        (PutIfAbsent(Y), None, V(Y), ChangeOutcome("ok", etag_of(Y))),
        (PutIfAbsent(Y), ABSENT, V(Y), ChangeOutcome("ok", etag_of(Y))),
        (PutIfAbsent(Y), V(X), V(X), ChangeOutcome("precondition_failed", etag_of(X))),
        (PutIfAbsent(Y), V(b""), V(b""), ChangeOutcome("precondition_failed", etag_of(b""))),
    ],
)
def test_apply_change(
    change: Change, current: RegisterValue | None, new: RegisterValue, outcome: ChangeOutcome
) -> None:
    assert apply_change(change, current) == (new, outcome)


# --- classic races, simulated over three acceptor states ----------------------------------------


class Acceptors:
    """Three acceptor states driven by the pure rules; tracks what a majority accepted."""

    def __init__(self, n: int = 3) -> None:
        self.states = [EMPTY_STATE] * n
        self.accepted_by: dict[Ballot, tuple[RegisterValue, set[int]]] = {}
        self.lineages: dict[Ballot, Lineage] = {}

    def prepare(self, i: int, ballot: Ballot) -> Promise | Rejected:
        self.states[i], reply = on_prepare(self.states[i], ballot)
        return reply

    def accept(
        self,
        i: int,
        ballot: Ballot,
        value: RegisterValue,
        promise_next: Ballot | None = None,
        lineage: Lineage = (),
    ) -> Accepted | Rejected:
        self.states[i], reply = on_accept(
            self.states[i], ballot, value, promise_next=promise_next, lineage=lineage
        )
        if isinstance(reply, Accepted):
            old, who = self.accepted_by.setdefault(ballot, (value, set()))
            assert old == value, "two values accepted at one ballot"
            who.add(i)
            self.lineages[ballot] = lineage
        return reply

    def restart(self, i: int) -> None:
        self.states[i] = AcceptorState.decode(self.states[i].encode())

    def chosen(self) -> dict[Ballot, RegisterValue]:
        """Chosen: accepted by a majority at a classic ballot, by every acceptor at a zero ballot
        (a first write without phase 1, see kvstore.protocol.paxos)."""
        need = majority(len(self.states))
        return {
            b: v for b, (v, who) in self.accepted_by.items()
            if len(who) >= (len(self.states) if is_zero(b) else need)
        }


def test_two_proposers_interleaving_later_ballot_wins() -> None:
    acc = Acceptors()
    p, q = B(1, "p"), B(2, "q")
    promises_p = [acc.prepare(i, p) for i in (0, 1)]
    assert all(isinstance(r, Promise) for r in promises_p)
    # Q prepares on acceptors 1 and 2 before P's accepts arrive.
    promises_q = [acc.prepare(i, q) for i in (1, 2)]
    assert all(isinstance(r, Promise) for r in promises_q)
    assert choose_value(promises_q) is None  # type: ignore[arg-type]
    # P's accepts: acceptor 0 takes it, acceptor 1 (promised Q) rejects: P has no majority.
    assert isinstance(acc.accept(0, p, V(b"from-p")), Accepted)
    rejected = acc.accept(1, p, V(b"from-p"))
    assert rejected == Rejected(q)
    assert acc.chosen() == {}
    # Q's accepts succeed on its majority.
    assert isinstance(acc.accept(1, q, V(b"from-q")), Accepted)
    assert isinstance(acc.accept(2, q, V(b"from-q")), Accepted)
    assert acc.chosen() == {q: V(b"from-q")}
    # P retries past the conflict; its phase 1 must see Q's chosen value, not its own stray one.
    p2 = next_ballot(p, rejected.conflict.counter, "p")
    assert p2 > q
    promises = [acc.prepare(i, p2) for i in (0, 1)]
    assert choose_value(promises) == V(b"from-q")  # type: ignore[arg-type]


def test_accepts_after_chosen_carry_the_chosen_value() -> None:
    acc = Acceptors()
    b1 = B(1, "p")
    for i in range(3):
        acc.prepare(i, b1)
    for i in (0, 1):
        acc.accept(i, b1, V(b"v1"))
    assert acc.chosen() == {b1: V(b"v1")}
    # Any later proposer on any majority sees v1.
    for majority_set in ((0, 1), (0, 2), (1, 2)):
        b = next_ballot(None, max(s.promised.counter for s in acc.states if s.promised), "q")
        promises = [acc.prepare(i, b) for i in majority_set]
        assert all(isinstance(r, Promise) for r in promises)
        assert choose_value(promises) == V(b"v1")  # type: ignore[arg-type]


@pytest.mark.parametrize("reached", [(0,), (1,), (2,)])
def test_proposer_crash_between_phases_value_recovers(reached: tuple[int, ...]) -> None:
    """P's accept reached one acceptor, then P crashed: Q's prepare on a majority containing that
    acceptor sees the partial value and finishes it (Q applies its change on top of it)."""
    acc = Acceptors()
    p = B(1, "p")
    for i in range(3):
        acc.prepare(i, p)
    for i in reached:
        acc.accept(i, p, V(b"partial"))
    assert acc.chosen() == {}
    q = B(2, "q")
    group = sorted({reached[0], (reached[0] + 1) % 3})
    promises = [acc.prepare(i, q) for i in group]
    current = choose_value(promises)  # type: ignore[arg-type]
    assert current == V(b"partial")
    new, outcome = apply_change(Read(), current)
    for i in group:
        assert isinstance(acc.accept(i, q, new), Accepted)
    assert acc.chosen() == {q: V(b"partial")}
    assert outcome.status == "ok" and outcome.current_etag == etag_of(b"partial")


def test_proposer_crash_partial_value_can_also_be_lost_but_never_split() -> None:
    """A majority that missed the partial accept picks the older value; the partial value can then
    never be chosen (its ballot is below every promise of that majority)."""
    acc = Acceptors()
    p = B(1, "p")
    for i in range(3):
        acc.prepare(i, p)
    acc.accept(0, p, V(b"partial"))
    q = B(2, "q")
    promises = [acc.prepare(i, q) for i in (1, 2)]
    assert choose_value(promises) is None  # type: ignore[arg-type]
    for i in (1, 2):
        acc.accept(i, q, V(b"q"))
    assert acc.accept(1, p, V(b"partial")) == Rejected(q)
    assert acc.chosen() == {q: V(b"q")}


def test_acceptor_restart_keeps_its_promise() -> None:
    acc = Acceptors()
    assert isinstance(acc.prepare(0, B(5, "q")), Promise)
    acc.restart(0)
    assert acc.states[0].promised == B(5, "q")
    assert acc.accept(0, B(4, "p"), V(b"stale")) == Rejected(B(5, "q"))
    assert acc.prepare(0, B(5, "q")) == Rejected(B(5, "q"))
    assert isinstance(acc.accept(0, B(5, "q"), V(b"ok")), Accepted)
    acc.restart(0)
    assert acc.states[0] == AcceptorState(B(5, "q"), B(5, "q"), V(b"ok"))


def test_fast_path_skips_phase_1_when_uncontended() -> None:
    acc = Acceptors()
    b1, b2, b3 = B(1, "p"), B(2, "p"), B(3, "p")
    for i in range(3):
        acc.prepare(i, b1)
    for i in range(3):
        assert acc.accept(i, b1, V(b"1"), promise_next=b2) == Accepted(b1, b2)
    # No prepare: accept at b2 directly, value derived from what b1 committed.
    for i in range(3):
        assert acc.accept(i, b2, V(b"2"), promise_next=b3) == Accepted(b2, b3)
    assert acc.chosen() == {b1: V(b"1"), b2: V(b"2")}


def test_fast_path_invalidated_by_intervening_prepare() -> None:
    acc = Acceptors()
    b1, b2 = B(1, "p"), B(2, "p")
    for i in range(3):
        acc.prepare(i, b1)
    for i in range(3):
        acc.accept(i, b1, V(b"1"), promise_next=b2)
    # Q's ballot at or below b2 is rejected, and the conflict tells it to jump past b2.
    rejected = acc.prepare(0, B(2, "a"))
    assert rejected == Rejected(b2)
    q = next_ballot(None, rejected.conflict.counter, "q")  # type: ignore[union-attr]
    promises = [acc.prepare(i, q) for i in (0, 1)]
    assert choose_value(promises) == V(b"1")  # type: ignore[arg-type]
    for i in (0, 1):
        acc.accept(i, q, V(b"1+q"))
    # P's fast accept at b2 is now rejected by the majority that promised q; acceptor 2 (which
    # Q never reached) may take it, which is harmless: b2 cannot reach a majority any more.
    assert acc.accept(0, b2, V(b"1+p")) == Rejected(q)
    assert acc.accept(1, b2, V(b"1+p")) == Rejected(q)
    assert isinstance(acc.accept(2, b2, V(b"1+p")), Accepted)
    assert acc.chosen() == {b1: V(b"1"), q: V(b"1+q")}
    # P falls back to the full protocol above q and sees Q's value (ballot q > b2).
    p3 = next_ballot(b2, q.counter, "p")
    promises = [acc.prepare(i, p3) for i in (1, 2)]
    assert choose_value(promises) == V(b"1+q")  # type: ignore[arg-type]


def test_fast_path_promise_survives_restart() -> None:
    acc = Acceptors()
    b1, b2 = B(1, "p"), B(2, "p")
    acc.prepare(0, b1)
    acc.accept(0, b1, V(b"1"), promise_next=b2)
    acc.restart(0)
    assert acc.prepare(0, B(2, "a")) == Rejected(b2)
    assert acc.accept(0, b2, V(b"2")) == Accepted(b2, None)


# --- the production proposer core under a seeded scheduler: safety property ---------------------
#
# Real ``ProposerCore``s (kvstore.protocol.proposer) -- several per node, sharing the node's
# ``ProposerState`` as in production -- are stepped against the pure acceptor rules answering
# wire messages through the production codec (kvstore.protocol.paxos_wire).  A seeded discrete-event
# scheduler plays the network and the driver: every message gets a random latency (so they are
# reordered), may be lost (the call then fails at once, as a refused or cut connection, or never
# answers and the core's deadline ends the round), may be duplicated; acceptors restart from
# their encoded state; clients give up on proposals (cancellation).  Answers due at one instant
# reach a core as one batch, in arrival order, and answers of calls the core already released are
# delivered anyway.  Every client op goes into a history judged by the linearizability checker.


@dataclass
class _Client:
    node: int
    name: str
    todo: int
    core: ProposerCore | None = None
    op: dict[str, Any] | None = None  # the history record of the op in progress
    change: Change | None = None
    timer_gen: int = 0
    inbox: list[Answer] = field(default_factory=list)
    flush_at: int | None = None


@dataclass
class CoreSim:
    """One seeded run: ``history`` (op records), the acceptors, and every accept sent."""

    seed: int
    acceptors: dict[str, Acceptors]  # per key: each key is its own register
    history: list[dict[str, Any]] = field(default_factory=list)
    # origin (ballot of an accept carrying a changed value) -> the lineage that accept carried
    origins: dict[Ballot, Lineage] = field(default_factory=dict)
    stats: ProposerStats = field(default_factory=ProposerStats)
    outcomes: dict[str, int] = field(default_factory=dict)


MS = 1_000_000


def _wire(message: Message) -> Message:
    """A message as it crosses the transport (msgpack, as kvstore.transport does)."""
    decoded: Message = msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False)
    return decoded


def run_cores(
    seed: int, nodes: int = 3, clients_per_node: int = 2, ops_per_client: int = 4, new_keys: bool = False
) -> CoreSim:
    """``new_keys``: many keys, each client's first op a first write racing the others' (zero
    ballots contend: the case where a majority is not enough to choose)."""
    rng = random.Random(seed)
    drop = rng.choice([0.0, 0.05, 0.15])
    silent = rng.choice([0.0, 0.5, 1.0])  # share of losses that never answer (vs. failing at once)
    dup = rng.choice([0.0, 0.05])
    abandon = rng.choice([0.0, 0.001])
    keys = [f"k{i}" for i in range(rng.choice([2, 3]))] if new_keys else ["k0", "k1"][: rng.choice([1, 2])]
    config = ProposerConfig(
        max_attempts=rng.choice([3, 20]),
        backoff_base_s=0.005,
        backoff_cap_s=0.05,
        fast_path=rng.random() < 0.7,
        clock_ballots=rng.random() < 0.5,
        peek_reads=rng.random() < 0.7,
        unanimity_wait_s=rng.choice([0.0, 0.003, 0.05, 0.5]),
    )
    # Reads of a node that is not the key's proposer peek only (the register hands an
    # inconclusive peek to the key's proposer); here: some reads never fall back.
    peek_only = rng.random() < 0.3
    first_writes = 1.0 if new_keys else rng.choice([0.0, 0.5, 1.0])  # changes tried at a zero ballot first
    names = [f"n{i}" for i in range(nodes)]
    group = tuple(names)
    skew_ns = [rng.randrange(0, 50 * MS) for _ in names]
    states = [ProposerState(name, fast_path_capacity=rng.choice([0, 1, 100])) for name in names]
    node_rngs = [random.Random(rng.random()) for _ in names]
    sim = CoreSim(seed, {key: Acceptors(nodes) for key in keys})
    events: list[tuple[int, int, Callable[[], None]]] = []
    seq = itertools.count()
    now = 0
    values = itertools.count()
    written: dict[str, list[str]] = {key: [] for key in keys}

    def at(when_ns: int, action: Callable[[], None]) -> None:
        heapq.heappush(events, (when_ns, next(seq), action))

    def latency() -> int:
        return rng.randint(1, 5) * MS

    def instant(client: _Client) -> Instant:
        return Instant(now, 1_700_000_000_000 * MS + now + skew_ns[client.node])

    def answer(client: _Client, core: ProposerCore, item: Answer) -> None:
        def arrive() -> None:
            if client.core is not core:
                return  # the proposal is over (or abandoned): nobody listens any more
            client.inbox.append(item)
            if client.flush_at != now:
                client.flush_at = now
                at(now, lambda: flush(client, core))  # after every answer already due now

        at(now + latency(), arrive)

    def flush(client: _Client, core: ProposerCore) -> None:
        client.flush_at = None
        if client.core is not core or not client.inbox:
            return
        batch, client.inbox = client.inbox, []
        apply(client, core, core.on_answers(batch, instant(client)))

    def send(client: _Client, core: ProposerCore, effect: Send) -> None:
        target = names.index(effect.peer)
        message = _wire(effect.message)
        acc = sim.acceptors[message["key"]]
        if message["op"] == "paxos_accept" and message["lineage"]:
            request = parse_request(message)
            if request.lineage[0] == request.ballot:  # a changed value: its origin
                assert sim.origins.setdefault(request.ballot, request.lineage) == request.lineage

        def lost(maybe_delivered: bool) -> None:
            if rng.random() >= silent:
                answer(client, core, CallFailed(effect.call, maybe_delivered=maybe_delivered))

        def deliver() -> None:
            if rng.random() < 0.01:
                acc.restart(rng.randrange(nodes))
            reply: Promise | Accepted | Rejected | Observed
            if message["op"] == "paxos_peek":
                parse_peek(message)
                answer(client, core, Reply(effect.call, _wire(reply_to_wire(on_peek(acc.states[target])))))
                return
            request = parse_request(message)
            if request.op == "paxos_prepare":
                reply = acc.prepare(target, request.ballot)
            else:
                assert request.value is not None
                reply = acc.accept(target, request.ballot, request.value, request.promise_next, request.lineage)
            if rng.random() < drop:
                lost(maybe_delivered=True)
            else:
                answer(client, core, Reply(effect.call, _wire(reply_to_wire(reply))))

        if rng.random() < drop:
            lost(maybe_delivered=False)
            return
        at(now + latency(), deliver)
        if rng.random() < dup:
            at(now + latency(), deliver)

    def apply(client: _Client, core: ProposerCore, effects: list[Effect]) -> None:
        kinds = [type(e).__name__ for e in effects]
        # The documented order: sends, then releases, then at most one timer, then the outcome.
        rank = {"Send": 0, "Abandon": 1, "Detach": 1, "StartTimer": 2, "Done": 3, "Failed": 3}
        assert [rank[k] for k in kinds] == sorted(rank[k] for k in kinds), kinds
        assert kinds.count("StartTimer") <= 1 and kinds.count("Done") + kinds.count("Failed") <= 1
        for effect in effects:
            match effect:
                case Send():
                    send(client, core, effect)
                case Abandon() | Detach():
                    pass  # sent requests stay sent; answers still come and must be ignored
                case StartTimer(at_ns=at_ns):
                    client.timer_gen += 1  # replaces any earlier timer
                    at(max(now, at_ns), functools.partial(fire, client, core, client.timer_gen))
                case Done(result=result):
                    finish(client, result)
                case Failed(error=error):
                    finish(client, error)

    def fire(client: _Client, core: ProposerCore, gen: int) -> None:
        if client.core is core and gen == client.timer_gen:
            apply(client, core, core.on_timer(instant(client)))

    def begin(client: _Client) -> None:
        key = rng.choice(keys)
        value = f"{client.name}.{next(values)}"
        kind = rng.choice(["read", "write", "cas", "cas", "put_if_absent", "delete"])
        if new_keys and client.todo == ops_per_client:
            kind = rng.choice(["write", "put_if_absent"])
        change: Change
        op: dict[str, Any] = {"f": kind, "key": key, "value": None, "invoke": next(seq)}
        if kind == "read":
            change = Read()
        elif kind == "write":
            change, op["value"] = Write(value.encode()), value
        elif kind == "delete":
            change = Delete()
        elif kind == "put_if_absent":
            change, op["f"], op["value"] = PutIfAbsent(value.encode()), "cas", [None, value]
        else:
            expected = rng.choice(written[key]) if written[key] else value
            change, op["value"] = CompareAndSet(etag_of(expected.encode()), value.encode()), [expected, value]
        if kind != "read" and kind != "delete":
            written[key].append(value)
        core = ProposerCore(
            states[client.node],
            config,
            node_rngs[client.node],
            key,
            0,
            group,
            change,
            now + rng.choice([40, 150, 500]) * MS,
            sim.stats,
            fallback=not (peek_only and rng.random() < 0.5),
            # The register's belief that the key is new is a guess: right or wrong, safe.
            first_write=rng.random() < first_writes,
            all_up=rng.random() < 0.8,  # else a zero ballot's last acceptor is not waited for
        )
        client.core, client.op, client.change, client.inbox = core, op, change, []
        sim.history.append(op)
        apply(client, core, core.start(instant(client)))

    def finish(client: _Client, outcome: ProposeResult | ConsensusUnavailable | None) -> None:
        op, change = client.op, client.change
        assert op is not None and change is not None
        op["complete"] = next(seq)
        if outcome is None:
            op["type"], label = "info", "abandoned"
        elif isinstance(outcome, ConsensusUnavailable):
            indeterminate = bool(outcome.indeterminate)
            # A read changes nothing: its failure is never indeterminate.
            assert not (indeterminate and isinstance(change, Read))
            op["type"] = "info" if indeterminate else "fail"
            label = "indeterminate" if indeterminate else "failed"
        elif outcome.outcome == "precondition_failed":
            # A failed precondition commits the unchanged state: an observation of it.
            assert isinstance(change, CompareAndSet | PutIfAbsent)
            if isinstance(change, CompareAndSet):
                assert outcome.current_etag != change.expected_etag
            else:
                assert outcome.value.present
            observed = outcome.value.value
            op["f"], op["type"], op["value"] = "read", "ok", None if observed is None else observed.decode()
            op["result"] = op["value"]
            label = "precondition_failed"
        else:
            op["type"], label = "ok", "ok"
            if op["f"] == "read":
                observed = outcome.value.value
                op["result"] = None if observed is None else observed.decode()
        sim.outcomes[label] = sim.outcomes.get(label, 0) + 1
        client.core = client.op = client.change = None
        client.todo -= 1
        if client.todo > 0:
            at(now + rng.randint(0, 5) * MS, functools.partial(begin, client))

    clients = [
        _Client(node, f"{names[node]}c{c}", todo=ops_per_client)
        for node in range(nodes)
        for c in range(clients_per_node)
    ]
    for client in clients:
        at(rng.randint(0, 1 if new_keys else 5) * MS, functools.partial(begin, client))
    for _ in range(200_000):
        if not events:
            break
        now, _, action = heapq.heappop(events)
        action()
        if abandon and rng.random() < abandon:
            busy = [client for client in clients if client.core is not None]
            if busy:
                finish(rng.choice(busy), None)  # the caller went away: the proposal just stops
    else:
        raise AssertionError("the simulation did not finish")
    assert all(client.core is None and client.todo == 0 for client in clients)
    return sim


def history_rows(sim: CoreSim) -> list[dict[str, Any]]:
    """The client ops as a history in our JSON Lines shape (docs/history-format.md)."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for process, op in enumerate(sim.history):
        common = {"process": process, "f": op["f"], "key": op["key"]}
        rows.append((op["invoke"], {**common, "type": "invoke", "value": op["value"]}))
        value = op.get("result") if op["f"] == "read" else op["value"]
        rows.append((op["complete"], {**common, "type": op["type"], "value": value}))
    return [row for _, row in sorted(rows, key=lambda item: item[0])]


def ancestry(origins: dict[Ballot, Lineage], origin: Ballot | None) -> set[Ballot]:
    """Every change a state whose latest change is ``origin`` was built on (itself included).
    A change's parent is the second entry of the lineage its accept carried."""
    chain: set[Ballot] = set()
    while origin is not None:
        chain.add(origin)
        lineage = origins[origin]
        origin = lineage[1] if len(lineage) > 1 else None
    return chain


def assert_chosen_chain(sim: CoreSim) -> None:
    """A key's chosen states ordered by ballot: each one is built on the previous one."""
    for key, acceptors in sim.acceptors.items():
        previous: Ballot | None = None
        for ballot, _value in sorted(acceptors.chosen().items()):
            lineage = acceptors.lineages[ballot]
            latest = lineage[0] if lineage else None
            assert previous is None or previous in ancestry(sim.origins, latest), (
                f"seed {sim.seed}: {key}'s state chosen at {ballot} is not built on the change {previous}"
            )
            previous = latest if latest is not None else previous


def assert_linearizable(sim: CoreSim) -> None:
    result = check(history_rows(sim), model="cas-register", workers=1, time_limit_s=60)
    assert result.valid == "true", (sim.seed, result.keys)


@pytest.mark.parametrize("nodes", [3, 5])
def test_production_proposer_is_linearizable_under_a_seeded_scheduler(nodes: int) -> None:
    totals: dict[str, int] = {}
    stats = ProposerStats()
    for seed in range(150 if nodes == 3 else 40):
        sim = run_cores(seed * 7919 + nodes, nodes=nodes)
        assert_chosen_chain(sim)
        assert_linearizable(sim)
        for label, count in sim.outcomes.items():
            totals[label] = totals.get(label, 0) + count
        stats.retries += sim.stats.retries
        stats.fast_path_hits += sim.stats.fast_path_hits
        stats.fast_path_misses += sim.stats.fast_path_misses
        stats.peek_hits += sim.stats.peek_hits
        stats.peek_misses += sim.stats.peek_misses
        stats.first_write_hits += sim.stats.first_write_hits
        stats.first_write_misses += sim.stats.first_write_misses
    # The runs do exercise what the check is about (else it would pass vacuously).
    # First writes without phase 1: chosen (every acceptor took it), and short of unanimity (in
    # 5-node runs the two keys are rarely still empty when a zero-ballot accept reaches all five).
    assert stats.first_write_misses > 0 and (stats.first_write_hits > 0 or nodes == 5)
    assert totals["ok"] > 300
    assert totals["precondition_failed"] > 0 and totals["indeterminate"] > 0 and totals["failed"] > 0
    assert stats.retries > 0 and stats.fast_path_hits > 0 and stats.fast_path_misses > 0
    # Reads answered by a peek, and peeks that saw a change in flight and fell back (or gave up).
    assert stats.peek_hits > 0 and stats.peek_misses > 0


def test_racing_first_writes_are_linearizable() -> None:
    """Every client starts with a first write (zero ballot, no phase 1) of one of a few new keys,
    at once: zero ballots contend, majorities without unanimity, re-commits at the next ballot."""
    stats = ProposerStats()
    for seed in range(300):
        sim = run_cores(seed * 7919 + 3, new_keys=True)
        assert_chosen_chain(sim)
        assert_linearizable(sim)
        stats.first_write_hits += sim.stats.first_write_hits
        stats.first_write_misses += sim.stats.first_write_misses
    assert stats.first_write_hits > 50 and stats.first_write_misses > 50


def _zero_chosen_by_a_majority(self: ProposerCore, r: Any, plan: Any, at: Instant) -> list[Effect]:
    """A wrong first write: done once a majority took the zero ballot (not every acceptor)."""
    if quorum_reached({peer for peer, _ in r.ok_peers}, self.sets):
        self.finished = True
        return [Done(ProposeResult(plan.reported, plan.outcome.status, plan.outcome.current_etag, 1))]
    return _after_zero_accept(self, r, plan, at)


_after_zero_accept = ProposerCore._after_zero_accept


def _peek_trusting_a_zero_majority(replies: Any, sets: Any) -> Observed | None:
    """A wrong quorum read: a majority agreeing on a zero ballot (not every acceptor) is enough."""
    by_ballot: dict[Any, list[Observed]] = {}
    for _, observed in replies:
        if observed.voted:
            by_ballot.setdefault(observed.accepted, []).append(observed)
    return next((o[0] for o in by_ballot.values() if len(o) >= majority(len(sets[0]))), None)


def _peek_trusting_the_highest(replies: Any, sets: Any) -> Observed | None:
    """A wrong quorum read: answers the highest state a majority's replies report, as phase 1
    would pick it, without the replies agreeing (a value a minority accepted may be lost later)."""
    replies = list(replies)
    if len(replies) < 2:
        return None
    return max((o for _, o in replies), key=lambda o: (o.accepted is not None, o.accepted or Ballot(0, "-")))


def _peek_trusting_one_reply(replies: Any, sets: Any) -> Observed | None:
    """A wrong quorum read: answers the first reply (a lagging acceptor's state is stale)."""
    replies = list(replies)
    return replies[0][1] if replies else None


@pytest.mark.parametrize(
    "bug",
    [
        "failures_called_certain", "retries_blind_to_pending", "peek_trusts_the_highest_reply",
        "peek_trusts_one_reply", "zero_chosen_by_a_majority", "peek_trusts_a_zero_majority",
        "zero_ballot_taken_by_a_voted_acceptor",
    ],
)
def test_the_seeded_check_catches_an_injected_proposer_bug(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: make the core lie -- call every failure certain, re-apply a change on retry
    without looking for it in the lineage, or let a peek answer a state only some acceptor holds
    (possibly accepted by a minority and later lost) -- and the same harness finds a
    non-linearizable run."""
    if bug == "failures_called_certain":
        original = ProposerCore._fail
        monkeypatch.setattr(ProposerCore, "_fail", lambda self, indeterminate, reason: original(self, False, reason))
    elif bug == "peek_trusts_the_highest_reply":
        monkeypatch.setattr("kvstore.protocol.proposer.agreed_read", _peek_trusting_the_highest)
    elif bug == "peek_trusts_one_reply":
        monkeypatch.setattr("kvstore.protocol.proposer.agreed_read", _peek_trusting_one_reply)
    elif bug == "zero_chosen_by_a_majority":
        monkeypatch.setattr(ProposerCore, "_after_zero_accept", _zero_chosen_by_a_majority)
    elif bug == "peek_trusts_a_zero_majority":
        monkeypatch.setattr("kvstore.protocol.proposer.agreed_read", _peek_trusting_a_zero_majority)
    elif bug == "zero_ballot_taken_by_a_voted_acceptor":
        # The acceptor and the quorum rules forget zero ballots (they become the lowest classic ones).
        monkeypatch.setattr("kvstore.protocol.paxos.is_zero", lambda ballot: False)
    else:
        monkeypatch.setattr("kvstore.protocol.proposer.change_status", lambda origin, lineage, parent: "not_applied")
    zero_bug = "zero" in bug
    for seed in range(200):
        try:
            sim = run_cores(seed * 7919 + 3, new_keys=zero_bug)
            assert_linearizable(sim)
            if zero_bug:
                assert_chosen_chain(sim)
        except AssertionError:
            return
    pytest.fail(f"no seed caught the injected bug {bug}")


def test_chain_checker_catches_a_fork() -> None:
    acc = Acceptors()
    sim = CoreSim(0, {"k": acc})
    a, b = B(1, "p"), B(2, "q")
    sim.origins = {a: (a,), b: (b,)}  # two changes, neither built on the other
    for i in range(2):
        acc.accept(i, a, V(b"a"), lineage=(a,))
        acc.accept(i, b, V(b"b"), lineage=(b,))
    with pytest.raises(AssertionError):
        assert_chosen_chain(sim)


def check_lineage_oracle(sim: CoreSim) -> tuple[int, int]:
    """``change_status`` against the truth, for every (change sent, state ever accepted) pair: the
    truth is the change's presence in the state's whole ancestry, rebuilt from every accept."""
    decided = unknown = 0
    for acceptors in sim.acceptors.values():
        for ballot in acceptors.accepted_by:
            lineage = acceptors.lineages[ballot]
            assert not lineage or lineage[0] <= ballot
            history = ancestry(sim.origins, lineage[0] if lineage else None)
            for origin, carried in sim.origins.items():
                parent = carried[1] if len(carried) > 1 else None
                status = change_status(origin, lineage, parent)
                if status == "unknown":
                    unknown += 1
                    continue
                decided += 1
                assert (status == "applied") == (origin in history), (sim.seed, origin, parent, lineage)
    return decided, unknown


@pytest.mark.parametrize("depth", [2, 3, LINEAGE_DEPTH])
def test_seeded_runs_lineage_tells_the_truth(depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Depth 1 cannot be checked this way: the parent of a change is read off its accept's lineage.
    monkeypatch.setattr("kvstore.protocol.paxos.LINEAGE_DEPTH", depth)
    decided = unknown = 0
    for seed in range(30):
        d, u = check_lineage_oracle(run_cores(20_000 + seed, ops_per_client=6))
        decided, unknown = decided + d, unknown + u
    assert decided > 10 * max(1, unknown) or depth < LINEAGE_DEPTH
    assert decided > 1000

# --- lineage ----------------------------------------------------------------------------------


def test_extend_lineage_keeps_the_newest() -> None:
    lineage: Lineage = ()
    for c in range(1, LINEAGE_DEPTH + 3):
        lineage = extend_lineage(lineage, B(c))
    assert len(lineage) == LINEAGE_DEPTH
    assert lineage[0] == B(LINEAGE_DEPTH + 2) and list(lineage) == sorted(lineage, reverse=True)
    with pytest.raises(AssertionError):
        extend_lineage(lineage, B(1))  # origins increase along the chain


FULL = tuple(B(c) for c in range(20, 20 - LINEAGE_DEPTH, -1))  # newest 20 ... oldest 20-DEPTH+1


@pytest.mark.parametrize(
    ("origin", "lineage", "parent", "status"),
    [
        (B(5), (), None, "not_applied"),  # nothing ever changed
        (B(5), (B(5),), None, "applied"),
        (B(5), (B(9), B(5), B(2)), B(2), "applied"),
        (B(5), (B(9), B(6), B(2)), B(2), "not_applied"),  # short lineage: complete history
        (B(20), FULL, None, "applied"),
        (FULL[-1], FULL, None, "applied"),
        (B(14, "z"), FULL, None, "not_applied"),  # inside the window but absent
        (B(3), FULL, None, "unknown"),  # older than the window: trail lost
        (B(3), FULL, B(15), "not_applied"),  # its parent is listed with another successor
        (B(3), FULL, FULL[-1], "not_applied"),
        (B(3), FULL, B(2), "unknown"),  # parent older than the window too
    ],
)
def test_change_status(origin: Ballot, lineage: Lineage, parent: Ballot | None, status: str) -> None:
    assert change_status(origin, lineage, parent) == status


@pytest.mark.parametrize("lineage", [(), (B(3),), FULL])
def test_lineage_wire_round_trip(lineage: Lineage) -> None:
    wire = msgpack.unpackb(msgpack.packb(lineage_to_wire(lineage)), raw=False)
    assert lineage_from_wire(wire) == lineage


@pytest.mark.parametrize(
    "wire",
    [
        "x",
        [[1]],
        [[1, "a"], [2, "a"]],
        [[1, "a"], [1, "a"]],
        [[c, "a"] for c in range(40, 40 - LINEAGE_DEPTH - 1, -1)],
    ],
)
def test_lineage_from_wire_rejects_malformed(wire: object) -> None:
    with pytest.raises(ValueError):
        lineage_from_wire(wire)


def test_prepare_reports_the_lineage() -> None:
    state, _ = on_accept(S(B(1)), B(1), V(b"x"), promise_next=None, lineage=(B(1),))
    _, promise = on_prepare(state, B(2))
    assert promise == Promise(B(2), B(1), V(b"x"), (B(1),))
    with pytest.raises(AssertionError):
        on_accept(S(B(1)), B(1), V(b"x"), promise_next=None, lineage=(B(2),))  # change after its accept


# --- first writes without phase 1 (zero ballots) ----------------------------------------------------

Z = Ballot(0, "p")


@pytest.mark.parametrize(
    ("state", "taken"),
    [
        (EMPTY_STATE, True),
        (AcceptorState(promised=B(1)), False),  # promised a classic ballot: voted on the key
        (AcceptorState(promised=Ballot(0, "a")), False),  # even a zero promise: not empty
        (AcceptorState(promised=B(3), accepted=B(2), value=V(b"x"), lineage=(B(2),)), False),
        (AcceptorState(promised=B(9), accepted=Ballot(0, "a"), value=V(b"x"), lineage=(Ballot(0, "a"),)), False),
    ],
)
def test_a_zero_ballot_is_taken_only_by_an_acceptor_that_never_voted(state: AcceptorState, taken: bool) -> None:
    new_state, reply = on_accept(state, Z, V(b"v"), promise_next=Ballot(7, "p"), lineage=(Z,))
    if taken:
        assert reply == Accepted(Z, Ballot(7, "p"))
        assert new_state == AcceptorState(promised=Ballot(7, "p"), accepted=Z, value=V(b"v"), lineage=(Z,))
    else:
        assert isinstance(reply, Rejected) and new_state == state


def test_zero_ballots_are_below_every_classic_ballot() -> None:
    state, _ = on_accept(EMPTY_STATE, Z, V(b"v"), promise_next=None, lineage=(Z,))
    assert isinstance(on_prepare(state, Ballot(1, "a"))[1], Promise)  # the lowest classic ballot wins
    assert is_zero(Z) and not is_zero(Ballot(1, "p")) and not is_zero(None)


def _obs(ballot: Ballot | None, value: bytes = b"v") -> Observed:
    return Observed(ballot, None if ballot is None else V(value), (ballot,) if ballot else ())


@pytest.mark.parametrize(
    ("replies", "agreed"),
    [
        ([("a", _obs(Z)), ("b", _obs(Z))], None),  # a majority at a zero ballot is not chosen
        ([("a", _obs(Z)), ("b", _obs(Z)), ("c", _obs(Z))], Z),  # every acceptor: chosen
        ([("a", _obs(Z)), ("b", _obs(Z)), ("c", _obs(None))], None),
        ([("a", _obs(B(4))), ("b", _obs(B(4)))], B(4)),  # classic: a majority
    ],
)
def test_a_peek_needs_every_acceptor_for_a_zero_ballot(replies: list[tuple[str, Observed]], agreed: Ballot | None) -> None:
    result = agreed_read(replies, (("a", "b", "c"),))
    assert (None if result is None else result.accepted) == agreed


def test_zero_agreement_pending_only_while_unanimity_is_possible() -> None:
    sets = (("a", "b", "c"),)
    two = [("a", _obs(Z)), ("b", _obs(Z))]
    assert zero_agreement_pending(two, ["c"], sets)
    assert not zero_agreement_pending(two, [], sets)  # c answered otherwise (or failed)
    assert not zero_agreement_pending([("a", _obs(B(4))), ("b", _obs(B(4)))], ["c"], sets)
    assert agreement_possible(two, ["c"], sets) and not agreement_possible([*two, ("c", _obs(None))], [], sets)
