"""Table-driven unit tests for kvstore.protocol.quorum (pure; milliseconds)."""

from __future__ import annotations

import itertools

import pytest

from kvstore.protocol.quorum import InvalidQuorum, QuorumTracker, majority, parse_quorum

# --- majority ---------------------------------------------------------------------------------------

MAJORITY_TABLE = [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4), (8, 5), (9, 5)]


@pytest.mark.parametrize(("n", "expected"), MAJORITY_TABLE)
def test_majority_table(n: int, expected: int) -> None:
    assert majority(n) == expected


@pytest.mark.parametrize("n", range(1, 40))
def test_majority_is_the_smallest_intersecting_quorum(n: int) -> None:
    m = majority(n)
    assert 1 <= m <= n
    assert 2 * m > n  # any two majorities intersect: R = W = quorum gives R + W > N
    assert 2 * (m - 1) <= n  # and one fewer would not


@pytest.mark.parametrize("n", [0, -1])
def test_majority_of_nothing_asserts(n: int) -> None:
    with pytest.raises(AssertionError):
        majority(n)


# --- parse_quorum -----------------------------------------------------------------------------------

# (text, n, default, expected)
PARSE_OK = [
    (None, 3, 2, 2),
    ("", 3, 2, 2),
    (None, 5, 1, 1),
    ("", 1, 1, 1),
    (1, 3, 2, 1),
    (2, 3, 1, 2),
    (3, 3, 1, 3),
    ("1", 3, 2, 1),
    ("3", 3, 2, 3),
    (" 2 ", 3, 1, 2),
    ("02", 3, 1, 2),
    ("5", 5, 1, 5),
    ("one", 3, 2, 1),
    ("ONE", 3, 2, 1),
    ("One", 5, 3, 1),
    (" one ", 3, 2, 1),
    ("quorum", 3, 1, 2),
    ("QUORUM", 3, 1, 2),
    ("Quorum", 5, 1, 3),
    ("quorum", 4, 1, 3),
    ("quorum", 1, 1, 1),
    ("quorum", 2, 1, 2),
    ("all", 3, 1, 3),
    ("ALL", 5, 1, 5),
    ("aLl", 1, 1, 1),
]


@pytest.mark.parametrize(("text", "n", "default", "expected"), PARSE_OK)
def test_parse_quorum_accepts(text: str | int | None, n: int, default: int, expected: int) -> None:
    assert parse_quorum(text, n, default) == expected


PARSE_BAD = [
    0,
    4,
    -1,
    100,
    "0",
    "4",
    "-1",
    "-0",
    "abc",
    "majority",
    "on e",
    "one!",
    " ",
    "2.0",
    "1e1",
    "0x2",
    "two",
    True,
    False,
    2.0,
    1.5,
    float("nan"),
    b"2",
    [2],
    {"r": 2},
    "9" * 5000,  # beyond int()'s digit limit: still InvalidQuorum, not a bare ValueError leak
]


@pytest.mark.parametrize("text", PARSE_BAD, ids=repr)
def test_parse_quorum_rejects(text: object) -> None:
    with pytest.raises(InvalidQuorum) as info:
        parse_quorum(text, 3, 2)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)  # the API maps it to 400


def test_parse_quorum_error_names_the_parameter() -> None:
    with pytest.raises(InvalidQuorum, match=r"w=7"):
        parse_quorum("7", 3, 2, name="w")
    with pytest.raises(InvalidQuorum, match=r"^w="):
        parse_quorum("nope", 3, 2, name="w")


@pytest.mark.parametrize(("n", "default"), [(3, 0), (3, 4), (1, 2), (0, 1)])
def test_parse_quorum_bad_default_asserts(n: int, default: int) -> None:
    with pytest.raises(AssertionError):
        parse_quorum(None, n, default)


# --- QuorumTracker ----------------------------------------------------------------------------------

