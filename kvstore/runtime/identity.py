"""A node's identity in the dots it issues: an incarnation kept *with* its data (Riak KV-679).

Theory of operation
-------------------
A dot ``(actor, counter)`` must name one write forever (``kvstore.protocol.versions``): replicas drop
an incoming sibling whose dot their clock already covers, as "seen and superseded".  A node
that coordinates with a counter it already used -- because it lost the data that held the
counter (a wiped or replaced disk, a memory store, an unsynced file after a crash) while the
other replicas kept its old dots -- issues dots they believe they have seen: its new writes are
acknowledged and then silently dropped everywhere else.  Riak's KV-679 is this bug; Riak fixed
it by giving a vnode a new actor id (an epoch) whenever its durable state is new.

The rule here: a node's actor for dots is ``<node_id>.<incarnation>``, where the incarnation
is a 64-bit random id drawn from the node's injected ``random.Random`` when the data store is
new, and stored in that store's meta (``Storage.meta_put``: the same file as the data, outside
every scan and Merkle tree).  So:

* a restart with the data intact reads the same incarnation back: the counters continue;
* a restart with the data lost (file deleted, disk replaced, directory restored empty) finds
  no incarnation, draws a new one, and counts from 1 under a name no replica has seen;
* a non-durable store (``memory``, or ``fsync = "never"``, which may lose acknowledged dots in
  a crash) gets a new incarnation at every start, never read back.

Fallback coordinators (sloppy quorum with no primary reachable) write under one-shot actors
``<node_id>!<incarnation>.<boot>.<seq>``: ``boot`` counts the starts of this incarnation and
is persisted before the node serves, ``seq`` counts within one run, so no two writes ever share
one, across restarts too.

What it assumes: the incarnation draw does not repeat for one node id (64 random bits from a
generator seeded with real entropy in ``kvstore.server.app``; a simulator must seed each start of
a node differently).  What it costs: each incarnation is one more entry in the clocks of the
keys it coordinates.  A corrupt identity record is treated like a missing one (a new
incarnation is always safe; reusing a guessed one is not).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import msgpack

from kvstore.storage.base import Storage

log = logging.getLogger(__name__)

IDENTITY_META = "node_identity"
INCARNATION_BITS = 64
_FORMAT = 1


class CorruptIdentity(ValueError):
    """A stored identity record could not be decoded."""


def new_incarnation(rng: random.Random) -> str:
    """A fresh incarnation id: 64 random bits as 16 hex digits (no '.' or '!', see ``actor``)."""
    return f"{rng.getrandbits(INCARNATION_BITS):0{INCARNATION_BITS // 4}x}"


@dataclass(frozen=True, slots=True)
class DataIdentity:
    """The identity under which a node issues dots during one run."""

    incarnation: str
    boot: int  # starts of this incarnation, 1 for the run that created it
    created: bool  # this run drew the incarnation (the store was new, wiped or non-durable)

    def __post_init__(self) -> None:
        assert self.incarnation and self.incarnation.isalnum(), f"bad incarnation {self.incarnation!r}"
        assert self.boot >= 1

    def actor(self, node_id: str) -> str:
        """The actor of the dots this node issues as a key's coordinating primary."""
        return f"{node_id}.{self.incarnation}"

    def fallback_actor(self, node_id: str, seq: int) -> str:
        """A one-shot actor for one fallback-coordinated write (``seq`` >= 1, unique per run)."""
        assert seq >= 1
        return f"{node_id}!{self.incarnation}.{self.boot}.{seq}"

    def encode(self) -> bytes:
        return msgpack.packb({"f": _FORMAT, "incarnation": self.incarnation, "boot": self.boot}, use_bin_type=True)

    @staticmethod
    def decode(blob: bytes) -> DataIdentity:
        try:
            obj = msgpack.unpackb(blob, raw=False)
            if not isinstance(obj, dict) or obj.get("f") != _FORMAT:
                raise ValueError("unknown identity format")
            incarnation, boot = obj["incarnation"], obj["boot"]
            if not isinstance(incarnation, str) or not incarnation.isalnum():
                raise ValueError(f"bad incarnation {incarnation!r}")
            if not isinstance(boot, int) or isinstance(boot, bool) or boot < 1:
                raise ValueError(f"bad boot counter {boot!r}")
            return DataIdentity(incarnation, boot, created=False)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise CorruptIdentity(f"undecodable node identity: {exc}") from exc


async def open_identity(storage: Storage, rng: random.Random, durable: bool) -> DataIdentity:
    """This run's identity for dots written to ``storage``: the stored incarnation with its boot
    counter advanced (durably, before it is used), or a new incarnation when the store has none,
    its record is corrupt, or the store is not durable."""
    if durable:
        blob = await storage.meta_get(IDENTITY_META)
        if blob is not None:
            try:
                stored = DataIdentity.decode(blob)
            except CorruptIdentity as exc:
                log.error("%s; starting a new incarnation", exc)
            else:
                identity = DataIdentity(stored.incarnation, stored.boot + 1, created=False)
                await storage.meta_put(IDENTITY_META, identity.encode())
                return identity
    identity = DataIdentity(new_incarnation(rng), 1, created=True)
    if durable:
        await storage.meta_put(IDENTITY_META, identity.encode())
    return identity
