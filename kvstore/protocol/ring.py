"""Consistent-hash ring with virtual nodes.

Theory of operation
-------------------
Follows the Dynamo paper (DeCandia et al., SOSP 2007, §4.2-4.3) with Cassandra's
"vnodes": every member owns ``vnodes`` tokens on a 64-bit ring (signed mmh3 x64
hashes, the same token space as Cassandra's Murmur3Partitioner).  A key's token is
the mmh3 hash of its UTF-8 bytes; the key belongs to the first vnode clockwise at
or after that token, and its *preference list* is the first N members of its *walk*.
The members after those N, in the same order, are the key's *fallbacks*: where a
sloppy quorum sends writes for unreachable primaries.

Machines.  Each member runs on a *machine* (by default a machine of its own, named by
its id).  Several node processes on one machine (one per core: a node uses one core at
most) fail together, so the walk prefers distinct machines, as Riak's location-aware
claim and Cassandra's rack-aware NetworkTopologyStrategy do: walking clockwise from the
key's vnode, the first member met on each machine comes first (in ring order), then the
second member met on each machine (in ring order), and so on.  So the N primaries sit on
N distinct machines whenever there are N machines; with fewer, every machine holds one
before any holds two.  Fallbacks follow the same rule, so the first fallbacks are one member
of each machine that holds no replica of the key (a stand-in lands on a new machine while
one is up).  When every member is its own machine
(the default) every member is "first on its machine" and the walk is exactly the
clockwise order of distinct members: clusters that name no machines place as before.

Guarantees:

* Determinism: tokens are derived only from (member id, vnode index), and the walk only
  from tokens and the member -> machine map, so every node computes the identical ring
  from the same member list, with no coordination.
* Minimal movement (one member per machine): adding a member only inserts it into
  walks; a key changes primary only to the new member, never between two old members.
  A member added to a machine that already has one can also reorder the walk's later
  members (a range move like any other: kvstore.protocol.membership streams it).
* O(log V*M) lookup: a bisection on a sorted token list, then the walk from that vnode,
  computed once and kept in a bounded cache (``walk_cache_size`` vnodes, least recently
  used out).  A ring never changes in place: a membership change builds a new ``Ring``,
  so a cached walk can never answer for another member set.  The range lists
  (``ranges``, ``ranges_of``: anti-entropy's every round) are computed once per ring too,
  and ``shared_ring`` hands every caller in a process one ring per member set.

Assumes the member list (and machines) is the same on every node: the membership version
in force (kvstore.protocol.membership), whose ``Placement`` holds one ring per member set.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import mmh3

TOKEN_MIN = -(2**63)
TOKEN_MAX = 2**63 - 1
TOKEN_SPACE = 2**64
DEFAULT_VNODES = 256
# Walks cached per ring: every vnode of 16 members at 256 vnodes fits, so a node's ring is
# computed once per vnode; bigger rings keep the most recently used.
WALK_CACHE_SIZE = 4096


SHARED_RINGS = 16  # rings kept by ``shared_ring`` (least recently used out)
_shared_rings: OrderedDict[tuple[object, ...], Ring] = OrderedDict()


def shared_ring(members: list[str], vnodes: int = DEFAULT_VNODES, machines: Mapping[str, str] | None = None) -> Ring:
    """The ``Ring`` of this member set, built once per process and shared by every caller asking
    for the same one (a ring never changes in place, and its answers depend only on these
    arguments): a node rebuilds its placement at every start and membership change, and a
    simulated cluster's nodes all build the same rings.  Bounded by ``SHARED_RINGS``."""
    given = machines or {}
    key = (tuple(sorted(members)), vnodes, tuple(given.get(m) or m for m in sorted(members)))
    ring = _shared_rings.get(key)
    if ring is None:
        ring = Ring(members, vnodes, machines)
        _shared_rings[key] = ring
        while len(_shared_rings) > SHARED_RINGS:
            _shared_rings.popitem(last=False)
    else:
        _shared_rings.move_to_end(key)
    return ring


def key_token(key: str) -> int:
    """The ring position of a key (signed 64-bit)."""
    return int(mmh3.hash64(key.encode("utf-8"), signed=True)[0])


def vnode_token(member: str, index: int) -> int:
    return int(mmh3.hash64(f"{member}#vnode{index}".encode(), signed=True)[0])


@dataclass(frozen=True, slots=True)
class TokenRange:
    """The half-open ring range (start, end] and the members replicating it, in preference order."""

    start: int
    end: int
    owners: tuple[str, ...]

    def contains(self, token: int) -> bool:
        if self.start < self.end:
            return self.start < token <= self.end
        return token > self.start or token <= self.end  # wraps past TOKEN_MAX

    def size(self) -> int:
        return (self.end - self.start) % TOKEN_SPACE or TOKEN_SPACE


