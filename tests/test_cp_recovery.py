"""An acceptor that lost its storage (kvstore.runtime.register_recovery): pure rules by table, then scenarios on
the simulated network (kvstore.transport.memory) with real acceptors, proposers and recovery.

The scenario that needs the incarnation views: a proposer holds a promise from an acceptor's
lost incarnation, and completes its phase 1 with a promise given *after* that acceptor's
recovery scan.  ``test_in_flight_promise_of_a_lost_incarnation_is_dropped`` shows the views
prevent it; its counterfactual twin shows that without them an acknowledged CAS is lost.

Every scenario runs on virtual time (``@simulated`` from tests/vtime.py: a fresh
``kvstore.sim.vloop.VirtualLoop`` per test, and the proposers read ``CLOCK``, the loop's time).
The in-memory network, storage and recovery have no real I/O or threads, so every proposal
deadline, call timeout, recovery backoff, sleep and ``wait_for`` deadline here is simulated: a busy
machine cannot make a proposal time out or a wait run out, the runs cost almost no wall time, and
the assertions about time are exact statements about simulated time (a refused proposal gives up
*at* its deadline; a new cluster votes without waiting out a down peer's call timeout).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

import kvstore.protocol.proposer as proposer_mod
from kvstore.protocol.messages import (
    ErrorReply,
    MessageError,
    PaxosRecoverScan,
    PaxosRecoverScanReply,
    PaxosRegister,
    PaxosStatus,
    serve,
)
from kvstore.protocol.paxos import (
    AcceptorState,
    Ballot,
    CompareAndSet,
    Read,
    RegisterValue,
    Write,
    etag_of,
    merge_states,
    stale_acceptors,
)
from kvstore.protocol.ring import key_token
from kvstore.runtime.caspaxos import ConsensusUnavailable, PaxosAcceptor, PaxosProposer
from kvstore.runtime.identity import CorruptIdentity
from kvstore.runtime.register_recovery import (
    ACCEPTOR_META,
    OP_RECOVER_SCAN,
    OP_REGISTER,
    OP_STATUS,
    REGISTRY_META,
    AcceptorIdentity,
    AcceptorRecovery,
    Registry,
    RetiredIncarnation,
    bootstrap_decision,
    may_vote,
)
from kvstore.storage import MemoryStorage, StorageFull
from kvstore.storage.base import StorageError, StorageWrapper
from kvstore.transport.base import FaultRules, Message, PeerUnavailable
from kvstore.transport.memory import MemoryNetwork
from tests.vtime import CLOCK, elapsed_s, run_simulated, simulated, virtual_loop

TOKEN = 42
CALL_TIMEOUT_S = 1.0  # the recovery's per-call timeout (simulated seconds)


def b(counter: int, node: str = "p") -> Ballot:
    return Ballot(counter, node)


def v(raw: bytes | None) -> RegisterValue:
    return RegisterValue.of(raw)


# --- pure rules -------------------------------------------------------------------------------

S_EMPTY = AcceptorState()
S_P5 = AcceptorState(promised=b(5))
S_A3 = AcceptorState(promised=b(4), accepted=b(3), value=v(b"three"), lineage=(b(3),))
S_A7 = AcceptorState(promised=b(9), accepted=b(7), value=v(b"seven"), lineage=(b(7), b(3)))


@pytest.mark.parametrize(
    ("a", "other", "expected"),
    [
        (S_EMPTY, S_EMPTY, S_EMPTY),
        (S_EMPTY, S_P5, S_P5),
        (S_P5, S_A3, AcceptorState(promised=b(5), accepted=b(3), value=v(b"three"), lineage=(b(3),))),
        (S_A3, S_A7, S_A7),
        (S_A7, S_P5, S_A7),  # a lower promise adds nothing
        (AcceptorState(promised=b(20)), S_A7, AcceptorState(b(20), b(7), v(b"seven"), (b(7), b(3)))),
    ],
)
def test_merge_states_takes_the_highest_promise_and_accepted(
    a: AcceptorState, other: AcceptorState, expected: AcceptorState
) -> None:
    assert merge_states(a, other) == expected
    assert merge_states(other, a) == expected  # commutative
    assert merge_states(expected, a) == expected  # idempotent


def test_merge_states_refuses_two_values_at_one_ballot() -> None:
    other = AcceptorState(promised=b(4), accepted=b(3), value=v(b"other"), lineage=(b(3),))
    with pytest.raises(ValueError, match="two states"):
        merge_states(S_A3, other)


@pytest.mark.parametrize(
    ("tags", "stale"),
    [
        ({}, set()),
        ({"a": ("x1", {}), "b": ("y1", {})}, set()),
        ({"a": ("x1", {"b": "y1"}), "b": ("y1", {"a": "x1"})}, set()),  # views agree
        ({"a": ("x1", {"b": "y2"}), "b": ("y1", {"a": "x1"})}, {"b"}),  # a registered b's new incarnation
        ({"a": ("x1", {"b": "y2"}), "b": ("y1", {"a": "x0"})}, {"a", "b"}),  # both: safe, only a retry
        ({"a": ("x1", {"b": "y2"}), "b": (None, {})}, set()),  # an untagged reply contradicts nothing
        ({"a": ("x1", {"c": "z9"}), "b": ("y1", {})}, set()),  # views of members not answering
    ],
)
def test_stale_acceptors(tags: dict[str, tuple[str | None, dict[str, str]]], stale: set[str]) -> None:
    assert stale_acceptors(tags) == frozenset(stale)


@pytest.mark.parametrize(
    ("previous", "needed", "decision"),
    [
        ({}, 2, "undecided"),
        ({"a": None}, 2, "undecided"),
        ({"a": None, "b": None}, 2, "fresh"),
        ({"a": "old"}, 2, "wiped"),  # one peer knew an earlier incarnation: enough
        ({"a": None, "b": None, "c": "old"}, 2, "wiped"),
        ({"a": "me"}, 1, "fresh"),  # our own incarnation (a restart mid-decision) is not evidence
        ({}, 0, "fresh"),  # a single-member cluster
    ],
)
def test_bootstrap_decision(previous: dict[str, str | None], needed: int, decision: str) -> None:
    assert bootstrap_decision(previous, "me", needed) == decision


@pytest.mark.parametrize(
    ("status", "done", "replicas", "votes"),
    [
        ("active", (), ("n1", "n2", "n3"), True),
        ("recovering", (), ("n1", "n2", "n3"), False),
        ("recovering", ("n2",), ("n1", "n2", "n3"), False),
        ("recovering", ("n2", "n3"), ("n1", "n2", "n3"), True),  # every other replica of the range
        ("recovering", ("n2", "n3"), ("n2", "n3", "n4"), False),  # a range without us is not ours
        ("recovering", ("n4",), ("n1", "n4"), True),
    ],
)
def test_may_vote(status: str, done: tuple[str, ...], replicas: tuple[str, ...], votes: bool) -> None:
    identity = AcceptorIdentity("abc", status, "existing", done)  # type: ignore[arg-type]
    assert may_vote(identity, "n1", replicas) is votes


def test_registry_register_retire_learn_and_round_trip() -> None:
    registry = Registry()
    assert registry.register("n2", "a1") == (True, None)
    assert registry.register("n2", "a1") == (False, "a1")  # idempotent
    assert registry.register("n2", "a2") == (True, "a1")
    with pytest.raises(RetiredIncarnation):
        registry.register("n2", "a1")  # a stale registration cannot bring a lost incarnation back
    assert registry.learn("n2", "zz") is False  # second-hand never overwrites
    assert registry.learn("n3", "c1") is True
    assert registry.learn("n2", "a1") is False
    for i in range(40):
        registry.register("n4", f"d{i}")
    assert len(registry.retired["n4"]) == 16  # bounded
    assert registry.view(["n2", "n3", "n9"]) == {"n2": "a2", "n3": "c1"}
    again = Registry.decode(registry.encode())
    assert (again.current, again.retired) == (registry.current, registry.retired)
    with pytest.raises(CorruptIdentity):
        Registry.decode(b"\x00garbage")


def test_acceptor_identity_round_trip_and_corruption() -> None:
    identity = AcceptorIdentity("abc123", "recovering", "new", ("n2", "n3"))
    assert AcceptorIdentity.decode(identity.encode()) == identity
    for blob in (b"", b"\xc1", identity.encode()[:-3]):
        with pytest.raises(CorruptIdentity):
            AcceptorIdentity.decode(blob)


# --- the simulated cluster --------------------------------------------------------------------

GROUP = ["n1", "n2", "n3"]


class RecNode:
    """One simulated node: acceptor (gated by its recovery), proposer, recovery, own storage."""

    def __init__(self, net: MemoryNetwork, node_id: str, members: list[str], seed: int) -> None:
        self.node_id = node_id
        self.members = members
        self.seed = seed
        self.transport = net.endpoint(node_id, FaultRules(rng=random.Random(seed)))
        self.storage = MemoryStorage()
        self.proposer = PaxosProposer(node_id, self.call, CLOCK, random.Random(seed), backoff_base_s=0.002)
        self.recovery: AcceptorRecovery
        self.acceptor: PaxosAcceptor
        self.boots = 0

    def build(self, cluster_state: str, **kw: Any) -> None:
        self.boots += 1
        self.recovery = AcceptorRecovery(
            self.node_id, self.members, self.storage, random.Random(self.seed * 1000 + self.boots), self.call,
            replicas_of=lambda token: GROUP, cluster_state=cluster_state, clock=CLOCK,
            backoff_base_s=0.005, backoff_cap_s=0.05, call_timeout_s=CALL_TIMEOUT_S, **kw,
        )
        self.acceptor = PaxosAcceptor(self.storage, gate=self.recovery)
        self.recovery.acceptor = self.acceptor

    async def start(self, cluster_state: str = "new", **kw: Any) -> None:
        self.build(cluster_state, **kw)
        await self.recovery.load()
        await self.transport.start(self.handle)
        self.recovery.start()

    async def stop(self) -> None:
        await self.recovery.stop()
        await self.transport.close()

    async def wipe_and_restart(self, cluster_state: str = "existing", **kw: Any) -> None:
        """The disk is lost: same node id, empty Paxos store (and a new process)."""
        await self.stop()
        self.storage = MemoryStorage()
        await self.start(cluster_state, **kw)

    async def handle(self, sender: str, message: Message) -> Message:
        op = message.get("op")
        try:
            # As the node serves them (LinearizableRegister.handlers): decoded by the one codec first.
            if op == OP_REGISTER:
                return await serve(PaxosRegister, self.recovery.on_register)(sender, message)
            if op == OP_RECOVER_SCAN:
                return await serve(PaxosRecoverScan, self.recovery.on_scan)(sender, message)
            if op == OP_STATUS:
                return await serve(PaxosStatus, self.recovery.on_status)(sender, message)
            return await self.acceptor.handle(message)
        except (StorageError, ValueError) as exc:  # MessageError is a ValueError
            return {"error": "bad_request", "message": str(exc), "remote_error": True}

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        if peer == self.node_id:
            if not self.transport.up:
                raise PeerUnavailable(peer, "down", maybe_delivered=False)
            return await self.handle(peer, message)
        return await self.transport.call(peer, message, timeout_s)


async def make_cluster(members: list[str], cluster_state: str = "new", start: list[str] | None = None) -> tuple[
    MemoryNetwork, dict[str, RecNode]
]:
    net = MemoryNetwork()
    nodes = {m: RecNode(net, m, members, i + 1) for i, m in enumerate(members)}
    for m in start if start is not None else members:
        await nodes[m].start(cluster_state)
    return net, nodes


async def wait_for(what: str, predicate: Callable[[], bool], timeout_s: float = 10.0) -> float:
    """Poll ``predicate`` every 5 ms of simulated time, for at most ``timeout_s`` simulated seconds;
    returns the simulated seconds waited (a multiple of the poll interval)."""
    started_ns = CLOCK.monotonic_ns()
    while not predicate():
        assert elapsed_s(started_ns) < timeout_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)
    return elapsed_s(started_ns)


async def stop_all(nodes: dict[str, RecNode]) -> None:
    for node in nodes.values():
        await node.recovery.stop()
    for _ in range(5):
        await asyncio.sleep(0.005)


async def propose(node: RecNode, change: Any, key: str = "k", timeout_s: float = 2.0) -> Any:
    return await node.proposer.propose(key, TOKEN, GROUP, change, timeout_s)


# --- bootstrap --------------------------------------------------------------------------------


@simulated
async def test_a_new_cluster_votes_at_once_even_with_a_node_down() -> None:
    _, nodes = await make_cluster(GROUP, "new", start=["n1", "n2"])  # n3 is down at the first boot
    waited_s = await wait_for("fresh", lambda: all(nodes[m].recovery.active.is_set() for m in ("n1", "n2")))
    assert waited_s < CALL_TIMEOUT_S  # at once: a majority answered, n3's call was not waited out
    assert nodes["n1"].recovery.decision == "fresh"
    assert (await propose(nodes["n1"], Write(b"x"))).outcome == "ok"
    await nodes["n3"].start("new")  # arrives later, also new: nobody knew it
    await wait_for("n3 fresh", nodes["n3"].recovery.active.is_set)
    assert (await propose(nodes["n3"], Read())).value.value == b"x"
    await stop_all(nodes)


@simulated
async def test_existing_cluster_state_on_empty_stores_waits_for_every_peer() -> None:
    _, nodes = await make_cluster(GROUP, "existing", start=["n1", "n2"])
    await asyncio.sleep(10 * CALL_TIMEOUT_S)  # simulated: however long n3 stays away
    assert not nodes["n1"].recovery.active.is_set()  # n3 could hold state n1 lost: no vote
    started_ns = CLOCK.monotonic_ns()
    with pytest.raises(ConsensusUnavailable) as err:
        await propose(nodes["n1"], Write(b"x"), timeout_s=0.3)
    assert err.value.indeterminate is False  # "recovering" is a refusal: nothing was stored
    assert "recovering" in err.value.reason
    assert elapsed_s(started_ns) == pytest.approx(0.3, abs=1e-6)  # it retried until its deadline, no longer
    await nodes["n3"].start("existing")
    await wait_for("all recovered", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    assert (await propose(nodes["n1"], Write(b"x"))).outcome == "ok"
    await stop_all(nodes)


@simulated
async def test_a_wiped_node_restarted_as_new_is_told_by_its_peers() -> None:
    _, nodes = await make_cluster(GROUP)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    await propose(nodes["n1"], Write(b"kept"))
    old = nodes["n2"].recovery.incarnation
    await nodes["n2"].wipe_and_restart("new")  # the wrong flag for a wiped node
    await wait_for("decided", nodes["n2"].recovery.decided.is_set)
    assert nodes["n2"].recovery.decision == "wiped"
    assert nodes["n2"].recovery.incarnation != old
    await wait_for("recovered", nodes["n2"].recovery.active.is_set)
    state = await nodes["n2"].acceptor.load("k", TOKEN)
    assert state.value == v(b"kept")  # recovered, not empty
    assert nodes["n2"].recovery.identity is not None and nodes["n2"].recovery.identity.bootstrap == "existing"
    await stop_all(nodes)


# --- the refusal and the recovery -------------------------------------------------------------


class RefusingIdentity(StorageWrapper):
    """A Paxos store that, once armed, refuses every save of the acceptor identity (a full disk for
    that record; the merged states still land)."""

    def __init__(self, inner: MemoryStorage) -> None:
        super().__init__(inner)
        self.armed = False
        self.refused = 0

    async def meta_put(self, name: str, blob: bytes) -> None:
        if self.armed and name == ACCEPTOR_META:
            self.refused += 1
            raise StorageFull("disk full (test): the identity was not saved")
        await self.inner.meta_put(name, blob)


async def wipe_onto_a_store_refusing_identity_saves(node: RecNode, cluster_state: str) -> RefusingIdentity:
    """``wipe_and_restart``, with every identity save after ``load()``'s refused until disarmed."""
    await node.stop()
    store = RefusingIdentity(MemoryStorage())
    node.storage = store  # type: ignore[assignment]  # the node's store, behind the refusing layer
    node.build(cluster_state)
    await node.recovery.load()
    store.armed = True  # load() saved the new incarnation; every later identity save is refused
    await node.transport.start(node.handle)
    node.recovery.start()
    return store


