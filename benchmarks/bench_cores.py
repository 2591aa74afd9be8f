"""3 nodes vs 6 nodes (2 per machine) on this machine: does one node per core buy throughput?

A node process is one asyncio event loop: it uses one core at most.  A deployment uses more
cores by running more node processes per machine, named onto their machine so a key's replicas
still land on distinct machines (docs/deployment.md, "Using more cores").  This measures what
that costs and gains here: the same N=3 quorum PUT and GET load (wrk, 100 B values, closed
loop, the same connections and wrk threads for both) against

* ``3``: 3 nodes, each its own machine (the baseline);
* ``6``: 6 nodes, ``nodes_per_machine=2`` (machines m1, m2, m3; every key on 3 machines).

Both clusters are up for the whole run and measured in interleaved rounds (3, 6, 6, 3, ...), so
a change in the machine's load hits both; the summary prints medians and the 6/3 ratios of
ops/s and of server CPU per op (all node processes), with the load averages before and after,
what each cluster's processes use with no load at all (heartbeats, anti-entropy, timers), and the
share of PUTs that arrived at a node that is not one of the key's primaries and were forwarded
(always 0 with 3 nodes and N=3: every node is a primary of every key).
On a 2-core machine six processes cannot use more than the two cores three already had: the
figure says what the extra processes cost.

Bounds: each load run stops at ``--count`` ops or ``--seconds``; every process is stopped by its
PID, also on an error or Ctrl-C.  Run: ``python benchmarks/bench_cores.py [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/bench_cores.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import LoadSpec, cpu_seconds, loadavg, machine_info, prepopulate, run_load  # noqa: E402
from kvstore.harness.local_cluster import LocalCluster  # noqa: E402

QUORUM = {"put": "consistency=quorum&w=2", "get": "consistency=quorum&r=2"}
SHAPES = {"3": (3, 1), "6": (6, 2)}  # name -> (nodes, nodes per machine)


def measure(cluster: LocalCluster, spec: LoadSpec, generator: str) -> tuple[float, float | None, str]:
    """ops/s, server CPU us per successful op, and the errors line of one bounded run."""
    pids = [cluster.pid(n) for n in cluster.node_ids if cluster.alive(n)]
    before = cpu_seconds(pids)
    result = run_load(spec, generator)  # type: ignore[arg-type]
    cpu = (cpu_seconds(pids) - before) / result.ok * 1e6 if result.ok else None
    return result.ops_per_s, cpu, result.error_text()


def forwarded_share(cluster: LocalCluster) -> tuple[float, float]:
    """(client PUTs answered, writes forwarded to a primary) summed over the nodes' /metrics: a
    node that is not one of the key's primaries forwards the write to one (kvstore.runtime.node)."""
    puts = forwarded = 0.0
    for url in cluster.urls:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("kvstore_forwarded_writes_total"):
                forwarded += float(line.rsplit(" ", 1)[1])
            elif line.startswith("kvstore_requests_total{") and 'op="put"' in line:
                puts += float(line.rsplit(" ", 1)[1])
    return puts, forwarded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per op (default 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time bound of one load run (default 3)")
    parser.add_argument("--count", type=int, default=200_000, help="op bound of one load run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads, the same for both shapes")
    parser.add_argument("--keys", type=int, default=2000, help="keys written first, for the GET runs")
    parser.add_argument("--storage", choices=("memory", "sqlite"), default="sqlite")
    parser.add_argument("--fsync", choices=("always", "batch", "never"), default="batch")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    assert args.rounds >= 1 and args.seconds > 0 and args.count > 0

    info = machine_info()
    print(f"machine: {info['nproc']} cores, {info['cpu']}; load average before: {info['loadavg']}")
    print(f"commit {info['commit']} ({info['kvstore_source']}); wrk {info['wrk']}")
    clusters: dict[str, LocalCluster] = {}
    figures: dict[str, dict[str, list[tuple[float, float | None]]]] = {"put": {}, "get": {}}
    idle: dict[str, float] = {}
    forwarded_puts: dict[str, float] = {}
    try:
        for name, (nodes, per_machine) in SHAPES.items():
            cluster = LocalCluster(nodes, 3, storage=args.storage, fsync=args.fsync, r=2, w=2,
                                   nodes_per_machine=per_machine)
            clusters[name] = cluster
            cluster.start()
            prepopulate(cluster.urls, "pre-", args.keys, 100, query="consistency=quorum&w=3")
        for name, cluster in clusters.items():  # what the nodes cost with no client at all
            pids = [cluster.pid(n) for n in cluster.node_ids]
            before = cpu_seconds(pids)
            time.sleep(args.seconds)
            idle[name] = (cpu_seconds(pids) - before) / args.seconds
            print(f"idle: {name} nodes use {idle[name]:.3f} cores (heartbeats, anti-entropy, timers)")
        print(f"{'round':<6} {'op':<4} {'nodes':>5} {'ops/s':>9} {'cpu us/op':>10} {'cores':>6}")
        for op in ("put", "get"):
            for round_no in range(args.rounds):
                order = list(SHAPES) if round_no % 2 == 0 else list(reversed(SHAPES))
                for name in order:
                    cluster = clusters[name]
                    spec = LoadSpec(
                        urls=cluster.urls, op=op, query=QUORUM[op], value_size=100,  # type: ignore[arg-type]
                        prefix=f"r{round_no}-" if op == "put" else "pre-", keys=args.keys,
                        count=args.count, duration_s=args.seconds, connections=args.connections,
                        threads=args.threads,
                    )
                    ops, cpu, errors = measure(cluster, spec, args.generator)
                    figures[op].setdefault(name, []).append((ops, cpu))
                    cores = f"{cpu * ops / 1e6:>6.2f}" if cpu is not None else f"{'-':>6}"
                    cpu_text = f"{cpu:>10.0f}" if cpu is not None else f"{'-':>10}"
                    print(f"{round_no + 1:<6} {op:<4} {name:>5} {ops:>9.0f} {cpu_text} {cores}  {errors}".rstrip(),
                          flush=True)
            if op == "put":
                for name, cluster in clusters.items():
                    puts, forwarded = forwarded_share(cluster)
                    forwarded_puts[name] = forwarded / puts if puts else 0.0
                    print(f"{name} nodes: {forwarded:.0f} of {puts:.0f} PUTs (with the loading) forwarded to a "
                          f"primary ({forwarded_puts[name]:.0%})")
    finally:
        for cluster in clusters.values():
            cluster.stop()
    after = loadavg()
    print(f"load average after: {after}")
    summary: dict[str, Any] = {"machine": info, "loadavg_after": after, "args": vars(args), "ops": {},
                               "idle_cores": idle, "forwarded_put_share": forwarded_puts}
    print("\nmedians over rounds; ratio = 6 nodes (2 per machine) / 3 nodes; per-round ratios in brackets")
    for op, by_shape in figures.items():
        if set(by_shape) != set(SHAPES):
            continue
        med = {name: statistics.median(r for r, _ in runs) for name, runs in by_shape.items()}
        cpu = {name: statistics.median(c for _, c in runs if c is not None) if any(c for _, c in runs) else None
               for name, runs in by_shape.items()}
        per_round = [six[0] / three[0] for three, six in zip(by_shape["3"], by_shape["6"], strict=True) if three[0]]
        ratio_ops = med["6"] / med["3"] if med["3"] else None
        ratio_cpu = cpu["6"] / cpu["3"] if cpu["3"] and cpu["6"] else None
        summary["ops"][op] = {"ops_per_s": med, "cpu_us_per_op": cpu, "ratio_ops": ratio_ops,
                              "ratio_rounds": per_round, "ratio_cpu_per_op": ratio_cpu,
                              "rounds": {k: v for k, v in by_shape.items()}}
        print(f"  quorum {op.upper():<4} 3 nodes {med['3']:>7.0f}/s ({cpu['3'] or 0:.0f} us/op)  "
              f"6 nodes {med['6']:>7.0f}/s ({cpu['6'] or 0:.0f} us/op)  "
              f"ratio {ratio_ops or 0:.2f}x [{', '.join(f'{r:.2f}' for r in per_round)}]  "
              f"CPU/op {ratio_cpu or 0:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
