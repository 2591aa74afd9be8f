"""Scenario tests: PaxosAcceptor + PaxosProposer over the simulated network (kvstore.transport.memory),
on virtual time (kvstore.sim.vloop, through the shared helpers in tests/vtime.py).

Each simulated node has its own acceptor (over its own storage) and its own proposer, and reaches
itself through the same ``call`` as its peers, like the real node does.  Everything random is
seeded (link jitter, proposer backoff).

Every test but one runs on a fresh ``VirtualLoop`` (``@simulated``): the loop's clock is simulated
and jumps to the next timer when nothing is ready, and the proposers read time through ``CLOCK``,
whose monotonic time *is* that clock.  So every deadline, call timeout, backoff, link delay and
sleep here is virtual: a 2 s deadline costs no wall time, a busy machine cannot make a proposal
time out, and a run is the same sequence of steps every time (a seed replays it exactly).  The
assertions about time are about simulated time and can be exact (a proposal gives up *at* its
deadline).  A livelock or hang ends as ``SimLimitExceeded`` (the simulated-time and step budgets
of tests/vtime.py), a wait that nothing can end as ``SimDeadlock``: typed failures, never a stuck test.

The one test on a real loop is the sqlite acceptor restart: the sqlite engine does its I/O in
executor threads, which a virtual loop cannot wait for (nothing is ready and no timer is pending
while a thread works: ``SimDeadlock``).  It has no deadline or sleep, so nothing in it depends on
speed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kvstore.clock import ManualClock
from kvstore.errors import Overloaded, QuorumUnavailable
from kvstore.protocol.paxos import (
    ABSENT,
    LINEAGE_DEPTH,
    AcceptorState,
    Ballot,
    Change,
    CompareAndSet,
    Delete,
    PutIfAbsent,
    Read,
    RegisterValue,
    Write,
    etag_of,
)
from kvstore.protocol.proposer import Effect, Instant, ProposerCore, Send
from kvstore.runtime.caspaxos import (
    ConsensusOverloaded,
    ConsensusUnavailable,
    PaxosAcceptor,
    PaxosProposer,
    ProposeResult,
    accept_message,
    prepare_message,
)
from kvstore.storage import open_storage
from kvstore.storage.base import Storage, StorageError, StorageWrapper
from kvstore.transport.base import FaultRules, LinkRule, Message, PeerUnavailable
from kvstore.transport.memory import MemoryNetwork
from tests.vtime import CLOCK, elapsed_s, run_simulated, simulated, virtual_loop

TOKEN = 42


class CountingStorage(StorageWrapper):
    """Wraps a storage: counts durable writes and yields on I/O like a real engine would."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.puts = 0

    async def get(self, key: str, token: int) -> bytes | None:
        await asyncio.sleep(0)
        return await self.inner.get(key, token)

    async def put(self, key: str, token: int, blob: bytes) -> None:
        await asyncio.sleep(0)
        self.puts += 1
        await self.inner.put(key, token, blob)


class SimNode:
    def __init__(self, net: MemoryNetwork, node_id: str, seed: int, **proposer_kw: Any) -> None:
        self.node_id = node_id
        self.transport = net.endpoint(node_id, FaultRules(rng=random.Random(seed)))
        self.storage = CountingStorage(open_storage("memory", None, "always"))
        self.acceptor = PaxosAcceptor(self.storage)
        self.proposer = PaxosProposer(
            node_id, self.call, CLOCK, random.Random(seed), **{"backoff_base_s": 0.002, **proposer_kw}
        )

    async def start(self) -> None:
        await self.transport.start(self.handle)

    async def handle(self, sender: str, message: Message) -> Message:
        try:
            return await self.acceptor.handle(message)
        except StorageError as exc:
            return {"error": "storage", "message": str(exc), "remote_error": True}

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        # Like Node.call: the local acceptor is reached without the network (but not when "down").
        if peer == self.node_id:
            if not self.transport.up:
                raise PeerUnavailable(peer, "down", maybe_delivered=False)
            return await self.handle(peer, message)
        return await self.transport.call(peer, message, timeout_s)

    def restart_acceptor(self) -> None:
        """A process restart as far as the acceptor goes: all memory lost, storage kept."""
        self.acceptor = PaxosAcceptor(self.storage)


async def make_cluster(n: int, seed: int = 1, **proposer_kw: Any) -> tuple[MemoryNetwork, list[SimNode]]:
    net = MemoryNetwork()
    nodes = [SimNode(net, f"n{i + 1}", seed * 100 + i, **proposer_kw) for i in range(n)]
    for node in nodes:
        await node.start()
    return net, nodes


async def settle() -> None:
    """Let shielded acceptor work and cancelled stragglers finish before the loop closes."""
    for _ in range(5):
        await asyncio.sleep(0.005)


def ids(nodes: list[SimNode]) -> list[str]:
    return [node.node_id for node in nodes]


async def propose(
    node: SimNode, change: Change, replicas: list[str], key: str = "k", timeout_s: float = 2.0
) -> ProposeResult:
    return await node.proposer.propose(key, TOKEN, replicas, change, timeout_s)


# --- correctness under concurrency ------------------------------------------------------------


