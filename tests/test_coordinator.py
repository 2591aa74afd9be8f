"""Unit tables for the AP coordinator cores (kvstore.protocol.coordinator), stepped by hand: no event
loop, no clock, no network -- inputs in, effects out."""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvstore import contract
from kvstore.errors import InsufficientStorage, NodeError, Overloaded
from kvstore.protocol import versions
from kvstore.protocol.causal_context import BadContext
from kvstore.protocol.coordinator import (
    FORWARD_MARGIN_MS,
    MIN_CALL_TIMEOUT_NS,
    Abandon,
    CallFailed,
    CheckRegister,
    CoordinateHere,
    Done,
    Effect,
    Failed,
    JointOwners,
    LocalFailed,
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
    WritePlan,
    WriteRouterCore,
    WriteTargets,
    outcome_of,
    plan_write,
    read_targets,
    write_targets,
)
from kvstore.protocol.membership import STALE_CONFIG
from kvstore.protocol.versions import VersionedObject
from kvstore.transport.base import RemoteError

MS = 1_000_000
T0 = 1_000 * MS  # the monotonic reading at start
DEADLINE = T0 + 2_000 * MS
REPLICA_TIMEOUT = 500 * MS
OK: dict[str, Any] = {"ok": True}


def written(value: bytes = b"v", actor: str = "n1.a") -> VersionedObject:
    return versions.update(VersionedObject.empty(), {}, actor, value, 1)


def write_core(
    w: int,
    up: tuple[str, ...] = ("n1", "n2", "n3"),
    down: tuple[str, ...] = (),
    spare: tuple[str, ...] = (),
    *,
    sloppy: bool = False,
    node: str = "n1",
    as_fallback: bool = False,
    context: dict[str, int] | None = None,
) -> WriteCoordinatorCore:
    return WriteCoordinatorCore(
        node_id=node, key="k", token=7, value=b"v", context=context or {}, w=w, sloppy=sloppy,
        plan=plan_write(WriteTargets(up, down, spare), node, as_fallback), as_fallback=as_fallback,
        deadline_ns=DEADLINE, replica_timeout_ns=REPLICA_TIMEOUT, mode="siblings",
    )


def replicating(core: WriteCoordinatorCore, obj: VersionedObject | None = None) -> list[Effect]:
    """Step a write core through its register check and local write; the effects after it."""
    assert core.start(T0) == [CheckRegister("k", 7)]
    [persist] = core.on_register(False, T0)
    assert isinstance(persist, PersistLocal) and persist.timeout_at_ns == DEADLINE
    return core.on_local(LocalWritten(obj or written()), T0)


def sends(effects: list[Effect]) -> dict[str, Send]:
    return {e.peer: e for e in effects if isinstance(e, Send)}


# --- planning --------------------------------------------------------------------------------


def test_write_targets_split_the_preference_list_by_the_failure_detector() -> None:
    walk = ("n1", "n2", "n3", "n4", "n5")
    alive = {"n1", "n3", "n5"}.__contains__
    assert write_targets(walk, 3, alive, sloppy=True) == WriteTargets(("n1", "n3"), ("n2",), ("n5",))
    assert write_targets(walk, 3, alive, sloppy=False) == WriteTargets(("n1", "n3"), ("n2",), ())


@pytest.mark.parametrize(
    ("targets", "node", "as_fallback", "slots", "spares"),
    [
        # everyone up: three data slots
        (WriteTargets(("n1", "n2", "n3"), (), ("n4",)), "n1", False,
         (("n1", None), ("n2", None), ("n3", None)), ("n4",)),
        # a down primary gets the next spare as its stand-in, holding a hint for it
        (WriteTargets(("n1", "n2"), ("n3",), ("n4", "n5")), "n1", False,
         (("n1", None), ("n2", None), ("n4", "n3")), ("n5",)),
        # two down, one spare: one stand-in only
        (WriteTargets(("n1",), ("n2", "n3"), ("n4",)), "n1", False, (("n1", None), ("n4", "n2")), ()),
        # the coordinator as a fallback takes the first down primary's slot, never a spare slot
        (WriteTargets((), ("n1", "n2", "n3"), ("n4", "n5")), "n4", True,
         (("n4", "n1"), ("n5", "n2")), ()),
    ],
)
def test_plan_write_table(
    targets: WriteTargets, node: str, as_fallback: bool,
    slots: tuple[tuple[str, str | None], ...], spares: tuple[str, ...],
) -> None:
    assert plan_write(targets, node, as_fallback) == WritePlan(slots, spares)


def test_read_targets_top_up_with_healthy_fallbacks_only_when_sloppy() -> None:
    walk = ("n1", "n2", "n3", "n4", "n5")
    alive = {"n1", "n3", "n4", "n5"}.__contains__
    assert read_targets(walk, 3, alive, sloppy=False) == ["n1", "n3"]
    assert read_targets(walk, 3, alive, sloppy=True) == ["n1", "n3", "n4"]


# --- writes -----------------------------------------------------------------------------------


def test_w2_of_n3_with_one_timeout_is_ok() -> None:
    core = write_core(w=2)
    effects = replicating(core)
    calls = sends(effects)
    assert core.on_failure(calls["n2"].call, T0 + 500 * MS, maybe_delivered=True) == []
    [done] = core.on_reply(calls["n3"].call, OK, T0 + 600 * MS)
    assert isinstance(done, Done) and isinstance(done.result, WriteOutcome)
    assert done.result.acknowledged == 2 and done.result.hinted == []
    assert outcome_of(done) == contract.OK
    assert core.settled


