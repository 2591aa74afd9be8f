"""Table tests for kvstore.protocol.membership (pure: configs, transitions, placement, joint quorums)."""

from __future__ import annotations

import pytest

from kvstore.protocol.membership import (
    Address,
    ClusterConfig,
    MembershipError,
    Placement,
    fence,
    quorum_possible,
    quorum_reached,
    segment_of,
    write_quorum_reached,
)
from kvstore.protocol.ring import TOKEN_SPACE, Ring, key_token


def addr(i: int) -> Address:
    return Address("127.0.0.1", 7000 + i, 8000 + i)


THREE = ClusterConfig.initial({f"n{i}": addr(i) for i in (1, 2, 3)})
KEYS = [f"key-{i}" for i in range(2000)]


def test_initial_is_stable_version_zero() -> None:
    assert THREE.version == 0 and THREE.phase == "stable"
    assert THREE.members == ("n1", "n2", "n3") and THREE.old == THREE.new


@pytest.mark.parametrize(
    ("step", "phase", "old", "new", "members"),
    [
        (lambda c: c.join("n4", addr(4), 3), "joint", ("n1", "n2", "n3"), ("n1", "n2", "n3", "n4"),
         ("n1", "n2", "n3", "n4")),
        (lambda c: c.join("n4", addr(4), 3).commit(), "stable", ("n1", "n2", "n3", "n4"),
         ("n1", "n2", "n3", "n4"), ("n1", "n2", "n3", "n4")),
        (lambda c: c.join("n4", addr(4), 3).abort(), "stable", ("n1", "n2", "n3"), ("n1", "n2", "n3"),
         ("n1", "n2", "n3")),
        (lambda c: c.join("n4", addr(4), 3).commit().leave("n2", 3), "joint", ("n1", "n2", "n3", "n4"),
         ("n1", "n3", "n4"), ("n1", "n2", "n3", "n4")),
        (lambda c: c.join("n4", addr(4), 3).commit().leave("n2", 3).commit(), "stable", ("n1", "n3", "n4"),
         ("n1", "n3", "n4"), ("n1", "n3", "n4")),
        (lambda c: c.replace("n3", "n9", addr(9), 3), "joint", ("n1", "n2", "n3"), ("n1", "n2", "n9"),
         ("n1", "n2", "n3", "n9")),
        (lambda c: c.replace("n3", "n9", addr(9), 3).commit(), "stable", ("n1", "n2", "n9"),
         ("n1", "n2", "n9"), ("n1", "n2", "n9")),
    ],
)
def test_transitions(step, phase, old, new, members) -> None:  # type: ignore[no-untyped-def]
    config = step(THREE)
    assert (config.phase, config.old, config.new, config.members) == (phase, old, new, members)


def test_every_step_is_one_version() -> None:
    joint = THREE.join("n4", addr(4), 3)
    assert (joint.version, joint.commit().version, joint.abort().version) == (1, 2, 2)


@pytest.mark.parametrize(
    ("step", "code"),
    [
        (lambda c: c.join("n1", addr(9), 3), "already_member"),
        (lambda c: c.join("n9", addr(1), 3), "address_in_use"),
        (lambda c: c.leave("n9", 3), "unknown_member"),
        (lambda c: c.leave("n1", 3), "too_few_members"),
        (lambda c: c.replace("n9", "n8", addr(8), 3), "unknown_member"),
        (lambda c: c.replace("n1", "n2", addr(8), 3), "already_member"),
        (lambda c: c.join("n4", addr(4), 3).join("n5", addr(5), 3), "change_in_progress"),
        (lambda c: c.join("n4", addr(4), 3).leave("n1", 3), "change_in_progress"),
        (lambda c: c.commit(), "no_change_in_progress"),
        (lambda c: c.abort(), "no_change_in_progress"),
    ],
)
def test_refused_changes_have_stable_codes(step, code) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MembershipError) as info:
        step(THREE)
    assert info.value.code == code


def test_wire_round_trip_and_canonical_bytes() -> None:
    for config in (THREE, THREE.join("n4", addr(4), 3), THREE.replace("n2", "n7", addr(7), 3).commit()):
        assert ClusterConfig.decode(config.encode()) == config
        assert ClusterConfig.decode(config.encode()).encode() == config.encode()


