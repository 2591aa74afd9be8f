"""Unit tables for the step-able CASPaxos proposer core (kvstore.protocol.proposer).

Each test feeds a ``ProposerCore`` inputs by hand and checks the exact effects it returns: their
order, the messages, when it falls back from the fast path, when a failure is indeterminate, and
that votes of a lost acceptor incarnation do not count.  No event loop, no clock: time is the
``Instant`` passed in.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from kvstore.protocol.membership import STALE_CONFIG
from kvstore.protocol.paxos import (
    ABSENT,
    EMPTY_STATE,
    LINEAGE_DEPTH,
    Accepted,
    AcceptorState,
    Ballot,
    Change,
    CompareAndSet,
    Delete,
    Lineage,
    PutIfAbsent,
    Read,
    RegisterValue,
    Rejected,
    Write,
    ballot_to_wire,
    choose_value,
    etag_of,
    lineage_to_wire,
    merge_states,
    on_accept,
    on_peek,
    on_prepare,
)
from kvstore.protocol.paxos_wire import OP_ACCEPT, OP_PREPARE, reply_to_wire
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
    PeekInconclusive,
    ProposerConfig,
    ProposerCore,
    ProposerState,
    Reply,
    Send,
    StartTimer,
)
from kvstore.transport.base import Message

GROUP = ("n0", "n1", "n2")
MS = 1_000_000
DEADLINE_NS = 1_000 * MS
T0 = Instant(0, 0)


def at_ms(ms: int) -> Instant:
    return Instant(ms * MS, ms * MS)


def core_for(
    change: Change,
    *,
    state: ProposerState | None = None,
    config: ProposerConfig | None = None,
    rng_seed: int = 1,
    key: str = "k",
) -> ProposerCore:
    return ProposerCore(
        state or ProposerState("n0"),
        # Reads here run the full protocol; the peek (quorum read) has its own tests below.
        config or ProposerConfig(clock_ballots=False, peek_reads=False),
        random.Random(rng_seed),
        key,
        7,
        GROUP,
        change,
        DEADLINE_NS,
    )


def sends(effects: list[Effect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def kinds(effects: list[Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


def promise(
    accepted: Ballot | None = None, value: bytes | None = None, lineage: Lineage = (), **tags: Any
) -> Message:
    reply: Message = {"ok": True, "accepted": ballot_to_wire(accepted), "value": value}
    reply["lineage"] = lineage_to_wire(lineage)
    reply.update(tags)
    return reply


def accepted(promised_next: Ballot | None = None, **tags: Any) -> Message:
    return {"ok": True, "promised_next": ballot_to_wire(promised_next), **tags}


def rejected(conflict: Ballot) -> Message:
    return {"ok": False, "conflict": conflict.to_wire()}


def as_answers(round_sends: list[Send], replies: list[Message | Answer]) -> list[Answer]:
    return [
        reply if isinstance(reply, Reply | CallFailed) else Reply(send.call, reply)
        for send, reply in zip(round_sends, replies, strict=False)
    ]


def answer_all(core: ProposerCore, round_sends: list[Send], replies: list[Message | Answer]) -> list[Effect]:
    """Answer ``round_sends`` one at a time, in order, until the core reacts; return its effects."""
    for item in as_answers(round_sends, replies):
        effects = core.on_answers([item], T0)
        if effects:
            return effects
    return []


def commit(core: ProposerCore, value: bytes | None = None, at: Instant = T0) -> tuple[list[Send], list[Effect]]:
    """Start ``core`` and let every replica promise (nothing accepted before) then accept;
    returns the accept sends and the effects of the last accept answer."""
    prepares = sends(core.start(at))
    effects = answer_all(core, prepares, [promise(), promise()])
    accepts = sends(effects)
    promised_next = Ballot.from_wire(accepts[0].message["promise_next"]) if accepts[0].message["promise_next"] else None
    return accepts, answer_all(core, accepts, [accepted(promised_next)] * 3)


# --- effect order -------------------------------------------------------------------------------


def test_a_proposal_without_contention_effect_by_effect() -> None:
    core = core_for(Write(b"v"))
    started = core.start(T0)
    # Prepare to every replica, in replica-list order, then the deadline timer.
    assert kinds(started) == ["Send", "Send", "Send", "StartTimer"]
    assert [s.peer for s in sends(started)] == list(GROUP)
    assert all(s.message["op"] == OP_PREPARE and s.timeout_at_ns == DEADLINE_NS for s in sends(started))
    assert started[-1] == StartTimer(DEADLINE_NS)
    assert len({s.call for s in sends(started)}) == 3
    ballot = Ballot.from_wire(started[0].message["ballot"])

    # One promise: not a majority yet, nothing to do.
    assert core.on_reply(started[0].call, promise(), T0) == []
    # The second: accepts go out, the third prepare is abandoned, the timer restarts.
    effects = core.on_reply(started[1].call, promise(), T0)
    assert kinds(effects) == ["Send", "Send", "Send", "Abandon", "StartTimer"]
    assert effects[3] == Abandon((started[2].call,))
    accepts = sends(effects)
    message = accepts[0].message
    assert message["op"] == OP_ACCEPT and message["value"] == b"v" and message["ballot"] == ballot.to_wire()
    assert message["lineage"] == [ballot.to_wire()]  # a changed value: its origin is this ballot
    promised_next = Ballot.from_wire(message["promise_next"])
    assert promised_next > ballot

    # A majority of accepts: the straggler is detached (not abandoned), then Done -- last.
    assert core.on_reply(accepts[0].call, accepted(promised_next), T0) == []
    effects = core.on_reply(accepts[1].call, accepted(promised_next), T0)
    assert kinds(effects) == ["Detach", "Done"]
    assert effects[0] == Detach((accepts[2].call,))
    done = effects[1]
    assert isinstance(done, Done)
    assert done.result.value == RegisterValue.of(b"v") and done.result.outcome == "ok"
    assert done.result.round_trips == 2
    # Nothing follows the outcome: late answers and timers are ignored.
    assert core.on_reply(accepts[2].call, accepted(promised_next), T0) == []
    assert core.on_timer(at_ms(2000)) == []


@pytest.mark.parametrize("batched", [True, False])
def test_answers_of_one_batch_are_judged_together(batched: bool) -> None:
    """An answer already at hand is never counted as a call in flight.  Two rejections and a
    refused connection, in one batch: nobody stored the change, a certain failure.  One at a
    time, the round ends at the second rejection, when the third accept is still in flight and
    may land: indeterminate."""
    core = core_for(Write(b"v"), config=ProposerConfig(max_attempts=1, clock_ballots=False, peek_reads=False))
    accepts = sends(answer_all(core, sends(core.start(T0)), [promise(), promise()]))
    answers = as_answers(
        accepts,
        [rejected(Ballot(99, "n1")), rejected(Ballot(99, "n1")), CallFailed(accepts[2].call, maybe_delivered=False)],
    )
    if batched:
        effects = core.on_answers(answers, T0)
        assert kinds(effects) == ["Failed"]
    else:
        effects = core.on_answers(answers[:2], T0)
        assert kinds(effects) == ["Abandon", "Failed"] and effects[0] == Abandon((accepts[2].call,))
    error = effects[-1].error  # type: ignore[union-attr]
    assert error.indeterminate is not batched
    assert "accept: 0/2 ok, 2 rejected" in error.reason


def test_duplicate_unknown_and_stale_answers_are_ignored() -> None:
    core = core_for(Read())
    started = sends(core.start(T0))
    assert core.on_reply(started[0].call, promise(), T0) == []
    assert core.on_reply(started[0].call, promise(), T0) == []  # a duplicate does not count twice
    assert core.on_reply(999, promise(), T0) == []  # never sent
    effects = core.on_reply(started[1].call, promise(), T0)
    assert kinds(effects)[-2:] == ["Abandon", "StartTimer"]
    # The abandoned prepare's answer arrives during the accept round: ignored, not an accept vote.
    assert core.on_reply(started[2].call, accepted(), T0) == []


def test_backoff_between_attempts_comes_from_the_rng_and_is_bounded() -> None:
    timers = []
    for _ in range(2):
        core = core_for(Write(b"v"), config=ProposerConfig(clock_ballots=False, backoff_cap_s=0.05), rng_seed=42)
        started = sends(core.start(T0))
        effects = answer_all(core, started, [rejected(Ballot(50, "n1")), rejected(Ballot(60, "n2"))])
        assert kinds(effects) == ["Abandon", "StartTimer"]
        timer = effects[-1]
        # The first backoff is at most backoff_base_s (5 ms) after the answer (at 0).
        assert isinstance(timer, StartTimer) and 0 <= timer.at_ns <= 5 * MS
        timers.append(timer.at_ns)
        # The timer ends the backoff: a new prepare above every conflict seen.
        retry = core.on_timer(Instant(timer.at_ns, timer.at_ns))
        assert kinds(retry) == ["Send", "Send", "Send", "StartTimer"]
        assert Ballot.from_wire(retry[0].message["ballot"]) > Ballot(60, "n2")  # type: ignore[union-attr]
    assert timers[0] == timers[1]  # same seed, same backoff


def test_the_deadline_timer_ends_a_round_and_the_proposal() -> None:
    core = core_for(Write(b"v"))
    started = sends(core.start(T0))
    assert core.on_reply(started[0].call, promise(), T0) == []
    effects = core.on_timer(Instant(DEADLINE_NS, DEADLINE_NS))
    assert kinds(effects) == ["Abandon", "Failed"]
    assert effects[0] == Abandon((started[1].call, started[2].call))
    error = effects[1].error  # type: ignore[union-attr]
    assert error.indeterminate is False and "timed out" in error.reason  # only a prepare was sent


# --- the fast path ------------------------------------------------------------------------------


def test_a_second_proposal_takes_the_fast_path_and_reaches_the_local_acceptor_last() -> None:
    state = ProposerState("n0")
    first = core_for(Write(b"1"), state=state)
    accepts, effects = commit(first)
    assert kinds(effects) == ["Detach", "Done"]
    assert state.holds_fast_path("k")
    fast_ballot = Ballot.from_wire(accepts[0].message["promise_next"])

    second = core_for(CompareAndSet(etag_of(b"1"), b"2"), state=state)
    started = second.start(T0)
    assert not state.holds_fast_path("k")  # taken: no other proposal can use that ballot
    # No prepare: the accept at the promised ballot, to the peers only (n0 is local, deferred).
    assert kinds(started) == ["Send", "Send", "StartTimer"]
    assert [s.peer for s in sends(started)] == ["n1", "n2"]
    message = sends(started)[0].message
    assert message["op"] == OP_ACCEPT and Ballot.from_wire(message["ballot"]) == fast_ballot
    assert message["value"] == b"2"
    # A peer took it: now the local acceptor gets it too.
    effects = second.on_reply(sends(started)[0].call, accepted(), T0)
    assert [s.peer for s in sends(effects)] == ["n0"] and kinds(effects) == ["Send"]
    effects = second.on_reply(sends(started)[1].call, accepted(), T0)
    assert kinds(effects) == ["Detach", "Done"]
    done = effects[-1]
    assert isinstance(done, Done) and done.result.round_trips == 1 and done.result.value == RegisterValue.of(b"2")
    assert second.stats.fast_path_hits == 1


def test_a_rejected_fast_accept_falls_back_to_the_full_protocol() -> None:
    state = ProposerState("n0")
    commit(core_for(Write(b"1"), state=state))
    core = core_for(Write(b"2"), state=state)
    started = sends(core.start(T0))
    # Someone else prepared in between: both peers reject; the local acceptor is never asked.
    effects = answer_all(core, started, [rejected(Ballot(90, "n2")), rejected(Ballot(90, "n2"))])
    assert kinds(effects) == ["StartTimer"]
    assert core.stats.fast_path_misses == 1
    assert not core.pending  # nobody took the changed value: the retry needs no lineage lookup
    timer = effects[0]
    assert isinstance(timer, StartTimer)
    retry = core.on_timer(Instant(timer.at_ns, timer.at_ns))
    assert kinds(retry) == ["Send", "Send", "Send", "StartTimer"]
    assert retry[0].message["op"] == OP_PREPARE  # type: ignore[union-attr]
    assert Ballot.from_wire(retry[0].message["ballot"]) > Ballot(90, "n2")  # type: ignore[union-attr]


def test_a_fast_path_entry_for_another_replica_set_is_not_used() -> None:
    state = ProposerState("n0")
    commit(core_for(Write(b"1"), state=state))
    other = ProposerCore(state, ProposerConfig(clock_ballots=False, peek_reads=False), random.Random(1), "k", 7, ("n0", "n1", "n3"),
                         Read(), DEADLINE_NS)
    assert sends(other.start(T0))[0].message["op"] == OP_PREPARE


# --- indeterminate failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "accept_answers", "indeterminate"),
    [
        # Rejected everywhere: nobody stored the change.
        (Write(b"v"), ["rejected", "rejected", "rejected"], False),
        # Two rejections end the round; the third accept, abandoned in flight, may still land.
        (Write(b"v"), ["rejected", "rejected"], True),
        # One acceptor stored it: a later proposer may finish it.
        (Write(b"v"), ["ok", "rejected", "rejected"], True),
        # No answer but maybe delivered (a timeout, a lost reply): may be stored.
        (Write(b"v"), ["maybe", "rejected", "rejected"], True),
        # Refused before sending, or refused by a recovering acceptor: certainly not stored.
        (Write(b"v"), ["refused", "recovering", "rejected"], False),
        # Fenced by an acceptor that installed a newer membership version: nothing was done there.
        (Write(b"v"), ["stale", "stale", "rejected"], False),
        # A malformed or error reply: the acceptor may have stored it before answering badly.
        (Write(b"v"), ["garbage", "rejected", "rejected"], True),
        # A read changes nothing: never indeterminate, even if taken somewhere.
        (Read(), ["ok", "rejected", "rejected"], False),
        # A failed precondition re-commits the unchanged value: nothing new could land.
        (PutIfAbsent(b"v"), ["ok", "rejected", "rejected"], False),
        (Delete(), ["ok", "maybe", "rejected"], True),
    ],
)
def test_a_failure_is_indeterminate_iff_a_changed_value_may_have_been_stored(
    change: Change, accept_answers: list[str], indeterminate: bool
) -> None:
    core = core_for(change, config=ProposerConfig(max_attempts=1, clock_ballots=False, peek_reads=False))
    prepares = sends(core.start(T0))
    # Phase 1 finds a value, so a delete and a failed put-if-absent have something to see.
    before = Ballot(0, "n9")
    found = promise(before, b"old", (before,))
    accepts = sends(answer_all(core, prepares, [found, found]))
    answers: list[Message | Answer] = []
    for send, kind in zip(accepts, accept_answers, strict=False):
        answers.append(
            {
                "ok": accepted(),
                "rejected": rejected(Ballot(99, "n2")),
                "maybe": CallFailed(send.call, maybe_delivered=True),
                "refused": CallFailed(send.call, maybe_delivered=False),
                "recovering": CallFailed(send.call, maybe_delivered=False, recovering=True),
                "garbage": {"ok": "yes"},
                "stale": {"error": STALE_CONFIG, "remote_error": True, "cv": 9},
            }[kind]
        )
    effects = core.on_answers(as_answers(accepts, answers), T0)  # one batch: judged after all
    assert kinds(effects)[-1] == "Failed"
    error = effects[-1].error  # type: ignore[union-attr]
    assert isinstance(error, ConsensusUnavailable) and error.indeterminate is indeterminate
    assert "gave up after 1 attempts" in error.reason


def test_a_change_found_applied_on_retry_is_recommitted_not_reapplied() -> None:
    core = core_for(CompareAndSet(etag_of(b"old"), b"new"), config=ProposerConfig(clock_ballots=False, peek_reads=False))
    before = Ballot(0, "n9")
    found = promise(before, b"old", (before,))
    accepts = sends(answer_all(core, sends(core.start(T0)), [found, found]))
    ours = Ballot.from_wire(accepts[0].message["ballot"])
    # One acceptor took our change, the others had moved on.
    effects = core.on_answers(
        as_answers(accepts, [accepted(), rejected(Ballot(50, "n2")), rejected(Ballot(50, "n2"))]), T0
    )
    assert list(core.pending) == [ours]
    timer = effects[-1]
    assert isinstance(timer, StartTimer)
    prepares = sends(core.on_timer(Instant(timer.at_ns, timer.at_ns)))
    # Meanwhile another proposer finished our change (it is in the lineage) and built on it.
    theirs = Ballot(50, "n2")
    later = promise(theirs, b"newer", (theirs, ours, before))
    effects = answer_all(core, prepares, [later, later])
    recommit = sends(effects)[0].message
    # The latest state unchanged (not the CAS applied again, which would now fail its precondition).
    assert recommit["value"] == b"newer" and recommit["lineage"] == lineage_to_wire((theirs, ours, before))
    effects = answer_all(core, sends(effects), [accepted(), accepted()])
    done = effects[-1]
    assert isinstance(done, Done)
    # The outcome of the attempt that took effect: ok, with the value it produced.
    assert done.result.outcome == "ok" and done.result.value == RegisterValue.of(b"new")


def test_a_lost_trail_fails_as_indeterminate() -> None:
    core = core_for(Write(b"mine"), config=ProposerConfig(clock_ballots=False, peek_reads=False))
    before = Ballot(0, "n9")
    found = promise(before, b"old", (before,))
    accepts = sends(answer_all(core, sends(core.start(T0)), [found, found]))
    effects = core.on_answers(
        as_answers(accepts, [accepted(), rejected(Ballot(90, "n2")), rejected(Ballot(90, "n2"))]), T0
    )
    timer = effects[-1]
    assert isinstance(timer, StartTimer)
    prepares = sends(core.on_timer(Instant(timer.at_ns, timer.at_ns)))
    # Many changes by others since: the lineage no longer reaches back to our attempt's parent.
    trail = tuple(Ballot(c, "n2") for c in range(90, 90 - LINEAGE_DEPTH, -1))
    later = promise(trail[0], b"other", trail)
    effects = answer_all(core, prepares, [later, later])
    assert kinds(effects) == ["Abandon", "Failed"]  # the third prepare is not waited for
    error = effects[-1].error  # type: ignore[union-attr]
    assert error.indeterminate is True and "too many changes" in error.reason


# --- acceptor incarnations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "counted"),
    [
        # No identities: every ok counts.
        ([{}, {}], 2),
        # Consistent identities and views: every ok counts.
        ([{"inc": "a", "view": {"n1": "b"}}, {"inc": "b", "view": {"n0": "a"}}], 2),
        # n1 answers as incarnation "b-old" but n0 has registered its newer "b": n1's vote is dropped.
        ([{"inc": "a", "view": {"n1": "b"}}, {"inc": "b-old", "view": {}}], 1),
    ],
)
def test_votes_of_a_lost_incarnation_do_not_count(tags: list[dict[str, Any]], counted: int) -> None:
    """Answer all three prepares in one batch; the round succeeds iff two votes still count."""
    core = core_for(Write(b"v"), config=ProposerConfig(max_attempts=1, clock_ballots=False, peek_reads=False))
    prepares = sends(core.start(T0))
    replies = [promise(**tag) for tag in tags] + [rejected(Ballot(99, "n2"))]
    effects = core.on_answers([Reply(s.call, r) for s, r in zip(prepares, replies, strict=True)], T0)
    if counted >= 2:
        assert kinds(effects) == ["Send", "Send", "Send", "StartTimer"]
    else:
        assert kinds(effects) == ["Failed"]
        error = effects[0].error  # type: ignore[union-attr]
        assert "1 from a lost incarnation" in error.reason and error.acknowledged == 1


def test_a_stale_incarnations_accept_still_makes_the_failure_indeterminate() -> None:
    """Its vote does not count, but it did store the value."""
    core = core_for(Write(b"v"), config=ProposerConfig(max_attempts=1, clock_ballots=False, peek_reads=False))
    accepts = sends(answer_all(core, sends(core.start(T0)), [promise(), promise()]))
    effects = answer_all(
        core,
        accepts,
        [
            accepted(inc="a", view={"n1": "b"}),
            accepted(inc="b-old", view={}),
            rejected(Ballot(99, "n2")),
        ],
    )
    error = effects[-1].error  # type: ignore[union-attr]
    assert error.indeterminate is True and "1 from a lost incarnation" in error.reason


# --- ballots ------------------------------------------------------------------------------------


def test_ballots_are_never_below_the_wall_clock_and_never_repeat_across_keys() -> None:
    state = ProposerState("n0")
    config = ProposerConfig(clock_ballots=True, peek_reads=False)
    wall = Instant(0, 1_700_000_000_000 * MS)
    first = core_for(Read(), state=state, config=config, key="a")
    second = core_for(Read(), state=state, config=config, key="b")
    b1 = Ballot.from_wire(sends(first.start(wall))[0].message["ballot"])
    b2 = Ballot.from_wire(sends(second.start(wall))[0].message["ballot"])
    assert b1.counter >= 1_700_000_000_000 - 1 and b2 > b1


def test_absent_is_reported_for_a_read_of_nothing() -> None:
    core = core_for(Read())
    _, effects = commit(core)
    done = effects[-1]
    assert isinstance(done, Done) and done.result.value == ABSENT and done.result.current_etag is None


# --- joint consensus (membership changes, docs/membership.md) -----------------------------------

OLD_SET, NEW_SET = ("n0", "n1", "n2"), ("n0", "n1", "n3")  # n3 replaces n2 in the key's acceptor set
UNION = ("n0", "n1", "n2", "n3")


def joint_core(
    change: Change, *, state: ProposerState | None = None, sets: tuple[tuple[str, ...], ...] = (OLD_SET, NEW_SET),
    config: ProposerConfig | None = None,
) -> ProposerCore:
    return ProposerCore(
        state or ProposerState("n0"), config or ProposerConfig(clock_ballots=False, peek_reads=False), random.Random(1), "k", 7, UNION,
        change, DEADLINE_NS, acceptor_sets=sets, stamp={"cv": 4},
    )


@pytest.mark.parametrize(
    ("ok", "failed", "decision"),
    [
        ({"n0", "n1"}, set(), "accept"),  # a majority of both sets
        ({"n1", "n2", "n3"}, set(), "accept"),
        ({"n0", "n2"}, set(), "wait"),  # the old set's majority; n1 or n3 may still make the new one's
        ({"n2", "n3"}, set(), "wait"),
        ({"n0", "n2"}, {"n1", "n3"}, "retry"),  # the new set can no longer answer a majority
        ({"n0", "n3"}, {"n1", "n2"}, "retry"),  # nor here the old set
        ({"n2"}, {"n0", "n3"}, "retry"),
    ],
)
def test_a_joint_prepare_needs_a_majority_of_each_acceptor_set(ok: set[str], failed: set[str], decision: str) -> None:
    core = joint_core(Write(b"v"))
    started = core.start(T0)
    prepares = {s.peer: s for s in sends(started)}
    assert sorted(prepares) == sorted(UNION)
    assert all(s.message["cv"] == 4 and s.message["op"] == OP_PREPARE for s in prepares.values())
    answers: list[Answer] = [Reply(prepares[p].call, promise()) for p in sorted(ok)]
    answers += [CallFailed(prepares[p].call, maybe_delivered=False) for p in sorted(failed)]
    effects = core.on_answers(answers, T0)
    if decision == "accept":
        accepts = sends(effects)
        assert accepts and all(s.message["op"] == OP_ACCEPT and s.message["cv"] == 4 for s in accepts)
    elif decision == "wait":
        assert effects == []
    else:
        assert kinds(effects)[-1] == "StartTimer" and not sends(effects)  # backoff, then a new attempt


def test_a_joint_accept_is_chosen_only_with_a_majority_of_each_set() -> None:
    core = joint_core(Write(b"v"))
    prepares = {s.peer: s for s in sends(core.start(T0))}
    accepts = {s.peer: s for s in sends(core.on_answers([Reply(prepares[p].call, promise()) for p in UNION], T0))}
    assert sorted(accepts) == sorted(UNION)
    # n0 and n2: a majority of the old set, not of the new one.
    assert core.on_answers([Reply(accepts["n0"].call, accepted()), Reply(accepts["n2"].call, accepted())], T0) == []
    effects = core.on_reply(accepts["n3"].call, accepted(), T0)
    assert kinds(effects)[-1] == "Done"
    # n0 and n1 alone are a majority of both sets (two of four, fewer than a majority of the union):
    other = joint_core(Write(b"w"))
    prep = {s.peer: s for s in sends(other.start(T0))}
    acc = {s.peer: s for s in sends(other.on_answers([Reply(prep[p].call, promise()) for p in ("n0", "n1")], T0))}
    effects = other.on_answers([Reply(acc["n0"].call, accepted()), Reply(acc["n1"].call, accepted())], T0)
    assert kinds(effects)[-1] == "Done"


def test_a_fast_path_entry_is_used_only_by_the_same_acceptor_sets() -> None:
    state = ProposerState("n0")
    core = joint_core(Write(b"1"), state=state)
    prepares = {s.peer: s for s in sends(core.start(T0))}
    accepts = sends(core.on_answers([Reply(prepares[p].call, promise()) for p in UNION], T0))
    promised_next = Ballot.from_wire(accepts[0].message["promise_next"])
    effects = core.on_answers([Reply(s.call, accepted(promised_next)) for s in accepts], T0)
    assert kinds(effects)[-1] == "Done" and state.holds_fast_path("k")
    # The same four replicas as one set (another quorum shape): a full prepare.
    single = joint_core(Read(), state=state, sets=(UNION,))
    assert sends(single.start(T0))[0].message["op"] == OP_PREPARE
    # Remembered again, then taken by the same joint shape: a fast accept.
    core = joint_core(Write(b"2"), state=state)
    prepares = {s.peer: s for s in sends(core.start(T0))}
    accepts = sends(core.on_answers([Reply(prepares[p].call, promise()) for p in UNION], T0))
    promised_next = Ballot.from_wire(accepts[0].message["promise_next"])
    core.on_answers([Reply(s.call, accepted(promised_next)) for s in accepts], T0)
    fast = joint_core(Read(), state=state)
    first = sends(fast.start(T0))
    assert first and first[0].message["op"] == OP_ACCEPT and first[0].message["cv"] == 4


# --- quorum reads (peeks) ------------------------------------------------------------------------

PEEKS = ProposerConfig(clock_ballots=False, peek_reads=True)


def peek_reply(state: AcceptorState) -> Message:
    """What an acceptor in ``state`` answers to a peek, through the production codec."""
    return reply_to_wire(on_peek(state))


def voted(ballot: Ballot, value: bytes, promised: Ballot | None = None) -> AcceptorState:
    state, reply = on_accept(EMPTY_STATE, ballot, RegisterValue.of(value), promise_next=promised, lineage=(ballot,))
    assert isinstance(reply, Accepted)
    return state


def test_a_read_is_answered_by_a_peek_a_majority_agrees_on() -> None:
    b1 = Ballot(4, "n1")
    state = ProposerState("n0")
    core = core_for(Read(), config=PEEKS, state=state)
    peeks = sends(core.start(T0))
    assert [s.message["op"] for s in peeks] == ["paxos_peek"] * 3 and [s.peer for s in peeks] == list(GROUP)
    assert all("ballot" not in s.message for s in peeks)  # no ballot: nothing is promised
    effects = answer_all(core, peeks, [peek_reply(voted(b1, b"v", Ballot(5, "n1")))] * 2)
    assert kinds(effects) == ["Abandon", "Done"]
    done = effects[-1]
    assert isinstance(done, Done) and done.result.value == RegisterValue.of(b"v")
    assert done.result.round_trips == 1 and done.result.current_etag == etag_of(b"v")
    assert core.stats.peek_hits == 1


def test_a_read_of_a_never_written_key_agrees_on_nothing_accepted() -> None:
    core = core_for(Read(), config=PEEKS)
    effects = answer_all(core, sends(core.start(T0)), [peek_reply(EMPTY_STATE)] * 2)
    assert isinstance(effects[-1], Done) and effects[-1].result.value == ABSENT


def test_a_value_accepted_by_a_minority_is_never_returned_by_a_peek_and_may_be_lost() -> None:
    """The dangerous case: n0 alone accepted ``minority`` (its proposer died mid-accept); n1 and
    n2 hold the chosen ``chosen``.  A peek that reaches n0 and one other must not answer either
    value on its own word; it falls back to the full protocol (a prepare).  A peek that reaches
    n1 and n2 answers ``chosen``.  And ``minority`` is indeed losable: a proposer whose majority
    is {n1, n2} overwrites it, and n0's stray accept can never be chosen after that."""
    chosen_at, minority_at = Ballot(4, "n1"), Ballot(6, "n2")
    states = [voted(minority_at, b"minority"), voted(chosen_at, b"chosen"), voted(chosen_at, b"chosen")]
    core = core_for(Read(), config=PEEKS)
    peeks = sends(core.start(T0))
    effects = answer_all(core, peeks, [peek_reply(states[0]), peek_reply(states[1])])
    assert [s.message["op"] for s in sends(effects)] == [OP_PREPARE] * 3  # the full protocol
    assert not any(isinstance(e, Done) for e in effects) and core.stats.peek_misses == 1

    core = core_for(Read(), config=PEEKS)
    peeks = sends(core.start(T0))
    effects = answer_all(core, peeks[1:], [peek_reply(states[1]), peek_reply(states[2])])
    assert isinstance(effects[-1], Done) and effects[-1].result.value == RegisterValue.of(b"chosen")

    # The minority value is then lost for good: Q's phase 1 on {n1, n2} does not see it.
    q = Ballot(9, "n3")
    promises = []
    for i in (1, 2):
        states[i], promised = on_prepare(states[i], q)
        promises.append(promised)
    assert choose_value(promises) == RegisterValue.of(b"chosen")  # type: ignore[arg-type]
    for i in (1, 2):
        states[i], reply = on_accept(states[i], q, RegisterValue.of(b"q"), promise_next=None, lineage=(q,))
        assert isinstance(reply, Accepted)
    _, late = on_accept(states[1], minority_at, RegisterValue.of(b"minority"), promise_next=None, lineage=(minority_at,))
    assert late == Rejected(q)