def test_w3_with_one_maybe_delivered_failure_is_indeterminate() -> None:
    core = write_core(w=3)
    calls = sends(replicating(core))
    assert core.on_reply(calls["n2"].call, OK, T0) == []
    [failed] = core.on_failure(calls["n3"].call, T0, maybe_delivered=True)
    assert isinstance(failed, Failed)
    body = failed.error.body()
    assert (failed.error.status, body["error"], body["indeterminate"]) == (503, "quorum_unavailable", True)
    assert body["acknowledged"] == 2 and body["needed"] == 3
    assert failed.indeterminate and outcome_of(failed) == contract.INFO


def test_the_deadline_timer_short_of_w_is_indeterminate_and_late_answers_change_nothing() -> None:
    core = write_core(w=3)
    calls = sends(replicating(core))
    [failed] = core.on_timer(DEADLINE)
    assert isinstance(failed, Failed) and failed.indeterminate
    assert core.on_reply(calls["n2"].call, OK, DEADLINE) == []  # background: no second outcome
    assert not core.settled
    assert core.on_reply(calls["n3"].call, OK, DEADLINE) == []
    assert core.settled


def test_too_few_targets_to_plan_w_fails_before_writing_anything() -> None:
    core = write_core(w=3, up=("n1", "n2"), down=("n3",))
    [failed] = core.start(T0)
    assert isinstance(failed, Failed) and not failed.indeterminate
    assert failed.error.body()["indeterminate"] is False and outcome_of(failed) == contract.FAIL


def test_a_linearizable_key_is_refused_before_the_local_write() -> None:
    core = write_core(w=2)
    assert core.start(T0) == [CheckRegister("k", 7)]
    [failed] = core.on_register(True, T0)
    assert isinstance(failed, Failed)
    assert (failed.error.status, failed.error.code) == (409, "consistency_conflict")
    assert outcome_of(failed) == contract.FAIL


def test_the_write_effects_come_in_the_documented_order() -> None:
    core = write_core(w=2)
    effects = replicating(core)
    # Sends in plan order, each capped by the replica timeout, then the deadline timer.
    assert [type(e) for e in effects] == [Send, Send, StartTimer]
    assert [e.peer for e in effects if isinstance(e, Send)] == ["n2", "n3"]
    assert all(e.timeout_at_ns == T0 + REPLICA_TIMEOUT for e in effects if isinstance(e, Send))
    assert effects[-1] == StartTimer(DEADLINE)
    message = effects[0].message if isinstance(effects[0], Send) else {}
    assert message["op"] == "replica_put" and "hint_for" not in message
    assert versions.decode(message["obj"]) == written()


def test_w1_answers_right_after_the_sends() -> None:
    core = write_core(w=1)
    effects = replicating(core)
    assert [type(e) for e in effects] == [Send, Send, Done]
    assert not core.settled  # the replica writes go on in the background


def test_a_call_never_gets_less_than_a_millisecond() -> None:
    core = write_core(w=2)
    assert core.start(DEADLINE) == [CheckRegister("k", 7)]
    core.on_register(False, DEADLINE)
    effects = core.on_local(LocalWritten(written()), DEADLINE + 5 * MS)
    assert {e.timeout_at_ns for e in effects if isinstance(e, Send)} == {DEADLINE + 5 * MS + MIN_CALL_TIMEOUT_NS}


def test_sloppy_stand_in_stores_a_hint_for_the_down_primary() -> None:
    core = write_core(w=3, up=("n1", "n2"), down=("n3",), spare=("n4", "n5"), sloppy=True)
    calls = sends(replicating(core))
    assert set(calls) == {"n2", "n4"}
    assert calls["n4"].message["hint_for"] == "n3" and "hint_for" not in calls["n2"].message
    assert core.on_reply(calls["n4"].call, OK, T0) == []
    [done] = core.on_reply(calls["n2"].call, OK, T0)
    assert isinstance(done, Done) and isinstance(done.result, WriteOutcome)
    assert done.result.acknowledged == 3 and done.result.hinted == ["n4"]


def test_a_failed_slot_is_handed_to_the_next_spare_before_the_outcome_in_one_batch() -> None:
    core = write_core(w=3, spare=("n4",), sloppy=True)
    calls = sends(replicating(core))
    effects = core.on_answers([CallFailed(calls["n2"].call, True), Reply(calls["n3"].call, OK)], T0 + 100 * MS)
    [handoff] = effects
    assert isinstance(handoff, Send) and handoff.peer == "n4"
    assert handoff.message["hint_for"] == "n2"
    assert handoff.timeout_at_ns == DEADLINE  # a hand-off may use all the time left
    [done] = core.on_reply(handoff.call, OK, T0 + 200 * MS)
    assert isinstance(done, Done) and isinstance(done.result, WriteOutcome)
    assert done.result.hinted == ["n4"] and done.result.acknowledged == 3


def test_hand_off_then_outcome_within_one_batch() -> None:
    core = write_core(w=2, spare=("n4",), sloppy=True)
    calls = sends(replicating(core))
    effects = core.on_answers([CallFailed(calls["n2"].call, True), Reply(calls["n3"].call, OK)], T0)
    assert [type(e) for e in effects] == [Send, Done]


