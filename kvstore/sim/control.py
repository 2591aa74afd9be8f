"""The chaos harness's fault control over a simulated cluster.

Theory of operation
-------------------
``SimControl`` is a ``kvstore.harness.nemesis.FaultControl``: the fault logic (what is in force, reinstalling
a restarted node's faults, healing) is the one the real harness runs, and only the per-node
primitives differ.  Where a real node gets an admin HTTP request (``/admin/faults``,
``/admin/clock``, ``/admin/storage-faults``, ``/admin/repair``) or a signal (SIGKILL, SIGSTOP,
SIGCONT), the simulated one gets the same change directly on its seams:

* link rules -> the node's ``SimTransport.faults`` (the same ``FaultRules`` the real transport
  consults);
* clock skew -> its ``SimClock.skew_ns``;
* disk faults -> its ``SimDisk``'s ``DiskFaults``;
* kill / kill with lost state / restart / pause / resume -> ``SimCluster`` (``kvstore.sim.cluster``).

The nemesis history events and their timing come from the same ``kvstore.harness.runner.FaultDriver``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kvstore.harness.endpoint import Endpoint
from kvstore.harness.nemesis import FaultControl
from kvstore.sim.cluster import SimCluster, SimEndpoint


class SimControl(FaultControl):
    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self.rules: dict[str, dict[str, dict[str, Any]]] = {}
        self.skews_ms: dict[str, float] = {}
        self.disk_faults: dict[str, dict[str, Any]] = {}
        self.killed: set[str] = set()
        self.paused: set[str] = set()

    @property
    def node_ids(self) -> list[str]:
        return sorted(self.cluster.node_ids)

    def endpoint(self) -> Endpoint:
        return SimEndpoint(self.cluster)

    def monotonic_ns(self) -> int:
        return self.cluster.loop.now_ns

    async def trigger_repair(self, node: str) -> None:
        await self.cluster.trigger_repair(node)

    async def _put_rules(self, node: str, rules: dict[str, dict[str, Any]]) -> None:
        self.cluster.set_rules(node, rules)

    async def _put_skew(self, node: str, skew_ms: float) -> None:
        self.cluster.set_skew(node, skew_ms)

    async def _put_disk(self, node: str, faults: dict[str, Any]) -> None:
        self.cluster.set_disk_faults(node, faults)

    async def _kill(self, nodes: list[str], lose_state: bool) -> None:
        for node in nodes:
            if node in self.paused:
                self.cluster.resume(node)  # as LocalCluster does: SIGCONT, then SIGKILL
            self.cluster.crash(node, lose_state)

    async def _restart(self, nodes: list[str]) -> None:
        # All started together, then all awaited (as LocalCluster.restart_many does).
        await asyncio.gather(*(self.cluster.restart(node) for node in nodes))

    async def _pause(self, node: str) -> None:
        self.cluster.pause(node)

    async def _resume(self, node: str) -> None:
        self.cluster.resume(node)

    async def _heal_node(self, node: str) -> str | None:
        self.cluster.set_rules(node, {})
        self.cluster.set_skew(node, 0)
        self.cluster.set_disk_faults(node, {})
        return None
