"""Linearizable PUT/GET: this checkout against an older one, interleaved in one run (issue 15 item 2).

Two 3-node clusters (N=3, sqlite ``fsync=batch`` data, the Paxos store fsyncing every vote as
always) run side by side: *new* from this checkout, *base* from another checkout's Python (a
venv of an old commit, ``--baseline-python``).  Rounds alternate (base, new, new, base, ...), and
every round is wrk with ``benchmarks/bench.lua``, closed loop, for ``--duration`` seconds:
``consistency=linearizable`` PUTs of fresh keys, then GETs of keys loaded through CASPaxos before.
Each figure comes with the server CPU per successful op (user+sys of the cluster's processes,
from /proc), the figure that survives a busy machine; the ratios new/base are printed per round
and for the medians.

    python benchmarks/bench_cp.py --baseline-python /tmp/cpbase/.venv/bin/python --rounds 2

``--fsync-batching`` measures instead how many acceptor votes share one fsync: ``concurrency``
accepts on distinct keys at a time through one ``PaxosAcceptor`` over ``SqliteStorage(fsync=
"always")`` (the Paxos store's policy), counting the writer thread's commits.

    python benchmarks/bench_cp.py --fsync-batching
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # ``python benchmarks/bench_cp.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import LoadSpec, cpu_seconds, ensure_wrk, loadavg, prepopulate, run_load  # noqa: E402
from kvstore.harness.local_cluster import LocalCluster  # noqa: E402
from kvstore.protocol.paxos import Ballot, RegisterValue  # noqa: E402
from kvstore.protocol.paxos_wire import accept_message  # noqa: E402
from kvstore.runtime.caspaxos import PaxosAcceptor  # noqa: E402
from kvstore.storage.sqlite import SqliteStorage  # noqa: E402

LINEARIZABLE = "consistency=linearizable"


class OtherCheckoutCluster(LocalCluster):
    """A LocalCluster whose nodes run another checkout's code (its own venv's interpreter)."""

    def __init__(self, python: str, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.python = python

    def node_command(self, node_id: str, config_path: Path) -> list[str]:
        return [self.python, "-m", "kvstore.server.app", "--config", str(config_path)]


def measure(cluster: LocalCluster, op: str, prefix: str, keys: int, duration_s: float, connections: int) -> tuple[
    float, float, float, int
]:
    """(ops/s, server CPU us/op, p99 ms, errors) of one closed-loop run."""
    pids = [cluster.pid(n) for n in cluster.node_ids if cluster.alive(n)]
    before = cpu_seconds(pids)
    spec = LoadSpec(
        urls=cluster.urls, op=op, query=LINEARIZABLE, value_size=100, prefix=prefix, keys=keys,  # type: ignore[arg-type]
        count=200_000, duration_s=duration_s, connections=connections,
    )
    result = run_load(spec, "wrk")
    cpu_us = (cpu_seconds(pids) - before) / result.ok * 1e6 if result.ok else float("nan")
    return result.ops_per_s, cpu_us, result.p("p99"), result.errors


async def votes_per_fsync(concurrency: int, votes: int) -> tuple[int, int, float]:
    """(votes, commits, seconds) of ``votes`` accepts, ``concurrency`` in flight at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        storage = SqliteStorage(str(Path(tmp) / "paxos.db"), fsync="always")
        commits = 0
        apply = storage._apply

        def counting_apply(*args: object) -> object:
            nonlocal commits
            commits += 1
            return apply(*args)  # type: ignore[arg-type]

        storage._apply = counting_apply  # type: ignore[method-assign,assignment]
        acceptor = PaxosAcceptor(storage)
        value = RegisterValue.of(b"x" * 100)
        sem = asyncio.Semaphore(concurrency)

        async def vote(i: int) -> None:
            async with sem:
                ballot = Ballot(1, "n1")
                reply = await acceptor.handle(accept_message(f"k{i}", i, ballot, value, None, (ballot,)))
                assert reply.get("ok") is True, reply

        started = time.perf_counter()
        await asyncio.gather(*(vote(i) for i in range(votes)))
        elapsed = time.perf_counter() - started
        await storage.close()
        return votes, commits, elapsed


def fsync_batching() -> int:
    print(f"load average at start: {loadavg()}")
    print("| accepts in flight | votes | commits (fsyncs) | votes per fsync | votes/s |")
    print("|---:|---:|---:|---:|---:|")
    for concurrency in (1, 4, 16, 64):
        votes, commits, elapsed = asyncio.run(votes_per_fsync(concurrency, 400))
        print(f"| {concurrency} | {votes} | {commits} | {votes / commits:.1f} | {votes / elapsed:.0f} |")
    print(f"load average at end: {loadavg()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-python", help="python of a venv with the old checkout installed")
    parser.add_argument("--fsync-batching", action="store_true", help="measure votes per fsync instead")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per side (alternating)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (each also bounded by count)")
    parser.add_argument("--keys", type=int, default=300, help="keys loaded for the GET runs")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if args.fsync_batching:
        return fsync_batching()
    if not args.baseline_python:
        parser.error("--baseline-python is required (or --fsync-batching)")
    if ensure_wrk(install=False) is None:
        print("wrk is not installed", file=sys.stderr)
        return 2
    print(f"load average at start: {loadavg()}")
    clusters = {
        "base": OtherCheckoutCluster(args.baseline_python, 3, 3, storage="sqlite", fsync="batch", r=2, w=2),
        "new": LocalCluster(3, 3, storage="sqlite", fsync="batch", r=2, w=2),
    }
    figures: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    try:
        for cluster in clusters.values():
            cluster.start()
        for cluster in clusters.values():
            prepopulate(cluster.urls, "cp-", args.keys, 100, query=LINEARIZABLE)
        order = [s for r in range(args.rounds) for s in (("base", "new") if r % 2 == 0 else ("new", "base"))]
        for op in ("put", "get"):
            for i, side in enumerate(order):
                prefix = f"cp-r{i}-" if op == "put" else "cp-"
                row = measure(clusters[side], op, prefix, args.keys, args.duration, args.connections)
                figures.setdefault((op, side), []).append(row)
                print(f"{op} {side:4} round {i + 1}: {row[0]:8.1f} ops/s  {row[1]:7.0f} us CPU/op  "
                      f"p99 {row[2]:6.1f} ms  errors {row[3]}", flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    print(f"load average at end: {loadavg()}")
    print("\n| op | base ops/s (rounds) | new ops/s (rounds) | new/base ops/s | base CPU us/op | new CPU us/op | "
          "new/base CPU/op |")
    print("|---|---|---|---:|---:|---:|---:|")
    for op in ("put", "get"):
        base, new = figures[(op, "base")], figures[(op, "new")]
        b_ops, n_ops = statistics.median(r[0] for r in base), statistics.median(r[0] for r in new)
        b_cpu, n_cpu = statistics.median(r[1] for r in base), statistics.median(r[1] for r in new)
        print(f"| linearizable {op} 100 B | {b_ops:.0f} ({' / '.join(f'{r[0]:.0f}' for r in base)}) | "
              f"{n_ops:.0f} ({' / '.join(f'{r[0]:.0f}' for r in new)}) | {n_ops / b_ops:.2f}x | {b_cpu:.0f} | "
              f"{n_cpu:.0f} | {n_cpu / b_cpu:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
