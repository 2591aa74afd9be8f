"""GET /cluster/keys/{key}/placement and ``kvstore status --key`` on a live cluster."""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path

import pytest

from kvstore import cli
from kvstore.harness.local_cluster import LocalCluster
from kvstore.protocol.ring import Ring
from tests.conftest import http
from tests.openapi_util import validate_response

pytestmark = pytest.mark.integration


def placement_of(url: str, key: str) -> dict[str, object]:
    reply = http(url, "GET", "/cluster/keys/" + urllib.parse.quote(key, safe="") + "/placement")
    body = validate_response("GET", "/cluster/keys/{key}/placement", reply.status, reply.headers, reply.body)
    assert reply.status == 200, reply.body
    assert isinstance(body, dict)
    return body


def test_placement_follows_the_ring_and_the_failure_detector(fresh_cluster: LocalCluster,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    key = "user/42?x"  # a slash and a question mark: one path segment, percent-encoded
    ring = Ring(fresh_cluster.node_ids, fresh_cluster.base_config.vnodes)
    walk = list(ring.walk(key))
    asker = walk[-1]  # a fallback of the key, so it stays up while a primary dies
    url = fresh_cluster.url(asker)
    healthy = placement_of(url, key)
    assert healthy["node"] == asker and healthy["key"] == key
    assert healthy["preference_list"] == walk[:3] and healthy["primaries_down"] == []
    assert [f["id"] for f in healthy["fallbacks"]] == walk[3:]  # type: ignore[index]
    assert healthy["majority_reachable"] is True

    victim = walk[0]
    fresh_cluster.kill(victim)
    deadline = time.monotonic() + 30
    while True:  # the failure detector needs a few missed heartbeats
        seen = placement_of(url, key)
        if seen["primaries_down"] == [victim] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert seen["primaries_down"] == [victim], seen
    assert seen["primaries_up"] == walk[1:3] and seen["majority_reachable"] is True
    stand_in = [f for f in seen["fallbacks"] if f["stands_in_for"] == victim]  # type: ignore[union-attr]
    assert stand_in == [{"id": walk[3], "up": True, "stands_in_for": victim}]

    assert cli.main(["status", "--node", url, "--key", key]) == 0
    text = capsys.readouterr().out
    assert f"primary 1: {victim}  DOWN  -> writes go to {walk[3]} (a hint)" in text
    assert "a majority of the primaries is reachable: yes" in text
    assert cli.main(["status", "--node", url, "--key", key, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == seen


def test_placement_refuses_a_key_that_is_not_one(cluster5: LocalCluster) -> None:
    for raw in ("%FF", "%00", "x" * 1025):
        reply = http(cluster5.urls[0], "GET", f"/cluster/keys/{raw}/placement")
        assert reply.status == 400 and json.loads(reply.body)["error"] == "invalid_key", reply.body


def test_machines_in_placement_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """4 nodes, 2 per machine, N=3: fewer machines than N, so every key keeps two replicas on one
    machine; the placement names it and both status commands warn."""
    cluster = LocalCluster(4, 3, data_dir=str(tmp_path / "c"), storage="memory", nodes_per_machine=2)
    try:
        cluster.start()
        machines = {"n1": "m1", "n2": "m1", "n3": "m2", "n4": "m2"}
        ring = Ring(cluster.node_ids, cluster.base_config.vnodes, machines)
        for key in ("user:1", "user:2", "k"):
            seen = placement_of(cluster.urls[0], key)
            assert seen["preference_list"] == list(ring.preference_list(key, 3))
            assert seen["machines"] == {m: machines[m] for m in ring.walk(key)}
            on = [machines[m] for m in ring.preference_list(key, 3)]
            assert seen["shared_machines"] == [m for m in ("m1", "m2") if on.count(m) == 2]
        assert cli.main(["status", "--node", cluster.urls[0], "--key", "k"]) == 0
        text = capsys.readouterr().out
        assert "WARNING: replicas" in text and "share machine" in text
        assert cli.main(["status", "--node", cluster.urls[0]]) == 0
        text = capsys.readouterr().out
        assert "machine" in text and "N=3 but the members run on 2 machine(s) (m1, m2)" in text.replace("\n", " ")
    finally:
        cluster.stop()


def test_a_joining_node_brings_its_machine_into_the_configuration(tmp_path: Path) -> None:
    """n1, n2 on m1, n3 on m2, then spare n4 joins on m2: the committed configuration carries
    n4's machine to every member, and their placements use it."""
    cluster = LocalCluster(3, 3, data_dir=str(tmp_path / "c"), storage="memory", nodes_per_machine=2, spares=1)
    try:
        cluster.start()
        url = cluster.url("n1")
        bad = {"action": "join", "id": "n4", "host": "127.0.0.1", "http_port": 1, "peer_port": 2, "machine": 5}
        reply = http(url, "POST", "/admin/membership", json.dumps(bad).encode(),
                     {"X-Cluster-Secret": cluster.secret, "Content-Type": "application/json"})
        assert reply.status == 400 and json.loads(reply.body)["error"] == "invalid_body", reply.body
        done = cluster.join("n4")
        members = done["config"]["members"]
        assert {m: a.get("machine") for m, a in members.items()} == {"n1": "m1", "n2": "m1", "n3": "m2", "n4": "m2"}
        machines = {"n1": "m1", "n2": "m1", "n3": "m2", "n4": "m2"}
        ring = Ring(["n1", "n2", "n3", "n4"], cluster.base_config.vnodes, machines)
        for node in ("n1", "n2", "n3", "n4"):
            deadline = time.monotonic() + 30
            while cluster.admin(node, "GET", "/admin/membership")["config"]["version"] < done["config"]["version"]:
                assert time.monotonic() < deadline, f"{node} did not install the committed version"
                time.sleep(0.1)
            seen = placement_of(cluster.url(node), "user:7")
            assert seen["preference_list"] == list(ring.preference_list("user:7", 3))
            assert seen["machines"]["n4"] == "m2"
    finally:
        cluster.stop()
