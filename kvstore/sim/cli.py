"""``kvstore sim``: one deterministic simulated chaos run from a seed, or a sweep of many seeds.

Theory of operation
-------------------
Parses a seed and a ``SimConfig`` (mode, nemesis, cluster size, length), runs
``kvstore.sim.run.run_sim`` and prints what the explorer prints for one cell (the figures and
the finding), the verdict (did the mode keep its promise), the history file and its sha256.
The same seed and options give the same history, byte for byte, in any process: the hash is
how to check (``--json`` prints everything as one JSON document, hash included).

``--ops N`` is a convenience for the length: the run lasts N / rate seconds of simulated time
(about N client operations), so it is still fully described by its seed and options.

``--seeds 1..1000`` (or a list, ``3,8,21``, or a mix) sweeps seeds instead
(``kvstore.sim.sweep``): each seed picks its mode, nemesis and schedule from the seed (``--mode``
/ ``--nemesis`` fix them), the seeds run in ``--jobs`` worker processes with a rich progress bar
on stderr, and every seed that broke its mode's promise is printed with its replay command
(``--json``: one JSON document with every seed's result).

``--faults KIND@START-END,...`` replaces the nemesis's schedule with explicit fault windows;
``--shrink`` delta-debugs a failing ``--seed`` run down to a minimal one that fails the same way
and prints its replay command (``kvstore.sim.shrink``).  ``--unsafe-skip-fsync-before-ack`` is a
test-only switch that plants a durability bug in the simulated disks (``kvstore.sim.disk``), for
seeing a sweep and a shrink catch a real broken promise; no node configuration can set it.

Exit status: 0 the mode kept its promise (every seed did), 1 it broke it (some seed did, or a
simulation failed: a deadlock, a budget exceeded, a crash), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvstore.harness.runner import SCENARIOS
from kvstore.harness.workload import MODES

EXIT_OK, EXIT_BROKEN, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore sim",
        description="Run one chaos run on a simulated cluster (real nodes, simulated time, network and disks) "
                    "from a seed; print the verdict and the history's hash.  Same seed, same history.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seed", type=int, help="the run's seed (everything random derives from it)")
    which.add_argument("--seeds", metavar="SEEDS",
                       help="sweep these seeds: a range 1..1000 (inclusive), a list 3,8,21, or a mix; each seed "
                            "picks its mode, nemesis and schedule, unless --mode / --nemesis fix them")
    parser.add_argument("--jobs", type=int, default=None,
                        help="with --seeds: worker processes (default: the CPU count)")
    parser.add_argument("--mode", choices=list(MODES), default=None,
                        help="consistency mode (default eventual; with --seeds: picked per seed)")
    parser.add_argument("--nemesis", choices=list(SCENARIOS), default=None,
                        help="fault scenario, as for kvstore chaos (default majority-partition; "
                             "with --seeds: picked per seed)")
    parser.add_argument("--nodes", type=int, default=5, help="cluster size (default 5)")
    parser.add_argument("--replicas", type=int, default=3, help="replicas per key, N (default 3)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--duration", type=float, default=None, help="simulated seconds of workload (default 8)")
    length.add_argument("--ops", type=int, default=None, help="about this many client operations (sets the duration)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients (default 10)")
    parser.add_argument("--keys", type=int, default=5, help="independent registers (default 5)")
    parser.add_argument("--rate", type=float, default=100.0, help="ops per simulated second, all clients (default 100)")
    parser.add_argument("--random-schedule", action="store_true", help="random fault windows from the seed")
    parser.add_argument("--faults", default=None, metavar="WINDOWS",
                        help="an explicit fault schedule instead of the nemesis's: KIND[+KIND]@START-END,... in "
                             "seconds of workload (e.g. kill-all@2.4-5.6), or 'none' (--shrink prints these)")
    parser.add_argument("--unsafe-skip-fsync-before-ack", action="store_true",
                        help="TEST ONLY: inject a durability bug (the simulated disks acknowledge writes before "
                             "syncing them; a crash loses them), to see the simulator and --shrink catch it")
    parser.add_argument("--shrink", action="store_true",
                        help="with --seed: if the run breaks its promise, delta-debug it (fewer faults, clients, "
                             "keys, a shorter run) to a minimal run that breaks it the same way; print its replay")
    parser.add_argument("--shrink-max-runs", type=int, default=80, help="with --shrink: at most this many runs")
    parser.add_argument("--shrink-max-wall", type=float, default=900.0,
                        help="with --shrink: at most this many wall-clock seconds")
    parser.add_argument("--out", default=None, help="folder for history.jsonl, run.json, check.json "
                                                     "(default: a new temporary folder); with --seeds: the "
                                                     "folder of the broken seeds' runs (seed-S/)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    from kvstore.sim.run import SimConfig, parse_fault_windows, replay_command, run_sim
    from kvstore.sim.vloop import SimError

    parser = build_parser()
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else 8.0
    if args.ops is not None:
        if args.ops < 1:
            parser.error("--ops must be at least 1")
        duration = round(args.ops / args.rate, 3)
    try:
        faults = parse_fault_windows(args.faults) if args.faults is not None else None
        config = SimConfig(
            mode=args.mode or "eventual", scenario=args.nemesis or "majority-partition", nodes=args.nodes,
            replicas=args.replicas, duration_s=duration, clients=args.clients, keys=args.keys, rate_per_s=args.rate,
            random_schedule=args.random_schedule, faults=faults,
            unsafe_skip_fsync_before_ack=args.unsafe_skip_fsync_before_ack,
        )
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out) if args.out else None
    if args.seeds is not None:
        if args.shrink or args.faults is not None:
            parser.error("--shrink and --faults go with --seed (shrink a broken seed of a sweep by its replay command)")
        return _sweep(parser, args, config, out)
    if args.jobs is not None:
        parser.error("--jobs goes with --seeds")
    if args.shrink:
        from kvstore.sim.shrink import main_shrink

        if args.shrink_max_runs < 1 or args.shrink_max_wall <= 0:
            parser.error("--shrink-max-runs and --shrink-max-wall must be positive")
        return main_shrink(args.seed, config, out, max_runs=args.shrink_max_runs, max_wall_s=args.shrink_max_wall,
                           as_json=args.json)
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


def _sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, base: object, out: Path | None) -> int:
    import os
    import tempfile

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvstore.sim.run import SimConfig
    from kvstore.sim.sweep import SeedOutcome, SeedSpecError, parse_seeds, sweep

    assert isinstance(base, SimConfig)
    try:
        seeds = parse_seeds(args.seeds)
    except SeedSpecError as exc:
        parser.error(str(exc))
    if args.random_schedule:
        parser.error("with --seeds each seed picks its schedule; drop --random-schedule")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    jobs = max(1, min(args.jobs or os.cpu_count() or 1, len(seeds)))
    out_root = out if out is not None else Path(tempfile.mkdtemp(prefix="kvstore-sim-sweep-"))
    console = Console(stderr=True)
    broken_so_far = 0
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("seeds"),
        TextColumn("[red]{task.fields[broken]} broken"), TimeElapsedColumn(), console=console,
    ) as bar:
        task = bar.add_task(f"sweeping ({jobs} process{'es' if jobs > 1 else ''})", total=len(seeds), broken=0)

        def done(outcome: SeedOutcome) -> None:
            nonlocal broken_so_far
            if not outcome.ok:
                broken_so_far += 1
                bar.console.print(f"[red]seed {outcome.seed} broke[/red] ({outcome.config.mode} x "
                                  f"{outcome.config.scenario}): {'; '.join(outcome.broken)}", highlight=False)
            bar.update(task, advance=1, broken=broken_so_far)

        result = sweep(seeds, base, out_root, jobs=jobs, modes=[args.mode] if args.mode else None,
                       scenarios=[args.nemesis] if args.nemesis else None, on_done=done)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_sweep(result, out_root)
    return EXIT_BROKEN if result.broken else EXIT_OK


def _print_sweep(result: object, out_root: Path) -> None:
    from collections import Counter

    from kvstore.sim.sweep import SweepResult

    assert isinstance(result, SweepResult)
    runs = Counter(o.config.mode for o in result.outcomes)
    broke = Counter(o.config.mode for o in result.broken)
    print(f"kvstore sim: {len(result.outcomes)} seeds in {result.elapsed_s:.1f} s "
          f"({result.seeds_per_s:.2f} seeds/s, {result.jobs} process{'es' if result.jobs > 1 else ''})")
    for mode, count in sorted(runs.items()):
        print(f"  {mode:<13} {count:>5} seeds, {broke.get(mode, 0)} broke its promise")
    if not result.broken:
        print("verdict: ok: every seed kept its mode's promise")
        return
    print(f"verdict: BROKEN: {len(result.broken)} seed(s) broke their mode's promise:")
    for o in result.broken:
        print(f"  seed {o.seed}: {o.config.mode} x {o.config.scenario}"
              f"{' (random schedule)' if o.config.random_schedule else ''}: {'; '.join(o.broken)}")
        for line in o.details:
            print(f"      {line}")
        print(f"    replay: {o.replay}")
    print(f"histories of the broken seeds: {out_root}/seed-S/")