def test_a_state_merged_in_by_recovery_never_counts_towards_a_peek() -> None:
    """n1 lost its disk and merged n0's minority accept: n0 and n1 both report ``minority`` at one
    ballot, but n1 never voted for it (and its lost incarnation may have promised a proposer that
    will overwrite it), so the peek does not answer it."""
    chosen_at, minority_at = Ballot(4, "n1"), Ballot(6, "n2")
    recovered = replace(merge_states(EMPTY_STATE, voted(minority_at, b"minority")), absorbed=True)
    assert recovered.absorbed and AcceptorState.decode(recovered.encode()) == recovered
    core = core_for(Read(), config=PEEKS)
    peeks = sends(core.start(T0))
    effects = answer_all(
        core, peeks, [peek_reply(voted(minority_at, b"minority")), peek_reply(recovered), peek_reply(voted(chosen_at, b"c"))]
    )
    assert [s.message["op"] for s in sends(effects)] == [OP_PREPARE] * 3
    # Once it votes again itself, its state counts: an accept clears the flag.
    revoted, _ = on_accept(recovered, Ballot(7, "n2"), RegisterValue.of(b"x"), promise_next=None)
    assert not revoted.absorbed


def test_an_inconclusive_peek_without_fallback_is_a_certain_failure() -> None:
    core = ProposerCore(
        ProposerState("n0"), PEEKS, random.Random(1), "k", 7, GROUP, Read(), DEADLINE_NS, fallback=False
    )
    peeks = sends(core.start(T0))
    effects = answer_all(
        core, peeks, [peek_reply(voted(Ballot(6, "n2"), b"a")), peek_reply(voted(Ballot(4, "n1"), b"b"))]
    )
    failed = effects[-1]
    assert isinstance(failed, Failed) and isinstance(failed.error, PeekInconclusive)
    assert failed.error.indeterminate is False


