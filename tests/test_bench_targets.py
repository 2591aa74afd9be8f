"""``kvstore bench`` judges the issue-15 targets from the figures of one run (table tests)."""

from __future__ import annotations

import pytest

from benchmarks.loadgen import LoadResult
from benchmarks.run import Report, Row, target_lines


def _row(system: str, mode: str, op: str, load: str, ops_per_s: float, p99_ms: float, cpu_us: float) -> Row:
    result = LoadResult("wrk", int(ops_per_s), int(ops_per_s), 1.0, {"p50": p99_ms / 2, "p99": p99_ms}, op=op)
    return Row(system, mode, op, 100, load, result, cpu_us_per_op=cpu_us)


def _report(ours: dict[tuple[str, str], float], p99_half_ms: float = 5.0) -> Report:
    rows = [
        _row("etcd", "etcd", "put", "sat", 1000, 20.0, 400),
        _row("etcd", "etcd", "get", "sat", 2000, 20.0, 200),
        _row("etcd", "etcd", "put", "half", 500, 15.0, 800),
        _row("etcd", "etcd", "get", "half", 1000, 15.0, 400),
    ]
    for (mode, op), rate in ours.items():
        rows.append(_row("kvstore-3", mode, op, "sat", rate, 30.0, 300))
        rows.append(_row("kvstore-3", mode, op, "half", rate / 2, p99_half_ms, 600))
    return Report(rows=rows)


ALL_MET = {("quorum", "put"): 1500, ("quorum", "get"): 4000, ("linearizable", "put"): 1000,
           ("linearizable", "get"): 2000}


@pytest.mark.parametrize(
    ("mode", "op", "rate", "met"),
    [
        ("quorum", "put", 1500, True), ("quorum", "put", 1499, False),  # >= 1.5x etcd writes
        ("quorum", "get", 4000, True), ("quorum", "get", 3999, False),  # >= 2x etcd linearizable reads
        ("linearizable", "put", 1000, True), ("linearizable", "put", 999, False),  # >= 1x
        ("linearizable", "get", 2000, True), ("linearizable", "get", 1999, False),
    ],
)
def test_throughput_targets_use_the_issue_factors(mode: str, op: str, rate: float, met: bool) -> None:
    lines = target_lines(_report({**ALL_MET, (mode, op): rate}), "sqlite/fsync=batch", (100,), None)
    # The first four lines are the throughput targets, in the issue's order.
    order = [("quorum", "put"), ("quorum", "get"), ("linearizable", "put"), ("linearizable", "get")]
    line = lines[order.index((mode, op))]
    assert mode in line and ("writes" if op == "put" else "reads") in line, line
    others = [x for i, x in enumerate(lines[:4]) if i != order.index((mode, op))]
    assert all(x.startswith("MET") for x in others), others
    assert line.startswith("MET") is met, line
    assert "us CPU/op" in line, "CPU per op is printed next to every figure"


@pytest.mark.parametrize(("p99_ms", "met"), [(9.99, True), (10.0, False), (48.0, False)])
def test_p99_at_half_saturation_is_judged_for_quorum_and_linearizable(p99_ms: float, met: bool) -> None:
    lines = [x for x in target_lines(_report(ALL_MET, p99_half_ms=p99_ms), "s", (100,), None) if "p99" in x]
    assert len(lines) == 4  # quorum and linearizable, put and get
    assert all(x.startswith("MET") is met for x in lines), lines
    assert all("us CPU/op" in x for x in lines)


def test_missing_figures_are_not_applicable_never_met() -> None:
    lines = target_lines(Report(rows=[]), "s", (100,), "the CP register is disabled")
    assert lines and all(x.startswith("n/a") for x in lines), lines
    assert not any("linearizable" in x and "p99" in x for x in lines)
