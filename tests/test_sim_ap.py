"""The AP machinery on a simulated cluster: hinted handoff, read repair, anti-entropy, tombstone reaping.

These are the scenarios tests/test_integration_ap.py used to run on real node processes with
wall-clock waits (a grace period slept through, repairs polled every second for up to 90 s).
Here every node is a real ``Node`` on ``kvstore.sim`` (virtual time, simulated network and
disks), so a wait is a jump of simulated time: a test waits out a 90 s grace period or a
dozen periodic anti-entropy rounds in well under a second of wall time, and it is the same run,
step for step, every time its seed is given.  Every wait is ``SimCluster.wait_until`` with a
simulated deadline; nothing asserts how fast anything happens.

Each test looks at one node's *own* copy of a key (its data store, or data plus hints), never
through a client read, so a quorum cannot mask what a replica holds; "no client read" is
asserted from the nodes' own request counters.  Real-process smoke of the same mechanisms stays
in tests/test_integration_ap.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kvstore.config import APSettings
from kvstore.harness.endpoint import ApiRequest, ApiResponse
from kvstore.protocol import versions
from kvstore.sim import vloop
from kvstore.sim.cluster import ClusterSpec, SimCluster

T = TypeVar("T")

# Heartbeats as the integration clusters had them; no periodic anti-entropy unless a test wants it.
NO_AE = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=3600.0)
SIM_BUDGET_S = 3600.0  # simulated seconds a whole test may take: a hang guard, not a speed claim


def simulate(main: Coroutine[Any, Any, T]) -> T:
    return vloop.run(main, max_time_s=SIM_BUDGET_S)


async def started(spec: ClusterSpec, seed: int) -> SimCluster:
    cluster = SimCluster(spec, seed)
    await cluster.start()
    await wait_all_up(cluster)
    return cluster


async def wait_all_up(cluster: SimCluster) -> None:
    up = [n for n in cluster.node_ids if cluster.members[n].up]
    await cluster.wait_until(
        "every running node sees every running node up",
        lambda: all(cluster.node(a).is_up(b) for a in up for b in up), deadline_s=30.0,
    )


async def wait_state(cluster: SimCluster, observers: list[str], member: str, up: bool) -> None:
    await cluster.wait_until(
        f"{observers} see {member} {'up' if up else 'down'}",
        lambda: all(cluster.node(o).is_up(member) == up for o in observers), deadline_s=30.0,
    )


def request(method: str, key: str, body: bytes | None = None, context: str | None = None,
            **query: str) -> ApiRequest:
    headers = {"X-Context": context} if context else {}
    return ApiRequest(method, f"/kv/{key}", {"timeout_ms": "1000", **query}, headers, body)


async def put(cluster: SimCluster, node: str, key: str, value: bytes, context: str | None = None,
              **query: str) -> ApiResponse:
    return await cluster.request(node, request("PUT", key, value, context, **query), 5.0)


async def delete(cluster: SimCluster, node: str, key: str, context: str, **query: str) -> ApiResponse:
    return await cluster.request(node, request("DELETE", key, None, context, **query), 5.0)


async def get(cluster: SimCluster, node: str, key: str, **query: str) -> ApiResponse:
    return await cluster.request(node, request("GET", key, None, None, **query), 5.0)


def error_body(response: ApiResponse) -> dict[str, Any]:
    doc = json.loads(response.body)
    assert isinstance(doc, dict)
    return doc


async def pending_hints(cluster: SimCluster, node: str) -> dict[str, int]:
    return await cluster.node(node).parts.handoff.pending_hints()


def total(cluster: SimCluster, name: str, **labels: str) -> float:
    """A metric summed over every running node (counters start again at a node's restart)."""
    return sum(cluster.metric(n, name, **labels) for n in cluster.node_ids if cluster.members[n].up)


def client_reads(cluster: SimCluster) -> float:
    """Client GETs answered by any running node, whatever their status."""
    count = 0.0
    for node_id in cluster.node_ids:
        if not cluster.members[node_id].up:
            continue
        for family in cluster.node(node_id).metrics.requests.collect():
            count += sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["op"] == "get")
    return count


async def live(cluster: SimCluster, node: str, key: str) -> list[bytes]:
    """The live values a node knows for a key (its data plus its unexpired hints)."""
    return list((await cluster.local_object(node, key)).live_values)


async def stored_live(cluster: SimCluster, node: str, key: str) -> list[bytes] | None:
    """The live values of a node's data-store copy, or None when it holds no copy at all."""
    obj = await cluster.stored_object(node, key)
    return None if obj is None else list(obj.live_values)


