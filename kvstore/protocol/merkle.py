"""Merkle trees over a token range, for anti-entropy between replicas.

Theory of operation
-------------------
Follows Dynamo (DeCandia et al. 2007, §4.7), Riak's active anti-entropy and
Cassandra's repair: two replicas of a token range compare hash trees instead of
data, and only exchange the keys under differing leaves.

**Shape.**  One tree per ring range ``(start, end]`` (a vnode's range, which wraps
past TOKEN_MAX when ``start >= end``).  The range is split evenly into
``2**depth`` *buckets* by token offset: a token ``t`` has offset
``o = (t - start - 1) mod 2**64`` in ``[0, size)`` and lands in bucket
``o * 2**depth // size``.  Working on offsets (not raw tokens) makes wrap-around
ranges and the full ring (``start == end``) need no special case.  The bucket
boundaries depend only on ``(start, end, depth)``, so two replicas' trees for the
same range are comparable node by node.  Buckets of a range smaller than
``2**depth`` tokens can be empty intervals; they hold no keys, so they hash
equal on both sides and are never reported.

**Hashes.**  A bucket's hash is BLAKE2b-128 over its ``(key, digest)`` pairs in
key order, each length-prefixed (so no two different bucket contents encode
alike); ``digest`` is ``versions.digest`` of the replica's object, which is equal
iff the replicas hold the same causal state.  An inner node hashes its two
children.  Level 0 is the root, level ``depth`` the buckets; node ``i`` of level
``L`` has children ``2i`` and ``2i + 1`` on level ``L + 1``.  Contents are sorted
before hashing, so the tree does not depend on the order leaves are fed in.

**Exchange.**  Sending a whole tree costs ``2**(depth+1) - 1`` hashes.  The
level-by-level exchange (``MerkleExchange``) instead asks the peer for the hashes
of the children of the nodes that differed at the previous level, starting from
the root: at most ``1 + 2 * d * depth`` hashes for ``d`` differing buckets, in
``depth + 1`` round trips, then the items of the differing buckets only.
``compare`` counts the hashes compared, which the tests bound.

What this guarantees: a bucket is reported iff its contents differ (up to a
2**-128 hash collision); keys outside reported buckets are identical on both
sides.  What it assumes: both sides build from a consistent scan of their store;
a write racing the scan just shows up as a difference (or is missed until the
next round), which is harmless because applying an object is an idempotent merge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.protocol.ring import TOKEN_MAX, TOKEN_MIN, TOKEN_SPACE

HASH_BYTES = 16
DEFAULT_DEPTH = 10
MAX_DEPTH = 20  # 2M buckets: far beyond any useful tree, a bound against hostile requests
MAX_DIGEST_BYTES = 64
WIRE_FORMAT_VERSION = 1


class MerkleError(ValueError):
    """Invalid input to a tree: a token outside the range, a duplicate key, a mismatched tree."""


class MerkleWireError(MerkleError):
    """A Merkle message from a peer is malformed or does not match the local tree."""


def _hash(parts: Iterable[bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    for part in parts:
        h.update(part)
    return h.digest()


def _bucket_hash(items: Sequence[tuple[str, bytes]]) -> bytes:
    parts: list[bytes] = [b"bucket"]
    for key, digest in items:
        key_bytes = key.encode("utf-8")
        parts += [len(key_bytes).to_bytes(4, "big"), key_bytes, len(digest).to_bytes(2, "big"), digest]
    return _hash(parts)


def _inner_hash(left: bytes, right: bytes) -> bytes:
    return _hash([b"node", left, right])


EMPTY_BUCKET_HASH = _bucket_hash([])


def _wrap(token: int) -> int:
    """Map an unbounded integer back into the signed 64-bit token space."""
    return (token - TOKEN_MIN) % TOKEN_SPACE + TOKEN_MIN


def range_size(start: int, end: int) -> int:
    """Number of tokens in the ring range (start, end]; start == end is the whole ring."""
    return (end - start) % TOKEN_SPACE or TOKEN_SPACE


def _check_range(start: int, end: int, depth: int) -> None:
    for token in (start, end):
        if not (isinstance(token, int) and TOKEN_MIN <= token <= TOKEN_MAX):
            raise MerkleError(f"range bound {token!r} is not a signed 64-bit token")
    if not (isinstance(depth, int) and 0 <= depth <= MAX_DEPTH):
        raise MerkleError(f"depth must be in [0, {MAX_DEPTH}], got {depth!r}")


@dataclass(frozen=True, slots=True)
class TreeShape:
    """The bucket geometry of a range: identical on every replica for the same (start, end, depth)."""

    start: int
    end: int
    depth: int

    def __post_init__(self) -> None:
        _check_range(self.start, self.end, self.depth)

    @property
    def bucket_count(self) -> int:
        return 1 << self.depth

    @property
    def size(self) -> int:
        return range_size(self.start, self.end)

    def contains(self, token: int) -> bool:
        return 0 <= (token - self.start - 1) % TOKEN_SPACE < self.size

    def bucket_of(self, token: int) -> int:
        offset = (token - self.start - 1) % TOKEN_SPACE
        if offset >= self.size:
            raise MerkleError(f"token {token} is outside the range ({self.start}, {self.end}]")
        return offset * self.bucket_count // self.size

    def _boundary(self, index: int) -> int:
        # The smallest offset whose bucket is >= index: ceil(index * size / buckets).
        return -(-index * self.size // self.bucket_count)

    def bucket_range(self, index: int) -> tuple[int, int]:
        """The ring range (start, end] of bucket ``index``, in TokenRange terms (start == end: whole ring).

        Raises MerkleError for a bucket that is an empty interval (a range smaller than
        ``2**depth`` tokens); ``compare`` never reports those, since they cannot hold keys.
        """
        assert 0 <= index < self.bucket_count
        low, high = self._boundary(index), self._boundary(index + 1)
        if low == high:
            raise MerkleError(f"bucket {index} of {self} is an empty token interval")
        # Offsets [low, high) are tokens start+1+low .. start+high, i.e. the range (start+low, start+high].
        return (_wrap(self.start + low), _wrap(self.start + high))

    def bucket_is_empty_interval(self, index: int) -> bool:
        return self._boundary(index) == self._boundary(index + 1)

    def level_width(self, level: int) -> int:
        assert 0 <= level <= self.depth
        return 1 << level

    def to_wire(self) -> list[int]:
        return [self.start, self.end, self.depth]

    @staticmethod
    def from_wire(raw: Any) -> TreeShape:
        if not (isinstance(raw, list) and len(raw) == 3 and all(type(v) is int for v in raw)):
            raise MerkleWireError("tree shape must be [start, end, depth] integers")
        try:
            return TreeShape(raw[0], raw[1], raw[2])
        except MerkleError as exc:
            raise MerkleWireError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class MerkleDiff:
    """The outcome of comparing two trees of the same shape."""

    bucket_indexes: tuple[int, ...]  # ascending
    ranges: tuple[tuple[int, int], ...]  # (bucket_start_token, bucket_end_token], same order
    hashes_compared: int


class MerkleTree:
    """A hash tree over one token range.  Built locally it knows its buckets' items; from the wire, only hashes."""

    def __init__(
        self,
        shape: TreeShape,
        levels: list[list[bytes]],
        buckets: Mapping[int, tuple[tuple[str, bytes], ...]] | None,
    ) -> None:
        assert len(levels) == shape.depth + 1
        for level, hashes in enumerate(levels):
            assert len(hashes) == 1 << level
        self.shape = shape
        self._levels = levels
        self._buckets = buckets  # None: a tree received from a peer (hashes only)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def build(
        cls, start: int, end: int, leaves: Iterable[tuple[int, str, bytes]], depth: int = DEFAULT_DEPTH
    ) -> MerkleTree:
        """A tree from (token, key, digest) triples, all inside (start, end]; keys must be unique."""
        shape = TreeShape(start, end, depth)
        grouped: dict[int, list[tuple[str, bytes]]] = {}
        seen: set[str] = set()
        for token, key, digest in leaves:
            if key in seen:
                raise MerkleError(f"key {key!r} appears twice in the leaves")
            seen.add(key)
            if len(digest) > MAX_DIGEST_BYTES:
                raise MerkleError(f"digest of {key!r} is {len(digest)} bytes, more than {MAX_DIGEST_BYTES}")
            grouped.setdefault(shape.bucket_of(token), []).append((key, bytes(digest)))
        buckets = {index: tuple(sorted(items)) for index, items in grouped.items()}
        leaf_hashes = [EMPTY_BUCKET_HASH] * shape.bucket_count
        for index, items in buckets.items():
            leaf_hashes[index] = _bucket_hash(items)
        return cls(shape, _levels_from_leaves(leaf_hashes), buckets)

    # --- reading --------------------------------------------------------------------------

    @property
    def start(self) -> int:
        return self.shape.start

    @property
    def end(self) -> int:
        return self.shape.end

    @property
    def depth(self) -> int:
        return self.shape.depth

    @property
    def root(self) -> bytes:
        return self._levels[0][0]

    @property
    def has_items(self) -> bool:
        """False for a tree decoded from the wire (it carries hashes, not bucket contents)."""
        return self._buckets is not None

    def level_hashes(self, level: int, indexes: Iterable[int] | None = None) -> list[bytes]:
        """The hashes of the given nodes of ``level`` (all of them when ``indexes`` is None)."""
        if not 0 <= level <= self.depth:
            raise MerkleError(f"level {level} outside [0, {self.depth}]")
        row = self._levels[level]
        if indexes is None:
            return list(row)
        out = []
        for index in indexes:
            if not 0 <= index < len(row):
                raise MerkleError(f"node {index} outside level {level} (width {len(row)})")
            out.append(row[index])
        return out

    def bucket_hash(self, index: int) -> bytes:
        return self.level_hashes(self.depth, [index])[0]

    def bucket_items(self, index: int) -> list[tuple[str, bytes]]:
        """The (key, digest) pairs of bucket ``index``, sorted by key."""
        if self._buckets is None:
            raise MerkleError("this tree came from the wire: it has hashes but no bucket contents")
        if not 0 <= index < self.shape.bucket_count:
            raise MerkleError(f"bucket {index} outside [0, {self.shape.bucket_count})")
        return list(self._buckets.get(index, ()))

    def bucket_keys(self, index: int) -> list[str]:
        return [key for key, _ in self.bucket_items(index)]

    def keys_in(self, indexes: Iterable[int]) -> list[str]:
        """Every key of the given buckets, in bucket then key order."""
        return [key for index in indexes for key in self.bucket_keys(index)]

    def bucket_of(self, token: int) -> int:
        return self.shape.bucket_of(token)

    def bucket_range(self, index: int) -> tuple[int, int]:
        return self.shape.bucket_range(index)

    # --- comparing ------------------------------------------------------------------------

    def _check_comparable(self, other: MerkleTree) -> None:
        if self.shape != other.shape:
            raise MerkleError(f"cannot compare trees of different shapes: {self.shape} vs {other.shape}")

    def compare(self, other: MerkleTree) -> MerkleDiff:
        """Differing buckets, descending only into subtrees whose hashes differ."""
        self._check_comparable(other)
        compared = 0
        frontier = [0]
        for level in range(self.depth + 1):
            mine, theirs = self._levels[level], other._levels[level]
            compared += len(frontier)
            differing = [i for i in frontier if mine[i] != theirs[i]]
            if level == self.depth or not differing:
                frontier = differing
                break
            frontier = children_of(differing)
        indexes = tuple(frontier)
        return MerkleDiff(indexes, tuple(self.shape.bucket_range(i) for i in indexes), compared)

    def diff(self, other: MerkleTree) -> list[tuple[int, int]]:
        """The (start, end] token ranges of the buckets whose contents differ, in bucket order."""
        return list(self.compare(other).ranges)

    def differing_indexes(self, level: int, indexes: Sequence[int], remote_hashes: Sequence[bytes]) -> list[int]:
        """Of the nodes ``indexes`` of ``level``, those whose local hash differs from the peer's."""
        if len(indexes) != len(remote_hashes):
            raise MerkleWireError(f"asked for {len(indexes)} hashes, got {len(remote_hashes)}")
        local = self.level_hashes(level, indexes)
        return [i for i, mine, theirs in zip(indexes, local, remote_hashes, strict=True) if mine != theirs]

    # --- wire -----------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """The whole tree, hashes only: {"v": 1, "shape": [start, end, depth], "levels": [[bytes]...]}."""
        return {"v": WIRE_FORMAT_VERSION, "shape": self.shape.to_wire(), "levels": [list(r) for r in self._levels]}

    @classmethod
    def from_wire(cls, raw: Any) -> MerkleTree:
        """Decode ``to_wire`` output, checking sizes and that every inner hash matches its children."""
        if not isinstance(raw, dict) or raw.get("v") != WIRE_FORMAT_VERSION:
            raise MerkleWireError(f"not a version-{WIRE_FORMAT_VERSION} Merkle tree")
        shape = TreeShape.from_wire(raw.get("shape"))
        levels = raw.get("levels")
        if not isinstance(levels, list) or len(levels) != shape.depth + 1:
            raise MerkleWireError(f"a depth-{shape.depth} tree has {shape.depth + 1} levels")
        for level, row in enumerate(levels):
            _check_hashes(row, 1 << level, f"level {level}")
        rebuilt = _levels_from_leaves(list(levels[shape.depth]))
        if rebuilt != levels:
            raise MerkleWireError("inner hashes do not match their children")
        return cls(shape, rebuilt, None)

    def answer(self, request: LevelRequest) -> LevelReply:
        """Serve a peer's level request (the responder side of ``MerkleExchange``)."""
        if request.shape != self.shape:
            raise MerkleWireError(f"peer asked about {request.shape}, this tree is {self.shape}")
        return LevelReply(tuple(self.level_hashes(request.level, request.indexes)))

    def answer_buckets(self, request: BucketRequest) -> BucketReply:
        if request.shape != self.shape:
            raise MerkleWireError(f"peer asked about {request.shape}, this tree is {self.shape}")
        return BucketReply(tuple(tuple(self.bucket_items(i)) for i in request.indexes))


