"""Integration: the AP machinery on real node processes (issue: AP machinery).

Each test breaks a real cluster (SIGKILL, restart, partitions through ``/admin/faults``) and then
looks at one node's *own* copy of a key through the authenticated internal route, never through
a client read, so a quorum cannot mask what a replica holds.  "No client read" is asserted from
the nodes' own request counters.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


def cut(cluster: LocalCluster, a: str, b: str) -> None:
    """Partition a <-> b (both directions, enforced on both ends), keeping other rules of a and b."""
    for here, there in ((a, b), (b, a)):
        rules = admin(cluster, here, "GET", "/admin/faults")
        assert isinstance(rules, dict)
        current = dict(rules["rules"])
        current[there] = {"drop_in": True, "drop_out": True}
        admin(cluster, here, "PUT", "/admin/faults", {"rules": current})


def isolate(cluster: LocalCluster, victim: str) -> None:
    others = [n for n in cluster.node_ids if n != victim]
    admin(cluster, victim, "PUT", "/admin/faults", {"rules": {o: {"drop_in": True, "drop_out": True} for o in others}})
    for other in others:
        admin(cluster, other, "PUT", "/admin/faults", {"rules": {victim: {"drop_in": True, "drop_out": True}}})


def heal(cluster: LocalCluster) -> None:
    for node_id in cluster.node_ids:
        if cluster.alive(node_id):
            admin(cluster, node_id, "DELETE", "/admin/faults")


def trigger_repair(cluster: LocalCluster, node_ids: list[str] | None = None) -> None:
    for node_id in node_ids or cluster.node_ids:
        doc = admin(cluster, node_id, "POST", "/admin/repair")
        assert isinstance(doc, dict) and doc["status"] == "started" and doc["ranges"] > 0, doc


def put(cluster: LocalCluster, node_id: str, key: str, value: bytes, **params: object) -> int:
    return http(cluster.url(node_id), "PUT", kv_path(key, **params), body=value).status


@pytest.fixture
def ap_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A private 5-node N=3 cluster with the AP settings given by indirect parametrization."""
    settings = APSettings(**request.param)
    cluster = LocalCluster(5, 3, data_dir=str(tmp_path / "cluster"), ap=settings)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --- configuration ----------------------------------------------------------------------------


def test_grace_shorter_than_the_hint_window_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        LocalCluster(3, 3, data_dir="/nonexistent-never-created", ap=APSettings(hint_max_age_s=60, tombstone_grace_s=30))
    assert info.value.field == "ap.tombstone_grace_s"
    LocalCluster(3, 3, data_dir="/nonexistent-never-created", ap=APSettings(hint_max_age_s=60, tombstone_grace_s=60))
    defaults = APSettings()
    assert defaults.tombstone_grace_s >= defaults.hint_max_age_s


# --- hinted handoff ---------------------------------------------------------------------------


def _write_while_primary_dead(cluster: LocalCluster, key: str) -> tuple[str, str, str]:
    """Kill the key's third primary; strict write fails, sloppy succeeds with a hint on the fallback."""
    order = walk(cluster, key)
    coordinator, dead, fallback = order[0], order[2], order[3]
    cluster.kill(dead)
    wait_state(cluster, [coordinator], dead, "down")
    strict = http(cluster.url(coordinator), "PUT", kv_path(key, w=3, sloppy="false"), body=b"strict")
    assert strict.status == 503, strict
    body = strict.json()
    assert isinstance(body, dict)
    assert body["error"] == "quorum_unavailable" and body["indeterminate"] is False
    assert put(cluster, coordinator, key, b"handed-off", w=3, sloppy="true") == 204
    assert pending_hints(cluster, fallback)[dead] == 1
    assert local_object(cluster, fallback, key).live_values == [b"handed-off"]
    assert metric(cluster, fallback, "kvstore_hints_stored_total", target=dead) >= 1
    # The transition is counted by the heartbeat loop on its next tick, not when /cluster shows it.
    wait_until(
        "the coordinator counted the transition",
        lambda: metric(cluster, coordinator, "kvstore_failure_detector_transitions_total", member=dead, state="down")
        >= 1,
    )
    return coordinator, dead, fallback


