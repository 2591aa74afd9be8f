"""A full disk on one primary, on the simulated cluster: what a w=2, r=2 client can rely on.

tests/test_integration_disk_faults.py once read back a sloppy (default) w=2 write with an
immediate r=2 read and, on a loaded machine, got a 404 now and then.  This pins down why, step
for step on simulated time: a primary whose disk refuses the write has its copy handed to a
fallback as a hint (the sloppy quorum, docs/consistency.md section 2), and that hint counts
toward W.  So W=2 can be the coordinator plus the fallback while the third primary's copy is
still on its way; a read quorum of the refusing primary and that third primary then holds
nothing.  The write is kept (the coordinator and the fallback hold it, and the third primary
takes it moments later), so this is the documented "R + W > N means nothing until handoff",
not a lost write.  With ``sloppy=false`` only primaries count: both healthy primaries hold the
write before it is acknowledged, and every read quorum of the primaries sees it.

The race is made certain, not hoped for, with link delays (one-way, simulated): the
coordinator's link to the third primary, and the read coordinator's link to the write
coordinator, are slow; the refusing primary and the fallback answer quickly.
"""

from __future__ import annotations

import pytest

from kvstore.sim.cluster import ClusterSpec, SimCluster
from tests.test_sim_ap import NO_AE, get, key_where, live, put, simulate, started

SLOW_MS = 300.0  # a one-way delay well inside every timeout (1000 ms) and far beyond the fast links


async def _write_then_read_at_once(sloppy: str, seed: int) -> tuple[int, int]:
    """(status of the w=2 write, status of an r=2 read through a non-primary right after it)."""
    cluster = await started(ClusterSpec(ap=NO_AE), seed=seed)
    # Every Paxos acceptor has saved its identity (a new cluster's acceptors decide that just after
    # start): a disk filled before would refuse that save, which is not what this test is about.
    await cluster.wait_until("every acceptor votes", lambda: all(
        cluster.node(n).parts.register.recovery.active.is_set() for n in cluster.node_ids), deadline_s=30.0)
    key = key_where(cluster, "full-disk-", lambda walk: True)
    coordinator, full, lagging, fallback, reader = cluster.walk(key)
    cluster.set_disk_faults(full, {"disk_full": True})
    cluster.set_rules(coordinator, {lagging: {"delay_ms": SLOW_MS}, reader: {"delay_ms": SLOW_MS}})
    cluster.set_rules(lagging, {coordinator: {"delay_ms": SLOW_MS}})
    cluster.set_rules(reader, {coordinator: {"delay_ms": SLOW_MS}})

    written = await put(cluster, coordinator, key, b"v", w="2", sloppy=sloppy)
    read = await get(cluster, reader, key, r="2")
    if sloppy == "true":
        # Acknowledged by the coordinator and the fallback's hint, before the lagging primary had it.
        assert await live(cluster, fallback, key) == [b"v"]
    await cluster.wait_until("the lagging primary holds the write",
                             lambda: _holds(cluster, lagging, key), deadline_s=10.0)
    assert await live(cluster, full, key) == []
    await cluster.stop()
    return written.status, read.status


async def _holds(cluster: SimCluster, node: str, key: str) -> bool:
    return await live(cluster, node, key) == [b"v"]


SEEDS = [1, 2, 3]  # the delays decide the race, not the seed: any seed shows it


@pytest.mark.parametrize("seed", SEEDS)
def test_a_sloppy_w2_write_acknowledged_through_a_fallback_can_be_missed_by_an_r2_read_at_once(seed: int) -> None:
    written, read = simulate(_write_then_read_at_once("true", seed))
    assert written == 204
    assert read == 404  # the documented sloppy-quorum caveat, not a lost write: see the docstring


@pytest.mark.parametrize("seed", SEEDS)
def test_a_strict_w2_write_with_one_primary_refusing_is_seen_by_every_r2_read(seed: int) -> None:
    written, read = simulate(_write_then_read_at_once("false", seed))
    assert written == 204
    assert read == 200