def test_hand_offs_go_on_after_the_outcome() -> None:
    core = write_core(w=2, spare=("n4",), sloppy=True)
    calls = sends(replicating(core))
    [done] = core.on_reply(calls["n3"].call, OK, T0)
    assert isinstance(done, Done)
    [handoff] = core.on_failure(calls["n2"].call, T0, maybe_delivered=True)
    assert isinstance(handoff, Send) and handoff.peer == "n4" and handoff.message["hint_for"] == "n2"
    assert not core.settled
    assert core.on_reply(handoff.call, OK, T0) == []
    assert core.settled


def test_a_failed_hand_off_is_a_failure_not_another_hand_off() -> None:
    core = write_core(w=3, spare=("n4", "n5"), sloppy=True)
    calls = sends(replicating(core))
    [handoff] = core.on_failure(calls["n2"].call, T0)
    assert isinstance(handoff, Send) and handoff.peer == "n4"
    [failed] = core.on_failure(handoff.call, T0)
    assert isinstance(failed, Failed) and failed.indeterminate


def test_without_sloppy_a_failed_slot_is_not_handed_off() -> None:
    core = write_core(w=3, spare=(), sloppy=False)
    calls = sends(replicating(core))
    [failed] = core.on_failure(calls["n2"].call, T0)
    assert isinstance(failed, Failed)


def test_an_error_reply_is_not_an_ack() -> None:
    core = write_core(w=3)
    calls = sends(replicating(core))
    [failed] = core.on_reply(calls["n2"].call, {"error": "overloaded", "remote_error": True}, T0)
    assert isinstance(failed, Failed)


def test_a_fallback_coordinator_writes_a_hint_and_counts_itself_hinted() -> None:
    core = write_core(w=2, up=(), down=("n1", "n2", "n3"), spare=("n4", "n5"), node="n4", sloppy=True,
                      as_fallback=True)
    assert core.start(T0) == [CheckRegister("k", 7)]
    assert core.on_register(False, T0) == [PersistLocal("k", 7, "n1", DEADLINE)]
    calls = sends(core.on_local(LocalWritten(written(actor="n4!x.1.1")), T0))
    assert calls["n5"].message["hint_for"] == "n2"
    [done] = core.on_reply(calls["n5"].call, OK, T0)
    assert isinstance(done, Done) and isinstance(done.result, WriteOutcome)
    assert done.result.hinted == ["n4", "n5"]


def test_local_update_refuses_a_context_claiming_unissued_counters_only_at_a_primary() -> None:
    stored = written(actor="n1.a")
    primary = write_core(w=2, context={"n1.a": 5})
    with pytest.raises(BadContext):
        primary.local_update(stored, "n1.a", 10)
    ok = primary.local_update(stored, "n1.b", 10)  # a different actor: nothing to check
    assert ok.vector()["n1.b"] == 1
    fallback = write_core(w=1, up=(), down=("n1", "n2", "n3"), spare=("n4",), node="n4", sloppy=True,
                          as_fallback=True, context={"n4!x.1.1": 5})
    assert fallback.local_update(VersionedObject.empty(), "n4!x.1.1", 10).vector()["n4!x.1.1"] == 6


REFUSED = Overloaded("hint store full", reason="max_bytes")


@pytest.mark.parametrize(
    ("failure", "status", "code", "indeterminate", "outcome"),
    [
        (LocalFailed("timeout", writing=True), 503, "timeout", True, contract.INFO),
        (LocalFailed("timeout", writing=False), 503, "timeout", False, contract.FAIL),
        (LocalFailed("storage_full", writing=True, detail="ENOSPC"), 507, "insufficient_storage", False,
         contract.FAIL),
        (LocalFailed("storage_busy", writing=False, detail="busy"), 503, "overloaded", False, contract.FAIL),
        (LocalFailed("storage_error", writing=True, detail="EIO"), 503, "storage_unavailable", True, contract.INFO),
        (LocalFailed("storage_error", writing=False, detail="EIO"), 503, "storage_unavailable", False,
         contract.FAIL),
        (LocalFailed("bad_context", writing=False, detail="reaped"), 400, "bad_context", None, contract.FAIL),
        (LocalFailed("refused", writing=True, detail="full", error=REFUSED), 503, "overloaded", False,
         contract.FAIL),
    ],
)
def test_local_write_failures_classify(
    failure: LocalFailed, status: int, code: str, indeterminate: bool | None, outcome: contract.Outcome
) -> None:
    core = write_core(w=2)
    core.start(T0)
    core.on_register(False, T0)
    [failed] = core.on_local(failure, T0)
    assert isinstance(failed, Failed)
    error: NodeError = failed.error
    assert (error.status, error.code, error.body().get("indeterminate")) == (status, code, indeterminate)
    assert outcome_of(failed) == outcome
    assert core.settled and core.outstanding == ()


# --- reads ------------------------------------------------------------------------------------


def read_core(r: int, targets: tuple[str, ...] = ("n1", "n2", "n3"),
              primaries: tuple[str, ...] = ("n1", "n2", "n3")) -> ReadCoordinatorCore:
    return ReadCoordinatorCore(
        key="k", token=7, r=r, targets=targets, primaries=primaries, deadline_ns=DEADLINE,
        replica_timeout_ns=REPLICA_TIMEOUT, mode="siblings",
    )


def holding(obj: VersionedObject | None, **extra: Any) -> dict[str, Any]:
    return {"obj": versions.encode(obj) if obj is not None else None, **extra}


