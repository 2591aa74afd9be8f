"""Per-key causal history: dotted version vectors (DVV sets), or last-write-wins.

Theory of operation
-------------------
Follows "Dotted Version Vectors: Logical Clocks for Optimistic Replication"
(Preguiça, Baquero, Almeida, Fonte, Gonçalves, 2010) in the compact "DVV set" form
that Riak 2.0 adopted (``dvv_enabled``) to end sibling explosion.

A stored object is a version vector ``clock`` (member -> counter: everything this
object has seen) plus a set of ``siblings``, each tagged with the *dot*
``(member, counter)`` of the write that created it.  Rules:

* **update** (a coordinator applies a client write): the new sibling gets dot
  ``(coordinator, clock[coordinator] + 1)``; every stored sibling whose dot the
  client's *context* covers is superseded (the client saw it); the others stay,
  because the client wrote without knowing them: they are concurrent.
* **sync** (two replicas merge): a sibling survives iff the other side has it too or
  the other side's clock does not cover its dot (it has not seen it, so it cannot
  have superseded it).
* A read returns every surviving sibling plus the merged clock as the opaque
  context; writing back with that context resolves all of them.  ``update`` trusts
  the context it is given: the API only passes one the cluster signed for the same
  key (``kvstore.protocol.causal_context``), since a made-up context would supersede writes
  its sender never saw.

Why dots and not plain vector clocks: with a per-server vector clock alone, two
clients writing through the same coordinator with the same stale context are
either wrongly ordered (a lost update) or, in Riak's pre-2.0 "vnode vclocks",
kept as siblings that no later write can ever individually supersede, so they
pile up (sibling explosion).  A dot names each write exactly, so a context
supersedes exactly what it saw; the number of siblings is bounded by the number
of truly concurrent writes, and the clock's size by the number of members that
coordinate writes (the test tables check both).

Uniqueness of dots assumes a dot's member coordinates the update with that key's
latest local state (the coordinator of a sibling-mode write is always one of the
key's replicas, which holds every dot it ever issued for that key), and that an
actor lives exactly as long as the data holding its counters: a node that loses its
data comes back under a new actor (``kvstore.runtime.identity``, Riak's KV-679).

In ``lww`` mode the same structure is kept, but after every update or sync only
the sibling with the greatest ``(timestamp_ns, member, counter)`` survives: the
coordinator's wall clock decides, and a skewed clock silently discards
acknowledged writes (that is the experiment).

A sibling whose ``value`` is None is a tombstone (a delete).  Everything here is
pure and deterministic: no clock reads, no unordered iteration in outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import msgpack

ConflictMode = Literal["siblings", "lww"]
CONFLICT_MODES: tuple[str, ...] = ("siblings", "lww")
MAX_CONTEXT_ENTRIES = 1024  # far above any real cluster; a bound against hostile contexts
# Counters are stored as msgpack uint64 and a write issues max(stored, context) + 1: a counter near
# 2**64 from a client would make every later write to the key unencodable (poisoned).
MAX_CONTEXT_COUNTER = 2**63 - 1

VersionVector = dict[str, int]


class InvalidContext(ValueError):
    """A client-supplied causal context could not be decoded (its syntax, not its origin)."""


@dataclass(frozen=True, slots=True)
class Sibling:
    node: str  # the dot: (node, counter)
    counter: int
    timestamp_ns: int  # the coordinator's wall clock when written (LWW order, information)
    value: bytes | None  # None = tombstone

    @property
    def dot(self) -> tuple[str, int]:
        return (self.node, self.counter)

    @property
    def is_tombstone(self) -> bool:
        return self.value is None

    def lww_key(self) -> tuple[int, str, int]:
        return (self.timestamp_ns, self.node, self.counter)


@dataclass(frozen=True, slots=True)
class VersionedObject:
    clock: tuple[tuple[str, int], ...]  # sorted by member id
    siblings: tuple[Sibling, ...]  # sorted by dot

    @staticmethod
    def empty() -> VersionedObject:
        return VersionedObject((), ())

    def vector(self) -> VersionVector:
        return dict(self.clock)

    @property
    def live_values(self) -> list[bytes]:
        return [s.value for s in self.siblings if s.value is not None]

    @property
    def is_deleted(self) -> bool:
        """Every sibling is a tombstone (and there is at least one): reads treat it as absent."""
        return bool(self.siblings) and all(s.is_tombstone for s in self.siblings)

    def check_invariants(self) -> None:
        vector = self.vector()
        dots = [s.dot for s in self.siblings]
        assert len(set(dots)) == len(dots), "duplicate dots"
        for s in self.siblings:
            assert s.counter <= vector.get(s.node, 0), f"sibling dot {s.dot} not covered by clock"


def _covers(vector: Mapping[str, int], node: str, counter: int) -> bool:
    return counter <= vector.get(node, 0)


def merge_vectors(a: Mapping[str, int], b: Mapping[str, int]) -> VersionVector:
    merged = dict(a)
    for node, counter in b.items():
        if counter > merged.get(node, 0):
            merged[node] = counter
    return merged


def descends(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """a has seen everything b has (a >= b)."""
    return all(a.get(node, 0) >= counter for node, counter in b.items())


def concurrent(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    return not descends(a, b) and not descends(b, a)


def _make(vector: Mapping[str, int], siblings: Iterable[Sibling], mode: ConflictMode) -> VersionedObject:
    ordered = sorted(siblings, key=lambda s: s.dot)
    if mode == "lww" and len(ordered) > 1:
        ordered = [max(ordered, key=Sibling.lww_key)]
    return VersionedObject(tuple(sorted((k, v) for k, v in vector.items() if v > 0)), tuple(ordered))


def update(
    stored: VersionedObject,
    context: Mapping[str, int],
    node: str,
    value: bytes | None,
    timestamp_ns: int,
    mode: ConflictMode = "siblings",
) -> VersionedObject:
    """Apply a client write (value None = delete) coordinated by ``node``."""
    vector = stored.vector()
    # max() with the context guards dot uniqueness even if this node lost state it had issued.
    counter = max(vector.get(node, 0), context.get(node, 0)) + 1
    if mode == "lww":
        # Pure last-write-wins (Cassandra, Riak's last_write_wins): the timestamp alone decides,
        # even against a causally later write.  Filtering by context here would let the outcome
        # depend on which replica saw what first.
        kept = list(stored.siblings)
    else:
        kept = [s for s in stored.siblings if not _covers(context, s.node, s.counter)]
    new_vector = merge_vectors(vector, context)
    new_vector[node] = counter
    return _make(new_vector, [*kept, Sibling(node, counter, timestamp_ns, value)], mode)


def sync(a: VersionedObject, b: VersionedObject, mode: ConflictMode = "siblings") -> VersionedObject:
    """Merge two replicas' versions of one key (commutative, associative, idempotent)."""
    if a == b:
        return a
    va, vb = a.vector(), b.vector()
    if mode == "lww":
        # LWW discards a losing write without any context having covered it, yet its dot is in the
        # clock; the coverage rule below could then let two replicas each drop the other's winner
        # (sync non-associative; a third merge left no sibling at all).  The max over the union
        # is a semilattice: every replica converges on the greatest (timestamp_ns, node, counter).
        return _make(merge_vectors(va, vb), {s.dot: s for s in (*a.siblings, *b.siblings)}.values(), mode)
    dots_a = {s.dot for s in a.siblings}
    dots_b = {s.dot for s in b.siblings}
    survivors = [s for s in a.siblings if s.dot in dots_b or not _covers(vb, s.node, s.counter)]
    survivors += [s for s in b.siblings if s.dot not in dots_a and not _covers(va, s.node, s.counter)]
    return _make(merge_vectors(va, vb), survivors, mode)


