"""Two nodes per machine, on the simulator: a whole machine lost keeps every key's quorum writes.

Six real ``Node``s on ``kvstore.sim`` (virtual time, simulated network), named onto three
machines of two nodes each (one node per core on 2-core hosts, docs/deployment.md "Using more
cores").  N=3, W=2, strict quorum (no stand-ins): both nodes of one machine crash, and every key
still has two primaries up, because the ring places a key's replicas on three distinct machines
(kvstore.protocol.ring).  The same crash on the same six nodes without machines named leaves
some keys with two primaries on the dead pair: those writes are refused, which is what the
machines are for.  Waits are on simulated conditions with simulated deadlines.
"""

from __future__ import annotations

import dataclasses

from kvstore.config import NodeConfig
from kvstore.protocol.ring import Ring
from kvstore.sim.cluster import ClusterSpec
from tests.test_sim_ap import NO_AE, put, simulate, started, wait_state

MACHINES = {"n1": "h1", "n2": "h1", "n3": "h2", "n4": "h2", "n5": "h3", "n6": "h3"}
KEYS = [f"machine-key-{i}" for i in range(120)]


@dataclasses.dataclass(frozen=True)
class OnMachines(ClusterSpec):
    """A ClusterSpec whose members name their machine (the simulator's own spec names none)."""

    machines: tuple[tuple[str, str], ...] = ()

    def node_config(self, node_id: str, initial_cluster_state: str) -> NodeConfig:
        cfg = super().node_config(node_id, initial_cluster_state)
        named = dict(self.machines)
        return dataclasses.replace(
            cfg, members=tuple(dataclasses.replace(m, machine=named.get(m.id, "")) for m in cfg.members))


def quorum_writes_with_a_machine_down(spec: ClusterSpec, keys: list[str], seed: int) -> dict[str, int]:
    """Crash n1 and n2 (machine h1), then one strict W=2 quorum PUT per key through n3..n6 in
    turn; each key's status."""

    async def main() -> dict[str, int]:
        cluster = await started(spec, seed)
        dead, alive = ["n1", "n2"], ["n3", "n4", "n5", "n6"]
        for node in dead:
            cluster.crash(node)
        for node in dead:
            await wait_state(cluster, alive, node, up=False)
        statuses = {}
        for i, key in enumerate(keys):
            answer = await put(cluster, alive[i % len(alive)], key, b"v", consistency="quorum", w="2",
                               sloppy="false")
            statuses[key] = answer.status
        await cluster.stop()
        return statuses

    return simulate(main())


def nodes_placing(cluster_spec: ClusterSpec) -> Ring:
    members = cluster_spec.node_config("n1", "new").members
    return Ring([m.id for m in members], cluster_spec.vnodes, {m.id: m.machine for m in members})


def test_losing_both_nodes_of_one_machine_keeps_every_keys_quorum_writes() -> None:
    spec = OnMachines(nodes=6, replicas=3, vnodes=32, ap=NO_AE, machines=tuple(sorted(MACHINES.items())))
    ring = nodes_placing(spec)
    assert all(len({MACHINES[m] for m in ring.preference_list(k, 3)}) == 3 for k in KEYS)
    statuses = quorum_writes_with_a_machine_down(spec, KEYS, seed=3)
    refused = {k: s for k, s in statuses.items() if s != 204}
    assert refused == {}, refused


def test_without_machines_the_same_crash_refuses_the_keys_it_took_two_replicas_of() -> None:
    spec = ClusterSpec(nodes=6, replicas=3, vnodes=32, ap=NO_AE)
    ring = nodes_placing(spec)
    both_dead = [k for k in KEYS if {"n1", "n2"} <= set(ring.preference_list(k, 3))]
    one_dead = [k for k in KEYS if len({"n1", "n2"} & set(ring.preference_list(k, 3))) <= 1]
    assert both_dead, "the plain ring puts some key on both n1 and n2 (else this control shows nothing)"
    statuses = quorum_writes_with_a_machine_down(spec, both_dead + one_dead[:10], seed=3)
    assert {statuses[k] for k in both_dead} == {503}, statuses
    assert {statuses[k] for k in one_dead[:10]} == {204}, statuses