def _wait_delivered(cluster: LocalCluster, key: str, dead: str, fallback: str) -> None:
    wait_until(f"{dead} holds its copy", lambda: local_object(cluster, dead, key).live_values == [b"handed-off"])
    wait_until("the hint is gone", lambda: pending_hints(cluster, fallback)[dead] == 0)
    assert metric(cluster, fallback, "kvstore_hints_replayed_total", target=dead) >= 1
    assert metric(cluster, fallback, "kvstore_hints_pending", target=dead) == 0
    assert client_reads(cluster) == 0


def test_hint_is_delivered_to_the_restarted_primary_without_reads(fresh_cluster: LocalCluster) -> None:
    key = "ap:handoff"
    _, dead, fallback = _write_while_primary_dead(fresh_cluster, key)
    fresh_cluster.restart(dead)
    _wait_delivered(fresh_cluster, key, dead, fallback)


def test_hints_survive_a_restart_of_their_holder(fresh_cluster: LocalCluster) -> None:
    key = "ap:handoff-holder-restart"
    _, dead, fallback = _write_while_primary_dead(fresh_cluster, key)
    fresh_cluster.kill(fallback)  # SIGKILL: the hint must be on disk, and the ledger rebuilt from it
    fresh_cluster.restart(fallback)
    assert pending_hints(fresh_cluster, fallback)[dead] == 1
    fresh_cluster.restart(dead)
    _wait_delivered(fresh_cluster, key, dead, fallback)


def test_a_full_hint_store_refuses_and_the_fallback_does_not_count(tmp_path: Path) -> None:
    """4 nodes, N=3: each key has one fallback.  With room for one hint per target, the second
    hint for the dead primary is refused, so a W=3 sloppy write cannot count the fallback."""
    settings = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=3600.0, hint_max_per_target=1)
    cluster = LocalCluster(4, 3, data_dir=str(tmp_path / "cluster"), ap=settings)
    try:
        cluster.start()
        first = "ap:full-1"
        order = walk(cluster, first)
        dead, fallback = order[2], order[3]
        second = next(
            k for k in (f"ap:full-{i}" for i in range(2, 10_000))
            if walk(cluster, k)[3] == fallback and walk(cluster, k)[0] != dead
        )
        cluster.kill(dead)
        coordinator = walk(cluster, second)[0]
        wait_state(cluster, [order[0], coordinator], dead, "down")
        assert put(cluster, order[0], first, b"one", w=3) == 204
        assert pending_hints(cluster, fallback)[dead] == 1
        refused = http(cluster.url(coordinator), "PUT", kv_path(second, w=3), body=b"two")
        assert refused.status == 503, refused
        body = refused.json()
        assert isinstance(body, dict) and body["error"] == "quorum_unavailable"
        assert body["acknowledged"] < 3 and body["indeterminate"] is True  # the primaries may hold it
        assert pending_hints(cluster, fallback)[dead] == 1  # refused, not stored and not counted
        assert metric(cluster, fallback, "kvstore_hints_dropped_total", reason="target_full") >= 1
        assert local_object(cluster, fallback, second).live_values == []
        assert put(cluster, coordinator, second, b"two", w=2) == 204  # W=2 needs no hint
    finally:
        cluster.stop()


# --- read repair ------------------------------------------------------------------------------


def test_read_repair_fixes_a_replica_that_missed_writes(fresh_cluster: LocalCluster) -> None:
    cluster = fresh_cluster  # anti-entropy is off in FAST_AP (one round per hour)
    key = "ap:read-repair"
    order = walk(cluster, key)
    coordinator, stale = order[0], order[2]
    first = http(cluster.url(coordinator), "PUT", kv_path(key, w=3), body=b"v1")
    assert first.status == 204
    cluster.kill(stale)
    wait_state(cluster, [coordinator], stale, "down")
    second = http(
        cluster.url(coordinator), "PUT", kv_path(key, w=2, sloppy="false"), body=b"v2",
        headers={"X-Context": first.headers["x-context"]},
    )
    assert second.status == 204  # strict: no hint anywhere, only the two live primaries have v2
    cluster.restart(stale)
    wait_state(cluster, [coordinator], stale, "up")
    assert local_object(cluster, stale, key).live_values == [b"v1"], "the replica should be stale before a read"
    got = http(cluster.url(coordinator), "GET", kv_path(key, r=2))
    assert got.status == 200 and got.body == b"v2"
    wait_until("read repair updated the stale replica", lambda: local_object(cluster, stale, key).live_values == [b"v2"])
    assert metric(cluster, coordinator, "kvstore_read_repairs_total") >= 1


