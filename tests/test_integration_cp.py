"""Integration: the linearizable mode (CASPaxos) on a real 5-node, N=3 cluster."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kvstore.checker import check
from kvstore.contract import etag_of as etag
from kvstore.harness.history import HistoryWriter, read_history
from kvstore.harness.local_cluster import LocalCluster
from kvstore.protocol.ring import Ring
from tests.cas_counter import CasCounter
from tests.conftest import http, kv_path

pytestmark = pytest.mark.integration
LIN = "linearizable"
GENEROUS_S = 90.0  # a bound on waiting for a condition, never an expectation of speed


def primaries(cluster: LocalCluster, key: str) -> tuple[str, ...]:
    return Ring(cluster.node_ids, cluster.base_config.vnodes).preference_list(key, 3)


def final_value(cluster: LocalCluster, key: str, node: str | None = None) -> int | None:
    """The register's value, read linearizably (waiting, within a bound, out a transient 503)."""
    deadline = time.monotonic() + GENEROUS_S
    while True:
        reply = http(cluster.url(node or cluster.node_ids[0]), "GET", kv_path(key, consistency=LIN, timeout_ms=3000))
        if reply.status in (200, 404):
            return int(reply.body) if reply.status == 200 else None
        assert reply.status == 503 and time.monotonic() < deadline, reply
        time.sleep(0.1)


def test_concurrent_cas_increments_lose_nothing_and_are_linearizable(cluster5: LocalCluster, tmp_path: Path) -> None:
    key = "cp:counter"
    history = HistoryWriter(tmp_path / "history.jsonl")

    async def run() -> tuple[list[int], int, int]:
        async with CasCounter(cluster5, key, history, first_process=0) as counter:
            deadline = asyncio.get_running_loop().time() + GENEROUS_S
            nodes = [cluster5.node_ids[i % len(cluster5.node_ids)] for i in range(6)]
            done = await asyncio.gather(*(counter.client(node, 8, deadline) for node in nodes))
            return list(done), counter.acked, counter.unknown

    done, acked, unknown = asyncio.run(run())
    history.close()
    assert done == [8] * 6, "a healthy cluster lets every client finish (the deadline is only a bound)"
    total = final_value(cluster5, key)
    assert total is not None and acked <= total <= acked + unknown
    result = check(read_history(tmp_path / "history.jsonl"), model="cas-register", time_limit_s=60, workers=1)
    assert str(result.valid) == "true", [kr.verdict for kr in result.keys]


def test_replica_killed_mid_run_still_available_and_linearizable(fresh_cluster: LocalCluster, tmp_path: Path) -> None:
    """One of the key's three replicas is SIGKILLed while clients are mid-run.  What that must mean, without
    depending on how fast anything is: operations through the surviving nodes keep succeeding (each
    surviving client completes increments invoked after the kill, within a generous bound), the history is
    linearizable, and the final value counts every acknowledged increment and nothing never attempted."""
    key = "cp:kill"
    pref = primaries(fresh_cluster, key)
    victim = pref[1]
    outsiders = [n for n in fresh_cluster.node_ids if n not in pref]
    # One client through the victim, one through a surviving replica, two through nodes that forward.
    survivors = [pref[0], outsiders[0], outsiders[1]]
    history = HistoryWriter(tmp_path / "history.jsonl")

    async def run() -> tuple[list[int], int, int]:
        loop = asyncio.get_running_loop()
        async with CasCounter(fresh_cluster, key, history, first_process=0) as counter:
            # Before: clients on every node, the victim's included, run until they are stopped.
            stop_before = asyncio.Event()
            before = [asyncio.create_task(counter.client(n, 10**6, loop.time() + GENEROUS_S, stop_before))
                      for n in [victim, *survivors]]
            deadline = loop.time() + GENEROUS_S
            while counter.acked < 4:  # mid-run: the register is in use when the replica dies
                assert loop.time() < deadline, "the healthy cluster acknowledged nothing"
                assert not any(t.done() for t in before), [t.result() for t in before if t.done()]
                await asyncio.sleep(0.01)
            await asyncio.to_thread(fresh_cluster.kill, victim)
            history.nemesis("kill", [victim])
            # Ops in flight at the kill finish (or fail) as they may; then fresh clients through the
            # survivors must each complete 3 increments, all invoked after the kill.
            stop_before.set()
            await asyncio.gather(*before)
            after_deadline = loop.time() + GENEROUS_S
            after = await asyncio.gather(*(counter.client(n, 3, after_deadline) for n in survivors))
            return list(after), counter.acked, counter.unknown

    after, acked, unknown = asyncio.run(run())
    history.close()
    assert after == [3, 3, 3], "2 of 3 replicas keep the register available through every surviving node"
    total = final_value(fresh_cluster, key, pref[0])
    assert total is not None and acked <= total <= acked + unknown, (total, acked, unknown)
    result = check(read_history(tmp_path / "history.jsonl"), model="cas-register", time_limit_s=60, workers=1)
    assert str(result.valid) == "true", [result.explain(kr) for kr in result.invalid_keys]


