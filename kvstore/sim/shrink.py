"""``kvstore sim --seed S --shrink``: reduce a failing simulated run to a minimal one that fails the same way.

Theory of operation
-------------------
A simulated run is a pure function of ``(seed, SimConfig)`` (``kvstore.sim.run``), so a smaller
config with the same seed is a new, exactly replayable run.  Shrinking searches the configs
below the failing one for a small one that still *fails the same way*: its verdict breaks the
same promise(s) (``failure_kinds``: "acknowledged write lost", "not linearizable", "error logged
by a node", "simulation failed (deadlock)" ...; the counts may differ).

The inputs reduced, in this order, each against the best failing config found so far:

1. the fault schedule: the run's schedule is first made explicit (``SimConfig.faults``: the
   nemesis's fixed or random windows for this seed; the history is byte-identical), then its
   windows are delta-debugged with ``ddmin`` (Zeller and Hildebrandt, "Simplifying and
   isolating failure-inducing input", TSE 2002): try halves, then their complements, then
   finer splits, down to single windows removed one by one;
2. the numbers: clients, keys, the request rate, each fault window's length and the run's
   duration (the last three: the number of operations) by ``shrink_int``: the minimum first, then a bisection between the
   last passing and the last failing value.  The predicate need not be monotonic; the result
   always failed when it was run.

A smaller input is adopted even when its history is not shorter (fewer clients at the same total
rate make about as many operations); the later reductions (rate, window, duration) shorten it.
Then the reductions repeat once if the first pass changed anything.  Every candidate is one
``run_sim``; results are cached by config.  The search is bounded by ``max_runs`` and
``max_wall_s`` (checked before each run: a run is never cut half-way); when a bound is hit the
best failing config so far is the answer.  The minimal config is finally re-run once more from
its replay command's options, and its verdict and history hash are reported with it.

``ddmin`` and ``shrink_int`` are pure (a predicate in, a failing input out) and table-tested.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from kvstore.sim.run import FaultWindow, SimConfig, SimResult, fault_windows_text, replay_command, run_sim
from kvstore.sim.vloop import SimError

T = TypeVar("T")

DURATION_STEP_S = 0.1  # the resolution of shortened windows and durations


class ShrinkBudgetExhausted(Exception):
    """The search reached its bound on runs or wall time."""


# --- pure search ----------------------------------------------------------------------------------


def _split(items: Sequence[T], parts: int) -> list[list[T]]:
    """``items`` in ``parts`` contiguous chunks as equal as possible (the first ones longer)."""
    assert 1 <= parts <= len(items)
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


def ddmin(items: Sequence[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """Zeller's ddmin: a 1-minimal failing sublist of ``items`` (order kept).

    ``fails(items)`` is assumed true.  The empty list is tried first (cheapest answer).  The
    result fails, and removing any single element of it does not (1-minimality), unless the
    predicate raises (e.g. ``ShrinkBudgetExhausted``), which propagates to the caller."""
    current = list(items)
    if current and fails([]):
        return []
    parts = 2
    while len(current) >= 2:
        chunks = _split(current, min(parts, len(current)))
        for chunk in chunks:
            if fails(chunk):
                current, parts = chunk, 2
                break
        else:
            for i in range(len(chunks)):
                complement = [x for j, c in enumerate(chunks) if j != i for x in c]
                if fails(complement):
                    current, parts = complement, max(parts - 1, 2)
                    break
            else:
                if parts >= len(current):
                    break
                parts = min(len(current), parts * 2)
    return current


def shrink_int(value: int, minimum: int, fails: Callable[[int], bool]) -> int:
    """The smallest failing value found between ``minimum`` and ``value`` (``fails(value)`` assumed).

    Tries ``minimum``, then bisects between the largest value seen passing and the smallest seen
    failing; with a monotonic predicate that is the least failing value."""
    assert minimum <= value
    if value == minimum or fails(minimum):
        return minimum
    passing, failing = minimum, value
    while failing - passing > 1:
        middle = (passing + failing) // 2
        if fails(middle):
            failing = middle
        else:
            passing = middle
    return failing


# --- what "failing the same way" means ---------------------------------------------------------------

_KIND_PATTERNS = (
    ("not linearizable", re.compile(r"^not linearizable")),
    ("acknowledged write lost", re.compile(r"acknowledged write\(s\) lost")),
    ("error logged by a node", re.compile(r"error\(s\) logged by the nodes")),
)


def failure_kinds(broken: Sequence[str]) -> frozenset[str]:
    """The kinds of broken promises in a verdict, without their counts."""
    kinds = set()
    for reason in broken:
        match = next((kind for kind, pattern in _KIND_PATTERNS if pattern.search(reason)), None)
        if match is None:
            failed = re.match(r"^(simulation failed \([^)]*\))", reason)
            match = failed.group(1) if failed else reason
        kinds.add(match)
    return frozenset(kinds)


# --- the shrinker -------------------------------------------------------------------------------------


@dataclass
class Attempt:
    config: SimConfig
    broken: list[str]
    ops: int
    events: int
    history_sha256: str | None
    wall_s: float


@dataclass
class ShrinkResult:
    seed: int
    original: Attempt
    minimal: Attempt
    confirmed: Attempt  # the minimal config run once more (what its replay command runs)
    target: frozenset[str]
    runs: int
    wall_s: float
    budget_exhausted: bool
    out_dir: Path
    steps: list[str] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return failure_kinds(self.confirmed.broken) == self.target

    @property
    def replay(self) -> str:
        return replay_command(self.seed, self.minimal.config) + " --json"

    def to_json(self) -> dict[str, Any]:
        def attempt(a: Attempt) -> dict[str, Any]:
            c = a.config
            return {
                "duration_s": c.duration_s, "clients": c.clients, "keys": c.keys, "rate_per_s": c.rate_per_s,
                "faults": fault_windows_text(c.faults) if c.faults is not None else None,
                "ops": a.ops, "events": a.events, "broken": a.broken, "history_sha256": a.history_sha256,
                "replay": replay_command(self.seed, c),
            }

        return {
            "seed": self.seed, "mode": self.original.config.mode, "nemesis": self.original.config.scenario,
            "failure": sorted(self.target), "original": attempt(self.original), "minimal": attempt(self.minimal),
            "replayed": {"broken": self.confirmed.broken, "history_sha256": self.confirmed.history_sha256,
                         "same_failure": self.reproduced},
            "runs": self.runs, "wall_s": round(self.wall_s, 2), "budget_exhausted": self.budget_exhausted,
            "steps": self.steps, "replay": self.replay, "history": str(self.out_dir / "minimal" / "history.jsonl"),
        }


def _attempt(seed: int, config: SimConfig, out_dir: Path) -> Attempt:
    started = time.perf_counter()
    try:
        result: SimResult = run_sim(seed, config, out_dir)
    except SimError as exc:  # a deadlock or a passed budget: a failure kind of its own
        return Attempt(config, [f"simulation failed ({type(exc).__name__}): {exc}"], 0, 0, None,
                       time.perf_counter() - started)
    except Exception as exc:  # a crash or failed assertion of the run is a finding too (as in a sweep)
        return Attempt(config, [f"simulation failed (crash: {type(exc).__name__}): {exc}"], 0, 0, None,
                       time.perf_counter() - started)
    ops = sum(1 for e in result.events if e.get("type") == "invoke" and e.get("process") != "nemesis")
    return Attempt(config, list(result.broken), ops, len(result.events), result.history_sha256, result.wall_s)


class Shrinker:
    def __init__(self, seed: int, original: Attempt, work_dir: Path, max_runs: int, max_wall_s: float,
                 say: Callable[[str], None] | None = None) -> None:
        self.seed = seed
        self.target = failure_kinds(original.broken)
        assert self.target, "only a failing run can be shrunk"
        self.best = original
        self.work_dir = work_dir
        self.max_runs = max_runs
        self.max_wall_s = max_wall_s
        self.runs = 0
        self.started = time.perf_counter()
        self.cache: dict[SimConfig, bool] = {original.config: True}
        self.failures: dict[SimConfig, Attempt] = {original.config: original}
        self.say = say or (lambda line: None)
        self.steps: list[str] = []

    def fails(self, config: SimConfig) -> bool:
        """Run ``config`` (unless cached): true iff it broke the same promises (then it is kept in
        ``failures``).  Raises ``ShrinkBudgetExhausted`` instead of running past a bound."""
        if config in self.cache:
            return self.cache[config]
        if self.runs >= self.max_runs or time.perf_counter() - self.started >= self.max_wall_s:
            raise ShrinkBudgetExhausted
        self.runs += 1
        out = self.work_dir / f"run-{self.runs}"
        attempt = _attempt(self.seed, config, out)
        shutil.rmtree(out, ignore_errors=True)
        same = failure_kinds(attempt.broken) == self.target
        self.cache[config] = same
        if same:
            self.failures[config] = attempt
        self.say(f"  run {self.runs}: {_describe(config)}: {attempt.ops} ops: "
                 f"{'fails the same way' if same else 'passes' if not attempt.broken else 'fails differently'}")
        return same

    def shrink(self) -> bool:
        """Reduce ``self.best``; return whether the budget ran out."""
        try:
            for _ in range(2):
                before = self.best.config
                self._pass()
                if self.best.config == before:
                    break
        except ShrinkBudgetExhausted:
            return True
        return False

    def _step(self, name: str, candidate: SimConfig) -> None:
        if candidate != self.best.config:
            self.steps.append(f"{name}: {_describe(candidate)}")

    def _pass(self) -> None:
        base = self.best.config
        assert base.faults is not None
        windows = ddmin(base.faults, lambda ws: self.fails(replace(self.best.config, faults=tuple(ws))))
        self._settle("faults", replace(self.best.config, faults=tuple(windows)))
        clients = shrink_int(self.best.config.clients, 1, lambda v: self.fails(replace(self.best.config, clients=v)))
        self._settle("clients", replace(self.best.config, clients=clients))
        keys = shrink_int(self.best.config.keys, 1, lambda v: self.fails(replace(self.best.config, keys=v)))
        self._settle("keys", replace(self.best.config, keys=keys))
        rate = shrink_int(int(self.best.config.rate_per_s), 1,
                          lambda v: self.fails(replace(self.best.config, rate_per_s=float(v))))
        if rate < self.best.config.rate_per_s:
            self._settle("rate", replace(self.best.config, rate_per_s=float(rate)))
        faults = self.best.config.faults
        assert faults is not None
        for i in range(len(faults)):
            self._shorten_window(i)
        self._shorten_duration()

    def _settle(self, name: str, candidate: SimConfig) -> None:
        """Adopt a reduction's answer (ddmin and shrink_int answer with an input seen failing)."""
        assert candidate in self.failures, f"{name}: the answer was not seen failing"
        self._step(name, candidate)
        self.best = self.failures[candidate]

    def _shorten_window(self, i: int) -> None:
        config = self.best.config
        assert config.faults is not None
        w = config.faults[i]
        steps = _steps(w.end_s - w.start_s)

        def with_length(n: int) -> SimConfig:
            windows = list(config.faults or ())
            windows[i] = FaultWindow(w.start_s, round(w.start_s + n * DURATION_STEP_S, 3), w.kinds)
            return replace(config, faults=tuple(windows))

        n = shrink_int(steps, 1, lambda n: self.fails(with_length(n)))
        self._settle(f"window {i + 1}", with_length(n))

    def _shorten_duration(self) -> None:
        config = self.best.config
        floor_s = max((w.end_s for w in config.faults or ()), default=0.0)
        minimum = max(1, _steps(floor_s))
        n = shrink_int(max(minimum, _steps(config.duration_s)), minimum,
                       lambda n: self.fails(replace(config, duration_s=round(n * DURATION_STEP_S, 3))))
        self._settle("duration", replace(config, duration_s=round(n * DURATION_STEP_S, 3)))