async def read_until_done(node: SimNode, replicas: list[str], log: dict[str, Any]) -> ProposeResult:
    """Reads fail only from contention here (never indeterminate); the client simply retries."""
    while True:
        try:
            return await propose(node, Read(), replicas, key="counter")
        except ConsensusUnavailable as exc:
            assert exc.indeterminate is False
            log["failed"] += 1


async def cas_incrementer(node: SimNode, replicas: list[str], increments: int, log: dict[str, Any]) -> None:
    """Read-CAS loop: read the counter, CAS it to +1, retry on precondition_failed."""
    done = 0
    current = await read_until_done(node, replicas, log)
    while done < increments:
        value = int(current.value.value) if current.value.value is not None else 0
        new = str(value + 1).encode()
        change: Change = (
            PutIfAbsent(new) if current.current_etag is None else CompareAndSet(current.current_etag, new)
        )
        try:
            result = await propose(node, change, replicas, key="counter")
        except ConsensusUnavailable as exc:
            if exc.indeterminate:
                log["indeterminate"] += 1
                done += 1  # it may or may not have happened: the final check allows both
            else:
                log["failed"] += 1  # certainly not applied: try again
            current = await read_until_done(node, replicas, log)
            continue
        if result.outcome == "ok":
            log["ok"].append(value + 1)
            done += 1
        else:
            log["conflicts"] += 1
        current = result
        log["round_trips"] += result.round_trips


CAS_INCREMENTS = 8  # per client; two clients per node
CAS_HANG_GUARD_S = 60.0  # simulated seconds; the workload takes well under one (a livelock guard)
CAS_SEEDS = [(3, 1), (3, 2), (3, 3), (5, 4), (5, 5)]


async def cas_workload(n: int, seed: int) -> dict[str, Any]:
    """Two read-CAS clients per node increment one counter over jittery links; returns the log, the
    final counter, the proposers' retries, and a fingerprint of the whole run (for the replay test)."""
    net, nodes = await make_cluster(n, seed)
    for node in nodes:  # jittery links so that messages of concurrent proposals interleave
        for peer in nodes:
            if peer is not node:
                node.transport.faults.set_rule(peer.node_id, LinkRule(delay_ms=0.5, jitter_ms=0.5))
    log: dict[str, Any] = {"ok": [], "indeterminate": 0, "failed": 0, "conflicts": 0, "round_trips": 0}
    replicas = ids(nodes)
    clients = [cas_incrementer(node, replicas, CAS_INCREMENTS, log) for node in nodes for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*clients), CAS_HANG_GUARD_S)
    final = await propose(nodes[0], Read(), replicas, key="counter")
    await settle()
    acceptors = [await node.acceptor.load("counter", TOKEN) for node in nodes]
    return {
        "clients": len(clients),
        "log": log,
        "final": final.value.value,
        "retries": sum(node.proposer.stats.retries for node in nodes),
        "fingerprint": (
            repr(log),
            repr(final),
            [repr(node.proposer.stats) for node in nodes],
            [repr(node.acceptor.stats) for node in nodes],
            [repr(state) for state in acceptors],
            CLOCK.monotonic_ns(),
            virtual_loop().steps,
        ),
    }


TEST_CAS = "test_concurrent_cas_increments_lose_nothing"


@simulated
@pytest.mark.parametrize(("n", "seed"), CAS_SEEDS)
async def test_concurrent_cas_increments_lose_nothing(n: int, seed: int) -> None:
    run = await cas_workload(n, seed)
    log = run["log"]
    replay = f"seed {seed} ({n} nodes); it replays exactly: pytest 'tests/test_cp_sim.py::{TEST_CAS}[{n}-{seed}]'"
    assert run["final"] is not None, replay
    total = int(run["final"])
    ok = log["ok"]
    # Every acknowledged increment produced a distinct successor value: no lost update.
    assert len(set(ok)) == len(ok), replay
    assert len(ok) <= total <= len(ok) + log["indeterminate"], replay
    assert len(ok) + log["indeterminate"] == run["clients"] * CAS_INCREMENTS, replay
    assert log["conflicts"] + run["retries"] > 0, replay  # the clients did contend


def test_concurrent_cas_run_replays_from_its_seed() -> None:
    """On virtual time the contended workload is a function of its seed: the same seed gives the
    same run step for step (every outcome, counter, acceptor state, simulated time and loop step);
    another seed gives another run (the seed does reach the jitter and the backoffs)."""

    def one_run(n: int, seed: int) -> Any:
        run = run_simulated(cas_workload(n, seed))
        return run["fingerprint"]

    first = one_run(3, 1)
    assert one_run(3, 1) == first
    assert one_run(3, 2) != first


@simulated
async def test_many_proposers_on_one_node_share_ballots_safely() -> None:
    """Concurrent proposals on one proposer for one key (fast-path entry used at most once)."""
    _, nodes = await make_cluster(3, seed=9)
    log: dict[str, Any] = {"ok": [], "indeterminate": 0, "failed": 0, "conflicts": 0, "round_trips": 0}
    await asyncio.gather(*(cas_incrementer(nodes[0], ids(nodes), 10, log) for _ in range(5)))
    final = await propose(nodes[1], Read(), ids(nodes), key="counter")
    assert final.value.value is not None
    assert len(log["ok"]) <= int(final.value.value) <= len(log["ok"]) + log["indeterminate"]
    assert len(set(log["ok"])) == len(log["ok"])
    await settle()