class Ring:
    def __init__(
        self,
        members: list[str],
        vnodes: int = DEFAULT_VNODES,
        machines: Mapping[str, str] | None = None,
        walk_cache_size: int = WALK_CACHE_SIZE,
    ) -> None:
        """``machines`` maps a member to the machine it runs on; a member it leaves out (or maps
        to "") is a machine of its own, named by its id, and entries for non-members are ignored
        (a joint configuration hands both rings one map).  ``walk_cache_size`` bounds the cached
        walks (0: compute every lookup, for tests that compare with the cache)."""
        assert members, "a ring needs at least one member"
        assert len(set(members)) == len(members), "duplicate member ids"
        assert vnodes >= 1
        assert walk_cache_size >= 0
        self.members: tuple[str, ...] = tuple(sorted(members))
        self.vnodes = vnodes
        given = machines or {}
        self._machine_of: dict[str, str] = {m: given.get(m) or m for m in self.members}
        # Whether any machine holds two members; if not, the walk is the plain clockwise order.
        self.shares_machines = len(set(self._machine_of.values())) < len(self.members)
        points = sorted((vnode_token(member, index), member) for member in self.members for index in range(vnodes))
        self._tokens: list[int] = []
        self._owner_at: list[str] = []
        for token, member in points:
            # A 64-bit collision is astronomically unlikely; resolve it deterministically anyway
            # (the smallest member id keeps the token: it sorts first).
            if not self._tokens or self._tokens[-1] != token:
                self._tokens.append(token)
                self._owner_at.append(member)
        # Walks are computed when first asked for, not all V*M at construction: a ring is built
        # at every node start and membership change, and most lookups hit few vnodes.  The cache
        # is bounded (a 64-member ring of 4096 vnodes would otherwise hold 262,144 walks).
        self._walk_cache_size = min(walk_cache_size, len(self._tokens))
        self._walk_cache: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        # Range lists by N and by (member, N): anti-entropy asks for its ranges every round, and a
        # ring never changes, so each is computed once (at most members * (members + 1) lists).
        self._ranges_cache: dict[int, tuple[TokenRange, ...]] = {}
        self._ranges_of_cache: dict[tuple[str, int], tuple[TokenRange, ...]] = {}

    def machine_of(self, member: str) -> str:
        return self._machine_of[member]

    def _walk_from(self, start: int) -> tuple[str, ...]:
        """Every member, from the vnode at index ``start``: first met on its machine first (ring
        order), then second met, and so on (see the module docstring)."""
        owner_at, count, everyone = self._owner_at, len(self._tokens), len(self.members)
        met: list[str] = []  # distinct members in clockwise order (a list: M is small, `in` is cheap)
        index = start
        for _ in range(count):
            member = owner_at[index]
            index = index + 1 if index + 1 < count else 0
            if member not in met:
                met.append(member)
                if len(met) == everyone:
                    break
        if not self.shares_machines:
            return tuple(met)
        per_machine: dict[str, int] = {}
        ranked: list[tuple[int, int, str]] = []  # (rank on its machine, position in the walk, member)
        for position, member in enumerate(met):
            machine = self._machine_of[member]
            rank = per_machine.get(machine, 0)
            per_machine[machine] = rank + 1
            ranked.append((rank, position, member))
        return tuple(member for _, _, member in sorted(ranked))

    def _walk_at(self, index: int) -> tuple[str, ...]:
        cache = self._walk_cache
        walk = cache.get(index)
        if walk is not None:
            if self._walk_cache_size < len(self._tokens):
                cache.move_to_end(index)  # least recently used goes first; pointless when all fit
            return walk
        walk = self._walk_from(index)
        if self._walk_cache_size:
            if len(cache) >= self._walk_cache_size:
                cache.popitem(last=False)
            cache[index] = walk
        return walk

    def _vnode_index(self, token: int) -> int:
        index = bisect_left(self._tokens, token)
        return 0 if index == len(self._tokens) else index

    def walk(self, key: str) -> tuple[str, ...]:
        """Every member, in the key's walk order: preference list first, then fallbacks."""
        return self._walk_at(self._vnode_index(key_token(key)))

    def walk_token(self, token: int) -> tuple[str, ...]:
        return self._walk_at(self._vnode_index(token))

    def vnode_token_of(self, token: int) -> int:
        """The token of the vnode that owns ``token`` (the first at or after it, wrapping)."""
        return self._tokens[self._vnode_index(token)]

    def vnode_owners(self) -> list[tuple[int, str]]:
        """Every vnode as (token, member), in ring order (for pictures of the ring)."""
        return list(zip(self._tokens, self._owner_at, strict=True))

    def preference_list(self, key: str, n: int) -> tuple[str, ...]:
        assert 1 <= n <= len(self.members), f"N={n} with {len(self.members)} members"
        return self.walk(key)[:n]

    def fallbacks(self, key: str, n: int) -> tuple[str, ...]:
        assert 1 <= n <= len(self.members)
        return self.walk(key)[n:]

    def ranges(self, n: int) -> list[TokenRange]:
        """Every vnode range with its N replicas, in ring order."""
        cached = self._ranges_cache.get(n)
        if cached is None:
            cached = tuple(
                TokenRange(self._tokens[i - 1] if i else self._tokens[-1], self._tokens[i], self._walk_at(i)[:n])
                for i in range(len(self._tokens))
            )
            self._ranges_cache[n] = cached
        return list(cached)

    def ranges_of(self, member: str, n: int) -> list[TokenRange]:
        """The ranges ``member`` replicates (as one of the N)."""
        cached = self._ranges_of_cache.get((member, n))
        if cached is None:
            cached = tuple(r for r in self.ranges(n) if member in r.owners)
            self._ranges_of_cache[(member, n)] = cached
        return list(cached)

    def vnode_range_of(self, token: int) -> tuple[int, int]:
        """The ``(start, end]`` of the vnode range holding ``token``."""
        index = self._vnode_index(token)
        return self._tokens[index - 1], self._tokens[index]  # index 0: wraps from the last token

    def is_vnode_range(self, start: int, end: int) -> bool:
        """Whether ``(start, end]`` is exactly one vnode's range of this ring."""
        index = bisect_left(self._tokens, end)
        if index == len(self._tokens) or self._tokens[index] != end:
            return False
        return self._tokens[index - 1] == start  # index 0: the range that wraps from the last token

    def ownership(self, n: int = 1) -> dict[str, float]:
        """Fraction of the ring each member replicates (n=1: as primary). Sums to n."""
        share = dict.fromkeys(self.members, 0.0)
        for token_range in self.ranges(n):
            for owner in token_range.owners:
                share[owner] += token_range.size() / TOKEN_SPACE
        return share
