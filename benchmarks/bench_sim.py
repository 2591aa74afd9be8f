"""Simulator throughput: CPU seconds per seed and seeds per second, against a baseline measured in the same run.

Theory of operation
-------------------
Two ways to measure, both printing ratios against a baseline measured in the same run (on a
shared machine the ratio is the figure to trust, not the absolute speed):

* ``--baseline-checkout PATH`` (this checkout vs an older one, e.g. ``git worktree add /tmp/simbase
  0d4d9ee``): one worker process per checkout (this script in ``--worker`` mode, importing
  ``kvstore`` from that checkout through ``PYTHONPATH``), fed the same seeds one at a time,
  alternately (baseline first on odd seeds, this checkout first on even ones) so that a change of
  machine load weighs on both alike.  Each seed runs as one seed of ``kvstore sim --seeds`` does
  (``kvstore.sim.sweep.run_seed``, with the mode, nemesis and schedule the seed picks,
  ``kvstore.sim.sweep.pick``); the worker reports the CPU time of the run (``time.process_time``:
  the simulation, the checker and the history files; not the imports), its wall time, and the
  history's hash.  Printed: CPU s per seed, wall s per seed and seeds per second for each checkout,
  their ratios, the CPU per mode, how many seeds gave the same history hash in both (with
  ``--expect-same-histories`` a difference makes the exit status 1: for changes that must not
  alter any run), and the projected wall time of a 1,000-seed sweep with ``--jobs 2`` on an idle
  2-core machine (1000 x CPU s per seed / 2).
* without it: the same seed sweep (``kvstore.sim.sweep.sweep``) with one worker process (the
  baseline) and with ``--jobs`` workers; seeds per wall second and simulated seconds per wall
  second, and a check that both sweeps gave every seed the same history hash.

Not a test: it prints numbers.

Usage (from the repository root)::

    python benchmarks/bench_sim.py --baseline-checkout /tmp/simbase [--seeds 1..50] [--expect-same-histories]
    python benchmarks/bench_sim.py [--seeds 1..8] [--jobs 2] [--duration 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_SIM_RESULT "


def _commit(checkout: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=checkout)
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


# --- worker mode: runs seeds with whatever kvstore PYTHONPATH gives it --------------------------------------


def worker(out_root: str) -> int:
    """Read one JSON job per stdin line, run that seed, answer one result line on stdout."""
    from kvstore.sim.run import SimConfig
    from kvstore.sim.sweep import run_seed

    for line in sys.stdin:
        job = json.loads(line)
        config = SimConfig(mode=job["mode"], scenario=job["scenario"], random_schedule=job["random_schedule"],
                           duration_s=job["duration_s"])
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        outcome = run_seed(job["seed"], config, out_root)
        cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
        result = {"seed": job["seed"], "sha": outcome.history_sha256, "broken": outcome.broken, "cpu_s": cpu_s,
                  "wall_s": wall_s, "simulated_s": outcome.simulated_s, "ops": outcome.ops}
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


@dataclass
class Worker:
    label: str
    checkout: Path
    process: subprocess.Popen[str]

    @classmethod
    def start(cls, label: str, checkout: Path, python: str, out_root: Path) -> Worker:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        process = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", str(out_root)], env=env, cwd=str(checkout),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        return cls(label, checkout, process)

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(job) + "\n")
        stdin.flush()
        return _read_result(stdout, self.label)

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # a worker between seeds exits at once
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # one in the middle of a seed: no need to finish it
            self.process.kill()
            self.process.wait()


def _read_result(stdout: IO[str], label: str) -> dict[str, Any]:
    for line in stdout:
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])  # type: ignore[no-any-return]
    raise RuntimeError(f"the {label} worker exited without a result")


def compare(args: argparse.Namespace) -> int:
    from kvstore.sim.sweep import parse_seeds, pick

    seeds = parse_seeds(args.seeds)
    baseline_checkout = Path(args.baseline_checkout).resolve()
    if not (baseline_checkout / "kvstore" / "sim" / "sweep.py").is_file():
        raise SystemExit(f"bench_sim: {baseline_checkout} is not a kvstore checkout with a simulator")
    print(f"kvstore bench_sim: this checkout {REPO} (commit {_commit(REPO)}) vs baseline {baseline_checkout} "
          f"(commit {_commit(baseline_checkout)}); {len(seeds)} seeds ({args.seeds}), {args.duration:g} s of workload "
          f"per seed, run alternately one at a time; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)
    out_root = Path(tempfile.mkdtemp(prefix="kvstore-bench-sim-"))
    # A stopped benchmark (SIGTERM) still stops its workers and removes their files (the finally below).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workers = {
        "baseline": Worker.start("baseline", baseline_checkout, args.baseline_python or sys.executable,
                                 out_root / "baseline"),
        "this": Worker.start("this", REPO, sys.executable, out_root / "this"),
    }
    results: dict[str, list[dict[str, Any]]] = {"baseline": [], "this": []}
    modes: list[str] = []
    started = time.perf_counter()
    try:
        for i, seed in enumerate(seeds):
            chosen = pick(seed)
            modes.append(chosen.mode)
            job = {"seed": seed, "mode": chosen.mode, "scenario": chosen.scenario,
                   "random_schedule": chosen.random_schedule, "duration_s": args.duration}
            order = ("baseline", "this") if i % 2 == 0 else ("this", "baseline")
            for label in order:
                results[label].append(workers[label].run(job))
            base, this = results["baseline"][-1], results["this"][-1]
            if args.verbose:
                same = "same" if base["sha"] == this["sha"] else "DIFFERENT"
                print(f"  seed {seed:>5} {chosen.mode:>12} {chosen.scenario:>18}: cpu {base['cpu_s']:.2f} s -> "
                      f"{this['cpu_s']:.2f} s, history {same}", flush=True)
    finally:
        for w in workers.values():
            w.stop()
        shutil.rmtree(out_root, ignore_errors=True)
    total_s = time.perf_counter() - started

    def figures(label: str) -> tuple[float, float, float, int]:
        rows = results[label]
        cpu = sum(r["cpu_s"] for r in rows) / len(rows)
        wall = sum(r["wall_s"] for r in rows) / len(rows)
        return cpu, wall, 1.0 / wall, sum(1 for r in rows if r["broken"])

    print(f"{'checkout':10} {'seeds':>5} {'cpu s/seed':>10} {'wall s/seed':>11} {'seeds/s':>8} {'broken':>6} "
          f"{'1000 seeds, --jobs 2, idle 2 cores':>36}")
    for label in ("baseline", "this"):
        cpu, wall, rate, broken = figures(label)
        projected = 1000 * cpu / 2
        print(f"{label:10} {len(seeds):>5} {cpu:>10.3f} {wall:>11.3f} {rate:>8.3f} {broken:>6} "
              f"{projected / 60:>29.1f} min")
    base_cpu, base_wall, base_rate, _ = figures("baseline")
    this_cpu, this_wall, this_rate, _ = figures("this")
    print(f"ratio (baseline / this): CPU per seed {base_cpu / this_cpu:.2f}x less, seeds/s {this_rate / base_rate:.2f}x "
          f"more (same run, same seeds, alternating)")
    for mode in dict.fromkeys(modes):
        idx = [i for i, m in enumerate(modes) if m == mode]
        b = sum(results["baseline"][i]["cpu_s"] for i in idx) / len(idx)
        t = sum(results["this"][i]["cpu_s"] for i in idx) / len(idx)
        print(f"  {mode:>12}: {len(idx):>3} seeds, cpu s/seed {b:.3f} -> {t:.3f} ({b / t:.2f}x)")
    differ = [r["seed"] for r, s in zip(results["baseline"], results["this"], strict=True) if r["sha"] != s["sha"]]
    print(f"histories: {len(seeds) - len(differ)}/{len(seeds)} seeds gave the same hash in both checkouts"
          + (f" (different: {differ[:20]}{' ...' if len(differ) > 20 else ''})" if differ else ""))
    for label in ("baseline", "this"):
        for r in results[label]:
            if r["broken"]:
                print(f"  {label}: seed {r['seed']} broken: {r['broken'][0]}")
    print(f"both in {total_s:.1f} s; load average {os.getloadavg()[0]:.2f} at the end")
    if args.expect_same_histories and differ:
        print(f"HISTORIES DIFFER on {len(differ)} seed(s), and --expect-same-histories was given", file=sys.stderr)
        return 1
    return 0


# --- without a baseline checkout: one worker vs --jobs workers ------------------------------------------------


def _row(label: str, result: Any, base: Any | None) -> str:
    simulated = sum(o.simulated_s for o in result.outcomes)
    sim_rate = simulated / result.elapsed_s
    if base is not None:
        base_rate = sum(o.simulated_s for o in base.outcomes) / base.elapsed_s
        ratio = f"{result.seeds_per_s / base.seeds_per_s:6.2f}x {sim_rate / base_rate:6.2f}x"
    else:
        ratio = f"{'1.00x':>7} {'1.00x':>7}"
    ops = sum(o.ops for o in result.outcomes)
    return (f"{label:12} {len(result.outcomes):>5} {result.elapsed_s:>8.1f} {result.seeds_per_s:>8.3f} "
            f"{sim_rate:>10.2f} {ops:>7} {len(result.broken):>6}  {ratio}")


def jobs_scaling(args: argparse.Namespace) -> int:
    from kvstore.sim.run import SimConfig
    from kvstore.sim.sweep import parse_seeds, sweep

    seeds = parse_seeds(args.seeds)
    if args.jobs < 2:
        raise SystemExit("bench_sim: --jobs must be at least 2 (one worker is the baseline)")
    base_config = SimConfig(duration_s=args.duration)
    print(f"kvstore bench_sim: commit {_commit(REPO)}, {len(seeds)} seeds ({args.seeds}), {args.duration:g} s of "
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seeds", default="1..8", help="seeds to run (default 1..8)")
    parser.add_argument("--duration", type=float, default=8.0, help="simulated seconds of workload per seed")
    parser.add_argument("--baseline-checkout", help="an older checkout to compare with, seed by seed")
    parser.add_argument("--baseline-python", help="the Python that runs the baseline (default: this one)")
    parser.add_argument("--expect-same-histories", action="store_true",
                        help="with --baseline-checkout: exit 1 unless every seed's history hash is equal in both")
    parser.add_argument("--verbose", action="store_true", help="with --baseline-checkout: one line per seed")
    parser.add_argument("--jobs", type=int, default=2, help="without --baseline-checkout: workers of the parallel sweep")
    args = parser.parse_args(argv)
    if args.baseline_checkout:
        return compare(args)
    return jobs_scaling(args)


if __name__ == "__main__":
    sys.exit(main())