# --- anti-entropy -----------------------------------------------------------------------------


def write_many(cluster: LocalCluster, via: list[str], keys: list[str], **params: object) -> None:
    def one(i: int) -> int:
        key = keys[i]
        return put(cluster, via[i % len(via)], key, key.encode(), **params)

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(len(keys))))
    assert statuses.count(204) == len(keys), {s: statuses.count(s) for s in set(statuses)}


def _diverge_and_converge(cluster: LocalCluster, victim: str, keys: list[str]) -> list[str]:
    """Write ``keys`` while ``victim`` is partitioned, heal, repair; returns the keys it replicates."""
    others = [n for n in cluster.node_ids if n != victim]
    isolate(cluster, victim)
    wait_state(cluster, others, victim, "down")
    write_many(cluster, others, keys, w=2, sloppy="false")  # strict: the victim gets no hints
    held = [k for k in keys if victim in walk(cluster, k)[:3]]
    before = stored_objects(cluster, victim, held)
    assert all(obj is None for obj in before.values()), "the partitioned replica should have missed every write"
    heal(cluster)
    for observer in others:
        wait_state(cluster, [observer], victim, "up")
    trigger_repair(cluster)

    def converged() -> bool:
        now = stored_objects(cluster, victim, held)
        return all(obj is not None and obj.live_values == [k.encode()] for k, obj in now.items())

    wait_until("the victim's own copies converge", converged, timeout_s=90, every_s=0.5)
    return held


def test_anti_entropy_converges_diverged_replicas_without_reads(fresh_cluster: LocalCluster) -> None:
    cluster = fresh_cluster
    keys = [f"ae:{i}" for i in range(1000)]
    held = _diverge_and_converge(cluster, "n5", keys)
    assert len(held) > 300
    assert client_reads(cluster) == 0
    exchanged = sum(metric(cluster, n, "kvstore_anti_entropy_keys_total") for n in cluster.node_ids)
    assert exchanged >= len(held)
    assert sum(metric(cluster, n, "kvstore_anti_entropy_rounds_total", result="repaired") for n in cluster.node_ids)
    # A second divergence right after: the next rounds must not answer from the first round's trees.
    wait_until("the first rounds finish", lambda: not any(
        internal(cluster, n, {"op": "ae_status"})["running"] for n in cluster.node_ids))
    more = [f"ae2:{i}" for i in range(300)]
    _diverge_and_converge(cluster, "n5", more)
    assert client_reads(cluster) == 0
    # Every replica of every key now agrees, not just the victim.
    for node_id in cluster.node_ids:
        mine = [k for k in keys + more if node_id in walk(cluster, k)[:3]]
        copies = stored_objects(cluster, node_id, mine)
        assert all(o is not None and o.live_values == [k.encode()] for k, o in copies.items()), node_id


def test_a_second_trigger_does_not_start_a_parallel_round(fresh_cluster: LocalCluster) -> None:
    first = admin(fresh_cluster, "n1", "POST", "/admin/repair")
    second = admin(fresh_cluster, "n1", "POST", "/admin/repair")
    assert isinstance(first, dict) and isinstance(second, dict)
    assert first["already_running"] is False
    assert second["already_running"] is True  # the first round cannot finish between two requests


# --- tombstones: no resurrection --------------------------------------------------------------

SHORT_GRACE: dict[str, Any] = {
    "heartbeat_interval_ms": 100, "anti_entropy_interval_s": 3600.0, "hint_max_age_s": 2, "tombstone_grace_s": 3.0,
}


def _no_copy_anywhere(cluster: LocalCluster, key: str) -> bool:
    return all(stored_objects(cluster, n, [key])[key] is None for n in walk(cluster, key)[:3])