def test_a_peek_leaves_the_fast_path_promise_for_the_next_change() -> None:
    state = ProposerState("n0")
    writer = core_for(Write(b"v"), config=PEEKS, state=state)
    commit(writer, b"v")
    assert state.holds_fast_path("k")
    reader = core_for(Read(), config=PEEKS, state=state)
    effects = answer_all(reader, sends(reader.start(T0)), [peek_reply(voted(Ballot(1, "n0"), b"v"))] * 2)
    assert isinstance(effects[-1], Done)
    assert state.holds_fast_path("k")  # a peek promised nothing: the next write skips phase 1


def test_a_peek_that_cannot_agree_ends_at_the_first_quorum_and_falls_back() -> None:
    """Waiting for a third reply could wait for an unreachable replica until the deadline."""
    core = core_for(Read(), config=PEEKS)
    peeks = sends(core.start(T0))
    effects = answer_all(core, peeks, [peek_reply(voted(Ballot(6, "n2"), b"a")), CallFailed(peeks[1].call, True),
                                       peek_reply(voted(Ballot(4, "n1"), b"b"))])
    assert [s.message["op"] for s in sends(effects)] == [OP_PREPARE] * 3


def test_a_read_asked_to_recommit_runs_the_full_protocol() -> None:
    """Membership catch-up reads with ``peek=False``: the state must be accepted anew."""
    core = ProposerCore(ProposerState("n0"), PEEKS, random.Random(1), "k", 7, GROUP, Read(), DEADLINE_NS, peek=False)
    assert [s.message["op"] for s in sends(core.start(T0))] == [OP_PREPARE] * 3