@simulated
async def test_a_refused_wiped_decision_is_retried_and_the_node_recovers_once_it_lands() -> None:
    """Started with the wrong flag (``new``) after a wipe: saving ``bootstrap=existing`` used to die
    in an unawaited task, and the recovery waited for that decision for ever."""
    _, nodes = await make_cluster(GROUP)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    assert (await propose(nodes["n1"], Write(b"kept"))).outcome == "ok"
    wiped = nodes["n2"]
    store = await wipe_onto_a_store_refusing_identity_saves(wiped, "new")
    await wait_for("the wiped decision's save refused, more than once", lambda: store.refused >= 3)
    assert wiped.recovery.decision == "wiped" and not wiped.recovery.decided.is_set()  # not durable yet
    assert not wiped.recovery.votable(TOKEN)
    store.armed = False
    await wait_for("recovered", wiped.recovery.active.is_set, timeout_s=1.0)  # backoff cap: 0.05 s
    identity = wiped.recovery.identity
    assert identity is not None and identity.bootstrap == "existing"
    assert (await wiped.acceptor.load("k", TOKEN)).value == v(b"kept")
    await stop_all(nodes)


@simulated
async def test_a_refused_recovered_mark_is_retried_and_the_acceptor_votes_once_it_lands() -> None:
    _, nodes = await make_cluster(GROUP)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    assert (await propose(nodes["n1"], Write(b"chosen"))).outcome == "ok"
    wiped = nodes["n2"]
    store = await wipe_onto_a_store_refusing_identity_saves(wiped, "existing")
    await wait_for("the recovered marks refused, more than once", lambda: store.refused >= 3)
    status = wiped.recovery.status()
    assert status["status"] == "recovering" and status["recovered_from"] == []  # nothing durable: no votes
    assert status["identity_save_failures"] >= 3 and "StorageFull" in status["identity_save_error"]
    assert not wiped.recovery.votable(TOKEN)
    store.armed = False
    await wait_for("the retried mark landed", wiped.recovery.active.is_set, timeout_s=1.0)  # backoff cap: 0.05 s
    assert wiped.recovery.status()["identity_save_error"] is None
    identity = wiped.recovery.identity
    assert identity is not None and await store.meta_get(ACCEPTOR_META) == identity.encode()  # durable
    await nodes["n1"].stop()  # {n2, n3}: n2's recovered state answers
    assert (await propose(nodes["n3"], Read())).value.value == b"chosen"
    await stop_all(nodes)