def _steps(seconds: float) -> int:
    return max(1, int(round(seconds / DURATION_STEP_S)))


def _describe(config: SimConfig) -> str:
    faults = fault_windows_text(config.faults) if config.faults is not None else "(the nemesis's schedule)"
    return (f"{config.duration_s:g} s, {config.clients} clients, {config.keys} keys, {config.rate_per_s:g} ops/s, "
            f"faults {faults}")


def shrink_run(seed: int, config: SimConfig, out_dir: Path, *, max_runs: int, max_wall_s: float,
               say: Callable[[str], None] | None = None) -> ShrinkResult | Attempt:
    """Shrink the run of ``(seed, config)``; an ``Attempt`` (the original run) if it did not fail."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    original = _attempt(seed, config, out_dir / "original")
    if not original.broken:
        return original
    explicit = replace(config, faults=config.fault_windows(seed), random_schedule=False)
    shrinker = Shrinker(seed, replace(original, config=explicit), out_dir / "candidates", max_runs, max_wall_s, say)
    exhausted = shrinker.shrink()
    shutil.rmtree(out_dir / "candidates", ignore_errors=True)
    confirmed = _attempt(seed, shrinker.best.config, out_dir / "minimal")
    return ShrinkResult(seed, original, shrinker.best, confirmed, shrinker.target, shrinker.runs,
                        time.perf_counter() - started, exhausted, out_dir, shrinker.steps)


def main_shrink(seed: int, config: SimConfig, out: Path | None, *, max_runs: int, max_wall_s: float,
                as_json: bool) -> int:
    import sys

    out_dir = out if out is not None else Path(tempfile.mkdtemp(prefix=f"kvstore-sim-shrink-{seed}-"))

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    say(f"kvstore sim --shrink: seed {seed}, {config.mode} x {config.scenario}: running it once")
    result = shrink_run(seed, config, out_dir, max_runs=max_runs, max_wall_s=max_wall_s, say=say)
    if isinstance(result, Attempt):
        if as_json:
            print(json.dumps({"seed": seed, "verdict": "ok", "broken": [], "ops": result.ops,
                              "history_sha256": result.history_sha256, "shrunk": False}, indent=2))
        else:
            print(f"kvstore sim --shrink: seed {seed} kept its promise ({result.ops} ops): nothing to shrink")
        return 0
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print(result)
    return 1


def _print(r: ShrinkResult) -> None:
    o, m, c = r.original, r.minimal, r.confirmed
    print(f"kvstore sim --shrink: seed {r.seed}, {o.config.mode} x {o.config.scenario}: "
          f"{', '.join(sorted(r.target))}")
    print(f"  {r.runs} runs in {r.wall_s:.0f} s{' (budget reached: the best so far)' if r.budget_exhausted else ''}")
    print(f"  original: {_describe(replace(o.config, faults=o.config.fault_windows(r.seed)))}")
    print(f"            {o.ops} ops, {o.events} history events: {'; '.join(o.broken)}")
    print(f"  minimal:  {_describe(m.config)}")
    print(f"            {m.ops} ops, {m.events} history events: {'; '.join(m.broken)}")
    for step in r.steps:
        print(f"    {step}")
    print(f"  replayed: {'; '.join(c.broken) or 'ok'} (sha256 {c.history_sha256}): "
          f"{'same failure' if r.reproduced else 'DID NOT REPRODUCE'}")
    print(f"history: {r.out_dir / 'minimal' / 'history.jsonl'}")
    print(f"replay: {r.replay}")