def test_a_read_asks_every_target_then_starts_the_deadline() -> None:
    core = read_core(2)
    effects = core.start(T0)
    assert [type(e) for e in effects] == [Send, Send, Send, StartTimer]
    assert [e.peer for e in effects if isinstance(e, Send)] == ["n1", "n2", "n3"]
    assert all(
        e.message == {"op": "replica_get", "key": "k", "token": 7} and e.timeout_at_ns == T0 + REPLICA_TIMEOUT
        for e in effects if isinstance(e, Send)
    )


def test_read_with_divergent_siblings_is_merged_and_repairs_the_stale_primaries() -> None:
    a = versions.update(VersionedObject.empty(), {}, "n1.a", b"a", 1)
    b = versions.update(VersionedObject.empty(), {}, "n2.b", b"b", 2)
    merged = versions.sync(a, b)
    assert len(merged.siblings) == 2
    core = read_core(2)
    calls = sends(core.start(T0))
    assert core.on_reply(calls["n1"].call, holding(a), T0) == []
    [done] = core.on_reply(calls["n2"].call, holding(b), T0)
    assert isinstance(done, Done) and isinstance(done.result, ReadOutcome)
    assert done.result.obj == merged and done.result.replies == 2 and done.result.responders == ["n1", "n2"]
    assert outcome_of(done) == contract.OK
    # Repair waits for the third reply (bounded), then brings every stale primary to the merge.
    assert core.begin_repair(T0 + MS, 200 * MS) == [StartTimer(T0 + 201 * MS)]
    effects = core.on_reply(calls["n3"].call, holding(None), T0 + 2 * MS)
    assert [type(e) for e in effects] == [Repair, Repair, Repair]
    assert [e.peer for e in effects if isinstance(e, Repair)] == ["n1", "n2", "n3"]
    for repair in effects:
        assert isinstance(repair, Repair) and repair.timeout_ns == REPLICA_TIMEOUT
        assert repair.message["op"] == "replica_put" and versions.decode(repair.message["obj"]) == merged
    assert core.settled


def test_read_repair_skips_up_to_date_silent_and_fallback_targets() -> None:
    a = versions.update(VersionedObject.empty(), {}, "n1.a", b"a", 1)
    newer = versions.update(a, a.vector(), "n1.a", b"a2", 2)
    core = read_core(2, targets=("n1", "n2", "n4"), primaries=("n1", "n2", "n3"))
    calls = sends(core.start(T0))
    core.on_reply(calls["n1"].call, holding(newer), T0)
    [done] = core.on_reply(calls["n4"].call, holding(a), T0)  # n4: a stale fallback
    assert isinstance(done, Done)
    assert core.begin_repair(T0, 200 * MS) == [StartTimer(T0 + 200 * MS)]
    # n2 never answers: abandoned when the wait ends; n1 is current; n4 holds hints, not data.
    assert core.on_timer(T0 + 200 * MS) == [Abandon((calls["n2"].call,))]
    assert core.settled


def test_read_repair_without_anything_outstanding_decides_at_once() -> None:
    a = written()
    core = read_core(3)
    calls = sends(core.start(T0))
    core.on_reply(calls["n1"].call, holding(a), T0)
    core.on_reply(calls["n2"].call, holding(a), T0)
    [done] = core.on_reply(calls["n3"].call, holding(None), T0)
    assert isinstance(done, Done) and done.result.obj == a
    [repair] = core.begin_repair(T0, 200 * MS)
    assert isinstance(repair, Repair) and repair.peer == "n3"


def test_a_read_that_finds_nothing_anywhere_repairs_nothing() -> None:
    # A key nobody holds (never written, or its tombstone reaped): a "repair" would write an
    # empty record on every primary at every read of an absent key.
    core = read_core(3)
    calls = sends(core.start(T0))
    core.on_reply(calls["n1"].call, holding(None), T0)
    core.on_reply(calls["n2"].call, holding(None), T0)
    [done] = core.on_reply(calls["n3"].call, holding(None), T0)
    assert isinstance(done, Done) and done.result.obj == VersionedObject.empty()
    assert core.begin_repair(T0, 200 * MS) == []
    assert core.settled


def test_a_read_short_of_r_abandons_the_rest_then_fails_certainly() -> None:
    core = read_core(3)
    calls = sends(core.start(T0))
    core.on_reply(calls["n1"].call, holding(None), T0)
    effects = core.on_failure(calls["n2"].call, T0, maybe_delivered=True)
    assert [type(e) for e in effects] == [Abandon, Failed]
    assert effects[0] == Abandon((calls["n3"].call,))
    failed = effects[1]
    assert isinstance(failed, Failed) and failed.error.code == "quorum_unavailable"
    assert failed.error.body()["indeterminate"] is False and outcome_of(failed) == contract.FAIL
    assert core.settled
    assert core.on_reply(calls["n3"].call, holding(None), T0) == []  # abandoned: ignored


def test_a_read_at_its_deadline_fails_certainly() -> None:
    core = read_core(2)
    calls = sends(core.start(T0))
    core.on_reply(calls["n1"].call, holding(None), T0)
    effects = core.on_timer(DEADLINE)
    assert [type(e) for e in effects] == [Abandon, Failed]


def test_a_read_with_too_few_targets_fails_before_asking() -> None:
    [failed] = read_core(3, targets=("n1", "n2")).start(T0)
    assert isinstance(failed, Failed) and failed.error.body()["indeterminate"] is False


def test_a_read_of_a_linearizable_key_is_a_conflict() -> None:
    core = read_core(2)
    calls = sends(core.start(T0))
    core.on_reply(calls["n1"].call, holding(None, cp=True), T0)
    effects = core.on_reply(calls["n2"].call, holding(None), T0)
    failed = effects[-1]
    assert isinstance(failed, Failed) and failed.error.status == 409


