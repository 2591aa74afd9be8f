"""Nemeses: the faults a chaos run injects, in Jepsen's vocabulary.

Theory of operation
-------------------
A *grudge* (Jepsen's term) maps each node to the set of nodes it must not hear
from.  Every partition shape is a pure function ``(nodes, rng) -> grudge``, so a
seed reproduces the same cut.  A grudge is installed by giving each node two
kinds of link rule: drop what it sends to a node that holds a grudge against it,
and drop what arrives from a node it holds a grudge against.  Because both ends
drop, a partition holds as soon as either end has its rule, even while the rules
reach the nodes one by one.  Client traffic never passes through these rules
(they live in the inter-node Transport), so clients stay bound to their node.

Process faults (kill/restart, kill-wipe -- a kill whose node comes back with an empty
disk --, kill-all -- every node at once --, pause/resume) act on the local cluster's PIDs;
``clock-skew`` moves one node's wall clock (LWW timestamps follow it); ``latency``
and ``loss`` set delay and drop probability on links; ``disk-full`` and ``slow-disk``
set one node's disk faults (``/admin/storage-faults``: its writes refused, or each
fsync held 3 s).  ``heal_all`` clears every
fault on every node, and the runner calls it in a ``finally``.

``FaultControl`` keeps what is in force (rules, skews, disk faults, who is killed or paused)
and reinstalls a node's faults when it restarts (a restarted process forgot them); the
per-node primitives are all a cluster has to provide.  ``ClusterControl`` provides them for
real node processes (the admin routes, through ``kvstore.client.admin.AdminClient``: sent once,
typed errors; and signals); ``kvstore.sim.control.SimControl`` for a simulated cluster, so both
run the same fault logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.client import ClientTransport, KvstoreError
from kvstore.client.admin import AdminClient
from kvstore.harness.endpoint import Endpoint, EndpointTransport, endpoint_urls
from kvstore.harness.local_cluster import LocalCluster

Grudge = dict[str, set[str]]

PARTITION_KINDS = ("halves", "majority", "isolate", "bridge", "majorities-ring", "one-way")
CUSTOM_PARTITION = "custom"  # a grudge drawn by hand (the live explorer): groups or single links
FAULT_KINDS = PARTITION_KINDS + (
    "kill", "kill-wipe", "kill-all", "pause", "clock-skew", "latency", "loss", "disk-full", "slow-disk",
)
SLOW_DISK = {"fsync_delay_ms": 3000.0}  # a 3 s fsync: longer than any request timeout


class NemesisError(Exception):
    """A fault could not be applied (e.g. kill on a cluster this harness did not start)."""


# --- pure partition shapes -------------------------------------------------------------------


def _complete_cut(groups: Sequence[Sequence[str]]) -> Grudge:
    grudge: Grudge = {n: set() for g in groups for n in g}
    for i, group in enumerate(groups):
        for j, other in enumerate(groups):
            if i != j:
                for n in group:
                    grudge[n].update(m for m in other if m not in group)
    return grudge


def groups_grudge(groups: Sequence[Sequence[str]]) -> Grudge:
    """Cut every link between two different groups (both directions); links inside a group stay."""
    seen: set[str] = set()
    for group in groups:
        for node in group:
            if node in seen:
                raise NemesisError(f"{node} is in two groups (a bridge is the 'bridge' shape)")
            seen.add(node)
    return _complete_cut(groups)


def links_grudge(nodes: Sequence[str], cut: Iterable[tuple[str, str]]) -> Grudge:
    """A grudge from single links: each ``(sender, receiver)`` means the receiver no longer hears
    the sender (cut both ways by naming both pairs)."""
    grudge: Grudge = {n: set() for n in nodes}
    for sender, receiver in cut:
        if sender not in grudge or receiver not in grudge or sender == receiver:
            raise NemesisError(f"no link {sender}->{receiver} among {', '.join(sorted(grudge))}")
        grudge[receiver].add(sender)
    return grudge


def grudge_groups(grudge: Grudge) -> list[list[str]]:
    """The groups of nodes that still hear each other both ways, directly or through each other
    (connected components, largest first, then by name): the sides a grudge leaves."""
    nodes = sorted(grudge)
    talks = {a: {b for b in nodes if b != a and b not in grudge[a] and a not in grudge[b]} for a in nodes}
    groups: list[list[str]] = []
    placed: set[str] = set()
    for start in nodes:
        if start in placed:
            continue
        group, frontier = {start}, [start]
        while frontier:
            for peer in talks[frontier.pop()]:
                if peer not in group:
                    group.add(peer)
                    frontier.append(peer)
        placed |= group
        groups.append(sorted(group))
    return sorted(groups, key=lambda g: (-len(g), g))


def partition_grudge(
    kind: str, nodes: Sequence[str], rng: random.Random, focus: str | None = None
) -> tuple[Grudge, Any]:
    """(grudge, description) for one partition shape; the description goes in the history.

    The nodes are drawn from ``rng``; ``focus`` names the node the shape is aimed at instead
    (the isolated, bridge or deaf node; for ``majority``/``halves``, one on the smaller side).
    """
    ordered = sorted(nodes)
    shuffled = ordered[:]
    rng.shuffle(shuffled)
    if focus is not None:
        if focus not in ordered:
            raise NemesisError(f"{focus!r} is not one of {', '.join(ordered)}")
        shuffled.remove(focus)
        if kind in ("majority", "halves"):
            shuffled.append(focus)
        else:
            shuffled.insert(0, focus)
    n = len(ordered)
    if n < 2:
        raise NemesisError("a partition needs at least two nodes")
    if kind == "halves":
        groups = [sorted(shuffled[: n // 2]), sorted(shuffled[n // 2 :])]
        return _complete_cut(groups), groups
    if kind == "majority":
        majority = n // 2 + 1
        groups = [sorted(shuffled[:majority]), sorted(shuffled[majority:])]
        return _complete_cut(groups), groups
    if kind == "isolate":
        alone = shuffled[0]
        groups = [[alone], sorted(m for m in ordered if m != alone)]
        return _complete_cut(groups), groups
    if kind == "bridge":
        if n < 3:
            raise NemesisError("bridge needs at least three nodes")
        bridge = shuffled[0]
        rest = shuffled[1:]
        left, right = sorted(rest[: len(rest) // 2]), sorted(rest[len(rest) // 2 :])
        grudge: Grudge = {m: set() for m in ordered}
        for a in left:
            grudge[a].update(right)
        for b in right:
            grudge[b].update(left)
        return grudge, {"bridge": bridge, "sides": [sorted([*left, bridge]), sorted([*right, bridge])]}
    if kind == "majorities-ring":
        # Each node keeps links only to its ring neighbours: with 5 nodes, each sees a
        # different 3-node majority, and no two nodes agree on who is in "the" majority.
        ring = shuffled
        keep = n // 2
        grudge = {m: set() for m in ordered}
        views = {}
        for i, node in enumerate(ring):
            visible = {ring[(i + d) % n] for d in range(-(keep // 2 + keep % 2), keep // 2 + 1)}
            visible.add(node)
            grudge[node] = set(ordered) - visible
            views[node] = sorted(visible)
        # Make the cut symmetric (a link is up only if both ends keep it).
        for a in ordered:
            for b in list(grudge[a]):
                grudge[b].add(a)
        return grudge, {"views": {k: sorted(set(ordered) - grudge[k]) for k in ordered}}
    if kind == "one-way":
        # One node can still send to everyone but hears nobody: asymmetric.
        deaf = shuffled[0]
        grudge = {m: set() for m in ordered}
        grudge[deaf] = {m for m in ordered if m != deaf}
        return grudge, {"deaf": deaf, "cannot_hear": sorted(grudge[deaf])}
    raise NemesisError(f"unknown partition kind {kind!r} (known: {', '.join(PARTITION_KINDS)})")


def grudge_to_rules(grudge: Grudge) -> dict[str, dict[str, dict[str, Any]]]:
    """Per-node link rules that enforce a grudge at both ends of every cut link."""
    rules: dict[str, dict[str, dict[str, Any]]] = {node: {} for node in grudge}
    for receiver, deaf_to in grudge.items():
        for sender in deaf_to:
            rules[receiver].setdefault(sender, {})["drop_in"] = True
            rules.setdefault(sender, {}).setdefault(receiver, {})["drop_out"] = True
    return rules


def majority_side(description: Any) -> list[str] | None:
    """The largest group of a partition description (for per-side availability)."""
    if isinstance(description, list) and description and all(isinstance(g, list) for g in description):
        return max(description, key=len)
    return None


# --- applying faults to a cluster --------------------------------------------------------------


class FaultControl:
    """The faults in force on a cluster, and the logic of changing them (shared by real and
    simulated clusters); subclasses provide the per-node primitives (``_`` methods)."""

    rules: dict[str, dict[str, dict[str, Any]]]
    skews_ms: dict[str, float]
    disk_faults: dict[str, dict[str, Any]]
    killed: set[str]
    paused: set[str]

    # --- what a cluster provides ----------------------------------------------------------

    @property
    def node_ids(self) -> list[str]:
        raise NotImplementedError

    def endpoint(self) -> Endpoint:
        """How clients reach the nodes' kv API, where it is not over HTTP (a simulation)."""
        raise NotImplementedError

    def client_nodes(self) -> tuple[dict[str, str], ClientTransport | None]:
        """The URL of each node's kv API and the transport that reaches them, for the workload's
        ``kvstore.client.Client``s (None: the client's own HTTP transport)."""
        return endpoint_urls(self.node_ids), EndpointTransport(self.endpoint())

    def monotonic_ns(self) -> int:
        """The clock of the run's history."""
        raise NotImplementedError

    async def trigger_repair(self, node: str) -> None:
        """Start an anti-entropy round on ``node`` (best effort: a node that cannot is skipped)."""
        raise NotImplementedError

    async def _put_rules(self, node: str, rules: dict[str, dict[str, Any]]) -> None:
        raise NotImplementedError

    async def _put_skew(self, node: str, skew_ms: float) -> None:
        raise NotImplementedError

    async def _put_disk(self, node: str, faults: dict[str, Any]) -> None:
        raise NotImplementedError

    async def _kill(self, nodes: list[str], lose_state: bool) -> None:
        raise NotImplementedError

    async def _restart(self, nodes: list[str]) -> None:
        raise NotImplementedError

    async def _pause(self, node: str) -> None:
        raise NotImplementedError

    async def _resume(self, node: str) -> None:
        raise NotImplementedError

    async def _heal_node(self, node: str) -> str | None:
        """Clear every fault of a running node; an error message, or None."""
        raise NotImplementedError

    def spares(self) -> list[str]:
        """Nodes that are not members now and can join (none where membership changes are not driven)."""
        return []

    async def join(self, node: str) -> None:
        raise NemesisError("membership changes need a cluster started by this harness")

    async def leave(self, node: str) -> None:
        raise NemesisError("membership changes need a cluster started by this harness")

    async def close(self) -> None:
        pass

    # --- the fault logic ------------------------------------------------------------------

    async def set_rules(self, rules: dict[str, dict[str, dict[str, Any]]]) -> None:
        """Install rules on every node (a node missing from ``rules`` gets an empty table)."""
        self.rules = {n: r for n, r in rules.items() if r}
        await asyncio.gather(
            *(
                self._put_rules(node, rules.get(node, {}))
                for node in self.node_ids
                if node not in self.killed and node not in self.paused
            )
        )

    async def partition(self, grudge: Grudge) -> None:
        await self.set_rules(grudge_to_rules(grudge))

    async def link_faults(self, delay_ms: float = 0.0, jitter_ms: float = 0.0, loss: float = 0.0) -> None:
        rule = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss": loss}
        await self.set_rules({a: {b: dict(rule) for b in self.node_ids if b != a} for a in self.node_ids})

    async def skew(self, node: str, skew_ms: float) -> None:
        await self._put_skew(node, skew_ms)
        self.skews_ms[node] = skew_ms
        if not skew_ms:
            self.skews_ms.pop(node, None)

    async def disk(self, node: str, faults: dict[str, Any]) -> None:
        """Set one node's disk faults (``{}`` heals): see kvstore/storage/faulty.py."""
        await self._put_disk(node, faults)
        self.disk_faults[node] = dict(faults)
        if not faults:
            self.disk_faults.pop(node, None)

    async def kill(self, node: str, lose_state: bool = False) -> None:
        """SIGKILL one node; with ``lose_state`` its disk is lost too (it restarts empty)."""
        await self._kill([node], lose_state)
        self.killed.add(node)
        self.paused.discard(node)

    async def kill_all(self, nodes: list[str]) -> None:
        """SIGKILL every node of ``nodes`` at once (no node sees another die before its own end)."""
        await self._kill(list(nodes), False)
        self.killed.update(nodes)
        self.paused.difference_update(nodes)

    async def restart(self, node: str) -> None:
        await self.restart_many([node])

    async def restart_many(self, nodes: list[str]) -> None:
        """Restart nodes from their data (all started, then all awaited healthy)."""
        await self._restart(list(nodes))
        for node in nodes:
            self.killed.discard(node)
            if node in self.rules:  # a restarted node lost its in-memory rules; reinstall them
                await self._put_rules(node, self.rules[node])
            if node in self.skews_ms:
                await self._put_skew(node, self.skews_ms[node])
            if node in self.disk_faults:  # the disk is still as bad after a restart
                await self._put_disk(node, self.disk_faults[node])

    async def pause(self, node: str) -> None:
        await self._pause(node)
        self.paused.add(node)

    async def resume(self, node: str) -> None:
        await self._resume(node)
        self.paused.discard(node)

    async def heal_all(self) -> None:
        """Undo every fault: resume, restart the killed, clear rules and skews.  Idempotent."""
        errors: list[str] = []
        for node in sorted(self.paused):
            try:
                await self.resume(node)
            except Exception as exc:  # resumed; its rules are cleared below
                errors.append(f"resume {node}: {exc}")
        for node in sorted(self.killed):
            try:
                await self.restart(node)
            except Exception as exc:  # keep healing the rest
                errors.append(f"restart {node}: {exc}")
        self.rules = {}
        for node in self.node_ids:
            error = await self._heal_node(node)
            if error is not None:
                errors.append(f"heal {node}: {error}")
        self.skews_ms.clear()
        self.disk_faults.clear()
        if errors:
            raise NemesisError("; ".join(errors))


