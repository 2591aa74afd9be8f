"""Who hears whom right now, and so which side of a fault a request is on, per key.

Theory of operation
-------------------
Pure.  A ``Topology`` is a snapshot of the faults in force: the link rules the nemesis
installed (``ClusterControl.rules``: ``drop_in``/``drop_out`` per peer, at both ends of each
cut link), the nodes killed or paused, the clock skews.  ``hears(receiver, sender)`` holds
when neither end drops the message; two nodes *talk* when both directions hold and both run.

Sides are judged per key, as the batch explorer judges them (``kvstore.explore.report``): a
request made through node X on key k is on the *majority side* when X, counting itself,
talks to a majority of k's N replicas -- the side where a quorum or a CASPaxos round can be
served.  A request through a node that is down is on the minority side (nobody answers it).
Direct links only: a request forwarded through a bridge node is judged by its first hop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.harness.nemesis import grudge_groups

MAJORITY, MINORITY = "majority", "minority"


@dataclass(frozen=True)
class Topology:
    nodes: tuple[str, ...]
    deaf_to: Mapping[str, frozenset[str]] = field(default_factory=dict)  # receiver -> senders it drops
    killed: frozenset[str] = frozenset()
    paused: frozenset[str] = frozenset()
    skews_ms: Mapping[str, float] = field(default_factory=dict)

    @staticmethod
    def from_rules(
        nodes: Sequence[str],
        rules: Mapping[str, Mapping[str, Mapping[str, Any]]],
        killed: Iterable[str] = (),
        paused: Iterable[str] = (),
        skews_ms: Mapping[str, float] | None = None,
    ) -> Topology:
        """From the nemesis's per-node link rules (``kvstore.harness.nemesis.grudge_to_rules`` form)."""
        deaf: dict[str, set[str]] = {n: set() for n in nodes}
        for node, table in rules.items():
            for peer, rule in table.items():
                if rule.get("drop_in") and node in deaf:
                    deaf[node].add(peer)  # node drops what arrives from peer
                if rule.get("drop_out") and peer in deaf:
                    deaf[peer].add(node)  # node drops what it sends to peer
        return Topology(tuple(sorted(nodes)), {n: frozenset(s) for n, s in deaf.items() if s},
                        frozenset(killed), frozenset(paused), dict(skews_ms or {}))

    def up(self, node: str) -> bool:
        return node not in self.killed and node not in self.paused

    def hears(self, receiver: str, sender: str) -> bool:
        return sender not in self.deaf_to.get(receiver, frozenset())

    def talks(self, a: str, b: str) -> bool:
        return a == b or (self.up(a) and self.up(b) and self.hears(a, b) and self.hears(b, a))

    def side(self, node: str, replicas_of_key: Sequence[str], n: int) -> str:
        if not self.up(node):
            return MINORITY
        reachable = sum(1 for r in replicas_of_key if self.talks(node, r))
        return MAJORITY if 2 * reachable > n else MINORITY

    @property
    def partitioned(self) -> bool:
        return any(self.deaf_to.values())

    @property
    def faulty(self) -> bool:
        return self.partitioned or bool(self.killed or self.paused or self.skews_ms)

    def groups(self) -> list[list[str]]:
        """The groups that still talk both ways (largest first), as the checker's sides."""
        return grudge_groups({n: set(self.deaf_to.get(n, frozenset())) for n in self.nodes})

    def cut_links(self) -> list[tuple[str, str]]:
        """Every (sender, receiver) whose messages are dropped, in order."""
        return [(s, r) for r in self.nodes for s in sorted(self.deaf_to.get(r, frozenset()))]

    def describe(self) -> str:
        """The faults in force in a few words ("" when there are none)."""
        parts: list[str] = []
        if self.partitioned:
            groups = self.groups()
            cut = self.cut_links()
            one_way = [(s, r) for s, r in cut if (r, s) not in cut]
            if len(groups) > 1:
                parts.append("partition " + " | ".join(" ".join(g) for g in groups))
            if one_way:
                parts.append("one-way: " + ", ".join(f"{r} does not hear {s}" for s, r in one_way))
            elif len(groups) == 1:
                parts.append("cut links: " + ", ".join(f"{s}-{r}" for s, r in cut if s < r))
        parts += [f"{n} killed" for n in sorted(self.killed)]
        parts += [f"{n} paused" for n in sorted(self.paused)]
        parts += [f"{n} clock {ms / 1000:+g} s" for n, ms in sorted(self.skews_ms.items())]
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": list(self.nodes),
            "cut": [list(pair) for pair in self.cut_links()],
            "groups": self.groups(),
            "killed": sorted(self.killed),
            "paused": sorted(self.paused),
            "skews_ms": dict(sorted(self.skews_ms.items())),
            "partitioned": self.partitioned,
            "description": self.describe(),
        }