# --- first writes at the zero ballot (no phase 1) -----------------------------------------------


def first_write_core(change: Change, state: ProposerState | None = None) -> ProposerCore:
    return ProposerCore(
        state or ProposerState("n0"), ProposerConfig(clock_ballots=False, unanimity_wait_s=0.01),
        random.Random(1), "k", 7, GROUP, change, DEADLINE_NS, first_write=True,
    )


def test_a_first_write_takes_one_round_trip_local_acceptor_first() -> None:
    state = ProposerState("n0")
    core = first_write_core(Write(b"v"), state)
    first = sends(core.start(T0))
    zero = Ballot(0, "n0")
    assert [s.peer for s in first] == ["n0"] and first[0].message["op"] == OP_ACCEPT
    assert first[0].message["ballot"] == zero.to_wire() and first[0].message["lineage"] == [zero.to_wire()]
    nxt = Ballot.from_wire(first[0].message["promise_next"])
    peers = sends(core.on_reply(first[0].call, accepted(nxt), at_ms(1)))
    assert [s.peer for s in peers] == ["n1", "n2"]  # only once the local acceptor took it
    assert kinds(core.on_reply(peers[0].call, accepted(nxt), at_ms(2))) == ["StartTimer"]  # a majority: wait
    done = core.on_reply(peers[1].call, accepted(nxt), at_ms(3))
    assert kinds(done) == ["Done"]
    result = done[-1].result  # type: ignore[union-attr]
    assert result.round_trips == 1 and result.value == RegisterValue.of(b"v") and result.outcome == "ok"
    assert state.holds_fast_path("k")  # and the next write is one round trip too