def flat_root(start: int, end: int, leaves: Sequence[tuple[int, str, bytes]]) -> bytes:
    """The root of ``MerkleTree.build(start, end, leaves, 0)`` (a range's summary hash), with the same
    checks; an empty range (most ranges of a small store) costs no tree at all."""
    if not leaves:
        _check_range(start, end, 0)
        return EMPTY_BUCKET_HASH
    return MerkleTree.build(start, end, leaves, 0).root


def children_of(indexes: Iterable[int]) -> list[int]:
    return [child for i in indexes for child in (2 * i, 2 * i + 1)]


def _levels_from_leaves(leaf_hashes: list[bytes]) -> list[list[bytes]]:
    levels = [leaf_hashes]
    while len(levels[0]) > 1:
        below = levels[0]
        levels.insert(0, [_inner_hash(below[i], below[i + 1]) for i in range(0, len(below), 2)])
    return levels


def _check_hashes(row: Any, count: int, what: str) -> None:
    if not isinstance(row, list | tuple) or len(row) != count:
        raise MerkleWireError(f"{what}: expected {count} hashes")
    for h in row:
        if not isinstance(h, bytes) or len(h) != HASH_BYTES:
            raise MerkleWireError(f"{what}: every hash must be {HASH_BYTES} bytes")