def key_where(cluster: SimCluster, prefix: str, ok: Callable[[list[str]], bool]) -> str:
    """The first key ``prefix<i>`` whose ring walk satisfies ``ok`` (keys are chosen, not hoped for)."""
    for i in range(10_000):
        key = f"{prefix}{i}"
        if ok(cluster.walk(key)):
            return key
    raise AssertionError(f"no key with prefix {prefix!r} fits")


# --- hinted handoff ---------------------------------------------------------------------------


async def _write_while_primary_down(cluster: SimCluster, key: str) -> tuple[str, str, str]:
    """Crash the key's third primary; a strict W=3 write is refused, a sloppy one leaves exactly
    one hint, on the first fallback and nowhere else, outside its data store."""
    order = cluster.walk(key)
    coordinator, dead, fallback = order[0], order[2], order[3]
    cluster.crash(dead)
    await wait_state(cluster, [coordinator], dead, up=False)
    strict = await put(cluster, coordinator, key, b"strict", w="3", sloppy="false")
    assert strict.status == 503, strict
    assert error_body(strict)["error"] == "quorum_unavailable" and error_body(strict)["indeterminate"] is False
    sloppy = await put(cluster, coordinator, key, b"handed-off", w="3", sloppy="true")
    assert sloppy.status == 204, sloppy
    expected = {peer: 0 for peer in cluster.node_ids if peer != fallback}
    assert await pending_hints(cluster, fallback) == {**expected, dead: 1}
    for other in cluster.node_ids:
        if other not in (dead, fallback):
            assert sum((await pending_hints(cluster, other)).values()) == 0, other
    assert total(cluster, "kvstore_hints_stored_total", target=dead) == 1  # one hint in the whole cluster
    assert await live(cluster, fallback, key) == [b"handed-off"]  # served from the hint ...
    assert await cluster.stored_object(fallback, key) is None  # ... never copied into its data
    await cluster.wait_until(
        "the coordinator counted the transition",
        lambda: cluster.metric(coordinator, "kvstore_failure_detector_transitions_total",
                               member=dead, state="down") >= 1, deadline_s=5.0,
    )
    return coordinator, dead, fallback


async def _wait_delivered(cluster: SimCluster, key: str, dead: str, fallback: str) -> float:
    took_s = await cluster.wait_until(
        f"{dead} holds its copy", lambda: _holds(cluster, dead, key, [b"handed-off"]), deadline_s=60.0)
    await cluster.wait_until(
        "the hint is gone", lambda: _no_hint(cluster, fallback, dead), deadline_s=10.0)
    assert cluster.metric(fallback, "kvstore_hints_replayed_total", target=dead) == 1  # delivered once
    assert cluster.metric(fallback, "kvstore_hints_pending", target=dead) == 0
    assert await live(cluster, fallback, key) == []  # the fallback forgot it: it was never a replica
    assert await cluster.stored_object(fallback, key) is None
    assert client_reads(cluster) == 0
    return took_s


async def _holds(cluster: SimCluster, node: str, key: str, values: list[bytes]) -> bool:
    return await stored_live(cluster, node, key) == values


async def _no_hint(cluster: SimCluster, holder: str, target: str) -> bool:
    return (await pending_hints(cluster, holder))[target] == 0


