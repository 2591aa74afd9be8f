"""Tables for the pure CASPaxos rules (kvstore.protocol.paxos) and a seeded random-interleaving safety check."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgpack
import pytest

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
    Promise,
    PutIfAbsent,
    Read,
    RegisterValue,
    Rejected,
    Write,
    apply_change,
    backoff_s,
    change_status,
    choose_value,
    etag_of,
    extend_lineage,
    highest_accepted,
    lineage_from_wire,
    lineage_to_wire,
    majority,
    next_ballot,
    on_accept,
    on_prepare,
)


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
        need = majority(len(self.states))
        return {b: v for b, (v, who) in self.accepted_by.items() if len(who) >= need}


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


# --- seeded random interleaving: safety property -------------------------------------------------


@dataclass
class Msg:
    kind: str  # prepare | accept | promise | accepted | rejected
    src: str
    dst: str
    ballot: Ballot
    value: RegisterValue | None = None
    promise_next: Ballot | None = None
    reply: Promise | Accepted | Rejected | None = None
    lineage: Lineage = ()


@dataclass
class SimProposer:
    """A proposer as a state machine: its change appends its own token to the register."""

    name: str
    n: int
    todo: int
    last: Ballot | None = None
    seen: int = 0
    phase: str = "idle"  # idle | prepare | accept
    ballot: Ballot | None = None
    promises: dict[int, Promise] = field(default_factory=dict)
    acks: set[int] = field(default_factory=set)
    promised_acks: set[int] = field(default_factory=set)
    value: RegisterValue | None = None
    next_b: Ballot | None = None
    fast: tuple[Ballot, RegisterValue, Lineage] | None = None
    lineage: Lineage = ()
    seq: int = 0
    # token -> (origin, parent): every change this proposer ever sent, for the lineage oracle
    origins: dict[bytes, tuple[Ballot, Ballot | None]] = field(default_factory=dict)

    def token(self) -> bytes:
        return f"{self.name}.{self.seq};".encode()

    def start(self, out: list[Msg], use_fast: bool) -> None:
        self.seq += 1
        self.promises, self.acks, self.promised_acks = {}, set(), set()
        if use_fast and self.fast is not None:
            ballot, current, lineage = self.fast
            self.fast = None
            self._send_accept(out, ballot, current, lineage)
            return
        self.fast = None
        self.ballot = next_ballot(self.last, self.seen, self.name)
        self.last = self.ballot
        self.phase = "prepare"
        out.extend(Msg("prepare", self.name, f"A{i}", self.ballot) for i in range(self.n))

    def _send_accept(self, out: list[Msg], ballot: Ballot, current: RegisterValue, lineage: Lineage) -> None:
        self.ballot = ballot
        self.value = RegisterValue.of((current.value or b"") + self.token())
        self.origins[self.token()] = (ballot, lineage[0] if lineage else None)
        self.lineage = extend_lineage(lineage, ballot)
        self.next_b = next_ballot(self.last, self.seen, self.name)
        self.last = self.next_b
        self.phase = "accept"
        out.extend(
            Msg("accept", self.name, f"A{i}", ballot, self.value, self.next_b, lineage=self.lineage)
            for i in range(self.n)
        )

    def receive(self, msg: Msg, out: list[Msg], use_fast: bool) -> None:
        reply = msg.reply
        i = int(msg.src[1:])
        if isinstance(reply, Rejected):
            self.seen = max(self.seen, reply.conflict.counter)
            return
        if msg.ballot != self.ballot:
            return  # a late reply of an abandoned attempt
        if self.phase == "prepare" and isinstance(reply, Promise):
            self.promises[i] = reply
            if len(self.promises) == majority(self.n):
                best = highest_accepted(self.promises.values())
                current = ABSENT if best is None or best.value is None else best.value
                assert self.ballot is not None
                self._send_accept(out, self.ballot, current, () if best is None else best.lineage)
        elif self.phase == "accept" and isinstance(reply, Accepted):
            self.acks.add(i)
            if reply.promised_next == self.next_b:
                self.promised_acks.add(i)
            if len(self.acks) == majority(self.n):
                self.todo -= 1
                self.phase = "idle"
                if len(self.promised_acks) >= majority(self.n):
                    assert self.next_b is not None and self.value is not None
                    self.fast = (self.next_b, self.value, self.lineage)
                if self.todo > 0:
                    self.start(out, use_fast)


@dataclass
class SimResult:
    chosen: list[tuple[Ballot, RegisterValue]]
    acceptors: Acceptors
    origins: dict[bytes, tuple[Ballot, Ballot | None]]


def run_interleaving(seed: int, proposers: int, acceptors: int = 3) -> SimResult:
    rng = random.Random(seed)
    drop = rng.choice([0.0, 0.05, 0.2])
    dup = rng.choice([0.0, 0.05])
    use_fast = rng.random() < 0.7
    acc = Acceptors(acceptors)
    props = {f"p{j}": SimProposer(f"p{j}", acceptors, todo=rng.randint(1, 4)) for j in range(proposers)}
    queue: list[Msg] = []
    for p in props.values():
        p.start(queue, use_fast)
    for _ in range(5000):
        active = [p for p in props.values() if p.todo > 0]
        if not active:
            break
        # A proposer times out and restarts with a fresh ballot when nothing is in flight for it,
        # or now and then at random (a slow network looks the same as a lost message).
        if not queue or rng.random() < 0.03:
            victim = rng.choice(active)
            victim.start(queue, use_fast=False)
            continue
        msg = queue.pop(rng.randrange(len(queue)))
        if rng.random() < drop:
            continue
        if rng.random() < dup:
            queue.append(msg)
        if rng.random() < 0.01:
            acc.restart(rng.randrange(acceptors))
        if msg.kind == "prepare":
            i = int(msg.dst[1:])
            reply: Promise | Accepted | Rejected = acc.prepare(i, msg.ballot)
            queue.append(Msg("reply", msg.dst, msg.src, msg.ballot, reply=reply))
        elif msg.kind == "accept":
            i = int(msg.dst[1:])
            assert msg.value is not None
            reply = acc.accept(i, msg.ballot, msg.value, msg.promise_next, msg.lineage)
            queue.append(Msg("reply", msg.dst, msg.src, msg.ballot, reply=reply))
        else:
            props[msg.dst].receive(msg, queue, use_fast)
    origins = {token: o for p in props.values() for token, o in p.origins.items()}
    return SimResult(sorted(acc.chosen().items()), acc, origins)


def assert_linear_chain(chosen: list[tuple[Ballot, RegisterValue]]) -> None:
    """Chosen states ordered by ballot: each one extends (is derived from) the previous one."""
    previous = b""
    for ballot, value in chosen:
        assert value.value is not None
        assert value.value.startswith(previous), (
            f"chosen at {ballot} does not extend {previous!r}: {value.value!r}"
        )
        previous = value.value


@pytest.mark.parametrize("proposers", [2, 3])
def test_random_interleavings_choose_a_single_linear_chain(proposers: int) -> None:
    committed_something = 0
    for seed in range(300):
        chosen = run_interleaving(seed * 7919 + proposers, proposers).chosen
        assert_linear_chain(chosen)
        committed_something += bool(chosen)
    assert committed_something > 250  # the harness does make progress, so the check is not vacuous


def test_random_interleavings_five_acceptors() -> None:
    for seed in range(100):
        assert_linear_chain(run_interleaving(10_000 + seed, 3, acceptors=5).chosen)


def test_chain_checker_catches_a_fork() -> None:
    with pytest.raises(AssertionError):
        assert_linear_chain([(B(1), V(b"a;")), (B(2), V(b"b;"))])


def check_lineage_oracle(sim: SimResult) -> tuple[int, int]:
    """Every state ever accepted spells out its whole history (tokens), so ``change_status`` can be
    checked against the truth for every (change, accepted state) pair."""
    decided = unknown = 0
    for ballot, (value, _) in sim.acceptors.accepted_by.items():
        assert value.value is not None
        history = set(value.value.split(b";")[:-1])
        lineage = sim.acceptors.lineages[ballot]
        assert lineage and lineage[0] <= ballot
        for token, (origin, parent) in sim.origins.items():
            status = change_status(origin, lineage, parent)
            truth = token.rstrip(b";") in history
            if status == "unknown":
                unknown += 1
                continue
            decided += 1
            assert (status == "applied") == truth, (token, origin, parent, lineage, value.value)
    return decided, unknown


@pytest.mark.parametrize("depth", [1, 2, LINEAGE_DEPTH])
def test_random_interleavings_lineage_tells_the_truth(depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvstore.protocol.paxos.LINEAGE_DEPTH", depth)
    decided = unknown = 0
    for seed in range(150):
        d, u = check_lineage_oracle(run_interleaving(20_000 + seed, 3))
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