def _check_indexes(raw: Any, width: int, what: str) -> tuple[int, ...]:
    if not isinstance(raw, list | tuple) or len(raw) > width:
        raise MerkleWireError(f"{what}: indexes must be a list of at most {width} node numbers")
    indexes = tuple(raw)
    for i in indexes:
        if type(i) is not int or not 0 <= i < width:
            raise MerkleWireError(f"{what}: node {i!r} outside [0, {width})")
    if list(indexes) != sorted(set(indexes)):
        raise MerkleWireError(f"{what}: indexes must be strictly ascending")
    return indexes


# --- the level-by-level exchange ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LevelRequest:
    """Ask a peer for the hashes of some nodes of one level of its tree for ``shape``."""

    shape: TreeShape
    level: int
    indexes: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"shape": self.shape.to_wire(), "level": self.level, "indexes": list(self.indexes)}

    @staticmethod
    def from_wire(raw: Any) -> LevelRequest:
        if not isinstance(raw, dict):
            raise MerkleWireError("a level request is a map")
        shape = TreeShape.from_wire(raw.get("shape"))
        level = raw.get("level")
        if type(level) is not int or not 0 <= level <= shape.depth:
            raise MerkleWireError(f"level {level!r} outside [0, {shape.depth}]")
        return LevelRequest(shape, level, _check_indexes(raw.get("indexes"), 1 << level, f"level {level}"))


