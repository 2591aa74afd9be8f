"""kvstore.protocol.placement: a key's token, primaries and stand-ins, as one node's failure detector sees them."""

from __future__ import annotations

import pytest

from kvstore.protocol.placement import placement
from kvstore.protocol.ring import TOKEN_MAX, Ring, key_token

MEMBERS = ["n1", "n2", "n3", "n4", "n5"]
RING = Ring(MEMBERS, 64)


def all_up(member: str) -> bool:
    return True


@pytest.mark.parametrize("key", ["user:42", "k", "ü/ß", "x" * 300])
def test_all_up_is_the_ring_walk(key: str) -> None:
    where = placement(RING, key, 3, all_up)
    assert where.token == key_token(key)
    assert where.preference_list == RING.preference_list(key, 3)
    assert where.fallbacks == RING.fallbacks(key, 3)
    assert where.primaries_up == where.preference_list and where.primaries_down == ()
    assert where.stand_ins == {} and where.majority_reachable
    assert where.vnode_token >= where.token or where.vnode_token == min(t for t, _ in RING.vnode_owners())


def test_vnode_token_wraps_past_the_last_vnode() -> None:
    tokens = [t for t, _ in RING.vnode_owners()]
    assert tokens == sorted(tokens) and len(tokens) == 5 * 64
    assert RING.vnode_token_of(TOKEN_MAX) == tokens[0] or tokens[-1] == TOKEN_MAX
    assert RING.vnode_token_of(tokens[3]) == tokens[3]
    assert RING.vnode_token_of(tokens[3] + 1) == tokens[4]


@pytest.mark.parametrize(
    ("down_ranks", "majority"),
    [((0,), True), ((2,), True), ((0, 1), False), ((0, 1, 2), False)],
)
def test_primaries_down_take_the_next_fallbacks_up_in_order(down_ranks: tuple[int, ...], majority: bool) -> None:
    key = "user:7"
    walk = RING.walk(key)
    down = {walk[i] for i in down_ranks}
    where = placement(RING, key, 3, lambda m: m not in down)
    assert set(where.primaries_down) == down
    assert where.majority_reachable is majority
    # Each primary believed down gets the next fallback believed up, in ring order (two fallbacks only).
    expected = dict(zip([p for p in walk[:3] if p in down], walk[3:], strict=False))
    assert where.stand_ins == expected


def test_a_fallback_believed_down_is_skipped() -> None:
    key = "user:9"
    walk = RING.walk(key)
    down = {walk[0], walk[3]}  # the first primary and the first fallback
    where = placement(RING, key, 3, lambda m: m not in down)
    assert where.stand_ins == {walk[0]: walk[4]}
    doc = where.to_json()
    assert doc["fallbacks"] == [{"id": walk[3], "up": False, "stands_in_for": None},
                                {"id": walk[4], "up": True, "stands_in_for": walk[0]}]
    assert doc["primaries_down"] == [walk[0]] and doc["majority_reachable"] is True


# --- machines -------------------------------------------------------------------------------------

SIX = ["n1", "n2", "n3", "n4", "n5", "n6"]
THREE_MACHINES = {"n1": "h1", "n2": "h1", "n3": "h2", "n4": "h2", "n5": "h3", "n6": "h3"}
TWO_MACHINES = {"n1": "h1", "n2": "h1", "n3": "h1", "n4": "h2", "n5": "h2", "n6": "h2"}
KEYS = [f"key-{i}" for i in range(500)]


def test_no_machines_named_reports_each_member_its_own_machine() -> None:
    where = placement(RING, "user:42", 3, all_up)
    assert where.machines == {m: m for m in MEMBERS}
    assert where.shared_machines == ()
    doc = where.to_json()
    assert doc["machines"] == {m: m for m in (*where.preference_list, *where.fallbacks)}
    assert doc["shared_machines"] == []


def test_enough_machines_no_key_shares_one() -> None:
    ring = Ring(SIX, 64, THREE_MACHINES)
    for key in KEYS:
        where = placement(ring, key, 3, all_up)
        assert where.shared_machines == (), key
        assert sorted(where.machines[p] for p in where.preference_list) == ["h1", "h2", "h3"]


def test_fewer_machines_than_n_every_key_names_the_shared_machine() -> None:
    ring = Ring(SIX, 64, TWO_MACHINES)
    for key in KEYS:
        where = placement(ring, key, 3, all_up)
        on = [TWO_MACHINES[p] for p in where.preference_list]
        assert sorted(set(on)) == ["h1", "h2"]  # both machines hold one before either holds two
        assert where.shared_machines == tuple(m for m in ("h1", "h2") if on.count(m) == 2)
        assert where.to_json()["shared_machines"] == list(where.shared_machines)


def test_a_stand_in_goes_to_a_machine_without_a_replica_first() -> None:
    machines = {"n1": "h1", "n2": "h1", "n3": "h2", "n4": "h2", "n5": "h3", "n6": "h4"}
    ring = Ring(SIX, 64, machines)
    for key in KEYS:
        walk = ring.walk(key)
        down = walk[0]
        where = placement(ring, key, 3, lambda m, down=down: m != down)  # type: ignore[misc]
        stand_in = where.stand_ins[down]
        assert machines[stand_in] not in {machines[p] for p in where.preference_list}, key
