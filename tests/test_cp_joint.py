"""CASPaxos across an acceptor-set change (joint consensus), on the simulated network and on virtual
time (tests/test_cp_sim.py's harness: every deadline here is simulated, so a busy machine changes nothing).

Old set {n1,n2,n3}, new set {n1,n2,n4} (n3 replaced by n4).  The protocol: stable(old) ->
joint(old, new): every round needs a majority of both -> catch-up (a joint read of each key, which
re-commits its value on a majority of the new set) -> stable(new).  These tests show why each step
is there: a new-set majority alone right after the old phase loses a chosen value; a joint round
and then a new-only round never do.
"""

from __future__ import annotations

import pytest

from kvstore.protocol.paxos import CompareAndSet, Read, Write, etag_of
from kvstore.runtime.caspaxos import ConsensusUnavailable
from tests.test_cp_sim import TOKEN, make_cluster, settle
from tests.vtime import simulated

OLD = ("n1", "n2", "n3")
NEW = ("n1", "n2", "n4")
UNION = ["n1", "n2", "n3", "n4"]


@simulated
async def test_new_majority_alone_without_catch_up_loses_a_chosen_value() -> None:
    """The unsafe shortcut the joint phase exists to prevent (shown, so the test below means something)."""
    net, nodes = await make_cluster(4)
    net.partition(["n1"], ["n2", "n3", "n4"])
    await nodes[1].proposer.propose("k", TOKEN, list(OLD), Write(b"chosen"), 2.0)  # chosen by {n2, n3}
    net.heal()
    net.partition(["n1", "n4"], ["n2", "n3"])
    lost = await nodes[0].proposer.propose("k", TOKEN, list(NEW), Read(), 2.0)  # {n1, n4}: a new majority
    assert lost.value.value is None  # the chosen value is invisible: not linearizable
    net.heal()
    await settle()


@simulated
async def test_joint_round_then_new_only_keeps_the_value() -> None:
    net, nodes = await make_cluster(4)
    net.partition(["n1"], ["n2", "n3", "n4"])
    await nodes[1].proposer.propose("k", TOKEN, list(OLD), Write(b"chosen"), 2.0)  # chosen by {n2, n3}
    net.heal()
    # Joint phase: the catch-up read needs a majority of both sets; it re-commits the value.
    net.partition(["n1"], ["n2", "n3", "n4"])
    got = await nodes[1].proposer.propose("k", TOKEN, UNION, Read(), 2.0, acceptor_sets=(OLD, NEW))
    assert got.value.value == b"chosen"
    net.heal()
    # After the commit only the new set votes; any new majority now sees the value.
    net.partition(["n1", "n4"], ["n2", "n3"])
    seen = await nodes[0].proposer.propose("k", TOKEN, list(NEW), Read(), 2.0)
    assert seen.value.value == b"chosen"
    net.heal()
    await settle()


@simulated
@pytest.mark.parametrize(
    ("side", "reachable"),
    [
        (["n1", "n2"], True),  # a majority of both sets
        (["n2", "n3"], False),  # a majority of the old set only
        (["n2", "n4"], False),  # a majority of the new set only
        (["n1", "n3", "n4"], True),  # {n1, n3} of the old, {n1, n4} of the new
    ],
)
async def test_joint_round_needs_both_majorities(side: list[str], reachable: bool) -> None:
    net, nodes = await make_cluster(4)
    net.partition(side, [m for m in UNION if m not in side])
    proposer = nodes[UNION.index(side[0])].proposer
    if reachable:
        result = await proposer.propose("k", TOKEN, UNION, Write(b"v"), 1.0, acceptor_sets=(OLD, NEW))
        assert result.outcome == "ok"
    else:
        with pytest.raises(ConsensusUnavailable) as info:
            await proposer.propose("k", TOKEN, UNION, Write(b"v"), 0.3, acceptor_sets=(OLD, NEW))
        assert info.value.indeterminate is False  # the prepare never reached both majorities
    net.heal()
    await settle()


@simulated
async def test_cas_chain_across_the_change_is_linear() -> None:
    """Increment a counter by CAS through old -> joint -> new; every acknowledged CAS is kept."""
    _net, nodes = await make_cluster(4)
    phases: list[tuple[list[str], tuple[tuple[str, ...], ...] | None]] = [
        (list(OLD), None), (UNION, (OLD, NEW)), (list(NEW), None)
    ]
    value = 0
    await nodes[0].proposer.propose("c", TOKEN, list(OLD), Write(b"0"), 2.0)
    for replicas, sets in phases:
        for step in range(5):
            proposer = nodes[(value + step) % 2].proposer  # n1 and n2 take turns: contention
            current = await proposer.propose("c", TOKEN, replicas, Read(), 2.0, acceptor_sets=sets)
            assert current.value.value == str(value).encode()
            new = str(value + 1).encode()
            done = await proposer.propose(
                "c", TOKEN, replicas, CompareAndSet(etag_of(str(value).encode()), new), 2.0, acceptor_sets=sets
            )
            assert done.outcome == "ok"
            value += 1
    final = await nodes[3].proposer.propose("c", TOKEN, list(NEW), Read(), 2.0)
    assert final.value.value == b"15"
    await settle()