def _handoff_after_restart(seed: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        cluster = await started(ClusterSpec(ap=NO_AE), seed)
        key = "ap-handoff"
        _, dead, fallback = await _write_while_primary_down(cluster, key)
        down_at = cluster.loop.time()
        await cluster.restart(dead)
        took_s = await _wait_delivered(cluster, key, dead, fallback)
        await cluster.stop()
        return {"down_at": down_at, "delivered_after_s": took_s, "messages": cluster.network.messages_sent}

    return simulate(main())


def test_hint_is_delivered_to_the_restarted_primary_without_reads_and_the_run_replays() -> None:
    first = _handoff_after_restart(seed=1)
    assert first["messages"] > 50 and first["delivered_after_s"] > 0
    assert first == _handoff_after_restart(seed=1)  # the same seed is the same run, to the message


def test_hints_survive_a_restart_of_their_holder() -> None:
    async def main() -> None:
        cluster = await started(ClusterSpec(ap=NO_AE), seed=2)
        key = "ap-handoff-holder-restart"
        _, dead, fallback = await _write_while_primary_down(cluster, key)
        cluster.crash(fallback)  # a crash: the hint must be on its disk, and the ledger rebuilt from it
        await cluster.restart(fallback)
        assert (await pending_hints(cluster, fallback))[dead] == 1
        assert await live(cluster, fallback, key) == [b"handed-off"]
        await cluster.restart(dead)
        await _wait_delivered(cluster, key, dead, fallback)
        await cluster.stop()

    simulate(main())


def test_a_full_hint_store_refuses_and_the_fallback_does_not_count() -> None:
    """4 nodes, N=3: each key has one fallback.  With room for one hint per target, the second
    hint for the dead primary is refused, so a W=3 sloppy write cannot count the fallback."""

    async def main() -> None:
        ap = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=3600.0, hint_max_per_target=1)
        cluster = await started(ClusterSpec(nodes=4, ap=ap), seed=3)
        first = "ap-full-1"
        order = cluster.walk(first)
        dead, fallback = order[2], order[3]
        # Its only fallback is the same node, and the dead node is one of its primaries (not the coordinator).
        second = key_where(cluster, "ap-full-second-", lambda w: w[3] == fallback and w[0] != dead)
        coordinator = cluster.walk(second)[0]
        cluster.crash(dead)
        await wait_state(cluster, [order[0], coordinator], dead, up=False)
        assert (await put(cluster, order[0], first, b"one", w="3")).status == 204
        assert (await pending_hints(cluster, fallback))[dead] == 1
        refused = await put(cluster, coordinator, second, b"two", w="3")
        assert refused.status == 503, refused
        body = error_body(refused)
        assert body["error"] == "quorum_unavailable"
        assert body["acknowledged"] < 3 and body["indeterminate"] is True  # the primaries may hold it
        assert (await pending_hints(cluster, fallback))[dead] == 1  # refused: not stored, not counted
        assert cluster.metric(fallback, "kvstore_hints_dropped_total", reason="target_full") == 1
        assert await live(cluster, fallback, second) == []
        assert (await put(cluster, coordinator, second, b"two", w="2")).status == 204  # W=2 needs no hint
        assert (await pending_hints(cluster, fallback))[dead] == 1
        await cluster.stop()

    simulate(main())


# --- read repair ------------------------------------------------------------------------------


def test_read_repair_fixes_a_replica_that_missed_writes() -> None:
    async def main() -> None:
        cluster = await started(ClusterSpec(ap=NO_AE), seed=4)  # no anti-entropy round in this run
        key = "ap-read-repair"
        order = cluster.walk(key)
        coordinator, stale = order[0], order[2]
        first = await put(cluster, coordinator, key, b"v1", w="3")
        assert first.status == 204
        cluster.crash(stale)
        await wait_state(cluster, [coordinator], stale, up=False)
        second = await put(cluster, coordinator, key, b"v2", first.headers["X-Context"], w="2", sloppy="false")
        assert second.status == 204  # strict: no hint anywhere, only the two live primaries have v2
        assert total(cluster, "kvstore_hints_stored_total", target=stale) == 0
        await cluster.restart(stale)
        await wait_state(cluster, [coordinator], stale, up=True)
        await asyncio.sleep(5.0)  # nothing but a read may fix it: it stays stale
        assert await stored_live(cluster, stale, key) == [b"v1"], "the replica should be stale before a read"
        got = await get(cluster, coordinator, key, r="2")
        assert (got.status, got.body) == (200, b"v2")
        await cluster.wait_until("read repair updated the stale replica",
                                 lambda: _holds(cluster, stale, key, [b"v2"]), deadline_s=5.0)
        assert cluster.metric(coordinator, "kvstore_read_repairs_total") >= 1
        assert total(cluster, "kvstore_anti_entropy_rounds_total", result="repaired") == 0  # not anti-entropy's doing
        copies = {n: versions.encode(o) for n in order[:3] if (o := await cluster.stored_object(n, key))}
        assert len(copies) == 3 and len(set(copies.values())) == 1, "all three replicas hold the same object"
        await cluster.stop()

    simulate(main())


def test_a_read_of_a_key_nobody_holds_stores_nothing() -> None:
    """Read repair brings stale primaries up to the merge; when no replica holds the key there is
    no merge to bring, and a read must not leave an empty record on every primary (it did: every
    read of an absent key wrote one, and a read after a reap re-created the record)."""

    async def main() -> None:
        cluster = await started(ClusterSpec(ap=NO_AE), seed=8)
        key = "never-written"
        for node_id in cluster.node_ids:
            got = await get(cluster, node_id, key, r="3")
            assert got.status == 404, got
        await asyncio.sleep(5.0)  # any repair would have landed by now
        assert [n for n in cluster.node_ids if await cluster.stored_object(n, key) is not None] == []
        assert total(cluster, "kvstore_read_repairs_total") == 0
        await cluster.stop()

    simulate(main())