def test_an_undecodable_read_reply_counts_as_a_failure() -> None:
    core = read_core(3)
    calls = sends(core.start(T0))
    effects = core.on_reply(calls["n1"].call, {"obj": b"\xc1 not msgpack"}, T0)
    assert isinstance(effects[-1], Failed)


# That the core does no I/O and reads no time is pinned for the whole pure layer (kvstore/protocol/)
# by tests/test_layout.py.


# --- seeded schedules -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(200))
def test_a_write_under_any_answer_order_answers_once_and_by_the_quorum(seed: int) -> None:
    rng = random.Random(seed)
    members = [f"n{i}" for i in range(1, 7)]
    n = rng.randint(1, 4)
    primaries, fallbacks = members[:n], members[n:]
    down = tuple(p for p in primaries[1:] if rng.random() < 0.3)  # n1 coordinates: up
    up = tuple(p for p in primaries if p not in down)
    sloppy = rng.random() < 0.6
    spare = tuple(f for f in fallbacks if rng.random() < 0.7) if sloppy else ()
    w = rng.randint(1, n)
    core = write_core(w, up, down, spare, sloppy=sloppy)
    first = core.start(T0)
    if isinstance(first[0], Failed):
        assert len(core.plan.slots) < w and not first[0].indeterminate
        return
    core.on_register(False, T0)
    effects = core.on_local(LocalWritten(written()), T0)
    outcomes: list[Done | Failed] = []
    in_flight: dict[int, Send] = {}
    sent_to: list[str] = []
    acked: set[str] = {"n1"}
    timer_fired = False
    while True:
        for effect in effects:
            if isinstance(effect, Send):
                assert effect.call not in in_flight
                in_flight[effect.call] = effect
                sent_to.append(effect.peer)
            elif isinstance(effect, Done | Failed):
                outcomes.append(effect)
        if not in_flight:
            break
        if not outcomes and not timer_fired and rng.random() < 0.05:
            timer_fired = True
            effects = core.on_timer(DEADLINE)
            continue
        call = rng.choice(sorted(in_flight))
        send = in_flight.pop(call)
        if rng.random() < 0.6:
            if not outcomes:
                acked.add(send.peer)
            effects = core.on_reply(call, OK, T0)
        else:
            effects = core.on_failure(call, T0, maybe_delivered=rng.random() < 0.5)
    assert core.settled
    assert len(outcomes) == 1, outcomes
    # Every member gets at most one copy; hand-offs go to spares only, each carrying a hint.
    assert len(sent_to) == len(set(sent_to)) and "n1" not in sent_to
    assert set(sent_to) <= set(up) | set(spare)
    [outcome] = outcomes
    if isinstance(outcome, Done):
        assert isinstance(outcome.result, WriteOutcome)
        assert outcome.result.acknowledged == w and outcome_of(outcome) == contract.OK
        assert outcome.result.acknowledged <= len(acked)
    else:
        assert outcome.indeterminate  # the coordinator holds the write
        assert timer_fired or outcome.error.body()["acknowledged"] < w


@pytest.mark.parametrize("seed", range(200))
def test_a_read_under_any_answer_order_answers_once_and_repairs_only_stale_primaries(seed: int) -> None:
    rng = random.Random(seed)
    versions_held = [None, written(b"a", "x.1"), written(b"b", "y.1"), written(b"c", "x.1")]
    targets = tuple(rng.sample(["n1", "n2", "n3", "n4", "n5"], rng.randint(1, 4)))
    primaries = ("n1", "n2", "n3")
    r = rng.randint(1, len(targets))
    core = read_core(r, targets=targets, primaries=primaries)
    effects = core.start(T0)
    in_flight = {e.call: e.peer for e in effects if isinstance(e, Send)}
    held: dict[str, VersionedObject | None] = {}
    outcomes: list[Done | Failed] = []
    repairs: list[Repair] = []
    repairing = False
    while True:
        for effect in effects:
            if isinstance(effect, Abandon):
                for call in effect.calls:
                    in_flight.pop(call)
            elif isinstance(effect, Repair):
                repairs.append(effect)
            elif isinstance(effect, Done | Failed):
                outcomes.append(effect)
        if outcomes and isinstance(outcomes[0], Done) and not repairing and rng.random() < 0.5:
            repairing = True
            effects = core.begin_repair(T0, 200 * MS)
            continue
        if not in_flight or core.settled:
            break
        if rng.random() < 0.05:
            effects = core.on_timer(DEADLINE)
            continue
        call = rng.choice(sorted(in_flight))
        peer = in_flight.pop(call)
        if rng.random() < 0.7:
            held[peer] = rng.choice(versions_held)
            effects = core.on_reply(call, holding(held[peer]), T0)
        else:
            effects = core.on_failure(call, T0)
    if not outcomes:  # every answer in before R: only the deadline can end it
        effects = core.on_timer(DEADLINE)
        outcomes += [e for e in effects if isinstance(e, Done | Failed)]
    assert len(outcomes) == 1
    [outcome] = outcomes
    if isinstance(outcome, Failed):
        assert not outcome.indeterminate and not repairs
        return
    assert isinstance(outcome.result, ReadOutcome) and outcome.result.replies == r
    assert set(outcome.result.responders) <= set(held)
    if repairing and core.settled:
        merged = versions.sync_all(o for o in held.values() if o is not None)
        stale = [
            t for t in targets
            if t in primaries and t in held
            and (held[t] is None or versions.digest(held[t]) != versions.digest(merged))  # type: ignore[arg-type]
        ] if merged != VersionedObject.empty() else []  # nobody holds anything: nothing is stale
        assert [e.peer for e in repairs] == stale