@dataclass(frozen=True, slots=True)
class LevelReply:
    hashes: tuple[bytes, ...]  # in the order of the request's indexes

    def to_wire(self) -> dict[str, Any]:
        return {"hashes": list(self.hashes)}

    @staticmethod
    def from_wire(raw: Any, request: LevelRequest) -> LevelReply:
        hashes = raw.get("hashes") if isinstance(raw, dict) else None
        _check_hashes(hashes, len(request.indexes), f"reply for level {request.level}")
        assert isinstance(hashes, list | tuple)
        return LevelReply(tuple(hashes))


@dataclass(frozen=True, slots=True)
class BucketRequest:
    """Ask a peer for the (key, digest) items of some buckets (leaf-level nodes)."""

    shape: TreeShape
    indexes: tuple[int, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"shape": self.shape.to_wire(), "buckets": list(self.indexes)}

    @staticmethod
    def from_wire(raw: Any) -> BucketRequest:
        if not isinstance(raw, dict):
            raise MerkleWireError("a bucket request is a map")
        shape = TreeShape.from_wire(raw.get("shape"))
        return BucketRequest(shape, _check_indexes(raw.get("buckets"), shape.bucket_count, "buckets"))


@dataclass(frozen=True, slots=True)
class BucketReply:
    buckets: tuple[tuple[tuple[str, bytes], ...], ...]  # per requested bucket, its items sorted by key

    def to_wire(self) -> dict[str, Any]:
        return {"buckets": [[[key, digest] for key, digest in items] for items in self.buckets]}

    @staticmethod
    def from_wire(raw: Any, request: BucketRequest) -> BucketReply:
        buckets = raw.get("buckets") if isinstance(raw, dict) else None
        if not isinstance(buckets, list) or len(buckets) != len(request.indexes):
            raise MerkleWireError(f"expected items of {len(request.indexes)} buckets")
        decoded: list[tuple[tuple[str, bytes], ...]] = []
        for items in buckets:
            if not isinstance(items, list):
                raise MerkleWireError("bucket items must be a list of [key, digest]")
            row: list[tuple[str, bytes]] = []
            for item in items:
                if not (
                    isinstance(item, list | tuple)
                    and len(item) == 2
                    and isinstance(item[0], str)
                    and isinstance(item[1], bytes)
                    and len(item[1]) <= MAX_DIGEST_BYTES
                ):
                    raise MerkleWireError("bucket items must be [key: str, digest: bytes]")
                row.append((item[0], item[1]))
            decoded.append(tuple(row))
        return BucketReply(tuple(decoded))

    def items(self) -> list[tuple[str, bytes]]:
        """All buckets' items, flattened."""
        return [item for items in self.buckets for item in items]