def test_a_first_write_short_of_unanimity_recommits_at_its_next_ballot() -> None:
    core = first_write_core(PutIfAbsent(b"v"))
    first = sends(core.start(T0))
    nxt = Ballot.from_wire(first[0].message["promise_next"])
    peers = sends(core.on_reply(first[0].call, accepted(nxt), at_ms(1)))
    core.on_reply(peers[0].call, accepted(nxt), at_ms(2))
    # n2 had voted on the key already: the zero ballot is out of reach, but {n0, n1} promised nxt
    # with (zero, v) as their highest accepted state: a phase 1 for nxt.
    effects = core.on_reply(peers[1].call, rejected(Ballot(5, "n9")), at_ms(3))
    recommit = sends(effects)
    assert [s.peer for s in recommit] == list(GROUP)
    assert recommit[0].message["ballot"] == nxt.to_wire() and recommit[0].message["value"] == b"v"
    done = core.on_answers(as_answers(recommit, [accepted(), accepted(), accepted()]), at_ms(4))
    result = done[-1].result  # type: ignore[union-attr]
    # The change was applied once (put-if-absent reports ok, not precondition_failed on its own value).
    assert kinds(done) == ["Done"] and result.outcome == "ok" and result.round_trips == 2


def test_a_first_write_of_a_key_the_local_acceptor_knows_falls_back_to_phase_1() -> None:
    core = first_write_core(Write(b"v"))
    first = sends(core.start(T0))
    effects = core.on_reply(first[0].call, rejected(Ballot(3, "n1")), at_ms(1))
    assert kinds(effects) == ["StartTimer"]  # nothing was sent elsewhere: a plain retry (backoff)
    prepare = sends(core.on_timer(at_ms(20)))
    assert [s.message["op"] for s in prepare] == [OP_PREPARE] * 3


