"""``kvstore sim``: one deterministic simulated chaos run from a seed.

Theory of operation
-------------------
Parses a seed and a ``SimConfig`` (mode, nemesis, cluster size, length), runs
``kvstore.sim.run.run_sim`` and prints what the explorer prints for one cell (the figures and
the finding), the verdict (did the mode keep its promise), the history file and its sha256.
The same seed and options give the same history, byte for byte, in any process: the hash is
how to check (``--json`` prints everything as one JSON document, hash included).

``--ops N`` is a convenience for the length: the run lasts N / rate seconds of simulated time
(about N client operations), so it is still fully described by its seed and options.

Exit status: 0 the mode kept its promise, 1 it broke it (or the simulation failed: a deadlock,
a budget exceeded), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chaos.runner import SCENARIOS
from chaos.workload import MODES

EXIT_OK, EXIT_BROKEN, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore sim",
        description="Run one chaos run on a simulated cluster (real nodes, simulated time, network and disks) "
                    "from a seed; print the verdict and the history's hash.  Same seed, same history.",
    )
    parser.add_argument("--seed", type=int, required=True, help="the run's seed (everything random derives from it)")
    parser.add_argument("--mode", choices=list(MODES), default="eventual", help="consistency mode (default eventual)")
    parser.add_argument("--nemesis", choices=list(SCENARIOS), default="majority-partition",
                        help="fault scenario, as for kvstore chaos (default majority-partition)")
    parser.add_argument("--nodes", type=int, default=5, help="cluster size (default 5)")
    parser.add_argument("--replicas", type=int, default=3, help="replicas per key, N (default 3)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=None, help="simulated seconds of workload (default 8)")
    length.add_argument("--ops", type=int, default=None, help="about this many client operations (sets the duration)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients (default 10)")
    parser.add_argument("--keys", type=int, default=5, help="independent registers (default 5)")
    parser.add_argument("--rate", type=float, default=100.0, help="ops per simulated second, all clients (default 100)")
    parser.add_argument("--random-schedule", action="store_true", help="random fault windows from the seed")
    parser.add_argument("--out", default=None, help="folder for history.jsonl, run.json, check.json "
                                                     "(default: a new temporary folder)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    from kvstore.sim.run import SimConfig, replay_command, run_sim
    from kvstore.sim.vloop import SimError

    parser = build_parser()
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else 8.0
    if args.ops is not None:
        if args.ops < 1:
            parser.error("--ops must be at least 1")
        duration = round(args.ops / args.rate, 3)
    try:
        config = SimConfig(
            mode=args.mode, scenario=args.nemesis, nodes=args.nodes, replicas=args.replicas, duration_s=duration,
            clients=args.clients, keys=args.keys, rate_per_s=args.rate, random_schedule=args.random_schedule,
        )
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out) if args.out else None
    try:
        result = run_sim(args.seed, config, out)
    except SimError as exc:
        print(f"kvstore sim: the simulation failed: {exc}", file=sys.stderr)
        print(f"replay: {replay_command(args.seed, config, out)}", file=sys.stderr)
        return EXIT_BROKEN
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_summary(result, replay_command(args.seed, config, out))
    return EXIT_OK if result.ok else EXIT_BROKEN


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _print_summary(result: object, replay: str) -> None:
    from kvstore.sim.run import SimResult

    assert isinstance(result, SimResult)
    s = result.summary
    c = result.config
    print(f"kvstore sim: seed {result.seed}, {c.mode} x {c.scenario}, {c.nodes} nodes, N={c.replicas}, "
          f"{c.duration_s:g} s of workload")
    ops = s["ops"]
    lat = (f"{s['latency_p50_ms']:.1f} / {s['latency_p99_ms']:.0f} ms" if s.get("latency_p50_ms") is not None
           else "-")
    print(f"  ops {ops['total']} (ok {ops['ok']}, fail {ops['fail']}, info {ops['info']}); "
          f"available during fault: majority {_pct(s['availability_fault_majority'])} | "
          f"minority {_pct(s['availability_fault_minority'])}")
    print(f"  linearizable {s['linearizable']}; stale reads {s['stale_reads']}; lost writes {s['lost_writes']}; "
          f"sibling reads {s['sibling_reads']}; p50 / p99 {lat}")
    print(f"  finding: {s['finding']}")
    if result.ok:
        print(f"verdict: ok: {c.mode} kept its promise")
    else:
        print("verdict: BROKEN: " + "; ".join(result.broken))
    print(f"history: {result.history_path}  sha256 {result.history_sha256}")
    speed = result.simulated_s / result.wall_s if result.wall_s > 0 else float("inf")
    print(f"simulated {result.simulated_s:.1f} s in {result.wall_s:.2f} s wall ({speed:.1f}x)")
    print(f"replay: {replay}")