@pytest.mark.parametrize(
    "blob",
    [
        b"not json",
        b"[]",
        b'{"version": 1}',
        b'{"version": -1, "phase": "stable", "old": ["a"], "new": ["a"], '
        b'"members": {"a": {"host": "h", "http_port": 1, "peer_port": 2}}}',
        b'{"version": 1, "phase": "joint", "old": ["a"], "new": ["a"], '
        b'"members": {"a": {"host": "h", "http_port": 1, "peer_port": 2}}}',
        b'{"version": 1, "phase": "stable", "old": ["a"], "new": ["a"], '
        b'"members": {"a": {"host": "h", "http_port": 0, "peer_port": 2}}}',
        b'{"version": 1, "phase": "stable", "old": ["a"], "new": ["a"], "members": {}}',
        b'{"version": 1, "phase": "stable", "old": [], "new": [], "members": {}}',
        b'{"version": true, "phase": "stable", "old": ["a"], "new": ["a"], '
        b'"members": {"a": {"host": "h", "http_port": 1, "peer_port": 2}}}',
    ],
)
def test_malformed_configs_are_refused(blob: bytes) -> None:
    with pytest.raises(MembershipError) as info:
        ClusterConfig.decode(blob)
    assert info.value.code == "invalid_config"


@pytest.mark.parametrize(
    ("request_version", "mine", "verdict"), [(3, 3, "current"), (2, 3, "stale"), (4, 3, "newer"), (0, 0, "current")]
)
def test_fence(request_version: int, mine: int, verdict: str) -> None:
    assert fence(request_version, mine) == verdict


def test_stable_placement_is_the_plain_ring() -> None:
    placement = Placement(THREE, 3, 16)
    ring = Ring(["n1", "n2", "n3"], 16)
    for key in KEYS[:200]:
        token = key_token(key)
        assert placement.write_owners(token) == ring.preference_list(key, 3)
        assert placement.acceptor_sets(token) == (ring.preference_list(key, 3),)


def test_joint_placement_reads_old_writes_both() -> None:
    five = ClusterConfig.initial({f"n{i}": addr(i) for i in range(1, 6)})
    joint = five.join("n6", addr(6), 3)
    placement = Placement(joint, 3, 16)
    old_ring, new_ring = Ring(list(five.new), 16), Ring(list(joint.new), 16)
    moved = 0
    for key in KEYS:
        token = key_token(key)
        old, new = old_ring.preference_list(key, 3), new_ring.preference_list(key, 3)
        assert placement.read_ring.preference_list(key, 3) == old
        assert set(placement.write_owners(token)) == set(old) | set(new)
        assert placement.write_owners(token)[:3] == old
        sets = placement.acceptor_sets(token)
        if set(old) == set(new):
            assert sets == (old,)
        else:
            moved += 1
            assert sets == (old, new)
    assert 0 < moved < len(KEYS)  # some keys move to the newcomer, most stay


def test_segments_partition_the_ring_and_match_both_rings() -> None:
    joint = THREE.join("n4", addr(4), 3)
    placement = Placement(joint, 3, 8)
    cuts = placement.segments()
    assert sum((s.end - s.start) % TOKEN_SPACE or TOKEN_SPACE for s in cuts) == TOKEN_SPACE
    for key in KEYS:
        token = key_token(key)
        segment = segment_of(cuts, token)
        assert segment.old_owners == placement.old_owners(token)
        assert segment.new_owners == placement.new_owners(token)
    gained = {m for s in cuts for m in s.gained}
    assert gained == {"n4"}  # minimal movement: only the newcomer receives ranges
    assert {m for s in cuts for m in s.lost} <= {"n1", "n2", "n3"}


@pytest.mark.parametrize(
    ("acked", "sets", "reached"),
    [
        ({"a", "b"}, (("a", "b", "c"),), True),
        ({"a"}, (("a", "b", "c"),), False),
        # joint: a majority of the old set alone is not enough...
        ({"a", "b"}, (("a", "b", "c"), ("b", "c", "d")), False),
        # ...a majority of both is
        ({"b", "c"}, (("a", "b", "c"), ("b", "c", "d")), True),
        ({"a", "b", "d"}, (("a", "b", "c"), ("b", "c", "d")), True),
        ({"a", "d"}, (("a", "b", "c"), ("b", "c", "d")), False),
        # replace: the sets share two of three
        ({"a", "b"}, (("a", "b", "c"), ("a", "b", "e")), True),
        ({"c", "e"}, (("a", "b", "c"), ("a", "b", "e")), False),
    ],
)
def test_joint_quorums(acked: set[str], sets: tuple[tuple[str, ...], ...], reached: bool) -> None:
    assert quorum_reached(acked, sets) is reached


def test_joint_quorum_possibility() -> None:
    sets = (("a", "b", "c"), ("b", "c", "d"))
    assert quorum_possible({"a"}, {"c", "d"}, sets)
    assert not quorum_possible({"a"}, {"d"}, sets)  # c and b both gone: old set has only a


def test_every_joint_quorum_meets_every_old_and_every_new_quorum() -> None:
    """The safety argument, checked exhaustively on a replace (3 -> 3, two shared)."""
    from itertools import combinations

    old, new = ("a", "b", "c"), ("a", "b", "e")
    universe = sorted(set(old) | set(new))
    subsets = [set(c) for k in range(len(universe) + 1) for c in combinations(universe, k)]
    joint = [s for s in subsets if quorum_reached(s, (old, new))]
    old_q = [s for s in subsets if quorum_reached(s, (old,))]
    new_q = [s for s in subsets if quorum_reached(s, (new,))]
    assert joint
    assert all(j & q for j in joint for q in old_q)
    assert all(j & q for j in joint for q in new_q)