class MerkleExchange:
    """The initiator's side of a level-by-level comparison with one peer (pure state machine).

    Usage (the caller does the I/O)::

        exchange = MerkleExchange(local_tree)
        while (request := exchange.next_request()) is not None:
            reply = LevelReply.from_wire(await ask(peer, request.to_wire()), request)
            exchange.receive(reply)
        buckets = exchange.bucket_request()          # None when the trees agree
        remote = BucketReply.from_wire(await ask(peer, buckets.to_wire()), buckets)
        keys = keys_to_exchange(exchange.local_items(), remote.items())

    Round trips: ``depth + 1`` level requests when anything differs, 1 when nothing does.
    """

    def __init__(self, local: MerkleTree) -> None:
        self.local = local
        self._level = 0
        self._frontier: list[int] = [0]
        self._pending: LevelRequest | None = None
        self._done = False
        self.hashes_compared = 0
        self.round_trips = 0

    @property
    def done(self) -> bool:
        return self._done

    def next_request(self) -> LevelRequest | None:
        """The next level to ask for, or None when the comparison is complete."""
        if self._done:
            return None
        if self._pending is None:
            self._pending = LevelRequest(self.local.shape, self._level, tuple(self._frontier))
        return self._pending

    def receive(self, reply: LevelReply) -> None:
        request = self._pending
        assert request is not None, "receive() without an outstanding request"
        differing = self.local.differing_indexes(request.level, request.indexes, reply.hashes)
        self.hashes_compared += len(request.indexes)
        self.round_trips += 1
        self._pending = None
        if request.level == self.local.depth or not differing:
            self._frontier = differing
            self._done = True
        else:
            self._frontier = children_of(differing)
            self._level = request.level + 1

    @property
    def differing_buckets(self) -> list[int]:
        assert self._done, "the exchange is not finished"
        return list(self._frontier)

    def differing_ranges(self) -> list[tuple[int, int]]:
        return [self.local.bucket_range(i) for i in self.differing_buckets]

    def bucket_request(self) -> BucketRequest | None:
        buckets = self.differing_buckets
        return BucketRequest(self.local.shape, tuple(buckets)) if buckets else None

    def local_items(self) -> list[tuple[str, bytes]]:
        """The local (key, digest) items of the differing buckets."""
        return [item for i in self.differing_buckets for item in self.local.bucket_items(i)]


def keys_to_exchange(
    local_bucket_items: Iterable[tuple[str, bytes]], remote_bucket_items: Iterable[tuple[str, bytes]]
) -> list[str]:
    """Keys present on one side only or with differing digests, sorted: the keys to sync."""
    local = dict(local_bucket_items)
    remote = dict(remote_bucket_items)
    return sorted(key for key in local.keys() | remote.keys() if local.get(key) != remote.get(key))