@dataclass
class ClusterControl(FaultControl):
    """Real node processes: URLs, the secret (admin routes), and maybe the processes (``local``)."""

    urls: dict[str, str]
    secret: str
    local: LocalCluster | None = None
    _admin_client: AdminClient | None = field(default=None, repr=False)
    rules: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    skews_ms: dict[str, float] = field(default_factory=dict)
    disk_faults: dict[str, dict[str, Any]] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)
    paused: set[str] = field(default_factory=set)

    @property
    def node_ids(self) -> list[str]:
        return sorted(self.urls)

    def client_nodes(self) -> tuple[dict[str, str], ClientTransport | None]:
        return dict(self.urls), None

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    @property
    def admin(self) -> AdminClient:
        """The admin calls to the nodes (one pooled session, each call sent once)."""
        if self._admin_client is None:
            self._admin_client = AdminClient(self.urls, self.secret, timeout_s=5.0)
        return self._admin_client

    async def _admin(self, node: str, what: str, call: Awaitable[Any]) -> None:
        try:
            await call
        except KvstoreError as exc:
            raise NemesisError(f"{what} on {node}: {exc}") from exc

    async def trigger_repair(self, node: str) -> None:
        with contextlib.suppress(KvstoreError):  # best effort: a node that cannot is skipped
            await self.admin.repair(node)

    async def _put_rules(self, node: str, rules: dict[str, dict[str, Any]]) -> None:
        await self._admin(node, "set link rules", self.admin.set_link_rules(node, rules))

    async def _put_skew(self, node: str, skew_ms: float) -> None:
        await self._admin(node, "skew the clock", self.admin.set_clock_skew(node, skew_ms))

    async def _put_disk(self, node: str, faults: dict[str, Any]) -> None:
        await self._admin(node, "set disk faults", self.admin.set_disk_faults(node, faults))

    def _local(self) -> LocalCluster:
        if self.local is None:
            raise NemesisError("kill/pause need a cluster started by this harness (not --nodes)")
        return self.local

    async def _kill(self, nodes: list[str], lose_state: bool) -> None:
        local = self._local()
        if len(nodes) == 1:
            await asyncio.to_thread(local.kill, nodes[0])
        else:
            await asyncio.to_thread(local.kill_all, nodes)
        if lose_state:
            for node in nodes:
                await asyncio.to_thread(local.wipe, node)

    async def _restart(self, nodes: list[str]) -> None:
        await asyncio.to_thread(self._local().restart_many, nodes)

    def spares(self) -> list[str]:
        """Nodes of the local cluster that are not members now (they can join)."""
        local = self._local()
        return sorted(n for n in local.all_members if n not in local.node_ids)

    async def join(self, node: str) -> None:
        """A membership change adding ``node`` (its ranges are streamed to it; returns once committed).
        The workload keeps its nodes: a joined node serves only through the others."""
        await asyncio.to_thread(self._local().join, node)

    async def leave(self, node: str) -> None:
        """A membership change removing ``node`` (its ranges move first), then its process stops and
        its directory is removed, so it is a spare again."""
        await asyncio.to_thread(self._local().leave, node, None, 120.0, True, True)

    async def _pause(self, node: str) -> None:
        self._local().pause(node)

    async def _resume(self, node: str) -> None:
        self._local().resume(node)
        # set_rules skipped the node while it was stopped: give it the table in force now (a
        # partition started or healed meanwhile), or it would keep dropping links on its own.
        await self._put_rules(node, self.rules.get(node, {}))

    async def _heal_node(self, node: str) -> str | None:
        try:
            await self._admin(node, "clear link rules", self.admin.clear_link_rules(node))
            await self._admin(node, "heal the clock", self.admin.set_clock_skew(node, 0))
            await self._admin(node, "clear disk faults", self.admin.clear_disk_faults(node))
        except NemesisError as exc:
            return str(exc)
        return None

    async def close(self) -> None:
        if self._admin_client is not None:
            await self._admin_client.close()