# --- anti-entropy -----------------------------------------------------------------------------

# Periodic rounds only (no trigger): convergence must come from the anti-entropy loop itself.
PERIODIC_AE = APSettings(heartbeat_interval_ms=100, anti_entropy_interval_s=10.0)


async def write_many(cluster: SimCluster, via: list[str], keys: list[str], **query: str) -> None:
    slots = asyncio.Semaphore(8)  # eight clients, as the integration test's thread pool had

    async def one(i: int) -> int:
        async with slots:
            return (await put(cluster, via[i % len(via)], keys[i], keys[i].encode(), **query)).status

    statuses = await asyncio.gather(*(one(i) for i in range(len(keys))))
    assert statuses.count(204) == len(keys), sorted(set(statuses))


async def _diverge_and_converge(cluster: SimCluster, victim: str, keys: list[str]) -> list[str]:
    """Write ``keys`` while ``victim`` is partitioned, heal, and wait for periodic rounds to
    converge every replica; returns the keys the victim replicates."""
    others = [n for n in cluster.node_ids if n != victim]
    cluster.isolate(victim)
    await wait_state(cluster, others, victim, up=False)
    await write_many(cluster, others, keys, w="2", sloppy="false")  # strict: the victim gets no hints
    held = [k for k in keys if victim in cluster.walk(k)[:3]]
    assert [k for k in held if await cluster.stored_object(victim, k) is not None] == [], \
        "the partitioned replica should have missed every write"
    cluster.heal()
    await wait_state(cluster, others, victim, up=True)

    async def converged() -> bool:
        return await _digests_agree(cluster, held)

    await cluster.wait_until("the victim's copies converge", converged, deadline_s=120.0, every_s=1.0)
    return held


async def _digests_agree(cluster: SimCluster, keys: list[str]) -> bool:
    """Every primary of every key holds the same object (its digest), whose value is the key."""
    for key in keys:
        copies = [await cluster.stored_object(n, key) for n in cluster.walk(key)[:3]]
        if any(c is None or c.live_values != [key.encode()] for c in copies):
            return False
        if len({versions.encode(c) for c in copies if c is not None}) != 1:
            return False
    return True


def test_anti_entropy_converges_diverged_replicas_without_reads() -> None:
    async def main() -> None:
        cluster = await started(ClusterSpec(ap=PERIODIC_AE), seed=5)
        keys = [f"ae-{i}" for i in range(1000)]
        held = await _diverge_and_converge(cluster, "n5", keys)
        assert len(held) > 300
        assert client_reads(cluster) == 0
        assert total(cluster, "kvstore_anti_entropy_keys_total") >= len(held)
        assert total(cluster, "kvstore_anti_entropy_rounds_total", result="repaired") > 0
        assert total(cluster, "kvstore_hints_stored_total", target="n5") == 0  # no handoff did it
        # A second divergence right after: the next rounds must not answer from the first round's trees.
        more = [f"ae2-{i}" for i in range(300)]
        await _diverge_and_converge(cluster, "n5", more)
        assert client_reads(cluster) == 0
        assert await _digests_agree(cluster, keys + more)  # every replica of every key, not just the victim's
        for node_id in cluster.node_ids:  # and nobody holds a key it does not replicate
            strays = [k for k in keys + more
                      if node_id not in cluster.walk(k)[:3] and await cluster.stored_object(node_id, k) is not None]
            assert strays == [], node_id
        await cluster.stop()

    simulate(main())


# --- tombstones: reaped after grace, never resurrected -----------------------------------------

# Grace >= the hint window (the config rule); periodic rounds reap.  In simulated seconds, so the
# windows can be long enough to be realistic about ordering without costing wall time.
HINT_WINDOW_S = 60
GRACE_S = 90.0
AE_INTERVAL_S = 20.0
SHORT_GRACE = APSettings(heartbeat_interval_ms=500, anti_entropy_interval_s=AE_INTERVAL_S,
                         hint_max_age_s=HINT_WINDOW_S, tombstone_grace_s=GRACE_S)
# Dozens of periodic rounds over one key: fewer ring ranges make each round cheaper, not different.
REAPING = ClusterSpec(vnodes=32, ap=SHORT_GRACE)


