"""Analyses on small hand-made histories: phases, availability, sides, lost writes, stale reads,
sibling reads, latency."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from kvstore.checker import analysis
from kvstore.checker.history import History, from_dicts, load

GOLDEN = Path(__file__).resolve().parent / "golden"


def h(*lines: str, key: str = "k") -> History:
    """'0 invoke write 1 @n1' / 'nemesis kill ["n2"]' -> a history with 1 ms per event."""
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        t = (i + 1) * 1_000_000
        if line.startswith("nemesis"):
            _, f, *rest = line.split(maxsplit=2)
            out.append({"time": t, "process": "nemesis", "type": "info", "f": f,
                        "value": eval(rest[0]) if rest else None})  # noqa: S307 - test literals
            continue
        body, _, node = line.partition(" @")
        process, kind, f, *rest = body.split(maxsplit=3)
        extra = rest[0].split(" !") if rest else []
        value = eval(extra[0]) if extra and extra[0] != "nil" else None  # noqa: S307
        row: dict[str, Any] = {"time": t, "process": int(process), "type": kind, "f": f, "key": key, "value": value}
        if node:
            row["node"] = node
        if len(extra) > 1:
            row["error"] = extra[1]
        out.append(row)
    return from_dicts(out)


def test_phases_from_partition_events() -> None:
    phases = analysis.phases(load(GOLDEN / "partition.jsonl"))
    assert [(p.name, p.start, p.end, p.faults) for p in phases] == [
        ("before", 0, 4, []),
        ("partition", 4, 13, ["partition"]),
        ("healed", 13, 18, []),
    ]


def test_phases_overlapping_faults_and_repeats() -> None:
    hist = h("0 invoke read", "0 ok read nil",
             'nemesis start-latency {"delay_ms": 50}',
             "nemesis start-loss {}",
             "nemesis stop-latency {}",
             "nemesis stop-loss {}",
             'nemesis kill ["n1"]',
             'nemesis restart ["n1"]',
             'nemesis kill ["n2"]',
             'nemesis restart ["n2"]')
    names = [p.name for p in analysis.phases(hist)]
    assert names == ["before", "latency", "latency+loss", "loss", "healed", "kill", "healed #2", "kill #2",
                     "healed #3"]


def test_jepsen_start_logged_twice_is_one_fault() -> None:
    hist = h("nemesis start", 'nemesis start "Cut off"', "0 invoke read", "0 ok read nil", "nemesis stop",
             'nemesis stop "fully connected"')
    windows = analysis.fault_windows(hist)
    assert len(windows) == 1 and (windows[0].start, windows[0].end) == (0, 4)
    assert windows[0].value == "Cut off"


def test_no_nemesis_is_one_phase() -> None:
    phases = analysis.phases(h("0 invoke read", "0 ok read nil"))
    assert [p.name for p in phases] == ["no faults"]


def test_availability_overall_phase_and_side() -> None:
    av = analysis.availability(load(GOLDEN / "partition.jsonl"))
    assert (av.overall.ok, av.overall.fail, av.overall.info) == (6, 1, 1)
    assert av.overall.availability == pytest.approx(6 / 8)
    assert {k: (c.ok, c.fail, c.info) for k, c in av.by_phase.items()} == {
        "before": (2, 0, 0), "partition": (2, 1, 1), "healed": (2, 0, 0)}
    assert {k: (c.ok, c.fail, c.info) for k, c in av.by_side.items()} == {"minority": (0, 1, 1), "majority": (2, 0, 0)}
    assert set(av.by_group) == {"n1,n2 (minority)", "n3,n4,n5 (majority)"}


def test_refused_cas_counts_as_available() -> None:
    hist = h("0 invoke cas (1, 2)", "0 fail cas (1, 2) !precondition_failed",
             "1 invoke write 3", "1 fail write 3 !quorum_unavailable")
    c = analysis.availability(hist).overall
    assert (c.ok, c.fail, c.refused, c.availability) == (0, 2, 1, 0.5)


@pytest.mark.parametrize(
    ("value", "sides"),
    [
        ([["n1", "n2"], ["n3", "n4", "n5"]], {"n1": "minority", "n3": "majority"}),
        ({"kind": "halves", "groups": [["n1", "n2"], ["n3", "n4"]]}, {"n1": "minority", "n4": "minority"}),
        ({"bridge": "n3", "sides": [["n1", "n2", "n3"], ["n3", "n4", "n5"]]},
         {"n3": "bridge", "n1": "majority", "n5": "majority"}),
        ({"deaf": "n2", "cannot_hear": ["n1", "n3", "n4"]}, {"n2": "minority", "n1": "majority"}),
    ],
)
def test_partition_sides(value: Any, sides: dict[str, str]) -> None:
    got = analysis.partition_sides(value)
    assert got is not None
    assert {node: got[node].side for node in sides} == sides


def test_partition_without_groups_has_no_sides() -> None:
    assert analysis.partition_sides({"views": {"n1": ["n1", "n2"]}}) is None
    assert analysis.partition_sides("isolated") is None


def test_lost_write_needs_evidence_and_no_explanation() -> None:
    # write 2 acknowledged, a later read still sees 1: lost
    lost = analysis.lost_writes(h("0 invoke write 1", "0 ok write 1", "0 invoke write 2", "0 ok write 2",
                                  "1 invoke read", "1 ok read 1"))
    assert [(lw.op, lw.value, lw.first_read) for lw in lost] == [(1, 2, 2)]
    # no read afterwards: no evidence either way
    assert analysis.lost_writes(h("0 invoke write 1", "0 ok write 1")) == []
    # a concurrent write explains it
    assert analysis.lost_writes(h("0 invoke write 1", "1 invoke write 2", "0 ok write 1", "1 ok write 2",
                                  "2 invoke read", "2 ok read 2")) == []
    # an info write after it explains it (it may have taken effect)
    assert analysis.lost_writes(h("0 invoke write 1", "0 ok write 1", "1 invoke write 2", "1 info write 2",
                                  "2 invoke read", "2 ok read nil")) == []


def test_read_cut_off_from_the_writer_is_not_evidence_of_loss() -> None:
    part = 'nemesis start-partition {"kind": "majority", "groups": [["n1", "n2", "n3"], ["n4", "n5"]]}'
    heal = 'nemesis stop-partition {"kind": "majority", "groups": [["n1", "n2", "n3"], ["n4", "n5"]]}'
    # Written on the minority side; a majority-side read during the partition misses it (a stale
    # read), then the writer's own next write replaces it: nothing was lost.
    assert analysis.lost_writes(h(part, "0 invoke write 1 @n4", "0 ok write 1 @n4", "1 invoke read @n1",
                                  "1 ok read nil @n1", "0 invoke write 2 @n4", "0 ok write 2 @n4", heal,
                                  "1 invoke read @n2", "1 ok read 2 @n2")) == []
    # The same, but the first read that could reach it (after healing) still misses it: lost.
    lost = analysis.lost_writes(h(part, "0 invoke write 1 @n4", "0 ok write 1 @n4", "1 invoke read @n1",
                                  "1 ok read nil @n1", heal, "1 invoke read @n2", "1 ok read nil @n2"))
    assert [(lw.value, lw.first_read) for lw in lost] == [(1, 2)]
    # A read on the writer's own side during the partition is evidence.
    lost = analysis.lost_writes(h(part, "0 invoke write 1 @n4", "0 ok write 1 @n4", "1 invoke read @n5",
                                  "1 ok read nil @n5", "0 invoke write 2 @n4", "0 ok write 2 @n4"))
    assert [lw.value for lw in lost] == [1]
    # While the writer's node is killed, other nodes' reads cannot see its copy either.
    killed = ("0 invoke write 1 @n2", "0 ok write 1 @n2", 'nemesis kill ["n2"]', "1 invoke read @n1",
              "1 ok read nil @n1", 'nemesis restart ["n2"]', "0 invoke write 2 @n2", "0 ok write 2 @n2",
              "1 invoke read @n1", "1 ok read 2 @n1")
    assert analysis.lost_writes(h(*killed)) == []
    # ... whereas the same read with no kill is evidence.
    assert [lw.value for lw in analysis.lost_writes(h(*(x for x in killed if "nemesis" not in x)))] == [1]


def test_stale_read_needs_a_completed_overwrite_before_the_read() -> None:
    stale = analysis.stale_reads(h("0 invoke write 1", "0 ok write 1", "0 invoke write 2", "0 ok write 2",
                                   "1 invoke read", "1 ok read 1"))
    assert [(s.op, s.value, s.overwritten_by) for s in stale] == [(2, 1, 1)]
    # the overwrite was still running when the read began: not stale
    assert analysis.stale_reads(h("0 invoke write 1", "0 ok write 1", "0 invoke write 2",
                                  "1 invoke read", "0 ok write 2", "1 ok read 1")) == []
    # reading the initial value after a completed write is stale; the initial value is configurable
    hist = h("0 invoke write 1", "0 ok write 1", "1 invoke read", "1 ok read 0")
    assert analysis.stale_reads(hist, initial=None) == []
    assert [s.op for s in analysis.stale_reads(hist, initial=0)] == [1]


def test_stale_read_with_siblings_needs_all_siblings_stale() -> None:
    rows = [
        {"process": 0, "type": "invoke", "f": "write", "key": "k", "value": 1},
        {"process": 0, "type": "ok", "f": "write", "key": "k", "value": 1},
        {"process": 0, "type": "invoke", "f": "write", "key": "k", "value": 2},
        {"process": 0, "type": "ok", "f": "write", "key": "k", "value": 2},
        {"process": 1, "type": "invoke", "f": "read", "key": "k", "value": None},
        {"process": 1, "type": "ok", "f": "read", "key": "k", "value": None, "siblings": [1, 2]},
    ]
    hist = from_dicts(rows)
    assert analysis.stale_reads(hist) == []
    assert analysis.sibling_reads(hist) == [2]


def test_keys_with_appends_are_skipped() -> None:
    hist = h("0 invoke append 'x'", "0 ok append 'x'", "1 invoke get", "1 ok get ''")
    result = analysis.analyse(hist, initial="")
    assert result.stale_reads == [] and result.lost_writes == [] and result.skipped_keys == ["k"]


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert analysis.percentile(values, 50) == 50.0
    assert analysis.percentile(values, 99) == 99.0
    assert analysis.percentile(values, 100) == 100.0
    assert analysis.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        analysis.percentile([], 50)


def test_latency_by_op_and_phase() -> None:
    hist = h("0 invoke write 1", "0 ok write 1",  # 1 ms
             "nemesis start-partition [['n1'], ['n2', 'n3']]",
             "0 invoke read", "1 invoke read", "1 ok read 1", "0 ok read 1",  # 3 ms and 1 ms
             "nemesis stop-partition")
    lat = analysis.latency(hist)
    assert lat["write"]["all"].p50_ms == pytest.approx(1.0)
    assert lat["read"]["partition"].count == 2
    assert lat["read"]["partition"].max_ms == pytest.approx(3.0)
    assert lat["read"]["partition"].p50_ms == pytest.approx(1.0)  # nearest rank of [1, 3]
    assert "before" not in lat["read"]


def test_analyses_to_dict_is_plain_data() -> None:
    import json

    result = analysis.analyse(load(GOLDEN / "sibling-read-stale.jsonl"))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["sibling_reads"]["count"] == 1
    assert data["stale_reads"][0]["value"] == [1, 2]


# --- the fast analyses agree with their definitions, written naively ---------------------------


def _naive_produces(op: Any) -> tuple[bool, Any]:
    if op.f == "write":
        return True, op.value
    if op.f == "delete":
        return True, None
    if op.f == "cas":
        return True, op.value[1]
    return False, None


def naive_lost(hist: History) -> list[int]:
    ops = hist.ops
    reads = [r for r in ops if r.f == "read" and r.type == "ok"]
    seen = {v for r in reads for v in (r.siblings if r.siblings is not None else (r.result,))}
    writers = [w for w in ops if w.type != "fail" and _naive_produces(w)[0]]
    lost = []
    for w in writers:
        if w.type != "ok" or w.f == "delete" or _naive_produces(w)[1] in seen:
            continue
        later = sorted((r for r in reads if r.invoke > w.complete), key=lambda r: r.invoke)
        if not later:
            continue
        first = later[0]
        if not any(o is not w and o.end > w.invoke and o.invoke < first.complete for o in writers):
            lost.append(w.id)
    return lost


def naive_stale(hist: History, initial: Any = None) -> list[int]:
    ops = hist.ops
    acked = [w for w in ops if w.type == "ok" and _naive_produces(w)[0]]
    stale = []
    for r in ops:
        if r.f != "read" or r.type != "ok":
            continue
        values = r.siblings if r.siblings is not None else (r.result,)
        all_stale = True
        for v in values:
            ends = [w.end for w in ops if w.type != "fail" and _naive_produces(w) == (True, v)]
            if v == initial:
                ends.append(-1)
            if not ends or not all(
                any(w2.invoke > end and w2.complete < r.invoke and _naive_produces(w2)[1] != v for w2 in acked)
                for end in ends
            ):
                all_stale = False
                break
        if all_stale:
            stale.append(r.id)
    return stale


def random_register_history(rng: random.Random) -> History:
    events: list[dict[str, Any]] = []
    open_ops: dict[int, dict[str, Any]] = {}
    for _ in range(rng.randint(4, 24)):
        p = rng.randrange(4)
        if p in open_ops:
            op = open_ops.pop(p)
            kind = rng.choice(["ok", "ok", "ok", "fail", "info"])
            row = {**op, "type": kind}
            if op["f"] == "read" and kind == "ok":
                if rng.random() < 0.15:
                    row["siblings"] = [rng.choice([None, 1, 2, 3, 4]) for _ in range(2)]
                else:
                    row["value"] = rng.choice([None, 1, 2, 3, 4])
            events.append(row)
        else:
            f = rng.choice(["read", "write", "write", "cas", "delete"])
            value: Any = None
            if f == "write":
                value = rng.randint(1, 4)
            elif f == "cas":
                value = [rng.randint(1, 4), rng.randint(1, 4)]
            op = {"process": p, "f": f, "key": "k", "value": value}
            open_ops[p] = op
            events.append({**op, "type": "invoke"})
    return from_dicts(events)


def test_fast_lost_writes_and_stale_reads_match_their_definitions() -> None:
    rng = random.Random("analyses-vs-naive")
    found = {"lost": 0, "stale": 0}
    for _ in range(1500):
        hist = random_register_history(rng)
        lost = [lw.op for lw in analysis.lost_writes(hist)]
        stale = [s.op for s in analysis.stale_reads(hist)]
        assert lost == naive_lost(hist)
        assert stale == naive_stale(hist)
        found["lost"] += len(lost)
        found["stale"] += len(stale)
    assert found["lost"] > 10 and found["stale"] > 30  # both analyses had something to find
