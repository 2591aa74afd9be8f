"""Replication throughput: the multiplexed stream transport vs. HTTP-per-message, same run.

Why
---
Every quorum write costs the coordinator N-1 replica messages.  The node's real transport
(``kvstore/transport/stream.py``) sends them as msgpack frames over one persistent, multiplexed
TCP connection per peer; the baseline (``kvstore/transport/http.py``, selected by
``KVSTORE_TRANSPORT=http`` in the nodes' environment) sends each one as an HTTP POST through
aiohttp, which is what a straightforward Python implementation would do.  This benchmark shows
what the stream transport buys, on the same machine, in the same run, with the same load.

What it runs (each configuration on a fresh cluster, rounds interleaved to spread the noise of
a shared machine evenly):

* ``stream``  3 nodes, N=3, W=2, stream transport,
* ``http``    3 nodes, N=3, W=2, ``KVSTORE_TRANSPORT=http``,
* ``single``  1 node, N=1, W=1, memory storage whatever ``--storage`` says: no replication
  and no disk, the ceiling of the node's HTTP stack.

Load: PUT of unique keys with 100-byte values, W in the query string, a closed loop of
``--concurrency`` connections spread over all nodes, bounded by ``--count`` operations and
``--duration`` seconds.  Generator: wrk with ``benchmarks/bench.lua`` (installed with apt-get
when missing and running as root); otherwise the Python aiohttp generator, with a warning.

Output: writes/s and p50/p99 latency per run, the median over rounds per configuration and the
ratios stream/http, stream/single and http/single.  Usage::

    python benchmarks/bench_transport.py [--storage memory|sqlite] [--fsync batch]
        [--concurrency 64] [--count 200000] [--duration 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import socket
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # ``python benchmarks/bench_transport.py``: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import (  # noqa: E402
    LoadResult,
    LoadSpec,
    cpu_seconds,
    ensure_wrk,
    env_var,
    loadavg,
    machine_info,
    run_load,
    warn,
)
from kvstore.harness.local_cluster import LocalCluster  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    nodes: int
    replicas: int
    w: int
    transport: str  # "stream" | "http" (the nodes' KVSTORE_TRANSPORT)
    storage: str | None = None  # None: --storage; the ceiling is always in memory


CONFIGS = (
    Config("stream", 3, 3, 2, "stream"),
    Config("http", 3, 3, 2, "http"),
    Config("single", 1, 1, 1, "stream", storage="memory"),
)


def peer_port_listening(cluster: LocalCluster) -> bool:
    """True when node 1's peer port accepts connections: only the stream transport listens there."""
    port = cluster.base_config.members[0].peer_port
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def measure(cfg: Config, args: argparse.Namespace, round_no: int, generator: str) -> tuple[LoadResult, float]:
    """One configuration on a fresh cluster: (load result, node CPU microseconds per write)."""
    env_value = "http" if cfg.transport == "http" else None
    with env_var("KVSTORE_TRANSPORT", env_value):  # read by LocalCluster when it spawns the nodes
        cluster = LocalCluster(
            cfg.nodes, cfg.replicas, storage=cfg.storage or args.storage, fsync=args.fsync, r=min(2, cfg.replicas),
            w=cfg.w,
        )
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
    try:
        if cfg.nodes > 1:
            listening = peer_port_listening(cluster)
            if listening != (cfg.transport == "stream"):
                raise RuntimeError(f"{cfg.name}: nodes did not pick the {cfg.transport} transport")
        query = f"w={cfg.w}"
        warmup = LoadSpec(
            urls=cluster.urls, op="put", query=query, value_size=args.value_size, prefix=f"warm{round_no}-",
            count=args.count, duration_s=1.0, connections=args.concurrency,
        )
        run_load(warmup, generator)  # type: ignore[arg-type]
        spec = LoadSpec(
            urls=cluster.urls, op="put", query=query, value_size=args.value_size, prefix=f"r{round_no}-",
            count=args.count, duration_s=args.duration, connections=args.concurrency,
        )
        pids = [cluster.pid(n) for n in cluster.node_ids]
        before = cpu_seconds(pids)
        result = run_load(spec, generator)  # type: ignore[arg-type]
        cpu_us = (cpu_seconds(pids) - before) / max(1, result.ok) * 1e6
        return result, cpu_us
    finally:
        cluster.stop()


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--fsync", choices=("always", "batch", "never"), default="batch")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--count", type=int, default=200_000, help="op-count bound per run")
    parser.add_argument("--duration", type=float, default=10.0, help="time bound per run (s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install wrk")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    wrk = ensure_wrk(install=not args.no_install) if args.generator in ("auto", "wrk") else None
    if args.generator == "wrk" and wrk is None:
        print("wrk is not installed and could not be installed", file=sys.stderr)
        return 1
    info = machine_info()
    command = "python benchmarks/bench_transport.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"# Replication transport ({info['date']}, commit {info['commit']})")
    print(f"machine: nproc={info['nproc']} cpu={info['cpu']} python={info['python']} loadavg={info['loadavg']}")
    print(f"command: {command.strip()}")
    print(f"kvstore measured from: {info['kvstore_source']}")
    print(
        f"load: PUT {args.value_size} B unique keys, {args.concurrency} connections, bound {args.count} ops / "
        f"{args.duration:.0f} s; storage={args.storage} fsync={args.fsync}\n"
    )

    results: dict[str, list[LoadResult]] = {c.name: [] for c in CONFIGS}
    cpus: dict[str, list[float]] = {c.name: [] for c in CONFIGS}
    print(f"{'round':>5} {'config':<7} {'gen':<6} {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'p999 ms':>8} "
          f"{'cpu us':>7}  errors   (cpu us = CPU of all nodes per write)")
    try:
        for round_no in range(1, args.rounds + 1):
            for cfg in CONFIGS:
                r, cpu_us = measure(cfg, args, round_no, args.generator)
                results[cfg.name].append(r)
                cpus[cfg.name].append(cpu_us)
                print(
                    f"{round_no:>5} {cfg.name:<7} {r.generator:<6} {r.ops_per_s:>9.0f} {r.p('p50'):>7.2f} "
                    f"{r.p('p99'):>7.2f} {r.p('p999'):>8.2f} {cpu_us:>7.0f}  {r.error_text()}",
                    flush=True,
                )
    except KeyboardInterrupt:
        warn("interrupted: every node was stopped; printing what was measured")

    def med(name: str, what: str) -> float:
        rs = results[name]
        if not rs:
            return float("nan")
        if what == "cpu":
            return statistics.median(cpus[name])
        return statistics.median(r.ops_per_s if what == "ops" else r.p(what) for r in rs)

    print("\nmedian over rounds:")
    print(f"{'config':<7} {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu us':>7}")
    for cfg in CONFIGS:
        print(f"{cfg.name:<7} {med(cfg.name, 'ops'):>9.0f} {med(cfg.name, 'p50'):>7.2f} {med(cfg.name, 'p99'):>7.2f} "
              f"{med(cfg.name, 'cpu'):>7.0f}")
    per_round = [
        ratio(s.ops_per_s, h.ops_per_s) for s, h in zip(results["stream"], results["http"], strict=False)
    ]
    print("\nratios (throughput, medians):")
    print(f"  stream/http   {ratio(med('stream', 'ops'), med('http', 'ops'))}   per round: {', '.join(per_round)}")
    print(f"  stream/single {ratio(med('stream', 'ops'), med('single', 'ops'))}")
    print(f"  http/single   {ratio(med('http', 'ops'), med('single', 'ops'))}")
    print(f"  p99 http/stream {ratio(med('http', 'p99'), med('stream', 'p99'))}")
    print(f"  CPU per write http/stream {ratio(med('http', 'cpu'), med('stream', 'cpu'))} "
          "(= stream/http throughput at equal CPU)")
    print(f"\nloadavg at the end: {loadavg()} (at the start: {info['loadavg']}; {info['nproc']} CPUs)")
    if args.json:
        payload = {
            "machine": info, "command": command.strip(), "args": vars(args),
            "results": {k: [r.to_json() for r in v] for k, v in results.items()},
            "cpu_us_per_write": cpus,
        }
        with contextlib.suppress(OSError):
            Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