@simulated
async def test_wiped_acceptor_refuses_until_recovered_and_keeps_the_chosen_value() -> None:
    _, nodes = await make_cluster(GROUP)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    await nodes["n3"].stop()
    assert (await propose(nodes["n1"], Write(b"chosen"))).outcome == "ok"  # accepted by {n1, n2}
    await nodes["n3"].start("existing")  # intact store, but it missed the write
    await nodes["n1"].stop()
    await nodes["n2"].wipe_and_restart()
    reply = await nodes["n2"].acceptor.handle(
        {"op": "paxos_prepare", "key": "k", "token": TOKEN, "ballot": [10**15, "n3"]}
    )
    assert reply["error"] == "recovering"
    assert (await nodes["n2"].acceptor.load("k", TOKEN)) == AcceptorState()  # the refusal stored nothing
    started_ns = CLOCK.monotonic_ns()
    with pytest.raises(ConsensusUnavailable) as err:
        await propose(nodes["n3"], Read(), timeout_s=0.3)  # {n2, n3} must not answer "absent"
    assert "recovering" in err.value.reason
    assert elapsed_s(started_ns) == pytest.approx(0.3, abs=1e-6)  # refused until its deadline, no longer
    await nodes["n1"].start("existing")
    await wait_for("n2 recovered", nodes["n2"].recovery.active.is_set)
    await nodes["n1"].stop()
    assert (await propose(nodes["n3"], Read())).value.value == b"chosen"
    await stop_all(nodes)


