"""Table-driven and seeded-random unit tests for kvstore.protocol.versions (pure; about a second)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import msgpack
import pytest

from kvstore.protocol.versions import (
    MAX_CONTEXT_COUNTER,
    MAX_CONTEXT_ENTRIES,
    ConflictMode,
    InvalidContext,
    Sibling,
    VersionedObject,
    concurrent,
    decode,
    decode_vector,
    descends,
    digest,
    encode,
    encode_vector,
    merge_vectors,
    supersedes,
    sync,
    sync_all,
    update,
)

E = VersionedObject.empty()
NODES = ("n1", "n2", "n3")


def values(obj: VersionedObject) -> list[bytes | None]:
    """The sibling values, order-independent (tombstones sort first)."""
    return sorted((s.value for s in obj.siblings), key=lambda v: (v is not None, v or b""))


# --- vector algebra ---------------------------------------------------------------------------------

# (a, b, descends(a, b), descends(b, a), concurrent(a, b))
VECTOR_TABLE = [
    ({}, {}, True, True, False),
    ({"a": 1}, {}, True, False, False),
    ({"a": 2}, {"a": 1}, True, False, False),
    ({"a": 1}, {"a": 1}, True, True, False),
    ({"a": 1, "b": 1}, {"a": 1}, True, False, False),
    ({"a": 1}, {"b": 1}, False, False, True),
    ({"a": 2, "b": 1}, {"a": 1, "b": 2}, False, False, True),
    ({"a": 1, "b": 5}, {"a": 1, "b": 5, "c": 1}, False, True, False),
    ({"a": 3}, {"a": 2, "b": 1}, False, False, True),
    # A zero entry means "nothing seen": it never breaks descent.
    ({}, {"a": 0}, True, True, False),
    ({"a": 0}, {"b": 0}, True, True, False),
]


@pytest.mark.parametrize(("a", "b", "a_ge_b", "b_ge_a", "conc"), VECTOR_TABLE)
def test_descends_and_concurrent(a: dict, b: dict, a_ge_b: bool, b_ge_a: bool, conc: bool) -> None:
    assert descends(a, b) is a_ge_b
    assert descends(b, a) is b_ge_a
    assert concurrent(a, b) is conc
    assert concurrent(b, a) is conc


MERGE_TABLE = [
    ({}, {}, {}),
    ({"a": 1}, {}, {"a": 1}),
    ({}, {"a": 1}, {"a": 1}),
    ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
    ({"a": 3}, {"a": 1}, {"a": 3}),
    ({"a": 1}, {"a": 3}, {"a": 3}),
    ({"a": 2, "b": 1}, {"a": 1, "b": 2, "c": 7}, {"a": 2, "b": 2, "c": 7}),
]


@pytest.mark.parametrize(("a", "b", "expected"), MERGE_TABLE)
def test_merge_vectors(a: dict, b: dict, expected: dict) -> None:
    a_copy, b_copy = dict(a), dict(b)
    merged = merge_vectors(a, b)
    assert merged == expected
    assert merge_vectors(b, a) == expected
    assert descends(merged, a) and descends(merged, b)
    assert (a, b) == (a_copy, b_copy)  # inputs untouched
    merged["zzz"] = 1
    assert "zzz" not in a and "zzz" not in b  # the result is a fresh dict


# --- update / sync scenarios ------------------------------------------------------------------------

# A tiny script language over three replicas (one per coordinator), each step one of:
#   ("put", node, ctx, value)   node coordinates a client write; ctx is None (blind) or a snapshot name
#   ("read", name, node)        snapshot node's clock as a client's context
#   ("sync", dst, src)          dst merges src's object (a replica_put / read repair)
# then the expected sibling values and clock of one replica.
Step = tuple
SCENARIOS: list[tuple[str, list[Step], str, list[bytes | None], dict[str, int]]] = [
    ("blind write on empty", [("put", "n1", None, b"a")], "n1", [b"a"], {"n1": 1}),
    (
        "read context supersedes (same coordinator)",
        [("put", "n1", None, b"a"), ("read", "c", "n1"), ("put", "n1", "c", b"b")],
        "n1",
        [b"b"],
        {"n1": 2},
    ),
    (
        "read context supersedes (other coordinator)",
        [("put", "n1", None, b"a"), ("sync", "n2", "n1"), ("read", "c", "n1"), ("put", "n2", "c", b"b")],
        "n2",
        [b"b"],
        {"n1": 1, "n2": 1},
    ),
    (
        "context covers a value the coordinator never stored; sync drops it",
        [("put", "n1", None, b"a"), ("read", "c", "n1"), ("put", "n2", "c", b"b"), ("sync", "n1", "n2")],
        "n1",
        [b"b"],
        {"n1": 1, "n2": 1},
    ),
    (
        "two writes, same stale context, same coordinator: both kept",
        [("put", "n1", None, b"a"), ("read", "c", "n1"), ("put", "n1", "c", b"x"), ("put", "n1", "c", b"y")],
        "n1",
        [b"x", b"y"],
        {"n1": 3},
    ),
    (
        "two writes, same stale context, different coordinators: both kept after sync",
        [
            ("put", "n1", None, b"a"),
            ("sync", "n2", "n1"),
            ("read", "c", "n1"),
            ("put", "n1", "c", b"x"),
            ("put", "n2", "c", b"y"),
            ("sync", "n1", "n2"),
        ],
        "n1",
        [b"x", b"y"],
        {"n1": 2, "n2": 1},
    ),
    (
        "write with the merged context resolves every sibling",
        [
            ("put", "n1", None, b"a"),
            ("read", "c", "n1"),
            ("put", "n1", "c", b"x"),
            ("put", "n1", "c", b"y"),
            ("put", "n1", None, b"z"),
            ("read", "m", "n1"),
            ("put", "n2", "m", b"resolved"),
            ("sync", "n1", "n2"),
        ],
        "n1",
        [b"resolved"],
        {"n1": 4, "n2": 1},
    ),
    (
        "blind write is concurrent with what is stored",
        [("put", "n1", None, b"a"), ("put", "n1", None, b"b")],
        "n1",
        [b"a", b"b"],
        {"n1": 2},
    ),
    (
        "a context supersedes exactly what it saw",
        [
            ("put", "n1", None, b"a"),
            ("read", "c", "n1"),
            ("put", "n2", None, b"b"),
            ("sync", "n1", "n2"),
            ("put", "n1", "c", b"x"),
        ],
        "n1",
        [b"b", b"x"],
        {"n1": 2, "n2": 1},
    ),
    (
        "unsynced replicas keep their own siblings until they sync",
        [("put", "n1", None, b"a"), ("put", "n2", None, b"b")],
        "n2",
        [b"b"],
        {"n2": 1},
    ),
    (
        "concurrent blind writes on two replicas become siblings",
        [("put", "n1", None, b"a"), ("put", "n2", None, b"b"), ("sync", "n3", "n1"), ("sync", "n3", "n2")],
        "n3",
        [b"a", b"b"],
        {"n1": 1, "n2": 1},
    ),
    (
        "delete with context leaves one tombstone",
        [("put", "n1", None, b"a"), ("read", "c", "n1"), ("put", "n1", "c", None)],
        "n1",
        [None],
        {"n1": 2},
    ),
    (
        "delete concurrent with a write: the write survives beside the tombstone",
        [
            ("put", "n1", None, b"a"),
            ("sync", "n2", "n1"),
            ("read", "c", "n1"),
            ("put", "n1", "c", None),
            ("put", "n2", "c", b"b"),
            ("sync", "n1", "n2"),
        ],
        "n1",
        [None, b"b"],
        {"n1": 2, "n2": 1},
    ),
    (
        "write after a delete, with its context, resurrects the key",
        [
            ("put", "n1", None, b"a"),
            ("read", "c", "n1"),
            ("put", "n1", "c", None),
            ("read", "d", "n1"),
            ("put", "n3", "d", b"again"),
            ("sync", "n1", "n3"),
        ],
        "n1",
        [b"again"],
        {"n1": 2, "n3": 1},
    ),
    (
        "a stale sync does not resurrect superseded values",
        [
            ("put", "n1", None, b"a"),
            ("sync", "n2", "n1"),
            ("read", "c", "n1"),
            ("put", "n1", "c", b"b"),
            ("sync", "n1", "n2"),
        ],
        "n1",
        [b"b"],
        {"n1": 2},
    ),
]


def run_script(steps: list[Step], mode: ConflictMode = "siblings") -> dict[str, VersionedObject]:
    replicas = dict.fromkeys(NODES, E)
    contexts: dict[str, dict[str, int]] = {}
    for ts, step in enumerate(steps, start=1):
        if step[0] == "put":
            _, node, ctx_name, value = step
            ctx = contexts[ctx_name] if ctx_name else {}
            replicas[node] = update(replicas[node], ctx, node, value, ts * 1000, mode)
        elif step[0] == "read":
            _, name, node = step
            contexts[name] = replicas[node].vector()
        else:
            _, dst, src = step
            replicas[dst] = sync(replicas[dst], replicas[src], mode)
        for obj in replicas.values():
            obj.check_invariants()
    return replicas


@pytest.mark.parametrize(
    ("steps", "where", "expected_values", "expected_clock"),
    [s[1:] for s in SCENARIOS],
    ids=[s[0] for s in SCENARIOS],
)
def test_scenario(steps: list[Step], where: str, expected_values: list, expected_clock: dict) -> None:
    obj = run_script(steps)[where]
    assert values(obj) == expected_values
    assert obj.vector() == expected_clock
    assert obj.is_deleted is (bool(expected_values) and all(v is None for v in expected_values))
    assert sorted(obj.live_values) == [v for v in expected_values if v is not None]


def test_update_on_empty_with_empty_context() -> None:
    obj = update(E, {}, "n1", b"v", 123)
    assert obj == VersionedObject((("n1", 1),), (Sibling("n1", 1, 123, b"v"),))
    assert not obj.is_deleted and obj.live_values == [b"v"]


def test_update_is_pure() -> None:
    stored = update(E, {}, "n1", b"a", 1)
    ctx = {"n1": 1, "x": 4}
    update(stored, ctx, "n2", b"b", 2)
    assert stored == update(E, {}, "n1", b"a", 1)
    assert ctx == {"n1": 1, "x": 4}


def test_counter_never_reuses_a_dot_the_context_has_seen() -> None:
    # The coordinator lost its state (empty object) but the client saw n1's dots up to 5:
    # the new dot must be fresh, or it would be mistaken for one of those.
    obj = update(E, {"n1": 5}, "n1", b"v", 1)
    assert [s.dot for s in obj.siblings] == [("n1", 6)]
    assert obj.vector() == {"n1": 6}


def test_zero_context_entries_are_not_stored() -> None:
    obj = update(E, {"n2": 0}, "n1", b"v", 1)
    assert obj.clock == (("n1", 1),)


def test_empty_value_is_not_a_tombstone() -> None:
    obj = update(E, {}, "n1", b"", 1)
    assert not obj.is_deleted and obj.live_values == [b""]


@pytest.mark.parametrize(
    ("obj", "deleted"),
    [
        (E, False),  # absent, not deleted
        (update(E, {}, "n1", None, 1), True),
        (update(update(E, {}, "n1", None, 1), {}, "n2", None, 2), True),
        (update(update(E, {}, "n1", None, 1), {}, "n2", b"x", 2), False),
    ],
)
def test_is_deleted(obj: VersionedObject, deleted: bool) -> None:
    assert obj.is_deleted is deleted


def test_supersedes() -> None:
    a = update(E, {}, "n1", b"a", 1)
    b = update(E, {}, "n2", b"b", 2)
    both = sync(a, b)
    assert supersedes(both, a) and supersedes(both, b) and supersedes(a, a) and supersedes(a, E)
    assert not supersedes(a, b) and not supersedes(b, a) and not supersedes(a, both)


# --- seeded random histories ------------------------------------------------------------------------


@dataclass
class History:
    replicas: dict[str, VersionedObject]
    objects: list[VersionedObject] = field(default_factory=list)  # every state any replica passed through
    writes: list[tuple[Sibling, dict[str, int]]] = field(default_factory=list)  # (new sibling, its context)
    syncs: list[tuple[VersionedObject, VersionedObject, VersionedObject]] = field(default_factory=list)


def random_history(seed: int, mode: ConflictMode = "siblings", steps: int = 50) -> History:
    """Random client writes at 3 coordinators (blind, or with a context read from one replica or
    merged from two) and random one- or two-way syncs, checking the invariants after every step."""
    rng = random.Random(seed)
    history = History(dict.fromkeys(NODES, E), [E])
    # Each coordinator's wall clock is off by its own skew, so a causally later write often
    # carries a smaller timestamp (and coarse ticks make exact ties happen too).
    skew = {node: rng.randint(-40, 40) for node in NODES}
    for step in range(steps):
        replicas = history.replicas
        if rng.random() < 0.55:
            coordinator = rng.choice(NODES)
            source = rng.randrange(4)
            if source == 0:
                ctx: dict[str, int] = {}
            elif source == 1:
                ctx = replicas[rng.choice(NODES)].vector()
            else:
                ctx = sync_all([replicas[n] for n in rng.sample(NODES, 2)], mode).vector()
            value = None if rng.random() < 0.15 else f"v{step}".encode()
            ts = 1_000 + 10 * step + skew[coordinator]
            before = replicas[coordinator]
            after = update(before, ctx, coordinator, value, ts, mode)
            new = Sibling(coordinator, after.vector()[coordinator], ts, value)
            assert new.counter == before.vector().get(coordinator, 0) + 1
            if mode == "siblings":
                assert new in after.siblings
                # What the client saw is gone; what it did not see is kept.
                assert set(after.siblings) == {new} | {
                    s for s in before.siblings if s.counter > ctx.get(s.node, 0)
                }
            else:
                # Pure LWW: the context does not matter; the greatest timestamp of all wins,
                # even over a causally later write with a smaller timestamp.
                assert list(after.siblings) == [max([*before.siblings, new], key=Sibling.lww_key)]
            history.writes.append((new, ctx))
            replicas[coordinator] = after
        else:
            a, b = rng.sample(NODES, 2)
            merged = sync(replicas[a], replicas[b], mode)
            history.syncs.append((replicas[a], replicas[b], merged))
            replicas[a] = merged
            if rng.random() < 0.5:
                replicas[b] = merged
        for obj in replicas.values():
            obj.check_invariants()
            if mode == "lww":
                assert len(obj.siblings) <= 1
        history.objects.extend(replicas.values())
    return history


SEEDS = range(150)


def assert_semilattice(objects: list[VersionedObject], rng: random.Random, mode: ConflictMode) -> None:
    pool = list(dict.fromkeys(objects))  # distinct states, in first-seen order
    for x in pool:
        assert sync(x, x, mode) == x
        assert sync(x, E, mode) == x == sync(E, x, mode)
    for _ in range(60):
        x, y, z = (rng.choice(pool) for _ in range(3))
        xy = sync(x, y, mode)
        assert xy == sync(y, x, mode)
        assert sync(xy, z, mode) == sync(x, sync(y, z, mode), mode)
        assert sync(xy, x, mode) == xy  # absorbing: re-merging an input changes nothing
        xy.check_invariants()


@pytest.mark.parametrize("seed", SEEDS)
def test_random_history_siblings(seed: int) -> None:
    history = random_history(seed)
    rng = random.Random(~seed)
    assert_semilattice(history.objects, rng, "siblings")

    for a, b, merged in history.syncs:
        va, vb = a.vector(), b.vector()
        assert merged.vector() == merge_vectors(va, vb)
        assert set(merged.siblings) <= set(a.siblings) | set(b.siblings)
        # Never lose a sibling the other side has not seen (or also has).
        for mine, their_clock, theirs in ((a, vb, b), (b, va, a)):
            for s in mine.siblings:
                if s in theirs.siblings or s.counter > their_clock.get(s.node, 0):
                    assert s in merged.siblings

    # Ground truth once everything is exchanged: exactly the writes no client context ever covered.
    converged = sync_all(history.replicas.values())
    expected = {
        w for w, _ in history.writes if not any(w.counter <= ctx.get(w.node, 0) for _, ctx in history.writes)
    }
    assert set(converged.siblings) == expected
    # Gossip order does not matter.
    for order in itertools.permutations(history.replicas.values()):
        assert sync_all(order) == converged


@pytest.mark.parametrize("seed", SEEDS)
def test_random_history_lww(seed: int) -> None:
    history = random_history(seed, mode="lww")
    rng = random.Random(~seed)
    assert_semilattice(history.objects, rng, "lww")
    for a, b, merged in history.syncs:
        assert merged.vector() == merge_vectors(a.vector(), b.vector())
        candidates = [*a.siblings, *b.siblings]
        # Exactly the greatest (timestamp_ns, node, counter) of both sides survives; a merge of
        # two non-empty replicas never ends up with no value at all.
        assert list(merged.siblings) == ([max(candidates, key=Sibling.lww_key)] if candidates else [])
    converged = sync_all(history.replicas.values(), "lww")
    for order in itertools.permutations(history.replicas.values()):
        assert sync_all(order, "lww") == converged
    if any(obj.siblings for obj in history.replicas.values()):
        assert len(converged.siblings) == 1


# --- last-write-wins --------------------------------------------------------------------------------

# (writes as (node, timestamp_ns, value), all blind and concurrent) -> the single survivor's value
LWW_TABLE = [
    ([("n1", 100, b"a"), ("n2", 50, b"b")], b"a"),
    ([("n1", 50, b"a"), ("n2", 100, b"b")], b"b"),
    ([("n1", 100, b"a"), ("n2", 100, b"b")], b"b"),  # timestamp tie: the greater node id wins
    ([("n2", 100, b"a"), ("n1", 100, b"b")], b"a"),
    ([("n1", 100, b"a"), ("n1", 100, b"b")], b"b"),  # same node, same instant: the later counter
    ([("n1", 100, b"a"), ("n2", 200, None), ("n3", 150, b"c")], None),  # a newer delete wins
    ([("n1", 300, b"a"), ("n2", 200, None)], b"a"),  # an older delete loses
]


@pytest.mark.parametrize(("writes", "winner"), LWW_TABLE)
def test_lww_keeps_exactly_the_greatest(
    writes: list[tuple[str, int, bytes | None]], winner: bytes | None
) -> None:
    # Same replica (updates) ...
    obj = E
    for node, ts, value in writes:
        obj = update(obj, {}, node, value, ts, "lww")
        assert len(obj.siblings) == 1
    assert obj.siblings[0].value == winner
    # ... and separate replicas merged in every order give the same single survivor (only when
    # the nodes differ: one node's writes on separate empty replicas would reuse dot (node, 1)).
    if len({node for node, _, _ in writes}) < len(writes):
        return
    singles = [update(E, {}, node, value, ts, "lww") for node, ts, value in writes]
    for order in itertools.permutations(singles):
        merged = sync_all(order, "lww")
        assert [s.value for s in merged.siblings] == [winner]


def test_lww_skewed_clock_wins_and_acknowledged_write_is_lost() -> None:
    # The experiment: n1's clock runs an hour fast.  Its write lands first; a client then reads
    # it and writes a newer value through n2 (correct clock).  Once replicas exchange state, the
    # skewed timestamp wins everywhere and the acknowledged later write is gone.
    hour = 3600 * 10**9
    now = 1_700_000_000 * 10**9
    old = update(E, {}, "n1", b"old", now + hour, "lww")
    replicas = {"n1": old, "n2": old, "n3": E}
    ctx = replicas["n2"].vector()
    replicas["n2"] = update(replicas["n2"], ctx, "n2", b"new", now + 10**9, "lww")
    blind = update(replicas["n3"], {}, "n3", b"blind", now + 2 * 10**9, "lww")
    replicas["n3"] = blind
    for order in itertools.permutations(replicas.values()):
        converged = sync_all(order, "lww")
        assert [s.value for s in converged.siblings] == [b"old"]
        assert converged.siblings[0].timestamp_ns == now + hour


def test_lww_merge_never_drops_every_value() -> None:
    # Regression: three replicas that each saw a different subset of the same three writes.
    # Causal dropping in lww mode made sync non-associative; two replicas could each discard the
    # other's survivor and a third sync left the key with no value at all (not even a tombstone).
    x = update(E, {}, "a", b"x", 30, "lww")
    y = update(E, {}, "b", b"y", 20, "lww")
    z = update(x, x.vector(), "c", b"z", 5, "lww")  # read x, then write z through a slow clock
    left = sync(sync(x, y, "lww"), z, "lww")
    right = sync(x, sync(y, z, "lww"), "lww")
    assert left == right
    merged = sync(left, right, "lww")
    assert [s.value for s in merged.siblings] == [b"x"]


# --- bounds -----------------------------------------------------------------------------------------


def test_clock_size_bounded_by_coordinators() -> None:
    members = [f"m{i}" for i in range(5)]
    rng = random.Random(2024)
    replicas = dict.fromkeys(members, E)
    for i in range(1000):
        coordinator = rng.choice(members)
        ctx = replicas[rng.choice(members)].vector() if rng.random() < 0.9 else {}
        replicas[coordinator] = update(replicas[coordinator], ctx, coordinator, b"v", i)
        if rng.random() < 0.3:
            a, b = rng.sample(members, 2)
            replicas[a] = replicas[b] = sync(replicas[a], replicas[b])
        assert len(replicas[coordinator].clock) <= 5
    final = sync_all(replicas.values())
    assert [node for node, _ in final.clock] == members
    assert sum(counter for _, counter in final.clock) == 1000  # one dot per write, none reused


# Sibling explosion.  With plain per-server vector clocks (Riak before 2.0 "vnode vclocks"), a
# write's version is the client's context with the coordinator's entry bumped.  Two clients
# writing through the same coordinator with the same stale context then produce the *same* clock
# for different values: either one silently overwrites the other (a lost update) or, as Riak did,
# both are kept as siblings that no later context can name individually, so every interleaved
# read->write adds one more and siblings grow with the number of writes.  With dots, each
# client's write supersedes exactly the write it saw, so at most one sibling per client survives.
@pytest.mark.parametrize("clients", [2, 3])
@pytest.mark.parametrize("coordinators", [("n1",), NODES])
@pytest.mark.parametrize("seed", range(8))
def test_sibling_explosion_is_bounded_by_clients(
    clients: int, coordinators: tuple[str, ...], seed: int
) -> None:
    rng = random.Random(seed)
    replicas = dict.fromkeys(NODES, E)
    contexts: list[dict[str, int]] = [{} for _ in range(clients)]  # each client's latest context
    peak = 0
    writes = 0
    for step in range(300):
        client = rng.randrange(clients)
        roll = rng.random()
        if roll < 0.3:
            # A read through any replica; the client session never forgets what it has seen.
            contexts[client] = merge_vectors(contexts[client], replicas[rng.choice(NODES)].vector())
        elif roll < 0.85:
            coordinator = rng.choice(coordinators)
            replicas[coordinator] = update(
                replicas[coordinator], contexts[client], coordinator, f"c{client}.{step}".encode(), step
            )
            contexts[client] = replicas[coordinator].vector()  # the write's reply carries the new context
            writes += 1
        else:
            a, b = rng.sample(NODES, 2)
            replicas[a] = replicas[b] = sync(replicas[a], replicas[b])
        merged = sync_all(replicas.values())
        for obj in [*replicas.values(), merged]:
            assert len(obj.siblings) <= clients
        peak = max(peak, len(merged.siblings))
    assert writes > 100
    assert peak >= 2  # the interleaving did produce real concurrency


# --- encoding ---------------------------------------------------------------------------------------

SPECIAL_OBJECTS = [
    E,
    update(E, {}, "n1", None, 1),
    update(E, {}, "n1", b"", 0),
    update(E, {}, "ключ-узел", "значение".encode(), 2**63 - 1),
    update(E, {"n1": 2**63 - 2}, "n1", bytes(range(256)), -5),
    sync(update(E, {}, "n1", b"a", 1), update(E, {}, "n2", None, 2)),
]


@pytest.mark.parametrize("obj", SPECIAL_OBJECTS)
def test_encode_decode_round_trip_special(obj: VersionedObject) -> None:
    blob = encode(obj)
    assert isinstance(blob, bytes)
    assert decode(blob) == obj
    assert encode(decode(blob)) == blob


def test_encode_decode_round_trip_random() -> None:
    for seed in range(20):
        for obj in set(random_history(seed).objects):
            assert decode(encode(obj)) == obj


DIGEST_TABLE = [
    # (a, b, equal digests?)
    (E, E, True),
    (update(E, {}, "n1", b"a", 1), update(E, {}, "n1", b"a", 1), True),
    # Same clock and dots: a dot names one write, so the payload/timestamp is not hashed.
    (update(E, {}, "n1", b"a", 1), update(E, {}, "n1", b"other", 99), True),
    (update(E, {}, "n1", b"a", 1), update(E, {}, "n1", None, 1), False),  # tombstone flag is hashed
    (update(E, {}, "n1", b"a", 1), update(E, {}, "n2", b"a", 1), False),
    (update(E, {}, "n1", b"a", 1), update(E, {"n1": 1}, "n1", b"a", 1), False),
    (update(E, {}, "n1", b"a", 1), update(E, {"n2": 1}, "n1", b"a", 1), False),  # clock differs only
    (update(E, {}, "n1", b"a", 1), E, False),
    # Member ids may contain ':' and ',' (config allows them; contexts carry any string):
    # the fingerprint must still separate fields unambiguously.
    (
        VersionedObject((("a:1,b", 2),), ()),
        VersionedObject((("a", 1), ("b", 2)), ()),
        False,
    ),
    (
        VersionedObject((("a", 1), ("b", 2)), (Sibling("a:1:v,b", 2, 0, b"x"),)),
        VersionedObject((("a", 1), ("b", 2)), (Sibling("a", 1, 0, b"x"), Sibling("b", 2, 0, b"x"))),
        False,
    ),
    (VersionedObject((("a", 12),), ()), VersionedObject((("a", 1), ("2", 0)), ()), False),
]


@pytest.mark.parametrize(("a", "b", "equal"), DIGEST_TABLE)
def test_digest_table(a: VersionedObject, b: VersionedObject, equal: bool) -> None:
    assert (digest(a) == digest(b)) is equal
    assert len(digest(a)) == 8


def test_digest_equal_iff_same_clock_and_dots() -> None:
    def causal(obj: VersionedObject) -> tuple:
        return obj.clock, tuple((s.dot, s.is_tombstone) for s in obj.siblings)

    pool = list({obj for seed in range(10) for obj in random_history(seed).objects})
    by_digest: dict[bytes, tuple] = {}
    for obj in pool:
        assert by_digest.setdefault(digest(obj), causal(obj)) == causal(obj)
    assert len(by_digest) == len({causal(obj) for obj in pool})


# --- context payload: the version vector a sealed context carries ------------------------------------
# (The sealing, text and size bounds of the client-facing token: tests/test_causal_context.py.)

CONTEXT_ROUND_TRIP = [
    {},
    {"n1": 1},
    {"n1": 1, "n2": 7, "n3": 0},
    {"ключ": 3, "a:b,c": 4, "n1!inc.1": 9},
    {"n1": 2**62},
    {f"m{i}": i for i in range(MAX_CONTEXT_ENTRIES)},
]


@pytest.mark.parametrize("vector", CONTEXT_ROUND_TRIP, ids=lambda v: f"{len(v)}-entries")
def test_vector_round_trip(vector: dict[str, int]) -> None:
    raw = encode_vector(vector)
    assert decode_vector(raw) == vector
    assert encode_vector(dict(reversed(vector.items()))) == raw  # canonical: order-independent


def _packed(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


MALFORMED_VECTORS = [
    # not msgpack
    ("empty", b""),
    ("reserved msgpack byte", b"\xc1"),
    ("truncated array", b"\x92\xa1a"),
    ("truncated str", b"\xda\x00\x10ab"),
    ("extra data", msgpack.packb([]) + msgpack.packb([])),
    ("invalid utf-8 member", b"\x91\x92\xa1\xff\x01"),
    ("non-str map key", b"\x81\x91\x01\x01"),
    ("nesting bomb", b"\x91" * 5000),
    ("bad timestamp ext", b"\xd5\xff\x00\x00"),
    # msgpack but the wrong shape
    ("integer", _packed(5)),
    ("string", _packed("n1")),
    ("nil", _packed(None)),
    ("map", _packed({"n1": 1})),
    ("flat list", _packed(["n1", 1])),
    ("entry of one", _packed([["n1"]])),
    ("entry of three", _packed([["n1", 1, 2]])),
    ("entry is a map", _packed([{"n1": 1}])),
    ("entry is nil", _packed([None])),
    ("member is int", _packed([[1, 1]])),
    ("member is bytes", _packed([[b"n1", 1]])),
    ("member is nil", _packed([[None, 1]])),
    ("counter is str", _packed([["n1", "1"]])),
    ("counter is float", _packed([["n1", 1.0]])),
    ("counter is nil", _packed([["n1", None]])),
    ("counter is ext", _packed([["n1", msgpack.ExtType(1, b"")]])),
    ("negative counter", _packed([["n1", -1]])),
    ("very negative counter", _packed([["n1", -(2**63)]])),
    ("second entry negative", _packed([["n1", 1], ["n2", -1]])),
    ("counter true", _packed([["n1", True]])),
    ("counter false", _packed([["n1", False]])),
    # too large
    ("too many entries", _packed([[f"m{i}", 1] for i in range(MAX_CONTEXT_ENTRIES + 1)])),
    # A counter that cannot be incremented and stored: update() would issue 2**64 and encode()
    # would fail on every later write to the key (a client could poison a key this way).
    ("counter 2**64-1", _packed([["n1", 2**64 - 1]])),
    ("counter 2**63", _packed([["n1", 2**63]])),
]


@pytest.mark.parametrize("raw", [r for _, r in MALFORMED_VECTORS], ids=[n for n, _ in MALFORMED_VECTORS])
def test_malformed_vector_raises_invalid_context(raw: bytes) -> None:
    with pytest.raises(InvalidContext):
        decode_vector(raw)


def _fuzz_cases(rng: random.Random) -> list[bytes]:
    cases: list[bytes] = []
    for _ in range(800):
        cases.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 24))))
        entry: list = [
            rng.choice(["n1", 1, None, b"x", "é"]),
            rng.choice([0, 1, -1, 2**64 - 1, 1.5, True, "1", None]),
        ]
        cases.append(_packed(rng.choice([[entry], [entry, entry], entry, [entry[:1]], {"k": entry}])))
        valid = msgpack.packb([["n1", rng.randint(0, 9)], ["n2", 3]])
        cut = rng.randrange(len(valid))
        cases.append(valid[:cut] + valid[cut + 1 :])  # one byte dropped
    return cases


def test_decode_vector_fuzz_raises_only_invalid_context() -> None:
    accepted = 0
    for raw in _fuzz_cases(random.Random(11)):
        try:
            vector = decode_vector(raw)
        except InvalidContext:
            continue
        accepted += 1
        assert isinstance(vector, dict)
        for member, counter in vector.items():
            assert type(member) is str and type(counter) is int and counter >= 0
        # Whatever is accepted is usable: an update with it can be encoded and decoded.
        obj = update(E, vector, "n1", b"v", 1)
        assert decode(encode(obj)) == obj
    assert accepted > 0


def test_vector_counter_bound_is_exact_and_leaves_headroom() -> None:
    assert decode_vector(encode_vector({"n1": 2**62, "n2": 10**12})) == {"n1": 2**62, "n2": 10**12}
    vector = decode_vector(encode_vector({"n1": MAX_CONTEXT_COUNTER}))
    assert vector == {"n1": MAX_CONTEXT_COUNTER}
    obj = update(E, vector, "n1", b"v", 1)
    assert decode(encode(obj)).vector() == {"n1": MAX_CONTEXT_COUNTER + 1}
    with pytest.raises(InvalidContext):
        decode_vector(encode_vector({"n1": MAX_CONTEXT_COUNTER + 1}))


def test_duplicated_member_keeps_its_highest_counter() -> None:
    assert decode_vector(_packed([["n1", 5], ["n1", 2]])) == {"n1": 5}


def test_invalid_context_is_a_value_error() -> None:
    assert issubclass(InvalidContext, ValueError)