def test_two_of_three_unreachable_refuses_instead_of_stale(fresh_cluster: LocalCluster) -> None:
    key = "cp:minority"
    pref = primaries(fresh_cluster, key)
    url = fresh_cluster.url(pref[0])
    assert http(url, "PUT", kv_path(key, consistency=LIN), body=b"before").status == 204
    fresh_cluster.kill(pref[1])
    fresh_cluster.kill(pref[2])
    # pref[0] alone still holds "before", but it must not answer from it.
    read = http(url, "GET", kv_path(key, consistency=LIN, timeout_ms=1500))
    assert read.status == 503, read
    assert read.json()["error"] == "quorum_unavailable"  # type: ignore[index]
    write = http(url, "PUT", kv_path(key, consistency=LIN, timeout_ms=1500), body=b"after")
    assert write.status == 503
    outsider = next(n for n in fresh_cluster.node_ids if n not in pref)
    assert http(fresh_cluster.url(outsider), "GET", kv_path(key, consistency=LIN, timeout_ms=1500)).status == 503
    fresh_cluster.restart(pref[1])
    deadline = time.monotonic() + 20
    while True:
        got = http(url, "GET", kv_path(key, consistency=LIN, timeout_ms=1500))
        if got.status == 200:
            break
        assert time.monotonic() < deadline, got
    # The refused write was reported 503: if it was not indeterminate it must never appear.
    doc = write.json()
    assert isinstance(doc, dict)
    assert got.body == b"before" or doc.get("indeterminate") is True


def test_restarted_acceptor_keeps_its_promises(fresh_cluster: LocalCluster) -> None:
    key = "cp:restart"
    pref = primaries(fresh_cluster, key)
    url = fresh_cluster.url(pref[0])
    for i in range(5):
        assert http(url, "PUT", kv_path(key, consistency=LIN), body=f"v{i}".encode()).status == 204
    # Restart one acceptor, then lose another: the remaining majority includes the restarted
    # one, which must still hold the latest accepted value from disk.
    fresh_cluster.kill(pref[1])
    fresh_cluster.restart(pref[1])
    fresh_cluster.kill(pref[2])
    got = http(fresh_cluster.url(pref[1]), "GET", kv_path(key, consistency=LIN, timeout_ms=3000))
    assert got.status == 200 and got.body == b"v4"


def test_linearizable_http_semantics(cluster5: LocalCluster) -> None:
    url = cluster5.urls[2]
    key = "cp:http"
    assert http(url, "GET", kv_path(key, consistency=LIN)).status == 404
    created = http(url, "PUT", kv_path(key, consistency=LIN), body=b"one", headers={"If-None-Match": "*"})
    assert created.status == 204 and created.headers["etag"] == etag(b"one")
    again = http(url, "PUT", kv_path(key, consistency=LIN), body=b"two", headers={"If-None-Match": "*"})
    assert again.status == 412 and again.json()["current"] == etag(b"one")  # type: ignore[index]
    stale = http(url, "PUT", kv_path(key, consistency=LIN), body=b"two", headers={"If-Match": etag(b"zero")})
    assert stale.status == 412
    swapped = http(url, "PUT", kv_path(key, consistency=LIN), body=b"two", headers={"If-Match": etag(b"one")})
    assert swapped.status == 204
    assert http(cluster5.urls[4], "GET", kv_path(key, consistency=LIN)).body == b"two"
    assert http(url, "GET", kv_path(key)).status == 409, "eventual read of a linearizable key is refused"
    assert http(url, "PUT", kv_path(key), body=b"x").status == 409
    assert http(url, "PUT", kv_path("cp:ev"), body=b"e").status == 204
    assert http(url, "GET", kv_path("cp:ev", consistency=LIN)).status == 409
    bad = http(url, "PUT", kv_path(key, consistency=LIN), body=b"x", headers={"If-Match": "no-quotes"})
    assert bad.status == 400
    deleted = http(url, "DELETE", kv_path(key, consistency=LIN), headers={"If-Match": etag(b"two")})
    assert deleted.status == 204
    assert http(url, "GET", kv_path(key, consistency=LIN)).status == 404


def test_mixed_mode_guard_survives_restarts(fresh_cluster: LocalCluster) -> None:
    key = "cp:guard-restart"
    pref = primaries(fresh_cluster, key)
    assert http(fresh_cluster.url(pref[0]), "PUT", kv_path(key, consistency=LIN), body=b"cp").status == 204
    for node in pref:  # every replica restarts from its data; the guard must still know the key
        fresh_cluster.kill(node)
        fresh_cluster.restart(node)
    outsider = next(n for n in fresh_cluster.node_ids if n not in pref)
    assert http(fresh_cluster.url(outsider), "GET", kv_path(key, r=3)).status == 409
    assert http(fresh_cluster.url(outsider), "PUT", kv_path(key, w=2), body=b"ap").status == 409
    assert http(fresh_cluster.url(outsider), "GET", kv_path(key, consistency=LIN)).body == b"cp"
