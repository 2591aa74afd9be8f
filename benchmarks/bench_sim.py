"""Simulator throughput: seeds per second of a ``kvstore sim --seeds`` sweep, one worker vs several.

Theory of operation
-------------------
Runs the same seed sweep (``kvstore.sim.sweep.sweep``: each seed picks its mode, nemesis and
schedule, as ``kvstore sim --seeds A..B`` does) twice in this process: first with one worker
process (the baseline), then with ``--jobs`` workers, and prints for each the seeds per wall
second, the simulated seconds per wall second (the sum of the runs' simulated time over the
sweep's wall time) and the ratio of each figure against the baseline measured in the same run.
It also checks that both sweeps produced the same history hash for every seed (a seed's run
does not depend on the worker that ran it): a difference is reported and makes the exit status 1.
Not a test: it prints numbers.  On a shared machine the ratio is the figure to trust, not the
absolute speed.

Usage (from the repository root)::

    python benchmarks/bench_sim.py [--seeds 1..8] [--jobs 2] [--duration 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvstore.sim.run import SimConfig
from kvstore.sim.sweep import SweepResult, parse_seeds, sweep


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def _row(label: str, result: SweepResult, base: SweepResult | None) -> str:
    simulated = sum(o.simulated_s for o in result.outcomes)
    sim_rate = simulated / result.elapsed_s
    ratio = ""
    if base is not None:
        base_rate = sum(o.simulated_s for o in base.outcomes) / base.elapsed_s
        ratio = f"{result.seeds_per_s / base.seeds_per_s:6.2f}x {sim_rate / base_rate:6.2f}x"
    else:
        ratio = f"{'1.00x':>7} {'1.00x':>7}"
    ops = sum(o.ops for o in result.outcomes)
    return (f"{label:12} {len(result.outcomes):>5} {result.elapsed_s:>8.1f} {result.seeds_per_s:>8.3f} "
            f"{sim_rate:>10.2f} {ops:>7} {len(result.broken):>6}  {ratio}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1..8", help="seeds to sweep (default 1..8)")
    parser.add_argument("--jobs", type=int, default=2, help="workers of the parallel sweep (default 2)")
    parser.add_argument("--duration", type=float, default=8.0, help="simulated seconds of workload per seed")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if args.jobs < 2:
        parser.error("--jobs must be at least 2 (one worker is the baseline)")
    base_config = SimConfig(duration_s=args.duration)
    print(f"kvstore bench_sim: commit {_commit()}, {len(seeds)} seeds ({args.seeds}), {args.duration:g} s of "
          f"workload per seed, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    out_root = Path(tempfile.mkdtemp(prefix="kvstore-bench-sim-"))
    try:
        started = time.perf_counter()
        single = sweep(seeds, base_config, out_root / "jobs-1", jobs=1)
        parallel = sweep(seeds, base_config, out_root / f"jobs-{args.jobs}", jobs=args.jobs)
        total_s = time.perf_counter() - started
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
    print(f"{'sweep':12} {'seeds':>5} {'wall s':>8} {'seeds/s':>8} {'sim s/wall s':>10} {'ops':>7} {'broken':>6}"
          "  vs jobs=1 (seeds/s, sim s/wall s)")
    print(_row("jobs=1", single, None))
    print(_row(f"jobs={args.jobs}", parallel, single))
    print(f"both sweeps in {total_s:.1f} s; load average {os.getloadavg()[0]:.2f} at the end")
    differ = [a.seed for a, b in zip(single.outcomes, parallel.outcomes, strict=True)
              if a.history_sha256 != b.history_sha256]
    if differ:
        print(f"DETERMINISM: seeds {differ} gave different histories in the two sweeps", file=sys.stderr)
        return 1
    print(f"every seed gave the same history hash in both sweeps ({len(seeds)} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
