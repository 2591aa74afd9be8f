"""A seed sweep: many simulated runs, each shaped by its seed, in parallel worker processes.

Theory of operation
-------------------
``kvstore sim --seeds 1..1000`` is the VOPR / FoundationDB way of testing: every seed is one
complete simulated chaos run (``kvstore.sim.run.run_sim``), and the seed alone picks what the
run exercises: the consistency mode (over every mode of ``kvstore.harness.workload.MODES``), the nemesis
(over every scenario of ``kvstore.harness.runner.SCENARIOS``; the simulator runs them all) and whether
the fault windows are the fixed ones or random ones drawn from the seed (``pick``).  The pick
comes from its own ``random.Random`` seeded with the seed, so it is the same in every process and
on every machine, and a seed's replay command (``kvstore sim --seed S --mode M --nemesis X``)
names the run exactly.  ``--mode`` / ``--nemesis`` restrict the pick to one of each.

A seed *breaks* when its run breaks its mode's promise (``SimResult.broken``: a linearizable
history judged non-linearizable, an acknowledged write lost under siblings, an error logged by a
node), or when the run could not finish: a deadlock or a passed budget (``SimError``), any other
exception of the simulation (a crash, a failed assertion), or a worker that passed the wall-clock
limit of one seed (a pure-Python loop that never yields to the event loop; the simulated-time
and step budgets bound everything else).  Each broken seed is reported with its replay command,
and its history is kept (``--out``); the histories of seeds that kept their promise are deleted.

Seeds run in a ``ProcessPoolExecutor`` (``--jobs``, default ``os.cpu_count()``; processes are
spawned, not forked, so a worker never inherits the parent's progress thread; each exits if the
parent is killed: ``kvstore.lifeline``).  A seed's result
does not depend on which worker ran it or what ran there before: ``run_sim`` builds a fresh
loop, cluster and rngs per run.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import random
import re
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from kvstore.harness.runner import SCENARIOS
from kvstore.harness.workload import MODES
from kvstore.lifeline import exit_with_parent
from kvstore.sim import vloop
from kvstore.sim.run import SimConfig, replay_command, run_sim
from kvstore.sim.vloop import SimDeadlock, SimError

MAX_SEEDS = 1_000_000
SEED_WALL_LIMIT_S = 600.0  # one run takes seconds; this only catches a worker stuck outside the event loop

_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")


class SeedSpecError(ValueError):
    """A ``--seeds`` argument that is not a list of seeds and ``A..B`` ranges."""


def parse_seeds(text: str) -> list[int]:
    """``"1..1000"`` (inclusive), ``"3,8,21"``, or a mix (``"1..10,42"``); duplicates dropped, order kept."""
    seeds: dict[int, None] = {}
    for part in text.split(","):
        if not part.strip():
            raise SeedSpecError(f"empty item in seed list {text!r}")
        match = _RANGE.match(part)
        if match:
            low, high = int(match.group(1)), int(match.group(2))
            if high < low:
                raise SeedSpecError(f"empty seed range {part.strip()!r} (write low..high)")
            if high - low + 1 + len(seeds) > MAX_SEEDS:
                raise SeedSpecError(f"more than {MAX_SEEDS} seeds")
            seeds.update(dict.fromkeys(range(low, high + 1)))
            continue
        try:
            seeds[int(part)] = None
        except ValueError:
            raise SeedSpecError(f"not a seed or a low..high range: {part.strip()!r}") from None
        if len(seeds) > MAX_SEEDS:
            raise SeedSpecError(f"more than {MAX_SEEDS} seeds")
    return list(seeds)


@dataclass(frozen=True)
class Pick:
    mode: str
    scenario: str
    random_schedule: bool


def pick(seed: int, modes: list[str] | None = None, scenarios: list[str] | None = None) -> Pick:
    """What the run of ``seed`` exercises (module docstring); the same in every process."""
    rng = random.Random(f"sweep:{seed}")
    mode = rng.choice(modes or list(MODES))
    scenario = rng.choice(scenarios or list(SCENARIOS))
    return Pick(mode, scenario, rng.random() < 0.5)


@dataclass
class SeedOutcome:
    """The result of one seed of a sweep (what a worker sends back)."""

    seed: int
    config: SimConfig
    broken: list[str]
    history_sha256: str | None = None
    ops: int = 0
    simulated_s: float = 0.0
    wall_s: float = 0.0
    out_dir: str | None = None  # kept only for a broken seed
    failure: str | None = None  # how the simulation itself failed (deadlock, crash, ...), if it did
    details: list[str] = field(default_factory=list)  # e.g. the traceback of a crash

    @property
    def ok(self) -> bool:
        return not self.broken

    @property
    def replay(self) -> str:
        return replay_command(self.seed, self.config)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "mode": self.config.mode, "nemesis": self.config.scenario,
            "random_schedule": self.config.random_schedule, "verdict": "ok" if self.ok else "broken",
            "broken": self.broken, "failure": self.failure, "history_sha256": self.history_sha256,
            "ops": self.ops, "simulated_s": round(self.simulated_s, 3), "wall_s": round(self.wall_s, 3),
            "replay": self.replay, "out": self.out_dir, "details": self.details,
        }


class SeedWallLimit(Exception):
    """A worker passed the wall-clock limit of one seed and never got back to the event loop."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    reason = f"the run passed the wall-clock limit of {SEED_WALL_LIMIT_S:.0f} s for one seed"
    if vloop.aborting():
        # Asked once and the loop never took another step: stuck outside it (raising may then be
        # swallowed where it lands, but there is nothing else left to try).
        raise SeedWallLimit(reason)
    vloop.request_abort(reason)  # the loop raises SimAborted at its next step: reliable
    signal.setitimer(signal.ITIMER_REAL, 5.0)