@simulated
async def test_write_read_delete_cycle() -> None:
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    assert (await propose(nodes[0], Read(), r)).value == ABSENT
    w = await propose(nodes[0], Write(b"a"), r)
    assert (w.value, w.outcome, w.current_etag) == (RegisterValue.of(b"a"), "ok", etag_of(b"a"))
    assert (await propose(nodes[1], Read(), r)).value.value == b"a"
    failed = await propose(nodes[2], PutIfAbsent(b"b"), r)
    assert (failed.outcome, failed.current_etag, failed.value.value) == (
        "precondition_failed",
        etag_of(b"a"),
        b"a",
    )
    stale = await propose(nodes[2], CompareAndSet(etag_of(b"zzz"), b"c"), r)
    assert stale.outcome == "precondition_failed" and stale.current_etag == etag_of(b"a")
    cas = await propose(nodes[2], CompareAndSet(etag_of(b"a"), b"c"), r)
    assert cas.outcome == "ok" and cas.value.value == b"c"
    assert (await propose(nodes[0], Delete(), r)).value == ABSENT
    assert (await propose(nodes[1], Read(), r)).value == ABSENT
    assert (await propose(nodes[1], PutIfAbsent(b"d"), r)).outcome == "ok"
    await settle()


@simulated
async def test_proposer_outside_the_replica_set() -> None:
    """A node that is not one of the key's replicas can still coordinate (5 nodes, N=3)."""
    _, nodes = await make_cluster(5)
    replicas = ["n1", "n2", "n3"]
    assert (await propose(nodes[4], Write(b"x"), replicas)).outcome == "ok"
    assert (await propose(nodes[3], Read(), replicas)).value.value == b"x"
    assert all(node.acceptor.stats.writes == 0 for node in nodes[3:])
    await settle()


# --- availability --------------------------------------------------------------------------------


@simulated
async def test_minority_side_gets_unavailable_not_stale() -> None:
    net, nodes = await make_cluster(3)
    r = ids(nodes)
    await propose(nodes[0], Write(b"v1"), r)
    net.partition(["n1"], ["n2", "n3"])
    assert (await propose(nodes[1], Write(b"v2"), r)).outcome == "ok"

    started_ns = CLOCK.monotonic_ns()
    with pytest.raises(ConsensusUnavailable) as read_err:
        await propose(nodes[0], Read(), r, timeout_s=0.3)
    # Silence from the majority: it gives up at its deadline, not before and not after (virtual time,
    # so this is exact up to the loop's nanosecond rounding).
    assert elapsed_s(started_ns) == pytest.approx(0.3, abs=1e-6)
    assert read_err.value.indeterminate is False  # a read never is
    assert read_err.value.needed == 2 and read_err.value.acknowledged <= 1
    assert isinstance(read_err.value, QuorumUnavailable)  # maps to HTTP 503 quorum_unavailable

    # Full protocol (the fast-path entry was used up by the read): the prepare fails, no accept is
    # ever sent, so the failure is certain.
    assert not nodes[0].proposer.holds_fast_path("k")
    started_ns = CLOCK.monotonic_ns()
    with pytest.raises(ConsensusUnavailable) as write_err:
        await propose(nodes[0], Write(b"lost"), r, timeout_s=0.3)
    assert write_err.value.indeterminate is False
    assert elapsed_s(started_ns) == pytest.approx(0.3, abs=1e-6)

    net.heal()
    assert (await propose(nodes[0], Read(), r)).value.value == b"v2"
    await settle()


@simulated
async def test_fast_path_write_in_minority_is_indeterminate() -> None:
    """The fast accept reaches the local acceptor: the write may appear, so never a certain failure."""
    net, nodes = await make_cluster(3)
    r = ids(nodes)
    await propose(nodes[0], Write(b"v1"), r)
    assert nodes[0].proposer.holds_fast_path("k")
    net.partition(["n1"], ["n2", "n3"])
    started_ns = CLOCK.monotonic_ns()
    with pytest.raises(ConsensusUnavailable) as err:
        await propose(nodes[0], Write(b"maybe"), r, timeout_s=0.2)
    assert err.value.indeterminate is True
    assert elapsed_s(started_ns) == pytest.approx(0.2, abs=1e-6)  # at its deadline
    net.heal()
    # The majority never saw it, and the next proposal commits above it: it is gone for good.
    assert (await propose(nodes[1], Read(), r)).value.value == b"v1"
    assert (await propose(nodes[0], Read(), r)).value.value == b"v1"
    await settle()


@simulated
@pytest.mark.parametrize("down", ["n1", "n2", "n3"])
async def test_one_replica_down_still_works(down: str) -> None:
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    dead = next(node for node in nodes if node.node_id == down)
    await dead.transport.close()
    alive = [node for node in nodes if node is not dead]
    w = await propose(alive[0], Write(b"1"), r)
    assert w.outcome == "ok"
    c = await propose(alive[1], CompareAndSet(etag_of(b"1"), b"2"), r)
    assert c.outcome == "ok"
    assert (await propose(alive[0], Read(), r)).value.value == b"2"
    await settle()