# --- routing a client write -------------------------------------------------------------------


def router(
    up: tuple[str, ...] = ("n2", "n3", "n4"), down: tuple[str, ...] = (), *, node: str = "n1",
    w: int = 2, sloppy: bool = True,
) -> WriteRouterCore:
    return WriteRouterCore(
        node_id=node, key="k", value=b"v", context={"b": 2, "a": 1}, w=w, sloppy=sloppy,
        targets=WriteTargets(up, down, ()), deadline_ns=DEADLINE,
    )


def coordinated_reply(acknowledged: int = 2) -> dict[str, Any]:
    return {"status": "ok", "obj": versions.encode(written()), "acknowledged": acknowledged, "hinted": ["n5"]}


FULL_DISK = InsufficientStorage("n2: disk full", indeterminate=False)


def test_a_primary_coordinates_here_first() -> None:
    core = router(up=("n2", "n1", "n3"))
    assert core.start(T0) == [CoordinateHere(as_fallback=False)]
    [done] = core.on_coordinated(WriteOutcome(written(), 2), T0)
    assert isinstance(done, Done)


def test_a_non_primary_forwards_to_the_first_primary_up_with_a_margin_on_the_deadline() -> None:
    core = router()
    [forward] = core.start(T0 + 500 * MS)
    assert isinstance(forward, Send) and forward.peer == "n2" and forward.timeout_at_ns == DEADLINE
    assert forward.message == {
        "op": "coordinate_write", "key": "k", "value": b"v", "context": [("a", 1), ("b", 2)], "w": 2,
        "sloppy": True, "timeout_ms": 1500 - FORWARD_MARGIN_MS,
    }
    [done] = core.on_answer(Reply(forward.call, coordinated_reply()), T0)
    assert isinstance(done, Done) and isinstance(done.result, WriteOutcome)
    assert done.result.acknowledged == 2 and done.result.hinted == ["n5"]


@pytest.mark.parametrize("reply", [
    {"status": "ok", "acknowledged": 2},  # an ok answer without its object
    {"status": "ok", "obj": b"not an object", "acknowledged": 2},
    {"status": "maybe"},
    {"status": "ok", "obj": None, "acknowledged": "2"},
], ids=["no-obj", "undecodable-obj", "unknown-status", "str-acknowledged"])
def test_an_illegible_answer_from_the_coordinating_primary_is_indeterminate(reply: dict[str, Any]) -> None:
    # The primary answered, so it may have applied the write: never "certainly not applied",
    # and never an exception out of the core (the old parser raised KeyError on the first row).
    core = router()
    [forward] = core.start(T0)
    assert isinstance(forward, Send)
    [failed] = core.on_answer(Reply(forward.call, reply), T0)
    assert isinstance(failed, Failed) and failed.error.status == 503
    assert failed.error.extra.get("indeterminate") is True and outcome_of(failed) == contract.INFO


def test_a_certain_refusal_moves_on_to_the_next_primary_and_the_first_refusal_is_the_answer() -> None:
    core = router()
    [first] = core.start(T0)
    assert isinstance(first, Send)
    body = {"error": "insufficient_storage", "message": "disk full", "indeterminate": False}
    effects = core.on_answer(Reply(first.call, {"status": "error", "body": body, "http": 507}), T0)
    assert [type(e) for e in effects] == [NoteRefusal, Send]
    assert isinstance(effects[0], NoteRefusal) and effects[0].peer == "n2"
    second = effects[1]
    assert isinstance(second, Send) and second.peer == "n3"
    effects = core.on_answer(RemoteFailed(second.call, RemoteError("n3", "insufficient_storage", "full")), T0)
    assert [type(e) for e in effects] == [NoteRefusal, Send]
    third = effects[1]
    assert isinstance(third, Send) and third.peer == "n4"
    effects = core.on_answer(CallFailed(third.call, maybe_delivered=False), T0)  # never got it
    [failed] = effects
    assert isinstance(failed, Failed) and failed.error.status == 507 and failed.error.message == "disk full"
    assert outcome_of(failed) == contract.FAIL


@pytest.mark.parametrize(
    ("answer", "status", "code", "outcome"),
    [
        (CallFailed(0, maybe_delivered=True), 503, "quorum_unavailable", contract.INFO),
        (Reply(0, {"status": "error", "http": 503, "body": {
            "error": "quorum_unavailable", "message": "1 of 2", "needed": 2, "acknowledged": 1, "indeterminate": True,
        }}), 503, "quorum_unavailable", contract.INFO),
        (Reply(0, {"status": "error", "http": 409, "body": {"error": "consistency_conflict", "message": "cp"}}),
         409, "consistency_conflict", contract.FAIL),
        (RemoteFailed(0, RemoteError("n2", "storage", "EIO")), 503, "quorum_unavailable", contract.INFO),
        (RemoteFailed(0, RemoteError("n2", "overloaded", "busy")), 503, "overloaded", contract.FAIL),
    ],
)
def test_a_forward_answer_that_may_mean_applied_ends_the_request(
    answer: Reply | CallFailed | RemoteFailed, status: int, code: str, outcome: contract.Outcome
) -> None:
    core = router()
    [forward] = core.start(T0)
    assert isinstance(forward, Send) and forward.call == 0
    [failed] = core.on_answer(answer, T0)
    assert isinstance(failed, Failed)
    assert (failed.error.status, failed.error.code, outcome_of(failed)) == (status, code, outcome)