def run_seed(seed: int, config: SimConfig, out_root: str, wall_limit_s: float = SEED_WALL_LIMIT_S) -> SeedOutcome:
    """One seed of a sweep (in a worker process): its run, judged; never raises for a broken run."""
    out_dir = Path(out_root) / f"seed-{seed}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    started = time.perf_counter()
    vloop.clear_abort()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, wall_limit_s)
    try:
        result = run_sim(seed, config, out_dir)
    except SimError as exc:
        kind = ("deadlock" if isinstance(exc, SimDeadlock)
                else "hung" if isinstance(exc, vloop.SimAborted) else "budget exceeded")
        outcome = SeedOutcome(seed, config, [f"simulation failed ({kind}): {exc}"], failure=kind)
    except Exception as exc:  # a crash or failed assertion of the run is a finding (or SeedWallLimit)
        kind = "hung" if isinstance(exc, SeedWallLimit) else "crash"
        tail = traceback.format_exception(exc)[-6:]
        outcome = SeedOutcome(seed, config, [f"simulation failed ({kind}): {type(exc).__name__}: {exc}"],
                              failure=kind, details=[line.rstrip() for line in tail])
    else:
        ops = sum(1 for e in result.events if e.get("type") == "invoke" and e.get("process") != "nemesis")
        outcome = SeedOutcome(seed, config, list(result.broken), result.history_sha256, ops,
                              result.simulated_s, result.wall_s)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        vloop.clear_abort()
    if outcome.wall_s == 0.0:
        outcome.wall_s = time.perf_counter() - started
    if outcome.ok:
        shutil.rmtree(out_dir, ignore_errors=True)
    else:
        outcome.out_dir = str(out_dir) if out_dir.exists() else None
    return outcome


@dataclass
class SweepResult:
    outcomes: list[SeedOutcome]  # in seed order
    jobs: int
    elapsed_s: float

    @property
    def broken(self) -> list[SeedOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def seeds_per_s(self) -> float:
        return len(self.outcomes) / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": len(self.outcomes), "broken_seeds": len(self.broken), "jobs": self.jobs,
            "elapsed_s": round(self.elapsed_s, 2), "seeds_per_s": round(self.seeds_per_s, 3),
            "broken": [o.to_json() for o in self.broken], "results": [o.to_json() for o in self.outcomes],
        }


def seed_configs(seeds: list[int], base: SimConfig, modes: list[str] | None,
                 scenarios: list[str] | None) -> Iterator[tuple[int, SimConfig]]:
    for seed in seeds:
        chosen = pick(seed, modes, scenarios)
        yield seed, replace(base, mode=chosen.mode, scenario=chosen.scenario, random_schedule=chosen.random_schedule)


def sweep(
    seeds: list[int], base: SimConfig, out_root: Path, *, jobs: int, modes: list[str] | None = None,
    scenarios: list[str] | None = None, on_done: Callable[[SeedOutcome], None] | None = None,
    wall_limit_s: float = SEED_WALL_LIMIT_S,
) -> SweepResult:
    """Run every seed (module docstring); ``on_done`` sees each outcome as it arrives."""
    assert jobs >= 1
    out_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outcomes: dict[int, SeedOutcome] = {}
    context = multiprocessing.get_context("spawn")
    # Workers exit if this process is killed (kvstore.lifeline): else they run on, orphaned.
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=exit_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_seed, seed, config, str(out_root), wall_limit_s): (seed, config)
                   for seed, config in seed_configs(seeds, base, modes, scenarios)}
        for future in concurrent.futures.as_completed(futures):
            seed, config = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # the worker itself died (killed, out of memory, ...)
                outcome = SeedOutcome(seed, config, [f"worker process failed: {type(exc).__name__}: {exc}"],
                                      failure="worker died")
            outcomes[seed] = outcome
            if on_done is not None:
                on_done(outcome)
    return SweepResult([outcomes[s] for s in seeds], jobs, time.perf_counter() - started)