@simulated
async def test_two_replicas_down_is_unavailable_promptly() -> None:
    """Refused connections (not silence): each round fails at once; the retries (bounded by
    max_attempts) end the proposal before its deadline."""
    backoffs: list[float] = []

    async def recorded_sleep(delay_s: float) -> None:
        backoffs.append(delay_s)
        await asyncio.sleep(delay_s)

    _, nodes = await make_cluster(3, max_attempts=3, sleep=recorded_sleep)
    r = ids(nodes)
    for node in nodes[1:]:
        await node.transport.close()
    started_ns = CLOCK.monotonic_ns()
    with pytest.raises(ConsensusUnavailable) as err:
        await propose(nodes[0], Write(b"x"), r, timeout_s=1.0)
    assert err.value.indeterminate is False
    assert "3 attempts" in err.value.reason
    # Three rounds, two backoffs in between, and no round waited for anything: the whole proposal
    # took exactly its backoffs in simulated time, well inside the deadline.
    assert len(backoffs) == 2
    assert elapsed_s(started_ns) == pytest.approx(sum(backoffs), abs=1e-6)
    assert elapsed_s(started_ns) < 1.0
    await settle()


@simulated
async def test_deadline_respected_when_everyone_is_silent() -> None:
    net, nodes = await make_cluster(3)
    r = ids(nodes)
    net.partition(["n1"], ["n2"], ["n3"])
    before = len(asyncio.all_tasks())
    started_ns = CLOCK.monotonic_ns()
    with pytest.raises(ConsensusUnavailable):
        await propose(nodes[0], Write(b"x"), r, timeout_s=0.2)
    assert elapsed_s(started_ns) == pytest.approx(0.2, abs=1e-6)  # at the deadline, not after it
    await settle()
    assert len(asyncio.all_tasks()) <= before  # no call outlives the proposal


# --- durability of promises ----------------------------------------------------------------------


@simulated
async def test_restarted_acceptor_keeps_promise_memory_storage() -> None:
    _, nodes = await make_cluster(3)
    node = nodes[0]
    reply = await node.acceptor.handle(prepare_message("k", TOKEN, Ballot(10, "x")))
    assert reply["ok"] is True
    node.restart_acceptor()
    stale = await node.acceptor.handle(
        accept_message("k", TOKEN, Ballot(5, "y"), RegisterValue.of(b"s"), None)
    )
    assert stale == {"ok": False, "conflict": [10, "x"]}
    again = await node.acceptor.handle(prepare_message("k", TOKEN, Ballot(10, "x")))
    assert again == {"ok": False, "conflict": [10, "x"]}
    await settle()


async def test_restarted_acceptor_keeps_promise_sqlite(tmp_path: Path) -> None:
    path = str(tmp_path / "paxos.db")
    storage = open_storage("sqlite", path, "always")
    acceptor = PaxosAcceptor(storage)
    assert (await acceptor.handle(prepare_message("k", TOKEN, Ballot(3, "a"))))["ok"] is True
    nxt = Ballot(4, "a")
    accept = accept_message("k", TOKEN, Ballot(3, "a"), RegisterValue.of(b"v"), nxt)
    assert await acceptor.handle(accept) == {"ok": True, "promised_next": [4, "a"]}
    await storage.close()

    storage = open_storage("sqlite", path, "always")
    acceptor = PaxosAcceptor(storage)  # a new process: nothing in memory
    state = await acceptor.load("k", TOKEN)
    assert state == AcceptorState(nxt, Ballot(3, "a"), RegisterValue.of(b"v"))
    # The fast-path promise survived: another proposer's lower ballot is refused...
    assert await acceptor.handle(prepare_message("k", TOKEN, Ballot(4, "0"))) == {
        "ok": False,
        "conflict": [4, "a"],
    }
    # ...and the promised proposer's fast accept is honoured.
    fast = accept_message("k", TOKEN, nxt, RegisterValue.of(b"w"), Ballot(5, "a"))
    assert (await acceptor.handle(fast))["ok"] is True
    await storage.close()


@simulated
async def test_cluster_survives_acceptor_restarts_mid_stream() -> None:
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    for i in range(6):
        await propose(nodes[i % 3], Write(str(i).encode()), r)
        nodes[(i + 1) % 3].restart_acceptor()
    assert (await propose(nodes[2], Read(), r)).value.value == b"5"
    await settle()


@simulated
async def test_corrupt_state_is_refused_not_reset() -> None:
    _, nodes = await make_cluster(3)
    await nodes[0].storage.put("k", TOKEN, b"\xc1garbage")
    reply = await nodes[0].handle("n2", prepare_message("k", TOKEN, Ballot(1, "n2")))
    assert reply["error"] == "storage"
    # The two healthy acceptors still form a majority.
    assert (await propose(nodes[1], Write(b"x"), ids(nodes))).outcome == "ok"
    await settle()


# --- fast path ------------------------------------------------------------------------------------


