"""Integration: a node whose data directory is lost (same node id, empty disk) loses nothing.

Riak KV-679: a node that restarts with an empty disk restarts its dot counters at 1; the other
replicas already hold those dots for other values, so they drop its new writes as "already seen".
Each test wipes one node's data directory on a real cluster and then checks, through reads
coordinated by *other* nodes, that what was acknowledged afterwards is there.

The CP twin: a Paxos acceptor that comes back empty must not vote before it has recovered
its state from the other replicas (``kvstore.runtime.register_recovery``), or a chosen value disappears.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from kvstore.checker import check
from kvstore.harness.history import HistoryWriter, read_history
from kvstore.harness.local_cluster import LocalCluster
from kvstore.protocol.ring import Ring, key_token
from tests.cas_counter import CasCounter
from tests.conftest import FAST_AP, http, kv_path
from tests.test_integration_cp import final_value

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

    # The blind writes are siblings of the old value (they did not see it).  The context of a read
    # names both incarnations of the victim; the API accepts it and a write with it resolves them.
    for i, key in enumerate(keys[:5]):
        read = http(cluster.url(victim), "GET", kv_path(key, r=3))
        assert read.status == 300, read
        resolved = http(url, "PUT", kv_path(key, w=3), body=b"resolved-%d" % i,
                        headers={"X-Context": read.headers["x-context"]})
        assert resolved.status == 204, resolved
        after = http(cluster.url(victim), "GET", kv_path(key, r=3))
        assert (after.status, after.body) == (200, b"resolved-%d" % i)


# --- the CP twin: a Paxos acceptor that lost its state --------------------------------------

LIN = "linearizable"


def internal(cluster: LocalCluster, node_id: str, message: dict[str, object]) -> dict[str, object]:
    reply = http(
        cluster.url(node_id), "POST", "/internal/msg", body=msgpack.packb(message, use_bin_type=True),
        headers={"X-Cluster-Secret": cluster.secret, "X-Node": "test"},
    )
    assert reply.status == 200, reply
    doc = msgpack.unpackb(reply.body, raw=False)
    assert isinstance(doc, dict)
    return doc


def wait_until(what: str, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_wiped_acceptor_refuses_to_vote_until_it_recovered(cluster: LocalCluster) -> None:
    """Value accepted by {A, B}; B wiped; the only majority left is {B, C}, and C never had it."""
    key = "cp:wiped"
    a, b, c = primaries(cluster, key)
    # Bootstrapped: every node's config now says it is an existing member.
    assert 'initial_cluster_state = "existing"' in cluster.config_path(b).read_text()
    cluster.kill(c)
    assert http(cluster.url(a), "PUT", kv_path(key, consistency=LIN), body=b"chosen").status == 204
    cluster.restart(c)  # intact, but it missed the write
    cluster.kill(a)
    wipe_and_restart(cluster, b)
    assert cluster.acceptor_status(b)["status"] == "recovering"

    # B must not vote from its empty state: it refuses, typed, and changes nothing.
    prepare = {"op": "paxos_prepare", "key": key, "token": key_token(key), "ballot": [2**62, "test"]}
    assert internal(cluster, b, prepare)["error"] == "recovering"
    read = http(cluster.url(c), "GET", kv_path(key, consistency=LIN, timeout_ms=1500))
    assert read.status == 503, (read.status, read.body)  # never 404: the chosen value is not lost
    assert read.json()["error"] == "quorum_unavailable"  # type: ignore[index]
    # The ranges B shares with A stay unrecovered while A is down; the others recover.
    status = cluster.acceptor_status(b)
    assert status["status"] == "recovering" and a not in status["recovered_from"]

    cluster.restart(a)
    wait_until("B recovered", lambda: cluster.acceptor_status(b)["status"] == "active")
    cluster.kill(a)  # the majority is {B, C} again: B now carries the recovered state
    got = http(cluster.url(c), "GET", kv_path(key, consistency=LIN, timeout_ms=3000))
    assert (got.status, got.body) == (200, b"chosen")
    # The recovered register also arms B's mixed-mode guard.
    assert internal(cluster, b, {"op": "replica_get", "key": key, "token": key_token(key)}).get("cp") is True


async def cas_workload(
    cluster: LocalCluster, key: str, per_client: int, history: HistoryWriter, deadline_s: float, during: Any
) -> tuple[int, int]:
    """One client per node adds ``per_client`` increments with read + compare-and-set, recording
    a history (``tests.cas_counter``: through ``kvstore.Client``, the workload's outcome rules), until
    done or ``deadline_s`` (bounded in time, not in attempts: a client keeps trying while the
    register is unavailable).  Returns (acknowledged, indeterminate) CAS."""
    loop = asyncio.get_running_loop()
    async with CasCounter(cluster, key, history, first_process=0, timeout_ms=2000) as counter:
        tasks = [asyncio.create_task(counter.client(node, per_client, loop.time() + deadline_s))
                 for node in cluster.node_ids]
        await during()
        await asyncio.gather(*tasks)
    return counter.acked, counter.unknown


def test_cas_workload_survives_a_replica_losing_its_disk(cluster: LocalCluster, tmp_path: Path) -> None:
    """Linearizable CAS increments while one replica loses its disk and the two others take
    turns being down; the history must be linearizable and no acknowledged increment lost."""
    key = "cp:wipe-workload"
    a, b, c = primaries(cluster, key)
    history = HistoryWriter(tmp_path / "history.jsonl")

    async def nemesis() -> None:
        await asyncio.sleep(1.0)
        history.nemesis("kill", [c])
        await asyncio.to_thread(cluster.kill, c)
        await asyncio.sleep(2.0)  # C misses what {A, B} accept now
        history.nemesis("kill", [a])
        await asyncio.to_thread(cluster.kill, a)
        history.nemesis("wipe", [b])
        await asyncio.to_thread(wipe_and_restart, cluster, b)
        history.nemesis("restart", [c])
        await asyncio.to_thread(cluster.restart, c)
        await asyncio.sleep(3.0)  # the only majority is {B, C}: the wiped one and the stale one
        history.nemesis("restart", [a])
        await asyncio.to_thread(cluster.restart, a)

    per_client = 6
    acked, unknown = asyncio.run(cas_workload(cluster, key, per_client, history, 120.0, nemesis))
    history.close()
    wait_until("B recovered", lambda: cluster.acceptor_status(b)["status"] == "active")
    total = final_value(cluster, key, b)
    result = check(read_history(tmp_path / "history.jsonl"), model="cas-register", time_limit_s=60, workers=1)
    assert str(result.valid) == "true", [kr.verdict for kr in result.keys]
    assert total is not None and acked <= total <= acked + unknown, (acked, unknown, total)
    assert acked == per_client * len(cluster.node_ids), "every client finished within the deadline"
