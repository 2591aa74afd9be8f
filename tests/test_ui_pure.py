"""Tables for the live explorer's pure parts: sides per key, rolling figures, the rules that write
the explanations, replica agreement and the pictures (live page and batch report)."""

from __future__ import annotations

import pytest

from kvstore.harness.nemesis import groups_grudge, grudge_to_rules, links_grudge
from kvstore.protocol.placement import placement
from kvstore.protocol.ring import Ring
from kvstore.ui import explain, pictures, probe
from kvstore.ui.stats import ModeStats, Sample
from kvstore.ui.topology import MAJORITY, MINORITY, Topology

NODES = ["n1", "n2", "n3", "n4", "n5"]


def topo_of(grudge: dict[str, set[str]], **kw: object) -> Topology:
    return Topology.from_rules(NODES, grudge_to_rules(grudge), **kw)  # type: ignore[arg-type]


# --- topology: who hears whom, sides per key ------------------------------------------------

def test_a_majority_partition_has_two_groups_and_sides_per_key() -> None:
    topo = topo_of(groups_grudge([["n1", "n2", "n3"], ["n4", "n5"]]))
    assert topo.partitioned and topo.faulty
    assert topo.groups() == [["n1", "n2", "n3"], ["n4", "n5"]]
    assert topo.describe() == "partition n1 n2 n3 | n4 n5"
    # Sides are per key: n4 holds a majority of a key whose replicas are n3, n4, n5.
    assert topo.side("n4", ["n3", "n4", "n5"], 3) == MAJORITY
    assert topo.side("n1", ["n3", "n4", "n5"], 3) == MINORITY
    assert topo.side("n4", ["n1", "n2", "n3"], 3) == MINORITY
    assert topo.side("n2", ["n1", "n2", "n3"], 3) == MAJORITY


@pytest.mark.parametrize(("grudge", "expected"), [
    ({n: set() for n in NODES}, ""),
    (links_grudge(NODES, [("n1", "n2"), ("n2", "n1")]), "cut links: n1-n2"),
    (links_grudge(NODES, [("n1", "n2")]), "one-way: n2 does not hear n1"),
])
def test_describe_links(grudge: dict[str, set[str]], expected: str) -> None:
    assert topo_of(grudge).describe() == expected


def test_a_node_down_is_on_the_minority_side_and_talks_to_nobody() -> None:
    topo = topo_of({n: set() for n in NODES}, killed=["n2"], paused=["n3"], skews_ms={"n4": 10_000.0})
    assert not topo.partitioned and topo.faulty
    assert topo.side("n2", ["n1", "n2", "n3"], 3) == MINORITY
    assert topo.side("n1", ["n1", "n2", "n3"], 3) == MINORITY  # n2 killed, n3 paused: 1 of 3
    assert not topo.talks("n1", "n3") and topo.talks("n1", "n4")
    assert topo.describe() == "n2 killed; n3 paused; n4 clock +10 s"
    assert topo.to_json()["killed"] == ["n2"]


def test_one_way_link_means_no_talking_in_either_direction() -> None:
    topo = topo_of(links_grudge(NODES, [("n1", "n2")]))  # n2 does not hear n1
    assert not topo.hears("n2", "n1") and topo.hears("n1", "n2")
    assert not topo.talks("n1", "n2")


# --- stats: availability per side, refusals count as answers ---------------------------------

def sample(t: float, side: str, type_: str, f: str = "read", refused: bool = False, latency: float = 5.0) -> Sample:
    return Sample(t_s=t, side=side, type=type_, f=f, node="n1", latency_ms=latency, refused=refused)


def test_availability_per_side_counts_cas_refusals_as_answers() -> None:
    stats = ModeStats(window_s=10.0)
    for t in range(5):
        stats.add(sample(t, MAJORITY, "ok", f="write"))
        stats.add(sample(t, MINORITY, "fail"))
    stats.add(sample(5, MAJORITY, "fail", f="cas", refused=True))
    stats.add(sample(5, MINORITY, "info"))
    stats.add(sample(5, MINORITY, "ok", f="write"))
    fig = stats.figures(now_s=6.0)
    assert fig["majority"]["availability"] == 1.0 and fig["majority"]["total"] == 6
    assert fig["minority"]["total"] == 7 and fig["minority"]["availability"] == pytest.approx(1 / 7)
    assert fig["writes_ok_minority"] == 1
    assert fig["latency_p50_ms"] == 5.0


def test_figures_forget_what_left_the_window() -> None:
    stats = ModeStats(window_s=10.0)
    stats.add(sample(1.0, MINORITY, "fail"))
    stats.add(sample(30.0, MINORITY, "ok"))
    fig = stats.figures(now_s=31.0)
    assert fig["minority"]["total"] == 1 and fig["minority"]["availability"] == 1.0
    assert fig["totals"]["minority"]["total"] == 2  # the whole run still counts both


# --- explain: fixed rules over the figures ---------------------------------------------------

def side(total: int, availability: float) -> dict[str, object]:
    return {"total": total, "availability": availability, "info": 0}


def texts(f: explain.Figures) -> str:
    return " ".join(text for _, text in explain.explain(f))


def test_linearizable_minority_refused_is_the_c_of_cap() -> None:
    f = explain.Figures(mode="linearizable", fault="partition n1 n2 n3 | n4 n5", partitioned=True,
                        majority=side(40, 1.0), minority=side(20, 0.0), keys=5, keys_checked=5)
    out = explain.explain(f)
    refused = [(tone, t) for tone, t in out if "refused" in t]
    assert refused and "the C of CAP" in refused[0][1] and "(2 of 3)" in refused[0][1]
    assert refused[0][0] == explain.INFO  # refusing is this mode doing its job, not a failure
    assert "found no violation" in texts(f)


