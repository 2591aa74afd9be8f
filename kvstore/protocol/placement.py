"""Where a key lives: its token, its preference list and the fallbacks that would stand in.

Theory of operation
-------------------
Pure: a ``Ring``, N and a "believed up" predicate in, a ``Placement`` out; no clock, no I/O.
It states what the coordinator does (``Node.write_targets``): the key's token falls in one
vnode; the ring's walk from there (distinct machines first, kvstore.protocol.ring) gives
its N *primaries* (the preference list) and, after them, its *fallbacks*.  With fewer
machines than N some primaries share a machine: ``shared_machines`` names those machines,
since one machine failing then takes more than one replica of the key with it.  Each
primary believed down is replaced, in order, by the next fallback believed up (Dynamo's
sloppy quorum, section 4.6), which stores the write as a hint for that primary.  Which
members are believed up is the asking node's view (its failure detector), so two nodes on
the two sides of a partition give two different answers for one key -- that difference is
the point of showing it.

What the answer means for each consistency level: ``eventual`` (sloppy) can write while at
least one primary or stand-in is reachable; ``quorum`` and ``linearizable`` need a majority
of the *primaries* (stand-ins do not count), which ``majority_reachable`` says.

Served as ``GET /cluster/keys/{key}/placement`` (``kvstore.server.api``), printed by
``kvstore status --key K`` and drawn by the live explorer (``kvstore.ui``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstore.protocol.quorum import majority
from kvstore.protocol.ring import Ring, key_token


@dataclass(frozen=True)
class Placement:
    key: str
    token: int
    vnode_token: int  # the token of the vnode that owns the key (the first at or after its token)
    replicas: int  # N
    preference_list: tuple[str, ...]
    primaries_up: tuple[str, ...]
    primaries_down: tuple[str, ...]
    fallbacks: tuple[str, ...]  # every other member, in ring order
    fallbacks_up: tuple[str, ...]
    stand_ins: dict[str, str]  # primary believed down -> the fallback that takes its writes
    machines: dict[str, str]  # every member (primaries and fallbacks) -> the machine it runs on

    @property
    def shared_machines(self) -> tuple[str, ...]:
        """Machines holding more than one of the key's primaries (sorted): empty when N machines hold them."""
        on = [self.machines[p] for p in self.preference_list]
        return tuple(sorted({m for m in on if on.count(m) > 1}))

    @property
    def majority_reachable(self) -> bool:
        """Whether a strict quorum (or a CASPaxos round) can reach a majority of the primaries."""
        return len(self.primaries_up) >= majority(self.replicas)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "token": self.token,
            "vnode_token": self.vnode_token,
            "replicas": self.replicas,
            "preference_list": list(self.preference_list),
            "primaries_up": list(self.primaries_up),
            "primaries_down": list(self.primaries_down),
            "fallbacks": [
                {"id": f, "up": f in self.fallbacks_up,
                 "stands_in_for": next((p for p, s in self.stand_ins.items() if s == f), None)}
                for f in self.fallbacks
            ],
            "majority_reachable": self.majority_reachable,
            "machines": {m: self.machines[m] for m in (*self.preference_list, *self.fallbacks)},
            "shared_machines": list(self.shared_machines),
        }


def placement(ring: Ring, key: str, replicas: int, is_up: Callable[[str], bool]) -> Placement:
    """The key's placement as a node with failure detector ``is_up`` sees it."""
    assert 1 <= replicas <= len(ring.members), f"N={replicas} with {len(ring.members)} members"
    token = key_token(key)
    walk = ring.walk_token(token)
    primaries, fallbacks = walk[:replicas], walk[replicas:]
    up = tuple(p for p in primaries if is_up(p))
    down = tuple(p for p in primaries if p not in up)
    spare = [f for f in fallbacks if is_up(f)]
    stand_ins = dict(zip(down, spare, strict=False))  # as Node.coordinate_write plans it
    return Placement(
        key=key,
        token=token,
        vnode_token=ring.vnode_token_of(token),
        replicas=replicas,
        preference_list=primaries,
        primaries_up=up,
        primaries_down=down,
        fallbacks=fallbacks,
        fallbacks_up=tuple(spare),
        stand_ins=stand_ins,
        machines={m: ring.machine_of(m) for m in walk},
    )