@pytest.mark.parametrize(
    ("acked", "reached"),
    [({"a", "b"}, False), ({"a", "b", "d"}, True), ({"b", "c"}, True), ({"c", "d"}, False)],
)
def test_joint_write_quorum(acked: set[str], reached: bool) -> None:
    assert write_quorum_reached(acked, ("a", "b", "c"), ("b", "c", "d"), 2) is reached


# --- machines: part of the configuration, old encodings still decode -----------------------------

# A version-3 configuration exactly as this module encoded it before machines existed.
OLD_ENCODING = (
    b'{"members":{"n1":{"host":"127.0.0.1","http_port":7001,"peer_port":8001},'
    b'"n2":{"host":"127.0.0.1","http_port":7002,"peer_port":8002},'
    b'"n3":{"host":"127.0.0.1","http_port":7003,"peer_port":8003}},'
    b'"new":["n1","n2","n3"],"old":["n1","n2","n3"],"phase":"stable","version":3}'
)


def on_machines(layout: dict[str, str]) -> ClusterConfig:
    return ClusterConfig.initial(
        {m: Address("127.0.0.1", 7000 + i, 8000 + i, machine) for i, (m, machine) in enumerate(sorted(layout.items()))}
    )


SIX_ON_THREE = {"n1": "h1", "n2": "h1", "n3": "h2", "n4": "h2", "n5": "h3", "n6": "h3"}


def test_an_encoding_without_machines_decodes_and_re_encodes_byte_for_byte() -> None:
    config = ClusterConfig.decode(OLD_ENCODING)
    assert config.version == 3 and config.machines == {}
    assert all(address.machine == "" for _, address in config.addresses)
    assert config.encode() == OLD_ENCODING  # a cluster naming no machines writes what it always wrote
    assert ClusterConfig.initial({f"n{i}": addr(i) for i in (1, 2, 3)}).encode() == THREE.encode()


def test_machines_travel_in_the_encoding() -> None:
    config = on_machines(SIX_ON_THREE)
    assert config.machines == SIX_ON_THREE
    wire = config.to_wire()
    assert wire["members"]["n1"]["machine"] == "h1"
    decoded = ClusterConfig.decode(config.encode())
    assert decoded == config and decoded.machines == SIX_ON_THREE
    joined = config.join("n7", Address("127.0.0.1", 7100, 8100, "h4"), 3)
    assert ClusterConfig.decode(joined.encode()).machines == SIX_ON_THREE | {"n7": "h4"}
    assert joined.commit().machines == SIX_ON_THREE | {"n7": "h4"}


@pytest.mark.parametrize(
    "machine", [7, "", "x" * 129, "tab\there", None],
)
def test_malformed_machines_are_refused(machine: object) -> None:
    raw = {"version": 0, "phase": "stable", "old": ["a"], "new": ["a"],
           "members": {"a": {"host": "h", "http_port": 1, "peer_port": 2, "machine": machine}}}
    if machine == "":
        assert ClusterConfig.from_wire(raw).machines == {}  # "" is "a machine of its own"
        return
    with pytest.raises(MembershipError) as info:
        ClusterConfig.from_wire(raw)
    assert info.value.code == "invalid_config"


def test_two_members_may_share_a_machine_never_an_endpoint() -> None:
    config = on_machines({"n1": "h1", "n2": "h1", "n3": "h2"})
    config.join("n4", Address("127.0.0.1", 7050, 8050, "h1"), 3)  # a third process on h1: fine
    with pytest.raises(MembershipError) as info:
        config.join("n4", Address("127.0.0.1", 7000, 8000, "h9"), 3)  # n1's endpoint, another machine
    assert info.value.code == "address_in_use"


def test_placement_puts_replicas_on_distinct_machines() -> None:
    placement = Placement(on_machines(SIX_ON_THREE), 3, 64)
    plain = Placement(ClusterConfig.initial({f"n{i}": addr(i) for i in range(1, 7)}), 3, 64)
    spread = [len({SIX_ON_THREE[m] for m in placement.write_owners(key_token(k))}) for k in KEYS]
    assert spread == [3] * len(KEYS)
    assert any(len({SIX_ON_THREE[m] for m in plain.write_owners(key_token(k))}) < 3 for k in KEYS)
    joint = Placement(on_machines(SIX_ON_THREE).join("n7", Address("127.0.0.1", 7100, 8100, "h4"), 3), 3, 64)
    for key in KEYS[:300]:
        for owners in joint.acceptor_sets(key_token(key)):
            assert len({(SIX_ON_THREE | {"n7": "h4"})[m] for m in owners}) == 3
