"""Consistent-hash ring with virtual nodes.

Theory of operation
-------------------
Follows the Dynamo paper (DeCandia et al., SOSP 2007, §4.2-4.3) with Cassandra's
"vnodes": every member owns ``vnodes`` tokens on a 64-bit ring (signed mmh3 x64
hashes, the same token space as Cassandra's Murmur3Partitioner).  A key's token is
the mmh3 hash of its UTF-8 bytes; the key belongs to the first vnode clockwise at
or after that token, and its *preference list* is the first N distinct members met
walking clockwise from there.  The members after those N, in the same order, are
the key's *fallbacks*: where a sloppy quorum sends writes for unreachable primaries.

Guarantees:

* Determinism: tokens are derived only from (member id, vnode index), so every node
  computes the identical ring from the same member list, with no coordination.
* Minimal movement: adding a member only inserts its tokens; a key changes primary
  only to the new member, never between two old members.
* O(log V*M) lookup: a bisection on a sorted token list, then an index into a
  precomputed table of distinct successors per vnode.

Assumes the member list is the same on every node: the membership version in force
(kvstore.protocol.membership), whose ``Placement`` holds one ring per member set.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import mmh3
from sortedcontainers import SortedDict

TOKEN_MIN = -(2**63)
TOKEN_MAX = 2**63 - 1
TOKEN_SPACE = 2**64
DEFAULT_VNODES = 256


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
    def __init__(self, members: list[str], vnodes: int = DEFAULT_VNODES) -> None:
        assert members, "a ring needs at least one member"
        assert len(set(members)) == len(members), "duplicate member ids"
        assert vnodes >= 1
        self.members: tuple[str, ...] = tuple(sorted(members))
        self.vnodes = vnodes
        by_token: SortedDict = SortedDict()
        for member in self.members:
            for index in range(vnodes):
                token = vnode_token(member, index)
                # A 64-bit collision is astronomically unlikely; resolve it deterministically anyway.
                if token not in by_token or member < by_token[token]:
                    by_token[token] = member
        self._tokens: list[int] = list(by_token.keys())
        self._owner_at: list[str] = list(by_token.values())
        # Precomputing the distinct clockwise walk from each vnode turns every lookup into
        # a bisection plus an index, instead of a walk over up to V*M tokens.
        self._walk: list[tuple[str, ...]] = [self._distinct_from(i) for i in range(len(self._tokens))]

    def _distinct_from(self, start: int) -> tuple[str, ...]:
        seen: list[str] = []
        count = len(self._tokens)
        for step in range(count):
            member = self._owner_at[(start + step) % count]
            if member not in seen:
                seen.append(member)
                if len(seen) == len(self.members):
                    break
        return tuple(seen)

    def _vnode_index(self, token: int) -> int:
        index = bisect_left(self._tokens, token)
        return 0 if index == len(self._tokens) else index

    def walk(self, key: str) -> tuple[str, ...]:
        """Every member, in the key's clockwise order: preference list first, then fallbacks."""
        return self._walk[self._vnode_index(key_token(key))]

    def walk_token(self, token: int) -> tuple[str, ...]:
        return self._walk[self._vnode_index(token)]

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
        count = len(self._tokens)
        return [
            TokenRange(self._tokens[i - 1] if i else self._tokens[-1], self._tokens[i], self._walk[i][:n])
            for i in range(count)
        ]

    def ranges_of(self, member: str, n: int) -> list[TokenRange]:
        """The ranges ``member`` replicates (as one of the N)."""
        return [r for r in self.ranges(n) if member in r.owners]

    def ownership(self, n: int = 1) -> dict[str, float]:
        """Fraction of the ring each member replicates (n=1: as primary). Sums to n."""
        share = dict.fromkeys(self.members, 0.0)
        for token_range in self.ranges(n):
            for owner in token_range.owners:
                share[owner] += token_range.size() / TOKEN_SPACE
        return share