def sync_all(objects: Iterable[VersionedObject], mode: ConflictMode = "siblings") -> VersionedObject:
    merged = VersionedObject.empty()
    for obj in objects:
        merged = sync(merged, obj, mode)
    return merged


def supersedes(a: VersionedObject, b: VersionedObject) -> bool:
    """a already contains everything of b (syncing b into a changes nothing)."""
    return sync(a, b) == a


# --- encoding -------------------------------------------------------------------------


def encode(obj: VersionedObject) -> bytes:
    return msgpack.packb(
        [[list(e) for e in obj.clock], [[s.node, s.counter, s.timestamp_ns, s.value] for s in obj.siblings]],
        use_bin_type=True,
    )


def decode(blob: bytes) -> VersionedObject:
    clock, siblings = msgpack.unpackb(blob, raw=False)
    return VersionedObject(
        tuple((str(n), int(c)) for n, c in clock),
        tuple(Sibling(str(n), int(c), int(t), v) for n, c, t, v in siblings),
    )


def digest(obj: VersionedObject) -> bytes:
    """A short fingerprint of the causal state (clock + dots): equal iff replicas agree."""
    # msgpack is self-delimiting, so member ids containing ':' or ',' cannot make two different
    # states serialize alike (the config allows such ids and client contexts carry any string).
    causal = [[list(e) for e in obj.clock], [[s.node, s.counter, s.value is None] for s in obj.siblings]]
    return hashlib.blake2b(msgpack.packb(causal, use_bin_type=True), digest_size=8).digest()


def encode_vector(vector: Mapping[str, int]) -> bytes:
    """The canonical bytes of a version vector (sorted msgpack entries): a context's payload.

    Not a context by itself: what a client carries is this payload sealed to one key by
    ``kvstore.protocol.causal_context`` (an unsealed vector would let anyone claim any history).
    """
    return msgpack.packb(sorted(vector.items()), use_bin_type=True)


def decode_vector(raw: bytes) -> VersionVector:
    """Parse ``encode_vector`` bytes, refusing any shape or counter ``update`` could not use."""
    try:
        entries = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidContext(f"context is not valid msgpack: {exc}") from None
    if not isinstance(entries, list) or len(entries) > MAX_CONTEXT_ENTRIES:
        raise InvalidContext("context must be a list of [member, counter] entries")
    vector: VersionVector = {}
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], int)
            or isinstance(entry[1], bool)
            or not 0 <= entry[1] <= MAX_CONTEXT_COUNTER
        ):
            raise InvalidContext("context entries must be [member, counter in 0..2**63-1]")
        # A duplicated member keeps its highest counter: never claim less than the client saw.
        vector[entry[0]] = max(entry[1], vector.get(entry[0], 0))
    return vector