@simulated
async def test_recovery_is_paged_bounded_and_takes_only_the_keys_it_replicates() -> None:
    members = ["n1", "n2", "n3", "n4"]
    net = MemoryNetwork()
    nodes = {m: RecNode(net, m, members, i + 1) for i, m in enumerate(members)}
    mine = [f"k{i}" for i in range(60)]
    others = [f"o{i}" for i in range(20)]
    replicas = {key_token(k): ("n1", "n2", "n3") for k in mine} | {key_token(k): ("n1", "n3", "n4") for k in others}
    state = AcceptorState(promised=b(5), accepted=b(4), value=v(b"x" * 1000), lineage=(b(4),))
    for m in ("n1", "n3"):
        for k in mine + others:
            await nodes[m].storage.put(k, key_token(k), state.encode())
    for node in nodes.values():
        node.build("existing", page_records=7, page_bytes=5000)
        node.recovery.replicas_of = replicas.__getitem__
    for m in ("n1", "n3", "n4"):  # intact stores: they hold state, so they are not new
        await nodes[m].recovery.load()
        await nodes[m].transport.start(nodes[m].handle)
    pages: list[int] = []
    original = nodes["n1"].recovery.on_scan

    async def counting_scan(sender: str, request: PaxosRecoverScan) -> PaxosRecoverScanReply | ErrorReply:
        reply = await original(sender, request)
        assert isinstance(reply, PaxosRecoverScanReply), reply
        pages.append(len(reply.records))
        return reply

    nodes["n1"].recovery.on_scan = counting_scan  # type: ignore[method-assign]
    await nodes["n2"].recovery.load()
    await nodes["n2"].transport.start(nodes["n2"].handle)
    for m in members:
        nodes[m].recovery.start()
    await wait_for("n2 recovered", nodes["n2"].recovery.active.is_set)
    assert len(pages) > 10 and max(pages) <= 5  # 5 records of ~1 KB reach the 5000-byte bound
    assert await nodes["n2"].storage.count() == len(mine)  # not the keys of ranges without n2
    # Taken from a peer, not voted here: flagged so that quorum reads do not count it.
    assert await nodes["n2"].acceptor.load("k7", key_token("k7")) == replace(state, absorbed=True)
    await stop_all(nodes)


