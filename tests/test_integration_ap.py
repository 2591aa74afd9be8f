"""Integration smoke: the AP machinery on real node processes (issue: AP machinery; issue 12).

The scenarios in detail (handoff, read repair, anti-entropy convergence, tombstone reaping and
no resurrection) run on the deterministic simulator, in simulated time: tests/test_sim_ap.py.
What stays here breaks a real cluster (SIGKILL, restart from disk) and then looks at one node's
*own* copy of a key through the authenticated internal route, never through a client read, so a
quorum cannot mask what a replica holds.  "No client read" is asserted from the nodes' own
request counters.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable

import msgpack
import pytest

from kvstore.config import APSettings, ConfigError
from kvstore.harness.local_cluster import LocalCluster
from kvstore.protocol import versions
from kvstore.protocol.ring import Ring, key_token
from kvstore.protocol.versions import VersionedObject
from tests.conftest import http, kv_path

pytestmark = pytest.mark.integration

PULL_BATCH = 256  # kvstore.runtime.repair_messages.OBJECTS_PER_MESSAGE


# --- helpers ----------------------------------------------------------------------------------


@functools.cache
def _ring(members: tuple[str, ...], vnodes: int) -> Ring:
    return Ring(list(members), vnodes)


def walk(cluster: LocalCluster, key: str) -> tuple[str, ...]:
    """Preference list (first N) then fallbacks, in ring order."""
    return _ring(tuple(cluster.node_ids), cluster.base_config.vnodes).walk(key)


def internal(cluster: LocalCluster, node_id: str, message: dict[str, object]) -> dict[str, object]:
    reply = http(
        cluster.url(node_id), "POST", "/internal/msg", body=msgpack.packb(message, use_bin_type=True),
        headers={"X-Cluster-Secret": cluster.secret, "X-Node": "test"},
    )
    assert reply.status == 200, reply
    doc = msgpack.unpackb(reply.body, raw=False)
    assert isinstance(doc, dict) and not doc.get("remote_error"), doc
    return doc


def local_object(cluster: LocalCluster, node_id: str, key: str) -> VersionedObject:
    """One node's knowledge of a key (data + unexpired hints), via its internal replica_get."""
    doc = internal(cluster, node_id, {"op": "replica_get", "key": key, "token": key_token(key)})
    blob = doc["obj"]
    return VersionedObject.empty() if blob is None else versions.decode(blob)  # type: ignore[arg-type]


def stored_objects(cluster: LocalCluster, node_id: str, keys: list[str]) -> dict[str, VersionedObject | None]:
    """One node's *data store* copies of many keys (tombstones included), via the ae_pull route."""
    out: dict[str, VersionedObject | None] = {}
    pending = list(keys)
    while pending:
        batch = pending[:PULL_BATCH]
        doc = internal(cluster, node_id, {"op": "ae_pull", "keys": [[key_token(k), k] for k in batch]})
        objects = doc["objects"]
        assert isinstance(objects, list) and objects
        for key, blob in objects:
            out[key] = None if blob is None else versions.decode(blob)
        pending = pending[len(objects) :]
    return out


def admin(cluster: LocalCluster, node_id: str, method: str, path: str, body: object | None = None) -> object:
    reply = http(
        cluster.url(node_id), method, path, body=None if body is None else json.dumps(body).encode(),
        headers={"X-Cluster-Secret": cluster.secret, "Content-Type": "application/json"},
    )
    assert reply.status in (200, 202), reply
    return reply.json()


def cluster_info(cluster: LocalCluster, node_id: str) -> dict[str, object]:
    doc = http(cluster.url(node_id), "GET", "/cluster").json()
    assert isinstance(doc, dict)
    return doc


def member_state(cluster: LocalCluster, observer: str, member: str) -> str:
    members = cluster_info(cluster, observer)["members"]
    assert isinstance(members, list)
    return str(next(m["state"] for m in members if m["id"] == member))


def pending_hints(cluster: LocalCluster, node_id: str) -> dict[str, int]:
    pending = cluster_info(cluster, node_id)["pending_hints"]
    assert isinstance(pending, dict)
    return pending