def test_the_deadline_stops_the_failover() -> None:
    core = router()
    [first] = core.start(T0)
    assert isinstance(first, Send)
    body = {"error": "insufficient_storage", "message": "disk full", "indeterminate": False}
    effects = core.on_answer(Reply(first.call, {"status": "error", "body": body, "http": 507}), DEADLINE)
    assert [type(e) for e in effects] == [NoteRefusal, Failed]


def test_strict_writes_refuse_without_w_primaries_and_without_a_reachable_one() -> None:
    [failed] = router(up=("n2",), down=("n3", "n4"), sloppy=False).start(T0)
    assert isinstance(failed, Failed) and failed.error.body()["indeterminate"] is False
    core = router(up=("n2", "n3"), down=("n4",), sloppy=False)
    [first] = core.start(T0)
    assert isinstance(first, Send)
    [second] = core.on_answer(CallFailed(first.call, maybe_delivered=False), T0)
    assert isinstance(second, Send)
    [failed] = core.on_answer(CallFailed(second.call, maybe_delivered=False), T0)
    assert isinstance(failed, Failed) and "no primary reachable" in failed.error.message
    assert outcome_of(failed) == contract.FAIL


def test_sloppy_with_no_primary_reachable_coordinates_here_as_a_fallback_if_one_is_down() -> None:
    core = router(up=("n2",), down=("n3", "n4"))
    [first] = core.start(T0)
    assert isinstance(first, Send)
    assert core.on_answer(CallFailed(first.call, maybe_delivered=False), T0) == [ReadMembership()]
    assert core.on_membership(WriteTargets((), ("n2", "n3", "n4"), ("n1",)), T0) == [CoordinateHere(True)]
    # The fallback attempt is the last: even a certain refusal is the answer.
    [failed] = core.on_coordinated(InsufficientStorage("n1: disk full", indeterminate=False), T0)
    assert isinstance(failed, Failed) and failed.error.status == 507


@pytest.mark.parametrize(("at_ns", "code"), [(T0, "quorum_unavailable"), (DEADLINE, "timeout")])
def test_sloppy_with_every_primary_still_up_fails_certainly(at_ns: int, code: str) -> None:
    core = router()
    effects = core.start(T0)
    for _ in range(3):
        [forward] = effects
        assert isinstance(forward, Send)
        effects = core.on_answer(CallFailed(forward.call, maybe_delivered=False), T0)
    assert effects == [ReadMembership()]
    [failed] = core.on_membership(WriteTargets(("n2", "n3", "n4"), (), ()), at_ns)
    assert isinstance(failed, Failed) and failed.error.code == code and outcome_of(failed) == contract.FAIL


# --- membership changes: the joint phase (docs/membership.md) ---------------------------------

# n4 joins: the key's old owners n1 n2 n3, its new owners n1 n2 n4 (n3 loses the range).
JOIN = JointOwners(old=("n1", "n2", "n3"), new=("n1", "n2", "n4"))


def joint_write_core(
    w: int, joint: JointOwners = JOIN, *, spare: tuple[str, ...] = (), sloppy: bool = False,
    version: int | None = 5,
) -> WriteCoordinatorCore:
    return WriteCoordinatorCore(
        node_id="n1", key="k", token=7, value=b"v", context={}, w=w, sloppy=sloppy,
        plan=plan_write(WriteTargets(joint.old, (), spare), "n1", False, joint), as_fallback=False,
        deadline_ns=DEADLINE, replica_timeout_ns=REPLICA_TIMEOUT, mode="siblings", config_version=version,
    )


@pytest.mark.parametrize(
    ("targets", "node", "as_fallback", "joint", "slots", "spares"),
    [
        # a new owner that is not an old one gets a data slot after the others
        (WriteTargets(("n1", "n2", "n3"), (), ()), "n1", False, JOIN,
         (("n1", None), ("n2", None), ("n3", None), ("n4", None)), ()),
        # a down old owner still gets its stand-in; the new owner its own slot
        (WriteTargets(("n1", "n2"), ("n3",), ("n5",)), "n1", False, JOIN,
         (("n1", None), ("n2", None), ("n5", "n3"), ("n4", None)), ()),
        # both rings agree on the key: nothing more
        (WriteTargets(("n1", "n2", "n3"), (), ()), "n1", False, JointOwners(("n1", "n2", "n3"), ("n3", "n2", "n1")),
         (("n1", None), ("n2", None), ("n3", None)), ()),
        # a fallback coordinator that is a new owner: its own write is that slot (no second one)
        (WriteTargets((), ("n1", "n2", "n3"), ("n4", "n5")), "n4", True, JOIN,
         (("n4", "n1"), ("n5", "n2")), ()),
    ],
)
def test_plan_write_joint_table(
    targets: WriteTargets, node: str, as_fallback: bool, joint: JointOwners,
    slots: tuple[tuple[str, str | None], ...], spares: tuple[str, ...],
) -> None:
    assert plan_write(targets, node, as_fallback, joint) == WritePlan(slots, spares, joint)