@simulated
async def test_recovery_resumes_after_a_crash_midway() -> None:
    _, nodes = await make_cluster(GROUP)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    await propose(nodes["n1"], Write(b"v"))
    await nodes["n3"].stop()
    await nodes["n2"].wipe_and_restart()
    await wait_for("n1 done", lambda: "n1" in (nodes["n2"].recovery.status()["recovered_from"]))
    incarnation = nodes["n2"].recovery.incarnation
    await nodes["n2"].stop()  # crash: the store (and what was recovered so far) stays
    await nodes["n2"].start("new")  # the flag is ignored: the store is no longer new
    identity = nodes["n2"].recovery.identity
    assert identity is not None and identity.incarnation == incarnation and identity.recovered_from == ("n1",)
    assert not nodes["n2"].recovery.votable(TOKEN)
    await nodes["n3"].start("existing")
    await wait_for("n2 recovered", nodes["n2"].recovery.active.is_set)
    assert AcceptorIdentity.decode(await nodes["n2"].storage.meta_get(ACCEPTOR_META) or b"").status == "active"
    await stop_all(nodes)


@simulated
async def test_registration_and_scan_are_for_registered_members_only() -> None:
    _, nodes = await make_cluster(GROUP)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    recovery = nodes["n1"].recovery
    stranger = await recovery.on_register("stranger", PaxosRegister("abc"))
    assert isinstance(stranger, ErrorReply) and stranger.error == "bad_request"
    refused = await recovery.on_scan("n2", PaxosRecoverScan("notregistered", None, 5, 10))
    assert isinstance(refused, ErrorReply) and refused.error == "not_registered"
    # A malformed registration never reaches the handler: the codec refuses it, nothing is registered.
    before = dict(recovery.registry.current)
    with pytest.raises(MessageError):
        await serve(PaxosRegister, recovery.on_register)("n2", {"op": OP_REGISTER, "incarnation": "not an id!"})
    reply = await nodes["n1"].handle("n2", {"op": OP_REGISTER, "incarnation": "not an id!"})
    assert reply["error"] == "bad_request" and recovery.registry.current == before
    await stop_all(nodes)