def test_the_majority_named_follows_n() -> None:
    f = explain.Figures(mode="quorum", fault="partition", partitioned=True, majority=side(40, 1.0),
                        minority=side(20, 0.0), replicas=5)
    assert "R = W = 3 of N = 5" in texts(f) and "at most 2 is reachable" in texts(f)


def test_eventual_minority_answering_is_the_a_of_cap_with_the_writes_taken_there() -> None:
    f = explain.Figures(mode="eventual", fault="partition", partitioned=True, majority=side(40, 1.0),
                        minority=side(20, 1.0), writes_ok_minority=7)
    assert "the A of CAP; 7 writes were accepted there" in texts(f)


def test_too_few_requests_on_a_side_say_nothing_about_it() -> None:
    f = explain.Figures(mode="linearizable", fault="partition", partitioned=True, majority=side(40, 1.0),
                        minority=side(explain.MIN_OPS - 1, 0.0))
    assert "minority" not in texts(f).lower().replace("minority side", "") and "refused" not in texts(f)


def test_after_a_heal_agreeing_replicas_are_called_converged() -> None:
    f = explain.Figures(mode="eventual", healed_s=12.0, agree=5, probed_keys=5)
    assert "No fault: the last one was healed 12 s ago." in texts(f)
    assert "Converged since the heal 12 s ago" in texts(f)
    f.agree = 3
    assert "replicas agree on 3/5 keys" in texts(f)


def test_lww_with_skew_and_lost_writes_blames_the_clock() -> None:
    f = explain.Figures(mode="eventual-lww", fault="n1 clock +10 s", skews_ms={"n1": 10_000.0},
                        anomalies={"lost_writes": 2, "lost_writes_recent": 2, "lost_examples": ["write 5 on n2"]})
    text = texts(f)
    assert "a node whose clock runs ahead wins over later writes: 2 acknowledged writes were just lost" in text
    assert "last-write-wins silently drops the older of two concurrent writes" in text


def test_a_linearizable_violation_is_called_a_bug() -> None:
    f = explain.Figures(mode="linearizable", keys=5, keys_checked=5, keys_invalid=1)
    assert "that is a bug" in texts(f)


# --- probe: replicas agree only when every one answered with the same versions --------------------

@pytest.mark.parametrize(("copies", "expected"), [
    ({"n1": {"digest": "a"}, "n2": {"digest": "a"}}, True),
    ({"n1": {"digest": "a"}, "n2": {"digest": "b"}}, False),
    ({"n1": {"digest": "a"}, "n2": None}, False),
    ({"n1": None, "n2": None}, False),
])
def test_agree(copies: dict[str, dict[str, str] | None], expected: bool) -> None:
    assert probe.agree(copies) is expected  # type: ignore[arg-type]


# --- pictures --------------------------------------------------------------------------------

def test_ring_picture_numbers_the_preference_list() -> None:
    ring = Ring(NODES, 16)
    key = "user/42"
    where = placement(ring, key, 3, lambda m: m != ring.preference_list(key, 3)[0])
    svg = pictures.ring_svg(ring, where, down=[ring.preference_list(key, 3)[0]], title="as n1 sees it")
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "as n1 sees it" in svg
    assert "primary 1 - down" in svg and "primary 2" in svg and "primary 3" in svg
    assert f"stands in for {ring.preference_list(key, 3)[0]} (hints)" in svg


def test_topology_picture_draws_cut_and_one_way_links() -> None:
    grudge = links_grudge(NODES, [("n1", "n2"), ("n2", "n1"), ("n3", "n4")])
    svg = pictures.topology_svg(NODES, grudge, killed=["n5"])
    assert "<title>n1 - n2: cut</title>" in svg
    assert "n3 -> n4 delivers" not in svg and "n4 -> n3 delivers; n3 -> n4 is cut" in svg
    assert "killed" in svg and "<title>n1 - n3: up</title>" in svg


def test_run_fault_reads_the_recorded_nemesis_events() -> None:
    events = [
        {"process": 0, "type": "invoke", "f": "read", "key": "k"},
        {"process": "nemesis", "type": "info", "f": "start-partition",
         "value": {"kind": "majority", "groups": [["n1", "n2", "n3"], ["n4", "n5"]]}},
        {"process": "nemesis", "type": "info", "f": "kill", "value": ["n2"]},
        {"process": "nemesis", "type": "info", "f": "start-skew", "value": {"n3": 10_000}},
    ]
    fault = pictures.run_fault(events, NODES)
    assert fault["groups"] == [["n1", "n2", "n3"], ["n4", "n5"]] and fault["killed"] == ["n2"]
    assert fault["skews_ms"] == {"n3": 10_000.0}
    svg = pictures.fault_svg(events, NODES)
    assert svg is not None and "the fault: majority: n1 n2 n3 | n4 n5; kill n2; clock skew n3 +10 s" in svg
    assert pictures.fault_svg(events[:1], NODES) is None
    ring = Ring(NODES, 16)
    ring_pic = pictures.placement_during_fault_svg(ring, "k", 3, events[:2])
    assert "as n4 saw it during the fault" in ring_pic  # a node of the smaller side


def test_writes_not_seen_yet_are_not_called_lost() -> None:
    f = explain.Figures(mode="eventual", anomalies={"lost_writes": 0, "lost_writes_unsettled": 2})
    assert "2 acknowledged writes not seen by any read yet" in texts(f) and "lost so far" not in texts(f)