@simulated
async def test_fast_path_round_trips_and_fsyncs() -> None:
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    n1, n2 = nodes[0], nodes[1]

    async def puts_during(coro: Awaitable[ProposeResult]) -> tuple[ProposeResult, list[int]]:
        before = [node.storage.puts for node in nodes]
        result = await coro
        await settle()
        return result, [node.storage.puts - b for node, b in zip(nodes, before, strict=True)]

    first, puts = await puts_during(propose(n1, Write(b"1"), r))
    assert first.round_trips == 2 and puts == [2, 2, 2]  # prepare + accept, one fsync each

    second, puts = await puts_during(propose(n1, Write(b"2"), r))
    assert second.round_trips == 1 and puts == [1, 1, 1]  # one round trip, one fsync
    read, puts = await puts_during(propose(n1, Read(), r))
    assert read.round_trips == 1 and read.value.value == b"2"
    assert puts == [0, 0, 0] and n1.proposer.stats.peek_hits == 1  # a quorum read: no write at all

    other = await propose(n2, Write(b"3"), r)  # another proposer intervenes
    assert other.round_trips == 2

    back, puts = await puts_during(propose(n1, CompareAndSet(etag_of(b"3"), b"4"), r))
    assert back.round_trips == 3  # rejected fast accept, then the full protocol
    # The peers rejected the fast accept (no write), so it never went to n1's own acceptor.
    assert puts == [2, 2, 2]
    assert back.outcome == "ok" and back.value.value == b"4"
    assert n1.proposer.stats.fast_path_misses == 1

    again = await propose(n1, Write(b"5"), r)
    assert again.round_trips == 1
    assert (await propose(n2, Read(), r)).value.value == b"5"
    assert n1.proposer.stats.fast_path_hits == 2  # the read above took no fast-path promise
    await settle()


@simulated
async def test_fast_path_not_used_for_a_different_replica_set() -> None:
    _, nodes = await make_cluster(5, peek_reads=False)  # reads here run the full protocol
    await propose(nodes[0], Write(b"1"), ["n1", "n2", "n3"])
    moved = await propose(nodes[0], Read(), ["n1", "n2", "n4"])
    assert moved.round_trips == 2
    await settle()


@simulated
async def test_fast_path_lru_is_bounded() -> None:
    _, nodes = await make_cluster(3, fast_path_capacity=4, peek_reads=False)  # full-protocol reads
    for i in range(10):
        await propose(nodes[0], Write(b"v"), ids(nodes), key=f"k{i}")
    assert len(nodes[0].proposer.state.fast) == 4
    assert nodes[0].proposer.holds_fast_path("k9") and not nodes[0].proposer.holds_fast_path("k0")
    assert (await propose(nodes[0], Read(), ids(nodes), key="k9")).round_trips == 1
    assert (await propose(nodes[0], Read(), ids(nodes), key="k0")).round_trips == 2
    await settle()


# --- recovery and indeterminacy (scripted delivery) ------------------------------------------------


Script = Callable[[str, Message], str]  # (peer, message) -> "deliver" | "lost" | "refuse" | "drop-reply"


def scripted(node: SimNode, script: Script) -> Callable[[str, Message, float], Awaitable[Message]]:
    """A ``call`` that delivers, refuses, or delivers and then loses the reply, per the script."""

    async def call(peer: str, message: Message, timeout_s: float) -> Message:
        action = script(peer, message)
        if action == "refuse":
            raise PeerUnavailable(peer, "refused", maybe_delivered=False)
        if action == "lost":
            raise PeerUnavailable(peer, "lost request", maybe_delivered=True)
        reply = await node.call(peer, message, timeout_s)
        if action == "drop-reply":
            raise PeerUnavailable(peer, "lost reply", maybe_delivered=True)
        assert action == "deliver"
        return reply

    return call


@simulated
async def test_partial_accept_makes_a_write_indeterminate_but_not_a_read() -> None:
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    await propose(nodes[1], Write(b"base"), r)

    def accept_only_locally(peer: str, message: Message) -> str:
        if message["op"] == "paxos_accept" and peer != "n1":
            return "lost"
        return "deliver"

    proposer = PaxosProposer(
        "n1", scripted(nodes[0], accept_only_locally), CLOCK, random.Random(1), max_attempts=2,
        peek_reads=False,  # a full-protocol read (a quorum read would answer "base" from n2 and n3)
    )
    with pytest.raises(ConsensusUnavailable) as write_err:
        await proposer.propose("k", TOKEN, r, Write(b"new"), 1.0)
    assert write_err.value.indeterminate is True
    with pytest.raises(ConsensusUnavailable) as read_err:
        await proposer.propose("k", TOKEN, r, Read(), 1.0)
    assert read_err.value.indeterminate is False
    with pytest.raises(ConsensusUnavailable) as same_err:
        # Writing the value that is already there changes nothing: a certain failure.
        await proposer.propose("k", TOKEN, r, CompareAndSet(etag_of(b"zz"), b"q"), 1.0)
    assert same_err.value.indeterminate is False
    await settle()


@simulated
async def test_refused_accepts_are_a_certain_failure() -> None:
    _, nodes = await make_cluster(3)
    r = ids(nodes)

    def refuse_accepts(peer: str, message: Message) -> str:
        return "refuse" if message["op"] == "paxos_accept" else "deliver"

    proposer = PaxosProposer(
        "n1", scripted(nodes[0], refuse_accepts), CLOCK, random.Random(1), max_attempts=2
    )
    with pytest.raises(ConsensusUnavailable) as err:
        await proposer.propose("k", TOKEN, r, Write(b"x"), 1.0)
    assert err.value.indeterminate is False
    await settle()