# --- a round in flight across the wipe ----------------------------------------------------------


async def run_in_flight_scenario() -> tuple[Any, Any, bytes | None]:
    """P holds n2's promise from before n2's wipe and gets n3's promise after n2 recovered; in
    between Q commits a CAS through {n1, n2-new} at a ballot below P's.  Returns P's and Q's
    results and the final value."""
    members = [*GROUP, "p", "q"]
    _, nodes = await make_cluster(members)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    await propose(nodes["q"], Write(b"v1"))
    p, q = nodes["p"], nodes["q"]
    n2_promised = asyncio.Event()
    release_n3 = asyncio.Event()

    async def p_call(peer: str, message: Message, timeout_s: float) -> Message:
        if peer == "n1":
            raise PeerUnavailable(peer, "refused", maybe_delivered=False)
        if peer == "n3" and not release_n3.is_set():
            await release_n3.wait()  # P's prepare to n3 is slow: it arrives after n2's recovery
        reply = await p.call(peer, message, timeout_s)
        if peer == "n2" and message["op"] == "paxos_prepare":
            n2_promised.set()
        return reply

    async def q_call(peer: str, message: Message, timeout_s: float) -> Message:
        if peer == "n3":
            raise PeerUnavailable(peer, "refused", maybe_delivered=False)
        return await q.call(peer, message, timeout_s)

    proposer_p = PaxosProposer("p", p_call, CLOCK, random.Random(5), max_attempts=3, backoff_base_s=0.002)
    proposer_p.state.observe(10**15)  # P's ballots are above anything Q will use
    proposer_q = PaxosProposer("q", q_call, CLOCK, random.Random(6), backoff_base_s=0.002)
    task_p = asyncio.create_task(proposer_p.propose("k", TOKEN, GROUP, CompareAndSet(etag_of(b"v1"), b"p"), 5.0))
    await n2_promised.wait()
    await nodes["n2"].wipe_and_restart()
    await wait_for("n2 recovered", nodes["n2"].recovery.active.is_set)
    result_q = await proposer_q.propose("k", TOKEN, GROUP, CompareAndSet(etag_of(b"v1"), b"q"), 2.0)
    release_n3.set()
    try:
        result_p: Any = await task_p
    except ConsensusUnavailable as exc:
        result_p = exc
    final = (await propose(nodes["n3"], Read())).value.value
    await stop_all(nodes)
    return result_p, result_q, final


