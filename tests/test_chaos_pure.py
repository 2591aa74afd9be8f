"""Pure parts of the chaos harness: partition shapes (grudges), rules, schedules (the outcome mapping is in
tests/test_workload_client.py)."""

from __future__ import annotations

import random

import pytest

from kvstore.harness.nemesis import (
    PARTITION_KINDS,
    NemesisError,
    grudge_to_rules,
    majority_side,
    partition_grudge,
)
from kvstore.harness.runner import RunSpec, fixed_schedule, random_schedule

NODES = ["n1", "n2", "n3", "n4", "n5"]


def links_up(grudge: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Directed links a->b that still deliver (b hears a)."""
    return {(a, b) for a in NODES for b in NODES if a != b and a not in grudge[b]}


@pytest.mark.parametrize("seed", range(20))
def test_majority_is_a_clean_two_sided_cut(seed: int) -> None:
    grudge, groups = partition_grudge("majority", NODES, random.Random(seed))
    big, small = groups
    assert len(big) == 3 and len(small) == 2 and sorted(big + small) == NODES
    up = links_up(grudge)
    for a in NODES:
        for b in NODES:
            if a != b:
                same_side = (a in big) == (b in big)
                assert ((a, b) in up) == same_side
    assert majority_side(groups) == big


@pytest.mark.parametrize("seed", range(10))
def test_isolate_and_halves(seed: int) -> None:
    grudge, groups = partition_grudge("isolate", NODES, random.Random(seed))
    alone = groups[0][0]
    assert len(groups[0]) == 1 and all(alone in grudge[m] for m in NODES if m != alone)
    grudge, groups = partition_grudge("halves", NODES, random.Random(seed))
    assert sorted(len(g) for g in groups) == [2, 3]


@pytest.mark.parametrize("seed", range(10))
def test_bridge_node_sees_everyone(seed: int) -> None:
    grudge, desc = partition_grudge("bridge", NODES, random.Random(seed))
    bridge = desc["bridge"]
    assert grudge[bridge] == set() and all(bridge not in grudge[m] for m in NODES)
    left, right = (set(side) - {bridge} for side in desc["sides"])
    assert all(grudge[a] == right for a in left) and all(grudge[b] == left for b in right)


@pytest.mark.parametrize("seed", range(10))
def test_majorities_ring_every_node_sees_a_different_majority(seed: int) -> None:
    grudge, desc = partition_grudge("majorities-ring", NODES, random.Random(seed))
    views = {frozenset(v) for v in desc["views"].values()}
    assert len(views) == 5, "each node sees a different set"
    assert all(len(v) == 3 for v in views), "each sees a majority (itself + 2)"
    for a in NODES:  # symmetric
        for b in grudge[a]:
            assert a in grudge[b]


def test_one_way_is_asymmetric() -> None:
    grudge, desc = partition_grudge("one-way", NODES, random.Random(3))
    deaf = desc["deaf"]
    up = links_up(grudge)
    assert all((deaf, m) in up for m in NODES if m != deaf), "the deaf node can still send"
    assert all((m, deaf) not in up for m in NODES if m != deaf), "but hears nobody"


def test_rules_enforce_a_grudge_at_both_ends() -> None:
    grudge = {"n1": {"n2"}, "n2": set(), "n3": set()}
    rules = grudge_to_rules(grudge)
    assert rules["n1"]["n2"] == {"drop_in": True}
    assert rules["n2"]["n1"] == {"drop_out": True}
    assert rules["n3"] == {}


def test_same_seed_same_partition_different_seed_differs() -> None:
    a = [partition_grudge(k, NODES, random.Random(11))[1] for k in PARTITION_KINDS]
    b = [partition_grudge(k, NODES, random.Random(11))[1] for k in PARTITION_KINDS]
    assert a == b
    many = {str(partition_grudge("majority", NODES, random.Random(s))[1]) for s in range(30)}
    assert len(many) > 3


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(NemesisError):
        partition_grudge("tornado", NODES, random.Random(1))


def test_fixed_schedule_covers_the_run() -> None:
    phases = fixed_schedule(["majority"], 10.0)
    assert [p.name for p in phases] == ["healthy", "fault", "healed"]
    assert phases[0].start_s == 0 and phases[-1].end_s == 10.0
    assert all(a.end_s == b.start_s for a, b in zip(phases, phases[1:], strict=False))
    assert phases[1].faults == ["majority"]


@pytest.mark.parametrize("seed", range(10))
def test_random_schedule_is_seeded_contiguous_and_ends_healed(seed: int) -> None:
    one = random_schedule(["kill", "isolate"], 30.0, random.Random(seed))
    two = random_schedule(["kill", "isolate"], 30.0, random.Random(seed))
    assert one == two
    assert one[-1].name == "healed" and one[-1].end_s == 30.0
    assert all(a.end_s <= b.start_s + 1e-9 for a, b in zip(one, one[1:], strict=False))
    assert any(p.name == "fault" for p in one)


def test_run_spec_rejects_unknown_scenario() -> None:
    with pytest.raises(ValueError):
        RunSpec(scenario="meteor", mode="eventual").faults()