def _assert_deleted_everywhere(cluster: LocalCluster, key: str) -> None:
    for node_id in cluster.node_ids:
        assert local_object(cluster, node_id, key).live_values == [], node_id
        got = http(cluster.url(node_id), "GET", kv_path(key, r=3))
        assert got.status == 404, (node_id, got)


def _repair_until_reaped(cluster: LocalCluster, key: str) -> None:
    def reaped() -> bool:
        trigger_repair(cluster)
        return _no_copy_anywhere(cluster, key)

    wait_until("the tombstone is reaped on every primary", reaped, timeout_s=60, every_s=1.0)


@pytest.mark.parametrize("ap_cluster", [SHORT_GRACE], indirect=True, ids=["short-grace"])
def test_a_stale_replica_does_not_resurrect_a_delete(ap_cluster: LocalCluster) -> None:
    cluster = ap_cluster
    key = "ap:stale-delete"
    order = walk(cluster, key)
    first, stale = order[0], order[2]
    created = http(cluster.url(first), "PUT", kv_path(key, w=3), body=b"old")
    assert created.status == 204
    cluster.kill(stale)  # it keeps "old" on disk
    wait_state(cluster, [first], stale, "down")
    deleted = http(
        cluster.url(first), "DELETE", kv_path(key, w=2, sloppy="false"),
        headers={"X-Context": created.headers["x-context"]},
    )
    assert deleted.status == 204
    time.sleep(SHORT_GRACE["tombstone_grace_s"] + 0.5)
    trigger_repair(cluster, [first])
    time.sleep(1.0)
    tomb = stored_objects(cluster, first, [key])[key]
    assert tomb is not None and tomb.is_deleted, "a primary that is down must block the reap"
    cluster.restart(stale)
    assert stored_objects(cluster, stale, [key])[key].live_values == [b"old"]  # type: ignore[union-attr]
    wait_state(cluster, cluster.node_ids, stale, "up")
    _repair_until_reaped(cluster, key)
    assert sum(metric(cluster, n, "kvstore_tombstones_reaped_total") for n in order[:3]) == 3
    trigger_repair(cluster)  # one more round over reaped copies: nothing comes back
    time.sleep(2.0)
    _assert_deleted_everywhere(cluster, key)


@pytest.mark.parametrize("ap_cluster", [SHORT_GRACE], indirect=True, ids=["short-grace"])
def test_a_late_hint_does_not_resurrect_a_delete(ap_cluster: LocalCluster) -> None:
    cluster = ap_cluster
    key = "ap:late-hint"
    order = walk(cluster, key)
    first, owner, holder = order[0], order[2], order[3]
    cluster.kill(owner)
    wait_state(cluster, [first], owner, "down")
    rules = {"rules": {owner: {"drop_in": True, "drop_out": True}}}
    admin(cluster, holder, "PUT", "/admin/faults", rules)  # the holder will not see the owner come back
    created = http(cluster.url(first), "PUT", kv_path(key, w=3, sloppy="true"), body=b"old")
    assert created.status == 204
    assert pending_hints(cluster, holder)[owner] == 1  # a hint carrying the old value
    cluster.restart(owner)
    cut(cluster, owner, holder)
    wait_state(cluster, [first], owner, "up")
    deleted = http(
        cluster.url(first), "DELETE", kv_path(key, w=3, sloppy="false"),
        headers={"X-Context": created.headers["x-context"]},
    )
    assert deleted.status == 204  # every primary has the tombstone; the old value survives in the hint
    _repair_until_reaped(cluster, key)
    # The hint outlived nothing: grace (3 s) >= hint window (2 s), so it expired before the reap.
    assert metric(cluster, holder, "kvstore_hints_dropped_total", reason="expired") >= 1
    assert pending_hints(cluster, holder)[owner] == 0
    heal(cluster)
    wait_state(cluster, [holder], owner, "up")
    time.sleep(1.5)  # a replay tick or several, had the hint survived
    trigger_repair(cluster)
    time.sleep(1.0)
    _assert_deleted_everywhere(cluster, key)