@simulated
async def test_in_flight_promise_of_a_lost_incarnation_is_dropped() -> None:
    result_p, result_q, final = await run_in_flight_scenario()
    assert result_q.outcome == "ok" and result_q.value.value == b"q"  # acknowledged
    # P's stale promise from n2 was dropped; its retry saw Q's value: its CAS on v1 fails.
    assert not isinstance(result_p, Exception), result_p
    assert result_p.outcome == "precondition_failed" and result_p.current_etag == etag_of(b"q")
    assert final == b"q"


@simulated
async def test_without_the_views_the_in_flight_promise_loses_an_acknowledged_cas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The counterfactual: proposers that ignore incarnations let P's CAS on v1 succeed after Q's
    acknowledged CAS on v1 -- both "won", and Q's value is gone.  This is what the views prevent."""
    monkeypatch.setattr(proposer_mod, "stale_acceptors", lambda tags: frozenset())
    result_p, result_q, final = await run_in_flight_scenario()
    assert result_q.outcome == "ok"
    assert not isinstance(result_p, Exception) and result_p.outcome == "ok"
    assert final == b"p"


def test_the_in_flight_scenario_replays_step_for_step() -> None:
    """On virtual time the wipe-and-recover interleaving is a function of the seeds: two runs give the
    same outcomes (with their etags), final value, simulated end time and number of loop steps."""

    async def fingerprint() -> tuple[Any, ...]:
        result_p, result_q, final = await run_in_flight_scenario()
        return repr(result_p), repr(result_q), final, CLOCK.monotonic_ns(), virtual_loop().steps

    first = run_simulated(fingerprint())
    assert run_simulated(fingerprint()) == first