@simulated
async def test_retry_finishes_own_partial_write_exactly_once() -> None:
    """Attempt 1's CAS reaches one acceptor only; attempt 2's prepare finds it as the latest state
    and must finish it (ok), not re-apply the CAS (which would spuriously fail its precondition)."""
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    await propose(nodes[1], Write(b"0"), r)
    accepts_seen = 0

    def first_accept_partial(peer: str, message: Message) -> str:
        nonlocal accepts_seen
        if message["op"] == "paxos_accept":
            accepts_seen += 1
            if accepts_seen <= 3 and peer != "n1":
                return "refuse"
        return "deliver"

    proposer = PaxosProposer("n1", scripted(nodes[0], first_accept_partial), CLOCK, random.Random(1))
    result = await proposer.propose("k", TOKEN, r, CompareAndSet(etag_of(b"0"), b"1"), 2.0)
    assert (result.outcome, result.value.value) == ("ok", b"1")
    assert result.round_trips == 4  # prepare, partial accept, prepare (finds it), accept
    assert proposer.stats.retries == 1
    assert (await propose(nodes[2], Read(), r)).value.value == b"1"
    await settle()


def partial_then_deliver(first_accept_to: str) -> Script:
    """The first accept reaches only ``first_accept_to``; everything else is delivered."""
    state = {"accepts": 0}

    def script(peer: str, message: Message) -> str:
        if message["op"] == "paxos_accept" and state["accepts"] < 3:
            state["accepts"] += 1
            return "deliver" if peer == first_accept_to else "refuse"
        return "deliver"

    return script


async def other_proposer(node: SimNode, unreachable: str, change: Change, r: list[str]) -> ProposeResult:
    proposer = PaxosProposer(
        node.node_id,
        scripted(node, lambda peer, m: "refuse" if peer == unreachable else "deliver"),
        CLOCK,
        random.Random(2),
    )
    return await proposer.propose("k", TOKEN, r, change, 1.0)


@simulated
async def test_retry_after_takeover_that_missed_the_partial_write_applies_it_fresh() -> None:
    """While n1 backs off, n2 commits on {n2, n3}, which never saw n1's partial value: the lineage
    proves n1's change absent, so n1 applies it afresh (exactly once) on top of n2's value."""
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    await propose(nodes[1], Write(b"0"), r)
    took_over: list[ProposeResult] = []

    async def takeover(delay_s: float) -> None:
        took_over.append(await other_proposer(nodes[1], "n1", Write(b"q"), r))

    proposer = PaxosProposer(
        "n1", scripted(nodes[0], partial_then_deliver("n1")), CLOCK, random.Random(1), sleep=takeover
    )
    result = await proposer.propose("k", TOKEN, r, Write(b"p"), 2.0)
    assert took_over[0].outcome == "ok"
    assert (result.outcome, result.value.value) == ("ok", b"p")
    assert (await propose(nodes[2], Read(), r)).value.value == b"p"
    await settle()


@simulated
async def test_retry_after_takeover_that_built_on_the_partial_write_reports_it_applied() -> None:
    """n2's majority {n1, n2} picks n1's partial CAS up and builds on it; n1's retry must see its
    change in the lineage and answer ok -- re-applying would fail the precondition, a lie."""
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    await propose(nodes[1], Write(b"0"), r)
    took_over: list[ProposeResult] = []

    async def takeover(delay_s: float) -> None:
        took_over.append(await other_proposer(nodes[1], "n3", CompareAndSet(etag_of(b"1"), b"2"), r))

    proposer = PaxosProposer(
        "n1", scripted(nodes[0], partial_then_deliver("n1")), CLOCK, random.Random(1), sleep=takeover
    )
    result = await proposer.propose("k", TOKEN, r, CompareAndSet(etag_of(b"0"), b"1"), 2.0)
    assert took_over[0].outcome == "ok"  # n2 saw b"1": n1's change is in the chain
    assert (result.outcome, result.value.value, result.current_etag) == ("ok", b"1", etag_of(b"1"))
    assert (await propose(nodes[2], Read(), r)).value.value == b"2"
    await settle()


@simulated
async def test_retry_after_the_trail_is_lost_is_indeterminate() -> None:
    """More than LINEAGE_DEPTH changes happen before the retry: its fate cannot be told."""
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    await propose(nodes[1], Write(b"0"), r)

    async def many_changes(delay_s: float) -> None:
        for i in range(LINEAGE_DEPTH + 1):
            await other_proposer(nodes[1], "n1", Write(str(i).encode()), r)

    proposer = PaxosProposer(
        "n1", scripted(nodes[0], partial_then_deliver("n1")), CLOCK, random.Random(1), sleep=many_changes
    )
    with pytest.raises(ConsensusUnavailable) as err:
        await proposer.propose("k", TOKEN, r, Write(b"p"), 2.0)
    assert err.value.indeterminate is True
    assert "tell whether it took effect" in err.value.reason
    await settle()