# (needed, total, events, expected state after each event as (satisfied, impossible, pending))
# "A" = ack, "F" = fail.
TRACKER_TABLE = [
    (1, 1, "A", [(True, False, 0)]),
    (1, 1, "F", [(False, True, 0)]),
    (2, 3, "AA", [(False, False, 2), (True, False, 1)]),
    (2, 3, "AFA", [(False, False, 2), (False, False, 1), (True, False, 0)]),
    # W=2 of 3: the second failure makes success impossible with one reply still pending.
    (2, 3, "FF", [(False, False, 2), (False, True, 1)]),
    (2, 3, "AFF", [(False, False, 2), (False, False, 1), (False, True, 0)]),
    # All-of-3: a single failure is already fatal.
    (3, 3, "F", [(False, True, 2)]),
    (3, 3, "AAF", [(False, False, 2), (False, False, 1), (False, True, 0)]),
    # One-of-3 survives two failures.
    (1, 3, "FFA", [(False, False, 2), (False, False, 1), (True, False, 0)]),
    (1, 3, "FFF", [(False, False, 2), (False, False, 1), (False, True, 0)]),
    (3, 5, "FFF", [(False, False, 4), (False, False, 3), (False, True, 2)]),
    (3, 5, "AAA", [(False, False, 4), (False, False, 3), (True, False, 2)]),
]


@pytest.mark.parametrize(("needed", "total", "events", "states"), TRACKER_TABLE)
def test_tracker_table(needed: int, total: int, events: str, states: list[tuple[bool, bool, int]]) -> None:
    tracker = QuorumTracker(needed=needed, total=total)
    assert (tracker.satisfied, tracker.impossible, tracker.done, tracker.pending) == (
        False,
        False,
        False,
        total,
    )
    for i, (event, (satisfied, impossible, pending)) in enumerate(zip(events, states, strict=True)):
        if event == "A":
            tracker.ack(f"m{i}")
        else:
            tracker.fail()
        assert (tracker.satisfied, tracker.impossible, tracker.pending) == (satisfied, impossible, pending)
        assert tracker.done is (satisfied or impossible)
    assert tracker.responders == [f"m{i}" for i, e in enumerate(events) if e == "A"]


def _can_still_succeed(needed: int, acks: int, remaining: int) -> bool:
    """Brute force: does some sequence of the remaining outcomes reach ``needed`` acks?"""
    return any(acks + rest.count("A") >= needed for rest in itertools.product("AF", repeat=remaining))


@pytest.mark.parametrize(("needed", "total"), [(w, n) for n in range(1, 6) for w in range(1, n + 1)])
def test_tracker_exhaustively_against_brute_force(needed: int, total: int) -> None:
    # Every possible reply sequence: satisfied exactly at the needed-th ack; impossible exactly at
    # the first moment no continuation can succeed (not earlier, not later: "as early as possible").
    for events in itertools.product("AF", repeat=total):
        tracker = QuorumTracker(needed=needed, total=total)
        acks = fails = 0
        for event in events:
            if event == "A":
                tracker.ack("m")
                acks += 1
            else:
                tracker.fail()
                fails += 1
            remaining = total - acks - fails
            assert tracker.pending == remaining
            assert (tracker.acknowledged, tracker.failed) == (acks, fails)
            assert tracker.satisfied is (acks >= needed)
            assert tracker.impossible is (not _can_still_succeed(needed, acks, remaining))
            assert not (tracker.satisfied and tracker.impossible)
            assert tracker.done is (tracker.satisfied or tracker.impossible)
        assert tracker.done  # once every replica answered, the outcome is decided


@pytest.mark.parametrize("events", ["AAA", "FFF", "AFA", "FAF"])
def test_tracker_asserts_on_more_outcomes_than_replicas(events: str) -> None:
    tracker = QuorumTracker(needed=2, total=3)
    for event in events:
        tracker.ack("m") if event == "A" else tracker.fail()
    before = (tracker.acknowledged, tracker.failed, list(tracker.responders))
    with pytest.raises(AssertionError):
        tracker.ack("extra")
    with pytest.raises(AssertionError):
        tracker.fail()
    assert (tracker.acknowledged, tracker.failed, tracker.responders) == before  # unchanged


@pytest.mark.parametrize(("needed", "total"), [(0, 3), (4, 3), (1, 0), (0, 0), (-1, 3)])
def test_tracker_rejects_impossible_parameters(needed: int, total: int) -> None:
    with pytest.raises(AssertionError):
        QuorumTracker(needed=needed, total=total)


def test_trackers_do_not_share_responders() -> None:
    a, b = QuorumTracker(1, 2), QuorumTracker(1, 2)
    a.ack("x")
    assert b.responders == []