def metric(cluster: LocalCluster, node_id: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples on one node whose labels include ``labels``."""
    text = http(cluster.url(node_id), "GET", "/metrics").body.decode()
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.MULTILINE):
        got = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def client_reads(cluster: LocalCluster) -> float:
    return sum(metric(cluster, n, "kvstore_requests_total", op="get") for n in cluster.node_ids if cluster.alive(n))


def wait_until(what: str, predicate: Callable[[], bool], timeout_s: float = 30.0, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for: {what}"
        time.sleep(every_s)


def wait_state(cluster: LocalCluster, observers: list[str], member: str, state: str) -> None:
    wait_until(
        f"{observers} see {member} {state}",
        lambda: all(member_state(cluster, o, member) == state for o in observers),
        timeout_s=20,
    )


def trigger_repair(cluster: LocalCluster, node_ids: list[str] | None = None) -> None:
    for node_id in node_ids or cluster.node_ids:
        doc = admin(cluster, node_id, "POST", "/admin/repair")
        assert isinstance(doc, dict) and doc["status"] == "started" and doc["ranges"] > 0, doc


def put(cluster: LocalCluster, node_id: str, key: str, value: bytes, **params: object) -> int:
    return http(cluster.url(node_id), "PUT", kv_path(key, **params), body=value).status


# --- configuration ----------------------------------------------------------------------------


def test_grace_shorter_than_the_hint_window_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        LocalCluster(3, 3, data_dir="/nonexistent-never-created", ap=APSettings(hint_max_age_s=60, tombstone_grace_s=30))
    assert info.value.field == "ap.tombstone_grace_s"
    LocalCluster(3, 3, data_dir="/nonexistent-never-created", ap=APSettings(hint_max_age_s=60, tombstone_grace_s=60))
    defaults = APSettings()
    assert defaults.tombstone_grace_s >= defaults.hint_max_age_s


# --- smoke: handoff, read repair and anti-entropy on real processes ---------------------------
#
# The detailed scenarios (exact hint counts, hints surviving their holder's crash, a full hint
# store, convergence of 1300 keys through periodic rounds, tombstone reaping and both resurrection
# cases) run on the deterministic simulator in tests/test_sim_ap.py, in simulated time.  This one
# test keeps each mechanism honest on real processes: SIGKILL, a restart from the data directory,
# the peer links and the HTTP routes.  (Reaping on real processes: tests/test_integration_contexts.py.)


def key_with(cluster: LocalCluster, prefix: str, dead: str) -> str:
    """A key ``dead`` replicates without coordinating it (its first primary is another node)."""
    for i in range(10_000):
        order = walk(cluster, f"{prefix}{i}")
        if dead in order[1:3]:
            return f"{prefix}{i}"
    raise AssertionError(f"no key with prefix {prefix!r} fits")


def test_handoff_read_repair_and_anti_entropy_repair_a_restarted_replica(fresh_cluster: LocalCluster) -> None:
    cluster = fresh_cluster  # anti-entropy is off in FAST_AP (one round per hour) until triggered
    dead = "n3"
    handed, stale, missed = (key_with(cluster, p, dead) for p in ("ap:hint:", "ap:read-repair:", "ap:ae:"))
    fallback = walk(cluster, handed)[3]
    first = http(cluster.url(walk(cluster, stale)[0]), "PUT", kv_path(stale, w=3), body=b"v1")
    assert first.status == 204
    cluster.kill(dead)  # SIGKILL: it keeps v1 of `stale` on disk
    coordinators = sorted({walk(cluster, k)[0] for k in (handed, stale, missed)})
    wait_state(cluster, coordinators, dead, "down")

    # Hinted handoff: strict W=3 is refused; sloppy W=3 is acknowledged with a hint on the fallback.
    strict = http(cluster.url(walk(cluster, handed)[0]), "PUT", kv_path(handed, w=3, sloppy="false"), body=b"strict")
    assert strict.status == 503, strict
    body = strict.json()
    assert isinstance(body, dict) and body["error"] == "quorum_unavailable" and body["indeterminate"] is False
    assert put(cluster, walk(cluster, handed)[0], handed, b"handed-off", w=3, sloppy="true") == 204
    assert pending_hints(cluster, fallback)[dead] == 1
    assert local_object(cluster, fallback, handed).live_values == [b"handed-off"]
    # Strict writes the dead replica misses: one for read repair, one for anti-entropy.
    second = http(
        cluster.url(walk(cluster, stale)[0]), "PUT", kv_path(stale, w=2, sloppy="false"), body=b"v2",
        headers={"X-Context": first.headers["x-context"]},
    )
    assert second.status == 204
    assert put(cluster, walk(cluster, missed)[0], missed, b"missed", w=2, sloppy="false") == 204

    cluster.restart(dead)
    wait_until(f"{dead} holds its handed-off copy",
               lambda: local_object(cluster, dead, handed).live_values == [b"handed-off"])
    wait_until("the hint is gone", lambda: pending_hints(cluster, fallback)[dead] == 0)
    assert metric(cluster, fallback, "kvstore_hints_replayed_total", target=dead) >= 1
    assert client_reads(cluster) == 0

    # Read repair: stale until read, then repaired.
    wait_state(cluster, [walk(cluster, stale)[0]], dead, "up")
    assert local_object(cluster, dead, stale).live_values == [b"v1"], "the replica should be stale before a read"
    got = http(cluster.url(walk(cluster, stale)[0]), "GET", kv_path(stale, r=2))
    assert got.status == 200 and got.body == b"v2"
    wait_until("read repair updated the stale replica", lambda: local_object(cluster, dead, stale).live_values == [b"v2"])
    assert metric(cluster, walk(cluster, stale)[0], "kvstore_read_repairs_total") >= 1

    # Anti-entropy: the key nobody reads converges after a triggered round.
    reads = client_reads(cluster)
    assert stored_objects(cluster, dead, [missed])[missed] is None
    wait_state(cluster, [n for n in cluster.node_ids if n != dead], dead, "up")
    trigger_repair(cluster)
    wait_until("anti-entropy repaired the missed write",
               lambda: (stored_objects(cluster, dead, [missed])[missed] or VersionedObject.empty()).live_values
               == [b"missed"])
    assert client_reads(cluster) == reads
    assert sum(metric(cluster, n, "kvstore_anti_entropy_keys_total") for n in cluster.node_ids) >= 1

    # A second trigger does not start a parallel round (the first cannot finish between two requests).
    wait_until("the rounds finish", lambda: not any(
        internal(cluster, n, {"op": "ae_status"})["running"] for n in cluster.node_ids))
    once = admin(cluster, "n1", "POST", "/admin/repair")
    twice = admin(cluster, "n1", "POST", "/admin/repair")
    assert isinstance(once, dict) and isinstance(twice, dict)
    assert once["already_running"] is False and twice["already_running"] is True