def test_a_first_write_whose_local_answer_is_lost_is_never_claimed_from_the_lineage() -> None:
    """The zero ballot names the node, not the proposal: an origin found in the state may be
    another proposal's of this node, unless the local acceptor said it took ours."""
    core = first_write_core(PutIfAbsent(b"mine"))
    first = sends(core.start(T0))
    core.on_failure(first[0].call, at_ms(1), maybe_delivered=True)
    prepare = sends(core.on_timer(at_ms(20)))
    zero = Ballot(0, "n0")
    theirs = [promise(zero, b"theirs", (zero,)), promise(zero, b"theirs", (zero,)), promise()]
    effects = core.on_answers(as_answers(prepare, theirs), at_ms(21))
    assert kinds(effects)[-1] == "Failed"
    assert effects[-1].error.indeterminate  # type: ignore[union-attr]


@pytest.mark.parametrize("change", [Write(b"v"), PutIfAbsent(b"v")])
def test_no_first_write_at_a_zero_ballot_during_a_membership_change(change: Change) -> None:
    """A joining acceptor (n3) is empty until catch-up: a zero ballot it took could compete in a
    later phase 1 with a zero-ballot state the old acceptors chose, so joint rounds use phase 1."""
    core = ProposerCore(
        ProposerState("n0"), ProposerConfig(clock_ballots=False, unanimity_wait_s=0.01), random.Random(1), "k", 7,
        UNION, change, DEADLINE_NS, acceptor_sets=(OLD_SET, NEW_SET), stamp={"cv": 4}, first_write=True,
    )
    first = sends(core.start(T0))
    assert [s.message["op"] for s in first] == [OP_PREPARE] * len(UNION)
    assert all(Ballot.from_wire(s.message["ballot"]).counter >= 1 for s in first)