@simulated
async def test_partially_accepted_value_recovers() -> None:
    """A proposer crashed after its accept reached one acceptor: the next proposal whose majority
    includes that acceptor finishes the value."""
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    await propose(nodes[1], Write(b"old"), r)
    crashed = Ballot(CLOCK.wall_ns() // 1_000_000, "zz")  # newer than any ballot so far
    assert (await nodes[0].acceptor.handle(prepare_message("k", TOKEN, crashed)))["ok"]
    accept = accept_message("k", TOKEN, crashed, RegisterValue.of(b"partial"), None)
    assert (await nodes[0].acceptor.handle(accept))["ok"]
    await nodes[2].transport.close()  # the only majority left includes n1
    result = await propose(nodes[1], Read(), r)
    assert result.value.value == b"partial"
    assert result.round_trips >= 2
    assert (await nodes[1].acceptor.load("k", TOKEN)).value == RegisterValue.of(b"partial")
    await settle()


# --- contention, overload, malformed input ---------------------------------------------------------


@simulated
async def test_rejections_jump_the_ballot_and_give_up_at_max_attempts() -> None:
    clock = ManualClock()
    sleeps: list[float] = []

    async def always_reject(peer: str, message: Message, timeout_s: float) -> Message:
        return {"ok": False, "conflict": [10_000, "zz"]}

    async def fake_sleep(delay_s: float) -> None:
        sleeps.append(delay_s)
        clock.advance(int(delay_s * 1e9))

    proposer = PaxosProposer(
        "n1", always_reject, clock, random.Random(3), max_attempts=5, backoff_cap_s=0.05, sleep=fake_sleep
    )
    with pytest.raises(ConsensusUnavailable) as err:
        await proposer.propose("k", TOKEN, ["n1", "n2", "n3"], Write(b"x"), 10.0)
    assert err.value.indeterminate is False and err.value.acknowledged == 0
    assert "5 attempts" in err.value.reason and "rejected" in err.value.reason
    assert len(sleeps) == 4 and all(0 <= s <= 0.05 for s in sleeps)
    assert proposer.state.last is not None and proposer.state.last.counter > 10_000


@simulated
async def test_gives_up_at_the_deadline_with_a_manual_clock() -> None:
    clock = ManualClock()

    async def always_reject(peer: str, message: Message, timeout_s: float) -> Message:
        return {"ok": False, "conflict": [1, "zz"]}

    async def fake_sleep(delay_s: float) -> None:
        clock.advance(int(delay_s * 1e9))

    proposer = PaxosProposer(
        "n1", always_reject, clock, random.Random(3), max_attempts=10**6, backoff_base_s=0.1, sleep=fake_sleep
    )
    with pytest.raises(ConsensusUnavailable) as err:
        await proposer.propose("k", TOKEN, ["n1", "n2", "n3"], Read(), 1.0)
    assert "timed out" in err.value.reason
    assert clock.monotonic_ns() >= 1_000_000_000 + 1_000_000_000


@simulated
async def test_overloaded_when_too_many_in_flight() -> None:
    release = asyncio.Event()

    async def slow(peer: str, message: Message, timeout_s: float) -> Message:
        await release.wait()
        return {"ok": True, "accepted": None, "value": None}

    proposer = PaxosProposer("n1", slow, CLOCK, random.Random(1), max_in_flight=2)
    running = [asyncio.create_task(proposer.propose(f"k{i}", TOKEN, ["n1"], Read(), 5.0)) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(ConsensusOverloaded) as err:
        await proposer.propose("k9", TOKEN, ["n1"], Read(), 5.0)
    assert isinstance(err.value, Overloaded)
    release.set()
    results = await asyncio.gather(*running)
    assert all(r.value == ABSENT for r in results)
    assert proposer.in_flight == 0


@simulated
@pytest.mark.parametrize(
    "message",
    [
        {"op": "paxos_prepare", "key": "k", "token": TOKEN},
        {"op": "paxos_prepare", "key": 1, "token": TOKEN, "ballot": [1, "a"]},
        {"op": "paxos_prepare", "key": "k", "token": "t", "ballot": [1, "a"]},
        {"op": "paxos_prepare", "key": "k", "token": TOKEN, "ballot": [1]},
        {"op": "paxos_accept", "key": "k", "token": TOKEN, "ballot": [1, "a"]},
        {"op": "paxos_accept", "key": "k", "token": TOKEN, "ballot": [1, "a"], "value": "str"},
        {
            "op": "paxos_accept",
            "key": "k",
            "token": TOKEN,
            "ballot": [2, "a"],
            "value": b"v",
            "promise_next": [1, "a"],
        },
        {
            "op": "paxos_accept",
            "key": "k",
            "token": TOKEN,
            "ballot": [2, "a"],
            "value": b"v",
            "promise_next": [3, "b"],
        },
        {"op": "nope"},
    ],
)
async def test_malformed_messages_get_an_error_reply(message: Message) -> None:
    storage = CountingStorage(open_storage("memory", None, "always"))
    acceptor = PaxosAcceptor(storage)
    reply = await acceptor.handle(message)
    assert reply["error"] == "bad_request" and reply["remote_error"] is True
    assert storage.puts == 0


@simulated
async def test_error_replies_count_as_failures() -> None:
    async def broken(peer: str, message: Message, timeout_s: float) -> Message:
        return {"error": "storage", "message": "disk on fire", "remote_error": True}

    proposer = PaxosProposer("n1", broken, CLOCK, random.Random(1), max_attempts=2)
    with pytest.raises(ConsensusUnavailable) as err:
        await proposer.propose("k", TOKEN, ["n1", "n2", "n3"], Read(), 1.0)
    assert err.value.indeterminate is False


@simulated
@pytest.mark.parametrize(
    "reply",
    [
        {"ok": True, "accepted": [1, "a"]},  # accepted ballot without its value
        {"ok": True, "accepted": [1, "a"], "value": b"x", "lineage": [[5, "a"]]},  # change after accept
        {"ok": True, "accepted": [1, "a"], "value": "not bytes"},
        {"ok": "yes"},
        {"ok": False},
        {"ok": False, "conflict": "high"},
    ],
)
async def test_malformed_replies_count_as_failures(reply: Message) -> None:
    async def bad(peer: str, message: Message, timeout_s: float) -> Message:
        return reply

    proposer = PaxosProposer("n1", bad, CLOCK, random.Random(1), max_attempts=2)
    with pytest.raises(ConsensusUnavailable) as err:
        await proposer.propose("k", TOKEN, ["n1", "n2", "n3"], Write(b"x"), 1.0)
    assert err.value.indeterminate is False and err.value.acknowledged == 0


@simulated
async def test_acceptor_locks_are_dropped_when_free() -> None:
    _, nodes = await make_cluster(3)
    r = ids(nodes)
    # Forty dueling proposals on seven keys.  On virtual time no deadline can pass because the machine
    # is busy, so every one of them commits (as the test first asserted, before a busy machine made
    # some give up on the real loop); then no acceptor may keep a lock for a key nobody works on.
    outcomes = await asyncio.gather(
        *(propose(nodes[i % 3], Write(b"v"), r, key=f"key{i % 7}") for i in range(40))
    )
    assert all(o.outcome == "ok" for o in outcomes), outcomes
    assert any(node.proposer.stats.retries for node in nodes)  # they did duel
    await settle()
    assert all(len(node.acceptor.locks) == 0 for node in nodes)


@simulated
async def test_concurrent_messages_for_one_key_are_serialized() -> None:
    """Many prepares racing on one acceptor: exactly one promise per strictly increasing ballot."""
    storage = CountingStorage(open_storage("memory", None, "always"))
    acceptor = PaxosAcceptor(storage)
    ballots = [Ballot(c, "a") for c in random.Random(5).sample(range(1, 200), 60)]
    replies = await asyncio.gather(*(acceptor.handle(prepare_message("k", TOKEN, b)) for b in ballots))
    final = await acceptor.load("k", TOKEN)
    assert final.promised == max(ballots)
    promised = [b for b, rep in zip(ballots, replies, strict=True) if rep["ok"]]
    # In arrival order, each granted promise exceeds the previous one.
    assert promised == sorted(promised) and storage.puts == len(promised)


# --- the asyncio driver of the proposer core -------------------------------------------------------


@simulated
async def test_driver_feeds_each_answer_as_it_completes_not_in_send_order(monkeypatch: pytest.MonkeyPatch) -> None:
    gates = {peer: asyncio.Event() for peer in ("n1", "n2", "n3")}

    async def gated(peer: str, message: Message, timeout_s: float) -> Message:
        await gates[peer].wait()
        if message["op"] == "paxos_prepare":
            return {"ok": True, "accepted": None, "value": None}
        return {"ok": True, "promised_next": None}

    peer_of: dict[int, str] = {}
    fed: list[str] = []
    original_start, original_on_answers = ProposerCore.start, ProposerCore.on_answers

    def remember(effects: list[Effect]) -> list[Effect]:
        peer_of.update((e.call, e.peer) for e in effects if isinstance(e, Send))
        return effects

    def start(self: ProposerCore, at: Instant) -> list[Effect]:
        return remember(original_start(self, at))

    def on_answers(self: ProposerCore, answers: Any, at: Instant) -> list[Effect]:
        answers = list(answers)
        fed.extend(peer_of[a.call] for a in answers)
        return remember(original_on_answers(self, answers, at))

    monkeypatch.setattr(ProposerCore, "start", start)
    monkeypatch.setattr(ProposerCore, "on_answers", on_answers)
    proposer = PaxosProposer("n1", gated, CLOCK, random.Random(1))
    task = asyncio.create_task(proposer.propose("k", TOKEN, ["n1", "n2", "n3"], Write(b"v"), 5.0))
    for peer in ("n3", "n1"):  # sent n1, n2, n3; answered n3 first
        gates[peer].set()
        while peer not in fed:
            await asyncio.sleep(0)
    result = await task
    assert result.outcome == "ok"
    assert fed[:2] == ["n3", "n1"]
    gates["n2"].set()  # the detached accept to n2 finishes in the background
    await settle()


@simulated
async def test_a_cancelled_proposal_cancels_its_calls() -> None:
    started: list[str] = []
    cancelled: list[str] = []

    async def hang(peer: str, message: Message, timeout_s: float) -> Message:
        started.append(peer)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(peer)
            raise
        raise AssertionError("unreachable")

    proposer = PaxosProposer("n1", hang, CLOCK, random.Random(1))
    task = asyncio.create_task(proposer.propose("k", TOKEN, ["n1", "n2", "n3"], Write(b"v"), 5.0))
    while len(started) < 3:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert sorted(cancelled) == ["n1", "n2", "n3"]
    assert proposer.in_flight == 0