@simulated
async def test_proposer_counts_recovering_as_a_certain_failure() -> None:
    """A proposal whose accepts are all refused as "recovering" is not indeterminate."""
    _, nodes = await make_cluster(GROUP)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))

    async def refusing(peer: str, message: Message, timeout_s: float) -> Message:
        if message["op"] == "paxos_accept":
            return {"error": "recovering", "message": "test", "remote_error": True}
        return await nodes["n1"].call(peer, message, timeout_s)

    proposer = PaxosProposer("n1", refusing, CLOCK, random.Random(1), max_attempts=2)
    started_ns = CLOCK.monotonic_ns()
    with pytest.raises(ConsensusUnavailable) as err:
        await proposer.propose("k", TOKEN, GROUP, Write(b"x"), 1.0)
    assert err.value.indeterminate is False
    assert "recovering" in err.value.reason
    assert "2 attempts" in err.value.reason and elapsed_s(started_ns) < 1.0  # ended by its attempts, not its deadline
    await stop_all(nodes)


@simulated
@pytest.mark.parametrize("record", [ACCEPTOR_META, REGISTRY_META])
async def test_a_corrupt_identity_or_registry_means_recovering_again(record: str) -> None:
    _, nodes = await make_cluster(GROUP)
    await wait_for("fresh", lambda: all(n.recovery.active.is_set() for n in nodes.values()))
    await propose(nodes["n1"], Write(b"v"))
    old = nodes["n2"].recovery.incarnation
    await nodes["n2"].stop()
    await nodes["n2"].storage.meta_put(record, b"\xc1 garbage")
    await nodes["n2"].start("new")
    identity = nodes["n2"].recovery.identity
    assert identity is not None and identity.status == "recovering" and identity.incarnation != old
    assert not nodes["n2"].recovery.votable(TOKEN)
    await wait_for("n2 recovered", nodes["n2"].recovery.active.is_set)
    assert (await nodes["n2"].acceptor.load("k", TOKEN)).value == v(b"v")
    await stop_all(nodes)


async def test_a_peek_writes_nothing_and_an_absorbed_state_is_flagged_until_voted_again() -> None:
    """The acceptor side of quorum reads: a peek is read-only, a state merged in from a peer is
    reported as ``absorbed`` (never counted by a quorum read), and the acceptor's own next accept
    makes it a vote again."""
    acceptor = PaxosAcceptor(MemoryStorage())
    token = key_token("k")
    peek = {"op": "paxos_peek", "key": "k", "token": token}
    assert await acceptor.handle(peek) == {"ok": True, "accepted": None, "value": None, "lineage": [],
                                           "absorbed": False}
    b1 = Ballot(1, "n2")
    assert await acceptor.absorb("k", token, AcceptorState(b1, b1, RegisterValue.of(b"m"), (b1,)))
    writes = acceptor.stats.writes
    reply = await acceptor.handle(peek)
    assert reply["accepted"] == [1, "n2"] and reply["value"] == b"m" and reply["absorbed"] is True
    assert acceptor.stats.writes == writes and acceptor.stats.peeks == 2  # a peek persists nothing
    b2 = Ballot(2, "n3")
    accept = {"op": "paxos_accept", "key": "k", "token": token, "ballot": b2.to_wire(), "value": b"v",
              "promise_next": None, "lineage": [b2.to_wire()]}
    assert (await acceptor.handle(accept))["ok"] is True
    reply = await acceptor.handle(peek)
    assert reply["accepted"] == [2, "n3"] and reply["absorbed"] is False
    # Absorbing a state no newer than its own vote keeps it a vote.
    assert not await acceptor.absorb("k", token, AcceptorState(b2, b1, RegisterValue.of(b"m"), (b1,)))
    assert (await acceptor.handle(peek))["absorbed"] is False
