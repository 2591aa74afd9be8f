"""Integration: a node whose data directory is lost (same node id, empty disk) loses nothing.

Riak KV-679: a node that restarts with an empty disk restarts its dot counters at 1; the other
replicas already hold those dots for other values, so they drop its new writes as "already seen".
Each test wipes one node's data directory on a real cluster and then checks, through reads
coordinated by *other* nodes, that what was acknowledged afterwards is there.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.cluster import LocalCluster
from kvstore.ring import Ring
from tests.conftest import FAST_AP, http, kv_path

pytestmark = pytest.mark.integration


def primaries(cluster: LocalCluster, key: str) -> tuple[str, ...]:
    return Ring(cluster.node_ids, cluster.base_config.vnodes).preference_list(key, 3)


def wipe_and_restart(cluster: LocalCluster, node_id: str) -> None:
    """Stop the node, delete its whole directory (data, hints, Paxos state), start it again."""
    cluster.terminate(node_id)
    node_dir = cluster.data_dir / node_id
    shutil.rmtree(node_dir)
    assert not node_dir.exists()
    cluster.restart(node_id)


def values_of(body: bytes, status: int) -> list[bytes]:
    """The values a read returned: one (200) or every sibling (300, base64 in JSON)."""
    if status == 200:
        return [body]
    assert status == 300, status
    return [base64.b64decode(s["value"]) for s in json.loads(body)["siblings"]]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(5, 3, data_dir=str(tmp_path / "cluster"), ap=FAST_AP)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_writes_through_a_wiped_node_are_not_lost(cluster: LocalCluster) -> None:
    victim = "n1"
    keys = [k for k in (f"wiped:{i}" for i in range(400)) if victim in primaries(cluster, k)][:40]
    assert len(keys) == 40
    url = cluster.url(victim)
    # Before the wipe: each key written twice through the victim, which coordinates (it is a
    # primary), so its dot counter for each key reaches 2 on every replica.
    for key in keys:
        first = http(url, "PUT", kv_path(key, w=3), body=b"old-1")
        assert first.status == 204, first
        second = http(url, "PUT", kv_path(key, w=3), body=b"old-2", headers={"X-Context": first.headers["x-context"]})
        assert second.status == 204, second

    wipe_and_restart(cluster, victim)

    # After the wipe: 40 blind w=3 writes through the wiped node (it coordinates them again).
    for i, key in enumerate(keys):
        reply = http(url, "PUT", kv_path(key, w=3), body=b"new-%d" % i)
        assert reply.status == 204, reply
    lost = []
    for i, key in enumerate(keys):
        reader = next(n for n in cluster.node_ids if n != victim and n != primaries(cluster, key)[0])
        got = http(cluster.url(reader), "GET", kv_path(key, r=3))
        assert got.status in (200, 300), got
        if b"new-%d" % i not in values_of(got.body, got.status):
            lost.append(key)
    assert lost == [], f"{len(lost)} of {len(keys)} acknowledged writes through the wiped node vanished"