async def _no_copy_on_any_primary(cluster: SimCluster, key: str) -> bool:
    return all([await cluster.stored_object(n, key) is None for n in cluster.walk(key)[:3]])


async def _assert_gone_everywhere(cluster: SimCluster, key: str) -> None:
    """No node holds a copy (not even a tombstone) or a hint of it; every node reads 404 with r=3,
    with no context left to give (the tombstone is gone, not just deleted), and the reads leave
    no record behind."""
    for node_id in cluster.node_ids:
        assert await cluster.stored_object(node_id, key) is None, node_id
        assert await live(cluster, node_id, key) == [], node_id
    for node_id in cluster.node_ids:
        got = await get(cluster, node_id, key, r="3")
        assert got.status == 404, (node_id, got)
        assert "X-Context" not in got.headers, (node_id, got.headers)
    await asyncio.sleep(1.0)  # the reads' repairs, had they any to make
    assert [n for n in cluster.node_ids if await cluster.stored_object(n, key) is not None] == []


def test_a_stale_replica_does_not_resurrect_a_delete() -> None:
    async def main() -> None:
        cluster = await started(REAPING, seed=6)
        key = "ap-stale-delete"
        order = cluster.walk(key)
        first, stale = order[0], order[2]
        created = await put(cluster, first, key, b"old", w="3")
        assert created.status == 204
        cluster.crash(stale)  # it keeps "old" on its disk
        await wait_state(cluster, [first], stale, up=False)
        deleted = await delete(cluster, first, key, created.headers["X-Context"], w="2", sloppy="false")
        assert deleted.status == 204
        rounds_before = cluster.node(first).parts.anti_entropy.rounds_completed
        await asyncio.sleep(GRACE_S + 3 * AE_INTERVAL_S * 1.25)  # past grace, then three rounds at least
        assert cluster.node(first).parts.anti_entropy.rounds_completed >= rounds_before + 3
        for primary in order[:2]:
            tomb = await cluster.stored_object(primary, key)
            assert tomb is not None and tomb.is_deleted, f"a primary that is down must block the reap ({primary})"
        assert total(cluster, "kvstore_tombstones_reaped_total") == 0
        await cluster.restart(stale)
        assert await stored_live(cluster, stale, key) == [b"old"]
        await wait_all_up(cluster)
        await cluster.wait_until("the tombstone is reaped on every primary",
                                 lambda: _no_copy_on_any_primary(cluster, key), deadline_s=300.0, every_s=1.0)
        assert sum(cluster.metric(n, "kvstore_tombstones_reaped_total") for n in order[:3]) == 3
        await asyncio.sleep(3 * AE_INTERVAL_S * 1.25)  # more rounds over the reaped copies: nothing comes back
        await _assert_gone_everywhere(cluster, key)
        await cluster.stop()

    simulate(main())


def test_a_late_hint_does_not_resurrect_a_delete() -> None:
    async def main() -> None:
        cluster = await started(REAPING, seed=7)
        key = "ap-late-hint"
        order = cluster.walk(key)
        first, owner, holder = order[0], order[2], order[3]
        cluster.crash(owner)
        await wait_state(cluster, [first], owner, up=False)
        cluster.cut(holder, owner)  # the holder will not see the owner come back
        created = await put(cluster, first, key, b"old", w="3", sloppy="true")
        assert created.status == 204
        assert (await pending_hints(cluster, holder))[owner] == 1  # a hint carrying the old value
        await cluster.restart(owner)
        cluster.cut(owner, holder)
        await wait_state(cluster, [first], owner, up=True)
        deleted = await delete(cluster, first, key, created.headers["X-Context"], w="3", sloppy="false")
        assert deleted.status == 204  # every primary has the tombstone; the old value survives in the hint
        await cluster.wait_until("the tombstone is reaped on every primary",
                                 lambda: _no_copy_on_any_primary(cluster, key), deadline_s=300.0, every_s=1.0)
        # The hint outlived nothing: grace (90 s) >= hint window (60 s), so it expired before the reap.
        assert cluster.metric(holder, "kvstore_hints_dropped_total", reason="expired") == 1
        assert (await pending_hints(cluster, holder))[owner] == 0
        assert cluster.metric(holder, "kvstore_hints_replayed_total", target=owner) == 0
        cluster.heal()
        await wait_state(cluster, [holder], owner, up=True)
        await asyncio.sleep(3 * AE_INTERVAL_S * 1.25)  # replay ticks and rounds, had the hint survived
        await _assert_gone_everywhere(cluster, key)
        await cluster.stop()

    simulate(main())
