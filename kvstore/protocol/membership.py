"""Cluster membership as a versioned configuration (pure logic).

Theory of operation
-------------------
The ring is not read from each node's TOML for ever: it is a ``ClusterConfig`` with a
``version``, the members' addresses, and a *phase*:

* ``stable``: one member set; keys are placed by the ring of that set.
* ``joint(old, new)``: a range move is under way (Raft's joint consensus, Ongaro & Ousterhout
  2014 §6, applied to a Dynamo ring as Riak's ``cluster plan/commit`` and Cassandra's
  bootstrap/decommission streaming do).  Reads use the *old* ring; eventual writes go to the
  owners of both rings (W acknowledgements among the old owners *and* among the new ones);
  CASPaxos rounds need a majority of the old acceptor set *and* one of the new set.

A change is always ``stable(A) -> joint(A, B) -> stable(B)`` (or back to ``stable(A)`` by an
abort), each step one version higher.  The configuration lives in a linearizable register
(CASPaxos, under ``CONFIG_KEY``, a key no client can name since client keys never hold a NUL),
and every step is a compare-and-set on the stored configuration, so two different
configurations are never accepted for one version: two concurrent operators both read
version v, both try v+1, and only one compare-and-set wins.

Nodes learn newer versions by gossip (every internal message and heartbeat carries the
sender's version; a node seeing a higher one fetches it) and *fence* requests stamped with an
older one: a typed ``stale_config`` refusal, never a silent answer from an old placement.

Each member's address may name the *machine* it runs on (``Address.machine``): rings place a
key's replicas on distinct machines first (kvstore.protocol.ring).  Machines are part of the
configuration, so every node of a version places by the same ones; an encoding without them
(every configuration written before they existed) decodes as "each member a machine of its own",
which places exactly as before, and a configuration that names none encodes byte for byte as before.

Guarantees of this module: ``Placement`` of a config is deterministic (rings derive only from
member ids and machines); ``segments`` partitions the token space so that each segment has exactly one old
and one new owner list (what must be streamed where); transitions refuse every ill-formed
change with a typed ``MembershipError`` carrying a stable code.  No I/O, no clock, no
randomness; every ordering is by sorted member id.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Literal

from kvstore.protocol.paxos import majority
from kvstore.protocol.ring import Ring, shared_ring

CONFIG_KEY = "\x00kvstore/cluster-config"  # client keys never hold a NUL (kv_api refuses them)
MAX_MEMBERS = 64
MAX_CONFIG_BYTES = 64 * 1024
MAX_MACHINE_BYTES = 128
# The typed refusal of a request stamped with an older configuration version (nothing was done).
STALE_CONFIG = "stale_config"

Phase = Literal["stable", "joint"]
Fence = Literal["current", "stale", "newer"]


class MembershipError(ValueError):
    """A refused membership change or a malformed configuration; ``code`` is stable (JSON errors)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Address:
    """Where a member is reached, and (``machine``) which machine it runs on, for placement:
    "" is a machine of its own.  The machine travels with the address so that every node places
    keys by the same machines: they are part of the configuration version, like the members."""

    host: str
    http_port: int
    peer_port: int
    machine: str = ""

    @property
    def endpoint(self) -> tuple[str, int, int]:
        """The network part: two members may share a machine, never an endpoint."""
        return (self.host, self.http_port, self.peer_port)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"host": self.host, "http_port": self.http_port, "peer_port": self.peer_port}
        if self.machine:
            # Only when set: a configuration that names no machine encodes exactly as before.
            wire["machine"] = self.machine
        return wire

    @staticmethod
    def from_wire(raw: Any) -> Address:
        required = {"host", "http_port", "peer_port"}
        if not isinstance(raw, dict) or not required <= set(raw) <= required | {"machine"}:
            raise MembershipError("invalid_config", "an address is {host, http_port, peer_port[, machine]}")
        host, http_port, peer_port = raw["host"], raw["http_port"], raw["peer_port"]
        if not isinstance(host, str) or not host:
            raise MembershipError("invalid_config", "an address's host must be a non-empty string")
        for port in (http_port, peer_port):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise MembershipError("invalid_config", f"port {port!r} is not in 1..65535")
        machine = raw.get("machine", "")
        if not isinstance(machine, str) or len(machine.encode()) > MAX_MACHINE_BYTES or not machine.isprintable():
            raise MembershipError("invalid_config", f"a machine is a printable string of at most {MAX_MACHINE_BYTES} bytes")
        return Address(host, http_port, peer_port, machine)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One version of the cluster's membership.  ``old == new`` exactly when stable."""

    version: int
    addresses: tuple[tuple[str, Address], ...]  # every member of old | new, sorted by id
    old: tuple[str, ...]  # sorted
    new: tuple[str, ...]  # sorted

    def __post_init__(self) -> None:
        assert self.version >= 0
        ids = tuple(member for member, _ in self.addresses)
        assert ids == tuple(sorted(set(ids))), "addresses sorted by id, no duplicates"
        assert self.old == tuple(sorted(set(self.old))) and self.new == tuple(sorted(set(self.new)))
        assert self.old and self.new, "a member set is never empty"
        assert set(ids) == set(self.old) | set(self.new), "an address for every member, and no other"

    # --- views -------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return "stable" if self.old == self.new else "joint"

    @property
    def members(self) -> tuple[str, ...]:
        """Every member that takes part in this version (old and new), sorted."""
        return tuple(member for member, _ in self.addresses)

    @property
    def machines(self) -> dict[str, str]:
        """member -> machine, for the members that name one (the others are machines of their own)."""
        return {member: address.machine for member, address in self.addresses if address.machine}

    def address(self, member: str) -> Address:
        for member_id, address in self.addresses:
            if member_id == member:
                return address
        raise KeyError(member)

    # --- construction and transitions --------------------------------------------------------

    @staticmethod
    def initial(addresses: dict[str, Address]) -> ClusterConfig:
        """Version 0: the member list every node reads from its TOML (what a cluster starts with)."""
        ids = tuple(sorted(addresses))
        return ClusterConfig(0, tuple((m, addresses[m]) for m in ids), ids, ids)

    def _require_stable(self) -> None:
        if self.phase != "stable":
            raise MembershipError(
                "change_in_progress",
                f"version {self.version} is moving {list(self.old)} -> {list(self.new)}; "
                "finish or abort it first",
            )

    def _begin(self, new: tuple[str, ...], extra: dict[str, Address], replicas: int) -> ClusterConfig:
        if len(new) < replicas:
            raise MembershipError(
                "too_few_members", f"{len(new)} members cannot hold {replicas} replicas of every key"
            )
        if len(set(self.old) | set(new)) > MAX_MEMBERS:
            raise MembershipError("too_many_members", f"at most {MAX_MEMBERS} members")
        merged = dict(self.addresses) | extra
        ids = sorted(set(self.old) | set(new))
        return ClusterConfig(self.version + 1, tuple((m, merged[m]) for m in ids), self.old, tuple(sorted(new)))

    def join(self, member: str, address: Address, replicas: int) -> ClusterConfig:
        self._require_stable()
        if member in self.new:
            raise MembershipError("already_member", f"{member!r} is already a member")
        for other, other_address in self.addresses:
            if other_address.endpoint == address.endpoint:
                raise MembershipError("address_in_use", f"{other!r} already uses {address}")
        return self._begin((*self.new, member), {member: address}, replicas)

    def leave(self, member: str, replicas: int) -> ClusterConfig:
        self._require_stable()
        if member not in self.new:
            raise MembershipError("unknown_member", f"{member!r} is not a member")
        return self._begin(tuple(m for m in self.new if m != member), {}, replicas)

    def replace(self, member: str, by: str, address: Address, replicas: int) -> ClusterConfig:
        self._require_stable()
        if member not in self.new:
            raise MembershipError("unknown_member", f"{member!r} is not a member")
        if by in self.new:
            raise MembershipError("already_member", f"{by!r} is already a member")
        return self._begin(tuple(m for m in self.new if m != member) + (by,), {by: address}, replicas)

    def commit(self) -> ClusterConfig:
        """joint(old, new) -> stable(new): the move is complete; old-only members are gone."""
        if self.phase != "joint":
            raise MembershipError("no_change_in_progress", f"version {self.version} is stable")
        return ClusterConfig(
            self.version + 1, tuple((m, a) for m, a in self.addresses if m in self.new), self.new, self.new
        )

    def abort(self) -> ClusterConfig:
        """joint(old, new) -> stable(old): give the move up (the old owners still hold everything)."""
        if self.phase != "joint":
            raise MembershipError("no_change_in_progress", f"version {self.version} is stable")
        return ClusterConfig(
            self.version + 1, tuple((m, a) for m, a in self.addresses if m in self.old), self.old, self.old
        )

    # --- wire --------------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "phase": self.phase,
            "old": list(self.old),
            "new": list(self.new),
            "members": {m: a.to_wire() for m, a in self.addresses},
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def from_wire(raw: Any) -> ClusterConfig:
        if not isinstance(raw, dict) or set(raw) != {"version", "phase", "old", "new", "members"}:
            raise MembershipError("invalid_config", "a config is {version, phase, old, new, members}")
        version, old, new, members = raw["version"], raw["old"], raw["new"], raw["members"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise MembershipError("invalid_config", "version must be a non-negative integer")
        for name, ids in (("old", old), ("new", new)):
            if not isinstance(ids, list) or not ids or not all(isinstance(m, str) and m for m in ids):
                raise MembershipError("invalid_config", f"{name} must be a non-empty list of member ids")
            if len(ids) > MAX_MEMBERS or len(set(ids)) != len(ids):
                raise MembershipError("invalid_config", f"{name}: at most {MAX_MEMBERS} distinct ids")
        if not isinstance(members, dict) or set(members) != set(old) | set(new):
            raise MembershipError("invalid_config", "members must give an address for exactly old | new")
        addresses = tuple((m, Address.from_wire(members[m])) for m in sorted(members))
        config = ClusterConfig(version, addresses, tuple(sorted(old)), tuple(sorted(new)))
        if raw["phase"] != config.phase:
            raise MembershipError("invalid_config", f"phase {raw['phase']!r} contradicts old/new")
        return config

    @staticmethod
    def decode(blob: bytes) -> ClusterConfig:
        if len(blob) > MAX_CONFIG_BYTES:
            raise MembershipError("invalid_config", f"a config is at most {MAX_CONFIG_BYTES} bytes")
        try:
            raw = json.loads(blob)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MembershipError("invalid_config", f"not JSON: {exc}") from None
        return ClusterConfig.from_wire(raw)


def fence(request_version: int, my_version: int) -> Fence:
    """How a node treats a request stamped with ``request_version``: ``stale`` ones are refused
    (typed ``stale_config``); ``newer`` ones are served and make the node fetch that version."""
    if request_version < my_version:
        return "stale"
    if request_version > my_version:
        return "newer"
    return "current"


@dataclass(frozen=True, slots=True)
class Segment:
    """A half-open token range (start, end] with one owner list in each ring."""

    start: int
    end: int
    old_owners: tuple[str, ...]
    new_owners: tuple[str, ...]

    @property
    def gained(self) -> tuple[str, ...]:
        """Owners in the new ring that do not hold the range yet (the stream's destinations)."""
        return tuple(m for m in self.new_owners if m not in self.old_owners)

    @property
    def lost(self) -> tuple[str, ...]:
        return tuple(m for m in self.old_owners if m not in self.new_owners)


class Placement:
    """Where keys live under one ``ClusterConfig``, for N replicas and the given vnodes."""

    def __init__(self, config: ClusterConfig, replicas: int, vnodes: int) -> None:
        assert replicas >= 1
        self.config = config
        self.replicas = replicas
        machines = config.machines
        self.old_ring = shared_ring(list(config.old), vnodes, machines)
        self.new_ring = self.old_ring if config.phase == "stable" else shared_ring(list(config.new), vnodes, machines)
        assert replicas <= min(len(config.old), len(config.new)), "fewer members than replicas"

    @property
    def joint(self) -> bool:
        return self.config.phase == "joint"

    @property
    def read_ring(self) -> Ring:
        """The ring reads (and the AP mechanisms' ownership) follow: the old one until commit."""
        return self.old_ring

    def old_owners(self, token: int) -> tuple[str, ...]:
        return self.old_ring.walk_token(token)[: self.replicas]

    def new_owners(self, token: int) -> tuple[str, ...]:
        return self.new_ring.walk_token(token)[: self.replicas]

    def write_owners(self, token: int) -> tuple[str, ...]:
        """Old owners in preference order, then the new owners that are not old ones."""
        old = self.old_owners(token)
        return old + tuple(m for m in self.new_owners(token) if m not in old)

    def acceptor_sets(self, token: int) -> tuple[tuple[str, ...], ...]:
        """The sets a CASPaxos round needs a majority of: one in a stable phase, or when both
        rings agree on the key; the old and the new one in a joint phase (joint consensus)."""
        old = self.old_owners(token)
        if not self.joint:
            return (old,)
        new = self.new_owners(token)
        return (old,) if set(new) == set(old) else (old, new)

    def owns(self, member: str, token: int) -> bool:
        """Whether ``member`` must keep (and may be written) the key's data in this phase."""
        return member in self.write_owners(token)

    def segments(self) -> list[Segment]:
        """The token space cut at every vnode boundary of both rings, in token order."""
        return segments(self.old_ring, self.new_ring, self.replicas)


def segments(old: Ring, new: Ring, replicas: int) -> list[Segment]:
    """Partition the ring into (start, end] pieces, each with one owner list per ring."""
    bounds = sorted({r.end for r in old.ranges(replicas)} | {r.end for r in new.ranges(replicas)})
    out: list[Segment] = []
    for index, end in enumerate(bounds):
        start = bounds[index - 1] if index else bounds[-1]
        if len(bounds) == 1:
            start = end  # one vnode in all: the single range is the whole ring
        out.append(Segment(start, end, old.walk_token(end)[:replicas], new.walk_token(end)[:replicas]))
    return out


def segment_of(cuts: list[Segment], token: int) -> Segment:
    """The segment holding ``token`` (``cuts`` as returned by ``segments``)."""
    ends = [s.end for s in cuts]
    index = bisect_left(ends, token)
    return cuts[0] if index == len(ends) else cuts[index]


def quorum_reached(acked: set[str] | frozenset[str], sets: tuple[tuple[str, ...], ...]) -> bool:
    """A majority of every set answered (joint consensus: both the old and the new set)."""
    return all(sum(1 for m in group if m in acked) >= majority(len(group)) for group in sets)


def quorum_possible(
    acked: set[str] | frozenset[str], waiting: set[str] | frozenset[str], sets: tuple[tuple[str, ...], ...]
) -> bool:
    """Whether the acceptors still to answer could complete ``quorum_reached``."""
    return quorum_reached(set(acked) | set(waiting), sets)


def write_quorum_reached(acked: set[str], old: tuple[str, ...], new: tuple[str, ...], w: int) -> bool:
    """A joint-phase eventual write: W among the old owners and W among the new ones (each capped
    at the set's size), so it survives both before and after the commit."""
    return sum(1 for m in old if m in acked) >= min(w, len(old)) and sum(1 for m in new if m in acked) >= min(
        w, len(new)
    )

