"""Integration: the linearizable mode (CASPaxos) on a real 5-node, N=3 cluster."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chaos.history import HistoryWriter, read_history
from kvstore.checker import check
from kvstore.cluster import LocalCluster
from kvstore.contract import etag_of as etag
from kvstore.http_session import client_session
from kvstore.ring import Ring
from tests.conftest import http, kv_path

pytestmark = pytest.mark.integration
LIN = "linearizable"


def primaries(cluster: LocalCluster, key: str) -> tuple[str, ...]:
    return Ring(cluster.node_ids, cluster.base_config.vnodes).preference_list(key, 3)


async def cas_increments(cluster: LocalCluster, key: str, clients: int, per_client: int, history: HistoryWriter,
                         during: Any = None) -> tuple[int, int]:
    """Clients each add ``per_client`` increments with read + compare-and-set, recording a history.

    Returns (acknowledged increments, indeterminate CAS outcomes)."""
    next_process = [clients]
    acked = 0
    unknown = 0

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal acked, unknown
        process = i
        url = cluster.urls[i % len(cluster.urls)]
        node = cluster.node_ids[i % len(cluster.urls)]
        target = url + "/kv/" + urllib.parse.quote(key, safe="") + "?consistency=linearizable&timeout_ms=3000"
        done = 0
        attempts = 0
        while done < per_client and attempts < per_client * 60:
            attempts += 1
            history.record({"process": process, "type": "invoke", "f": "read", "key": key, "value": None, "node": node})
            try:
                async with session.get(target) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                history.record({"process": process, "type": "fail", "f": "read", "key": key, "value": None,
                                "node": node, "error": "timeout"})
                continue
            if status not in (200, 404):
                history.record({"process": process, "type": "fail", "f": "read", "key": key, "value": None,
                                "node": node, "error": f"http_{status}"})
                await asyncio.sleep(0.02)
                continue
            current = int(body) if status == 200 else None
            history.record({"process": process, "type": "ok", "f": "read", "key": key, "value": current, "node": node})
            new = (current or 0) + 1
            headers = {"If-Match": etag(str(current).encode())} if current is not None else {"If-None-Match": "*"}
            op = {"process": process, "f": "cas", "key": key, "value": [current, new], "node": node}
            history.record({**op, "type": "invoke"})
            try:
                async with session.put(target, data=str(new).encode(), headers=headers) as resp:
                    doc = await resp.json(content_type=None) if resp.status != 204 else None
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                history.record({**op, "type": "info", "error": "timeout"})
                unknown += 1
                process = next_process[0]
                next_process[0] += 1
                continue
            if status == 204:
                history.record({**op, "type": "ok"})
                acked += 1
                done += 1
            elif status == 412 or (status == 503 and doc and doc.get("indeterminate") is False):
                history.record({**op, "type": "fail", "error": doc.get("error") if doc else None})
            else:
                history.record({**op, "type": "info", "error": f"http_{status}"})
                unknown += 1
                process = next_process[0]
                next_process[0] += 1

    async with client_session(timeout=aiohttp.ClientTimeout(total=5)) as session:
        tasks = [asyncio.create_task(client(i, session)) for i in range(clients)]
        if during is not None:
            await during()
        await asyncio.gather(*tasks)
    return acked, unknown


def final_value(cluster: LocalCluster, key: str, node: str | None = None) -> int | None:
    reply = http(cluster.url(node or cluster.node_ids[0]), "GET", kv_path(key, consistency=LIN))
    assert reply.status in (200, 404), reply
    return int(reply.body) if reply.status == 200 else None


def test_concurrent_cas_increments_lose_nothing_and_are_linearizable(cluster5: LocalCluster, tmp_path: Path) -> None:
    key = "cp:counter"
    history = HistoryWriter(tmp_path / "history.jsonl")
    acked, unknown = asyncio.run(cas_increments(cluster5, key, clients=6, per_client=8, history=history))
    history.close()
    assert acked == 48
    total = final_value(cluster5, key)
    assert total is not None and acked <= total <= acked + unknown
    result = check(read_history(tmp_path / "history.jsonl"), model="cas-register", time_limit_s=60, workers=1)
    assert str(result.valid) == "true", [kr.verdict for kr in result.keys]


def test_replica_killed_mid_run_still_available_and_linearizable(fresh_cluster: LocalCluster, tmp_path: Path) -> None:
    key = "cp:kill"
    victim = primaries(fresh_cluster, key)[1]
    history = HistoryWriter(tmp_path / "history.jsonl")

    async def kill_soon() -> None:
        await asyncio.sleep(0.5)
        history.nemesis("kill", [victim])
        await asyncio.to_thread(fresh_cluster.kill, victim)

    acked, unknown = asyncio.run(cas_increments(fresh_cluster, key, clients=4, per_client=6, history=history,
                                                during=kill_soon))
    history.close()
    survivor = next(n for n in primaries(fresh_cluster, key) if n != victim)
    total = final_value(fresh_cluster, key, survivor)
    assert total is not None and acked <= total <= acked + unknown
    assert acked == 24, "2 of 3 replicas keep the register available"
    result = check(read_history(tmp_path / "history.jsonl"), model="cas-register", time_limit_s=60, workers=1)
    assert str(result.valid) == "true"


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
    deadline = __import__("time").monotonic() + 20
    while True:
        got = http(url, "GET", kv_path(key, consistency=LIN, timeout_ms=1500))
        if got.status == 200:
            break
        assert __import__("time").monotonic() < deadline, got
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
