"""The node as the coordinator cores' driver: assembled nodes on memory seams, clients through
``KvApi.handle`` (no socket, no process).  The cores' decisions are tabled in
tests/test_coordinator.py; these check that the driver carries them out through the seams:
read repair reaching the stores, a failed replica handed to a spare as a hint, the answer
given while calls are still in flight.

Every test runs on virtual time (``@simulated`` from tests/vtime.py): the nodes read ``CLOCK``, the
virtual loop's time, so their request deadlines, heartbeats and background writes and the
``eventually`` bound are simulated; a busy machine cannot make a request time out or a wait run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from kvstore.protocol import versions
from kvstore.protocol.hints import hint_storage_key
from kvstore.protocol.ring import key_token
from kvstore.protocol.versions import VersionedObject
from kvstore.runtime.assembly import NodeSeams, assemble_node
from kvstore.runtime.node import Node
from kvstore.server.kv_api import KvApi
from kvstore.transport.memory import MemoryNetwork
from tests.test_assembly import WAIT_S, cluster_configs, kv, memory_seams
from tests.vtime import CLOCK, simulated


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for ``condition`` with a bounded deadline (simulated; never an expected duration)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_S
    while not await condition():
        assert loop.time() < give_up, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.01)


class Cluster:
    def __init__(self, network: MemoryNetwork, nodes: list[Node]) -> None:
        self.network = network
        self.nodes = nodes
        self.by_id = {node.node_id: node for node in nodes}

    def api(self, node_id: str) -> KvApi:
        return KvApi(self.by_id[node_id])


async def start(count: int, replicas: int) -> Cluster:
    network = MemoryNetwork()
    seams: list[NodeSeams] = []
    configs = cluster_configs(count, replicas)
    for seed, cfg in enumerate(configs):
        seams.append(memory_seams(network, cfg.node_id, CLOCK, seed))
    nodes = [assemble_node(cfg, seam) for cfg, seam in zip(configs, seams, strict=True)]
    for node in nodes:
        await node.start()
    return Cluster(network, nodes)


@contextlib.asynccontextmanager
async def running_quad() -> AsyncIterator[Cluster]:
    cluster = await start(4, 3)
    try:
        yield cluster
    finally:
        for node in cluster.nodes:
            await node.stop()


async def stored(node: Node, key: str) -> VersionedObject | None:
    blob = await node.data.get(key, key_token(key))
    return versions.decode(blob) if blob is not None else None


@simulated
async def test_a_read_of_divergent_replicas_answers_siblings_and_repairs_the_primaries() -> None:
    async with running_quad() as quad:
        key = "diverged"
        walk = quad.nodes[0].ring.walk(key)
        primaries = walk[:3]
        token = key_token(key)
        # Two concurrent writes that never met: each on one primary only.
        left = versions.update(VersionedObject.empty(), {}, "left.1", b"left", 1)
        right = versions.update(VersionedObject.empty(), {}, "right.1", b"right", 2)
        await quad.by_id[primaries[0]].apply_local(key, token, left)
        await quad.by_id[primaries[1]].apply_local(key, token, right)
        merged = versions.sync(left, right)

        answer = await quad.api(primaries[0]).handle(kv("GET", key, {"r": "3"}))
        assert answer.status == 300, answer.body
        assert len(json.loads(answer.body)["siblings"]) == 2
        coordinator = quad.by_id[primaries[0]]
        for member in primaries:

            async def holds_merge(node: Node = quad.by_id[member]) -> bool:
                return await stored(node, key) == merged

            await eventually(holds_merge, f"read repair brought {member} to the merge")
        repairs = coordinator.metrics.registry.get_sample_value("kvstore_read_repairs_total") or 0.0
        assert repairs == 3.0  # every primary held something else than the merge (one held nothing)
        fallback = quad.by_id[walk[3]]
        assert await stored(fallback, key) is None  # not a primary: never repaired


@simulated
async def test_a_replica_that_refuses_is_replaced_by_a_spare_holding_a_hint() -> None:
    async with running_quad() as quad:
        key = "handed-off"
        walk = quad.nodes[0].ring.walk(key)
        coordinator, other, victim, spare = walk[0], walk[1], walk[2], walk[3]
        quad.network.endpoints[victim].up = False  # crashed: refuses at once, still believed up

        answer = await quad.api(coordinator).handle(kv("PUT", key, {"w": "3", "sloppy": "true"}, body=b"v"))
        assert answer.status == 204, answer.body
        assert (await stored(quad.by_id[other], key)) is not None
        spare_node = quad.by_id[spare]
        hint = await spare_node.hints.get(hint_storage_key(victim, key), key_token(key))
        assert hint is not None  # the victim's copy, kept for it by the spare
        assert await stored(spare_node, key) is None  # a hint, not data


@simulated
async def test_a_strict_write_missing_a_replica_is_indeterminate_and_names_its_targets() -> None:
    async with running_quad() as quad:
        key = "strict"
        walk = quad.nodes[0].ring.walk(key)
        coordinator, victim = walk[0], walk[2]
        quad.network.endpoints[victim].up = False

        answer = await quad.api(coordinator).handle(kv("PUT", key, {"w": "3", "sloppy": "false"}, body=b"v"))
        assert answer.status == 503, answer.body
        body = json.loads(answer.body)
        assert body["error"] == "quorum_unavailable" and body["indeterminate"] is True
        assert body["acknowledged"] == 2 and victim in body["message"]
        # The coordinator did write it (that is why it is indeterminate).
        assert await stored(quad.by_id[coordinator], key) is not None


@simulated
async def test_w1_answers_before_the_slow_replicas_and_they_still_get_the_write() -> None:
    async with running_quad() as quad:
        key = "w1"
        walk = quad.nodes[0].ring.walk(key)
        coordinator = walk[0]
        answer = await quad.api(coordinator).handle(kv("PUT", key, {"w": "1"}, body=b"v"))
        assert answer.status == 204, answer.body

        async def replicated() -> bool:
            return all([await stored(quad.by_id[member], key) is not None for member in walk[1:3]])

        await eventually(replicated, "the background replica writes landed")
