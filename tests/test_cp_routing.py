"""Where a linearizable change is proposed (kvstore.runtime.register.LinearizableRegister.run).

A change of a key the receiving replica never saw Paxos traffic for (a new key) is proposed
where it arrived: no proposer holds a fast path for it, so the forward to the key's proposer
would only add a hop.  A change of a known key is still forwarded to the key's first primary,
which keeps the one-round-trip fast path.  Runs on a simulated cluster (virtual time).
"""

from __future__ import annotations

import collections
from collections.abc import Coroutine
from typing import Any, TypeVar

from kvstore.config import APSettings
from kvstore.runtime.node import Node
from kvstore.server.kv_api import ApiRequest
from kvstore.sim import vloop
from kvstore.sim.cluster import ClusterSpec, SimCluster
from kvstore.transport.base import Message

T = TypeVar("T")
SPEC = ClusterSpec(nodes=3, replicas=3, ap=APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=3600.0))


def simulate(main: Coroutine[Any, Any, T]) -> T:
    return vloop.run(main, max_time_s=3600.0)


async def started() -> SimCluster:
    cluster = SimCluster(SPEC, seed=3)
    await cluster.start()
    await cluster.wait_until(
        "every node sees every node up",
        lambda: all(cluster.node(a).is_up(b) for a in cluster.node_ids for b in cluster.node_ids), deadline_s=30.0,
    )
    return cluster


def count_forwards(cluster: SimCluster) -> collections.Counter[str]:
    """cp_propose calls sent, per sending node (the forward of a change to the key's proposer)."""
    sent: collections.Counter[str] = collections.Counter()
    for node_id in cluster.node_ids:
        node = cluster.node(node_id)
        original = node.call

        async def call(peer: str, message: Message, timeout_s: float, *, _node: Node = node,
                       _original: Any = original) -> Message:
            if isinstance(message, dict) and message.get("op") == "cp_propose":
                sent[_node.node_id] += 1
            return await _original(peer, message, timeout_s)

        node.call = call  # type: ignore[method-assign]
    return sent


def put(key: str, value: bytes) -> ApiRequest:
    return ApiRequest("PUT", f"/kv/{key}", {"consistency": "linearizable"}, {}, value)


def test_a_new_key_is_proposed_where_it_arrives_a_known_one_is_forwarded() -> None:
    async def main() -> None:
        cluster = await started()
        sent = count_forwards(cluster)
        # A key whose first primary is not n1, sent to n1: new, so n1 proposes it.
        key = next(f"k{i}" for i in range(100) if cluster.node("n1").ring.preference_list(f"k{i}", 3)[0] != "n1")
        first = await cluster.request("n1", put(key, b"one"), 5.0)
        assert first.status == 204, first
        assert sum(sent.values()) == 0
        # Now n1 has seen the key's Paxos traffic: its next change goes to the key's proposer.
        second = await cluster.request("n1", put(key, b"two"), 5.0)
        assert second.status == 204, second
        assert sent["n1"] == 1
        read = await cluster.request("n1", ApiRequest("GET", f"/kv/{key}", {"consistency": "linearizable"}, {}), 5.0)
        assert read.status == 200 and read.body == b"two"
        await cluster.stop()

    simulate(main())
