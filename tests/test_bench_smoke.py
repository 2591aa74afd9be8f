"""Smoke test of the benchmark load generator (benchmarks/loadgen.py) against one real node.

Why: the benchmarks are not timed tests, but their generator is code whose bugs would show
up as silently wrong figures (no requests sent, every reply an error, a bound ignored).  This
runs the Python generator for about a second, closed loop and paced, and checks it measured
real successful operations, no errors, sane latencies, and stopped by its bounds; and, when
wrk is installed, that ``bench.lua`` stops wrk at the op count.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from benchmarks.loadgen import LoadSpec, prepopulate, run_load
from kvstore.harness.local_cluster import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(1, 1, storage="memory", r=1, w=1, data_dir=str(tmp_path_factory.mktemp("bench")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_closed_loop_puts_then_gets(node: LocalCluster) -> None:
    started = time.monotonic()
    puts = run_load(
        LoadSpec(urls=node.urls, op="put", query="w=1", prefix="smoke-", count=100_000, duration_s=0.7,
                 connections=8),
        "python",
    )
    assert time.monotonic() - started < 5.0  # the time bound held
    assert puts.ok > 0 and puts.errors == 0, puts.statuses
    assert puts.statuses.get("204") == puts.ok
    assert 0 < puts.p("p50") <= puts.p("p99") <= puts.p("max")

    prepopulate(node.urls, "smoke-read-", 50, 100, query="w=1")
    gets = run_load(
        LoadSpec(urls=node.urls, op="get", query="r=1", prefix="smoke-read-", keys=50, count=200,
                 duration_s=5.0, connections=4),
        "python",
    )
    assert gets.requests == 200  # the count bound stopped it, well before the time bound
    assert gets.ok == 200 and gets.errors == 0, gets.statuses


def test_paced_run_offers_the_requested_rate(node: LocalCluster) -> None:
    result = run_load(
        LoadSpec(urls=node.urls, op="put", query="w=1", prefix="paced-", count=10_000, duration_s=1.0,
                 connections=8, rate=200.0),
        "python",
    )
    assert result.errors == 0, result.statuses
    assert 150 <= result.ok <= 210  # ~200 requests scheduled over the 1 s bound
    assert result.offered_rate == 200.0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_stops_at_the_op_count(node: LocalCluster) -> None:
    started = time.monotonic()
    result = run_load(
        LoadSpec(urls=node.urls, op="put", query="w=1", prefix="wrk-", count=400, duration_s=5.0, connections=8),
        "wrk",
    )
    # bench.lua ends the run (SIGINT to wrk) when the first of wrk's 2 threads has its share of
    # the op count (200), long before wrk's -d bound; the others stop at their next reply.
    assert time.monotonic() - started < 4.0
    assert result.duration_s < 4.0
    assert result.errors == 0, result.statuses
    assert 200 <= result.ok <= 400 + 8, result.statuses
