"""Tables for the Merkle trees and the level-by-level anti-entropy exchange (pure)."""

from __future__ import annotations

import hashlib
import random

import msgpack
import pytest

from kvstore.protocol.merkle import (
    HASH_BYTES,
    BucketReply,
    BucketRequest,
    LevelReply,
    LevelRequest,
    MerkleError,
    MerkleExchange,
    MerkleTree,
    MerkleWireError,
    TreeShape,
    flat_root,
    keys_to_exchange,
    range_size,
)
from kvstore.protocol.ring import TOKEN_MAX, TOKEN_MIN, TOKEN_SPACE, Ring, TokenRange, key_token

Leaf = tuple[int, str, bytes]


def digest_of(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def leaves_for(start: int, end: int, count: int, seed: int = 0) -> list[Leaf]:
    """``count`` keys whose real ring tokens fall inside (start, end] (keys are drawn until enough hit)."""
    token_range = TokenRange(start, end, ())
    rng = random.Random(seed)
    out: list[Leaf] = []
    while len(out) < count:
        key = f"k{rng.getrandbits(48):012x}"
        token = key_token(key)
        if token_range.contains(token):
            out.append((token, key, digest_of(key + ":v1")))
    return out


def synthetic(start: int, count: int, size: int, seed: int = 0) -> list[Leaf]:
    """Leaves with tokens spread over a range of ``size`` tokens after ``start`` (wrapping)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        offset = rng.randrange(1, size + 1)
        token = (start + offset - TOKEN_MIN) % TOKEN_SPACE + TOKEN_MIN
        out.append((token, f"key{i:06d}", digest_of(f"key{i}:v1")))
    return out


def change(leaves: list[Leaf], keys: set[str]) -> list[Leaf]:
    return [(t, k, digest_of(k + ":v2") if k in keys else d) for t, k, d in leaves]


FULL = (0, 0)  # start == end: the whole ring
HALF = (-(2**62), 2**62)
WRAP = (TOKEN_MAX - 2**40, TOKEN_MIN + 2**40)  # wraps past TOKEN_MAX
TINY = (100, 110)  # fewer tokens than buckets


# --- geometry -----------------------------------------------------------------------------


@pytest.mark.parametrize("bounds", [FULL, HALF, WRAP, TINY, (5, 4), (TOKEN_MIN, TOKEN_MAX)])
@pytest.mark.parametrize("depth", [0, 1, 4, 10])
def test_buckets_tile_the_range_exactly(bounds: tuple[int, int], depth: int) -> None:
    shape = TreeShape(bounds[0], bounds[1], depth)
    nonempty = [i for i in range(shape.bucket_count) if not shape.bucket_is_empty_interval(i)]
    ranges = [shape.bucket_range(i) for i in nonempty]
    # Contiguous: each bucket starts where the previous ended, from the range start to its end.
    assert ranges[0][0] == shape.start and ranges[-1][1] == shape.end
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert sum(range_size(s, e) for s, e in ranges) == shape.size
    # Even split: sizes differ by at most one token.
    sizes = [range_size(s, e) for s, e in ranges]
    if shape.size >= shape.bucket_count:
        assert len(sizes) == shape.bucket_count and max(sizes) - min(sizes) <= 1
    # Each bucket's own bounds map back to it.
    for index, (low, high) in zip(nonempty, ranges, strict=True):
        assert shape.bucket_of(high) == index
        first = (low + 1 - TOKEN_MIN) % TOKEN_SPACE + TOKEN_MIN
        assert shape.bucket_of(first) == index


@pytest.mark.parametrize(
    "bounds, token, inside",
    [
        (WRAP, TOKEN_MAX, True),
        (WRAP, TOKEN_MIN, True),
        (WRAP, WRAP[0], False),  # the start is exclusive
        (WRAP, WRAP[1], True),  # the end is inclusive
        (WRAP, 0, False),
        (HALF, 0, True),
        (HALF, HALF[0], False),
        (FULL, 0, True),
        (FULL, TOKEN_MIN, True),
    ],
)
def test_range_membership_matches_token_range(bounds: tuple[int, int], token: int, inside: bool) -> None:
    shape = TreeShape(bounds[0], bounds[1], 4)
    assert shape.contains(token) is inside
    assert TokenRange(bounds[0], bounds[1], ()).contains(token) is inside
    if not inside:
        with pytest.raises(MerkleError):
            shape.bucket_of(token)


def test_wrap_around_range_keeps_tokens_on_both_sides_in_order() -> None:
    # (MAX - 2**40, MIN + 2**40] holds 2**41 + 1 tokens: the first half ends one token past the wrap.
    shape = TreeShape(WRAP[0], WRAP[1], 1)
    assert shape.size == 2**41 + 1
    assert shape.bucket_of(TOKEN_MAX - 5) == 0
    assert shape.bucket_of(TOKEN_MAX) == 0
    assert shape.bucket_of(TOKEN_MIN) == 0
    assert shape.bucket_of(TOKEN_MIN + 5) == 1
    assert shape.bucket_range(0) == (WRAP[0], TOKEN_MIN)
    assert shape.bucket_range(1) == (TOKEN_MIN, WRAP[1])


def test_empty_interval_bucket_has_no_range() -> None:
    shape = TreeShape(TINY[0], TINY[1], 10)
    empty = next(i for i in range(shape.bucket_count) if shape.bucket_is_empty_interval(i))
    with pytest.raises(MerkleError):
        shape.bucket_range(empty)


@pytest.mark.parametrize(
    "start, end, depth", [(0, 0, -1), (0, 0, 21), (TOKEN_MAX + 1, 0, 4), (0, TOKEN_MIN - 1, 4)]
)
def test_invalid_shapes_are_rejected(start: int, end: int, depth: int) -> None:
    with pytest.raises(MerkleError):
        TreeShape(start, end, depth)


# --- building -----------------------------------------------------------------------------


def test_build_is_independent_of_leaf_order() -> None:
    leaves = synthetic(HALF[0], 500, range_size(*HALF), seed=1)
    shuffled = list(leaves)
    random.Random(2).shuffle(shuffled)
    a, b = MerkleTree.build(*HALF, leaves), MerkleTree.build(*HALF, shuffled)
    assert a.root == b.root and a.to_wire() == b.to_wire()


def test_build_rejects_tokens_outside_the_range_and_duplicate_keys() -> None:
    with pytest.raises(MerkleError):
        MerkleTree.build(*HALF, [(HALF[1] + 1, "a", b"d")])
    with pytest.raises(MerkleError):
        MerkleTree.build(*HALF, [(1, "a", b"d"), (2, "a", b"d")])


def test_bucket_keys_and_items() -> None:
    leaves = synthetic(HALF[0], 300, range_size(*HALF), seed=3)
    tree = MerkleTree.build(*HALF, leaves, depth=6)
    seen: list[str] = []
    for index in range(64):
        items = tree.bucket_items(index)
        assert items == sorted(items)
        for key, _digest in items:
            token = next(t for t, k, _ in leaves if k == key)
            assert tree.bucket_of(token) == index
        seen += tree.bucket_keys(index)
    assert sorted(seen) == sorted(k for _, k, _ in leaves)


def test_tree_with_more_levels_than_tokens_still_builds() -> None:
    leaves = [(101, "a", b"1"), (105, "b", b"2"), (110, "c", b"3")]
    a = MerkleTree.build(*TINY, leaves, depth=10)
    b = MerkleTree.build(*TINY, change(leaves, {"b"}), depth=10)
    assert a.diff(b) == [(104, 105)]


# --- diff tables --------------------------------------------------------------------------

BASE = synthetic(HALF[0], 2000, range_size(*HALF), seed=7)
ONE_KEY = BASE[123][1]


@pytest.mark.parametrize(
    "name, local, remote, expected_keys",
    [
        ("identical", BASE, BASE, set()),
        ("one key changed", BASE, change(BASE, {ONE_KEY}), {ONE_KEY}),
        ("key only local", BASE, BASE[:123] + BASE[124:], {ONE_KEY}),
        ("key only remote", BASE[:123] + BASE[124:], BASE, {ONE_KEY}),
        ("empty vs full", [], BASE, {k for _, k, _ in BASE}),
        ("full vs empty", BASE, [], {k for _, k, _ in BASE}),
        ("both empty", [], [], set()),
    ],
)
def test_diff_table(name: str, local: list[Leaf], remote: list[Leaf], expected_keys: set[str]) -> None:
    a, b = MerkleTree.build(*HALF, local), MerkleTree.build(*HALF, remote)
    diff = a.compare(b)
    expected_buckets = sorted({a.bucket_of(t) for t, k, _ in BASE if k in expected_keys})
    assert list(diff.bucket_indexes) == expected_buckets, name
    assert a.diff(b) == [a.bucket_range(i) for i in expected_buckets]
    assert (a.root == b.root) is (not expected_keys)
    items_a = [item for i in diff.bucket_indexes for item in a.bucket_items(i)]
    items_b = [item for i in diff.bucket_indexes for item in b.bucket_items(i)]
    assert set(keys_to_exchange(items_a, items_b)) == expected_keys
    # Symmetric.
    assert b.compare(a).bucket_indexes == diff.bucket_indexes


def test_identical_trees_compare_only_the_root() -> None:
    a = MerkleTree.build(*HALF, BASE)
    assert a.compare(MerkleTree.build(*HALF, BASE)).hashes_compared == 1


def test_one_difference_compares_two_hashes_per_level() -> None:
    a = MerkleTree.build(*HALF, BASE, depth=10)
    diff = a.compare(MerkleTree.build(*HALF, change(BASE, {ONE_KEY}), depth=10))
    assert diff.hashes_compared == 1 + 2 * 10


@pytest.mark.parametrize("bounds", [WRAP, FULL])
def test_wrap_around_and_full_ring_diff(bounds: tuple[int, int]) -> None:
    leaves = synthetic(bounds[0], 3000, range_size(*bounds), seed=11)
    tokens = [t for t, _, _ in leaves]
    if bounds == WRAP:
        assert any(t > 0 for t in tokens) and any(t < 0 for t in tokens), "both sides of the wrap"
    changed = {leaves[0][1], leaves[-1][1], leaves[1500][1]}
    a, b = MerkleTree.build(*bounds, leaves), MerkleTree.build(*bounds, change(leaves, changed))
    found = set(a.keys_in(a.compare(b).bucket_indexes))
    assert changed <= found
    for low, high in a.diff(b):
        assert any(TokenRange(low, high, ()).contains(t) for t, k, _ in leaves if k in changed)


def test_ten_thousand_keys_with_a_hundred_differences() -> None:
    ring = Ring(["n1", "n2", "n3"], vnodes=1)
    token_range = max(ring.ranges(3), key=lambda r: r.size())
    leaves = leaves_for(token_range.start, token_range.end, 10_000, seed=5)
    rng = random.Random(6)
    changed = set(rng.sample([k for _, k, _ in leaves], 100))
    local = MerkleTree.build(token_range.start, token_range.end, leaves, depth=10)
    remote = MerkleTree.build(token_range.start, token_range.end, change(leaves, changed), depth=10)
    diff = local.compare(remote)
    expected_buckets = sorted({local.bucket_of(t) for t, k, _ in leaves if k in changed})
    assert list(diff.bucket_indexes) == expected_buckets  # all of them, and no others
    assert diff.hashes_compared <= 1 + 2 * len(expected_buckets) * 10
    assert diff.hashes_compared < 2**11 - 1  # far less than the whole tree
    keys = keys_to_exchange(
        [item for i in diff.bucket_indexes for item in local.bucket_items(i)],
        [item for i in diff.bucket_indexes for item in remote.bucket_items(i)],
    )
    assert set(keys) == changed
    # Those buckets hold few keys besides the changed ones: the exchange is proportional.
    assert len(local.keys_in(diff.bucket_indexes)) < 20 * len(changed)


def test_trees_of_different_shapes_do_not_compare() -> None:
    a = MerkleTree.build(*HALF, [], depth=4)
    with pytest.raises(MerkleError):
        a.compare(MerkleTree.build(*HALF, [], depth=5))
    with pytest.raises(MerkleError):
        a.compare(MerkleTree.build(*WRAP, [], depth=4))


# --- keys_to_exchange ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "local, remote, expected",
    [
        ([], [], []),
        ([("a", b"1")], [("a", b"1")], []),
        ([("a", b"1")], [("a", b"2")], ["a"]),
        ([("a", b"1")], [], ["a"]),
        ([], [("b", b"1")], ["b"]),
        ([("c", b"1"), ("a", b"1")], [("b", b"1"), ("a", b"1"), ("c", b"9")], ["b", "c"]),
    ],
)
def test_keys_to_exchange(
    local: list[tuple[str, bytes]], remote: list[tuple[str, bytes]], expected: list[str]
) -> None:
    assert keys_to_exchange(local, remote) == expected


# --- wire ---------------------------------------------------------------------------------


def roundtrip(obj: object) -> object:
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def test_whole_tree_wire_roundtrip_compares_equal() -> None:
    local = MerkleTree.build(*WRAP, synthetic(WRAP[0], 500, range_size(*WRAP), seed=1), depth=6)
    remote = MerkleTree.from_wire(roundtrip(local.to_wire()))
    assert remote.root == local.root and not remote.has_items
    assert local.diff(remote) == []
    with pytest.raises(MerkleError):
        remote.bucket_items(0)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda w: w.update(v=2),
        lambda w: w.update(shape=[0, 0]),
        lambda w: w["levels"].pop(),
        lambda w: w["levels"][3].pop(),
        lambda w: w["levels"][2].__setitem__(1, b"x" * HASH_BYTES),  # inner hash not matching children
        lambda w: w["levels"][6].__setitem__(0, b"short"),
    ],
)
def test_whole_tree_wire_rejects_corruption(corrupt: object) -> None:
    wire = roundtrip(MerkleTree.build(*HALF, BASE[:50], depth=6).to_wire())
    assert isinstance(wire, dict)
    corrupt(wire)  # type: ignore[operator]
    with pytest.raises(MerkleWireError):
        MerkleTree.from_wire(wire)


def run_exchange(local: MerkleTree, remote: MerkleTree) -> tuple[MerkleExchange, int, list[str]]:
    """Drive the exchange through msgpack, as over the network; returns hashes sent by the responder."""
    exchange = MerkleExchange(local)
    hashes_sent = 0
    while (request := exchange.next_request()) is not None:
        served = remote.answer(LevelRequest.from_wire(roundtrip(request.to_wire())))
        hashes_sent += len(served.hashes)
        exchange.receive(LevelReply.from_wire(roundtrip(served.to_wire()), request))
    bucket_request = exchange.bucket_request()
    if bucket_request is None:
        return exchange, hashes_sent, []
    served_buckets = remote.answer_buckets(BucketRequest.from_wire(roundtrip(bucket_request.to_wire())))
    reply = BucketReply.from_wire(roundtrip(served_buckets.to_wire()), bucket_request)
    return exchange, hashes_sent, keys_to_exchange(exchange.local_items(), reply.items())


@pytest.mark.parametrize("differences", [0, 1, 10, 100])
def test_level_exchange_sends_hashes_proportional_to_differences(differences: int) -> None:
    depth = 10
    leaves = synthetic(HALF[0], 10_000, range_size(*HALF), seed=21)
    changed = {k for _, k, _ in leaves[:differences]}
    local = MerkleTree.build(*HALF, leaves, depth)
    remote = MerkleTree.build(*HALF, change(leaves, changed), depth)
    exchange, hashes_sent, keys = run_exchange(local, remote)
    assert set(keys) == changed
    assert exchange.differing_buckets == list(local.compare(remote).bucket_indexes)
    assert exchange.hashes_compared == hashes_sent == local.compare(remote).hashes_compared
    assert hashes_sent <= 1 + 2 * differences * depth
    assert exchange.round_trips == (1 if differences == 0 else depth + 1)


def test_level_exchange_against_an_empty_peer_finds_every_key() -> None:
    leaves = synthetic(WRAP[0], 300, range_size(*WRAP), seed=22)
    _, _, keys = run_exchange(MerkleTree.build(*WRAP, [], 5), MerkleTree.build(*WRAP, leaves, 5))
    assert keys == sorted(k for _, k, _ in leaves)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"shape": [0, 0, 4], "level": 5, "indexes": [0]},  # level beyond depth
        {"shape": [0, 0, 4], "level": 2, "indexes": [4]},  # index beyond the level's width
        {"shape": [0, 0, 4], "level": 2, "indexes": [1, 0]},  # not ascending
        {"shape": [0, 0, 4], "level": 2, "indexes": [1, 1]},  # duplicates
        {"shape": [0, 0, 4], "level": 2, "indexes": "01"},
        {"shape": [0, 0, 99], "level": 0, "indexes": [0]},  # depth beyond MAX_DEPTH
        {"shape": [0, 0], "level": 0, "indexes": [0]},
    ],
)
def test_level_request_validation(raw: object) -> None:
    with pytest.raises(MerkleWireError):
        LevelRequest.from_wire(raw)


def test_replies_of_the_wrong_length_or_shape_are_rejected() -> None:
    tree = MerkleTree.build(*HALF, BASE[:10], depth=4)
    request = LevelRequest(tree.shape, 1, (0, 1))
    with pytest.raises(MerkleWireError):
        LevelReply.from_wire({"hashes": [b"x" * HASH_BYTES]}, request)
    with pytest.raises(MerkleWireError):
        MerkleTree.build(*WRAP, [], depth=4).answer(request)
    bucket_request = BucketRequest(tree.shape, (0, 3))
    with pytest.raises(MerkleWireError):
        BucketReply.from_wire({"buckets": [[["a", b"d"]]]}, bucket_request)
    with pytest.raises(MerkleWireError):
        BucketReply.from_wire({"buckets": [[["a", "not bytes"]], []]}, bucket_request)


@pytest.mark.parametrize("bounds", [FULL, HALF, WRAP, TINY])
@pytest.mark.parametrize("count", [0, 1, 7])
def test_flat_root_is_the_root_of_a_depth_zero_tree(bounds: tuple[int, int], count: int) -> None:
    leaves = synthetic(bounds[0], count, range_size(*bounds))
    assert flat_root(*bounds, leaves) == MerkleTree.build(*bounds, leaves, 0).root


@pytest.mark.parametrize("leaves", [[], [(5, "a", b"d")]])
def test_flat_root_checks_the_range_as_a_tree_does(leaves: list[Leaf]) -> None:
    with pytest.raises(MerkleError):
        flat_root(TOKEN_MAX + 1, 0, leaves)