def test_a_joint_write_waits_for_w_among_the_new_owners_too() -> None:
    core = joint_write_core(w=2)
    calls = sends(replicating(core))
    assert set(calls) == {"n2", "n3", "n4"}
    # n1 (itself) and n3 make W=2 slots and W among the old owners, but only one new owner (n1).
    assert core.on_reply(calls["n3"].call, OK, T0) == []
    [done] = core.on_reply(calls["n4"].call, OK, T0)
    assert isinstance(done, Done) and isinstance(done.result, WriteOutcome)
    assert done.result.acknowledged == 3
    # Without the joint phase the same answers end the write at n3's ack.
    stable = joint_write_core(w=2, joint=JointOwners(("n1", "n2", "n3"), ("n1", "n2", "n3")))
    stable_calls = sends(replicating(stable))
    [stable_done] = stable.on_reply(stable_calls["n3"].call, OK, T0)
    assert isinstance(stable_done, Done)


def test_a_joint_write_needs_w_among_the_old_owners_too() -> None:
    core = joint_write_core(w=2)
    calls = sends(replicating(core))
    assert core.on_reply(calls["n4"].call, OK, T0) == []  # new: n1, n4; old: n1 only
    assert core.on_failure(calls["n3"].call, T0) == []  # n2 still in flight: it may make both
    [done] = core.on_reply(calls["n2"].call, OK, T0)
    assert isinstance(done, Done)


def test_a_joint_write_short_of_the_new_owners_fails_indeterminate_once_nothing_is_in_flight() -> None:
    core = joint_write_core(w=2)
    calls = sends(replicating(core))
    assert core.on_reply(calls["n3"].call, OK, T0) == []
    assert core.on_failure(calls["n2"].call, T0) == []
    [failed] = core.on_failure(calls["n4"].call, T0)
    assert isinstance(failed, Failed) and failed.indeterminate  # n1 and n3 hold it
    assert failed.error.body()["acknowledged"] == 2
    assert core.settled


def test_a_joint_write_at_its_deadline_short_of_the_new_owners_is_indeterminate() -> None:
    core2 = joint_write_core(w=3)
    calls2 = sends(replicating(core2))
    assert core2.on_reply(calls2["n2"].call, OK, T0) == []
    assert core2.on_reply(calls2["n3"].call, OK, T0) == []  # W=3 slots, old 3/3, new 2/3
    [failed] = core2.on_timer(DEADLINE)
    assert isinstance(failed, Failed) and failed.indeterminate


def test_w2_joint_done_as_soon_as_both_rings_have_two() -> None:
    core = joint_write_core(w=2)
    calls = sends(replicating(core))
    [done] = core.on_reply(calls["n2"].call, OK, T0)  # n1 + n2 are owners in both rings
    assert isinstance(done, Done) and isinstance(done.result, WriteOutcome) and done.result.acknowledged == 2


def test_a_hinted_stand_in_counts_for_the_new_owner_it_stands_in_for() -> None:
    core = joint_write_core(w=2, spare=("n5",), sloppy=True)
    calls = sends(replicating(core))
    assert core.on_reply(calls["n3"].call, OK, T0) == []
    [handoff] = core.on_failure(calls["n4"].call, T0)
    assert isinstance(handoff, Send) and handoff.peer == "n5" and handoff.message["hint_for"] == "n4"
    [done] = core.on_reply(handoff.call, OK, T0)
    assert isinstance(done, Done) and isinstance(done.result, WriteOutcome) and done.result.hinted == ["n5"]


def test_replica_messages_carry_the_version_the_plan_was_made_on() -> None:
    core = joint_write_core(w=2, version=9)
    assert {e.message["cv"] for e in sends(replicating(core)).values()} == {9}
    unstamped = joint_write_core(w=2, version=None)
    assert all("cv" not in e.message for e in sends(replicating(unstamped)).values())
    read = ReadCoordinatorCore(
        key="k", token=7, r=2, targets=("n1", "n2", "n3"), primaries=("n1", "n2", "n3"), deadline_ns=DEADLINE,
        replica_timeout_ns=REPLICA_TIMEOUT, mode="siblings", config_version=9,
    )
    effects = read.start(T0)
    assert [e.message for e in effects if isinstance(e, Send)] == [
        {"op": "replica_get", "key": "k", "token": 7, "cv": 9}
    ] * 3
    calls = sends(effects)
    stale = written(b"other", actor="n9.z")  # concurrent: every primary misses one sibling
    read.on_reply(calls["n1"].call, {"obj": versions.encode(written())}, T0)
    [done] = read.on_reply(calls["n2"].call, {"obj": versions.encode(stale)}, T0)
    assert isinstance(done, Done)
    read.on_reply(calls["n3"].call, {"obj": versions.encode(written())}, T0)
    repairs = [e for e in read.begin_repair(T0, 10 * MS) if isinstance(e, Repair)]
    assert repairs and all(r.message["cv"] == 9 for r in repairs)


def test_a_fenced_replica_call_is_a_failed_call_and_a_fenced_forward_a_certain_failure() -> None:
    core = joint_write_core(w=3)
    calls = sends(replicating(core))
    fenced = {"error": STALE_CONFIG, "remote_error": True, "cv": 6}
    assert core.on_reply(calls["n2"].call, fenced, T0) == []
    assert core.on_reply(calls["n3"].call, OK, T0) == []
    [failed] = core.on_reply(calls["n4"].call, fenced, T0)
    assert isinstance(failed, Failed)
    forward = router()
    [first] = forward.start(T0)
    assert isinstance(first, Send)
    [refused] = forward.on_answer(RemoteFailed(first.call, RemoteError("n2", STALE_CONFIG, "planned on 4")), T0)
    assert isinstance(refused, Failed) and outcome_of(refused) == contract.FAIL
