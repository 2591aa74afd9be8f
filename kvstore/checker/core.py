"""``check()``: a whole history in, a ``Result`` out (per-key verdicts and the analyses).

Theory of operation
-------------------
Linearizability is *local* (Herlihy & Wing) and, for a map of independent registers,
P-compositional (Horn & Kroening, 2015): a history is linearizable iff each key's sub-history
is.  So we split by key and run the WGL search (``wgl.py``) once per key.  Keys climb a ladder
of budgets (5k, 50k, 500k cache entries, then the full budget), the way Porcupine's parallel
checker stops at the first failing partition:

* most keys are decided in milliseconds on the first rung, and a violation is usually found
  there; unless ``exhaustive`` is set, once a key is invalid the history is invalid, the
  ladder stops and the unfinished keys say ``unknown`` with the reason;
* hard keys run in worker processes when there is more than one CPU (a spawn-safe
  ``ProcessPoolExecutor``): starting one costs ~0.3 s (seconds on a loaded machine), so only
  where it pays -- the last rung with at least two keys left (each resisted 500k states, about
  a second), the 500k rung with at least four, never the small rungs (even a history of 20k
  ops on a few keys checks in a fraction of a second serially).  Workers share a stop event,
  so the first invalid key stops the others.  If worker processes cannot start, the same work
  runs serially.

In this process a key's search is kept between rungs and resumed (up to ``RETAIN_STATES``
cached states in all); a key moved to a worker starts over there, which redoes at most a
quarter of the last rung's work.  A single key skips the ladder: there is no other key to stop
early for.

Verdict of the history: ``false`` if any key is invalid, else ``unknown`` if any key ran out
of budget, else ``true``.  Time is read only through ``wgl.deadline_after`` (monotonic).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvstore.checker import analysis
from kvstore.checker import history as history_mod
from kvstore.checker.history import History, HistoryFormatError, Op, freeze, thaw
from kvstore.checker.models import UNSET, Model, ModelError, guess_model, make_model
from kvstore.checker.wgl import DEFAULT_MAX_STATES, KeyResult, Search, check_ops, deadline_after

STAGE_STATES = (5_000, 50_000, 500_000)  # the budget ladder before the full budget (cache entries)
RETAIN_STATES = 2_000_000  # cached states kept alive between rungs, over all keys
PARALLEL_STATES = 500_000  # rungs this big (about a second per key) are worth worker processes


class Verdict(StrEnum):
    TRUE = "true"
    FALSE = "false"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


@dataclass
class Result:
    valid: Verdict
    model: str
    initial: Any
    keys: list[KeyResult]  # in order of first appearance in the history
    analyses: analysis.Analyses
    history: History = field(repr=False)
    seconds: float = 0.0
    stage_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 valid, 1 invalid, 2 unknown (as Maelstrom)."""
        return {Verdict.TRUE: 0, Verdict.FALSE: 1, Verdict.UNKNOWN: 2}[self.valid]

    def key_result(self, key: Hashable) -> KeyResult:
        for kr in self.keys:
            if kr.key == key:
                return kr
        raise KeyError(key)

    @property
    def invalid_keys(self) -> list[KeyResult]:
        return [kr for kr in self.keys if kr.verdict == "invalid"]

    @property
    def unknown_keys(self) -> list[KeyResult]:
        return [kr for kr in self.keys if kr.verdict == "unknown"]

    def op(self, op_id: int) -> Op:
        return self.history.ops[op_id]

    def explain(self, kr: KeyResult) -> str:
        """Why a key is not linearizable, in words."""
        ce = kr.counterexample
        if kr.verdict != "invalid" or ce is None:
            return ""
        stuck = self.op(ce.stuck)
        others = [self.op(i) for i in ce.pending if i != ce.stuck]
        text = (
            f"the search linearized at most {len(ce.prefix)} ops (the longest linearizable prefix, leaving "
            f"the value {history_mod._show(ce.state)}); then op #{stuck.id} `{stuck.describe()}` by process "
            f"{stuck.process} (line {stuck.line}) must take effect before it completes, and no op still "
            "pending can make that legal"
        )
        if others:
            shown = ", ".join(f"#{o.id} `{o.describe()}`" for o in others[:8])
            more = f" and {len(others) - 8} more" if len(others) > 8 else ""
            text += f" (pending: {shown}{more})"
        hint = self._writers_hint(stuck)
        return f"{text}; {hint}" if hint else text

    def _writers_hint(self, op: Op) -> str:
        """For a read: which ops could have produced what it returned."""
        if op.f not in ("read", "get") or op.type != "ok":
            return ""
        if any(o.f == "append" for o in self.history.ops if o.key == op.key):
            return ""  # values are built by appends: "who wrote it" has no single answer
        values = op.siblings if op.siblings is not None else (op.result,)
        hints = []
        for value in values:
            end = op.complete if op.complete is not None else self.history.length
            writers = [w for w in self.history.ops if w.key == op.key and w.type != "fail" and w.invoke < end and (
                (w.f in ("write", "put") and w.value == value)
                or (w.f == "delete" and value is None)
                or (w.f == "cas" and isinstance(w.value, tuple) and len(w.value) == 2 and w.value[1] == value))]
            shown = history_mod._show(value)
            if value == self.initial:
                hints.append(f"{shown} is the initial value")
            elif not writers:
                hints.append(f"no op invoked before it completed wrote {shown}")
            else:
                listed = ", ".join(f"#{w.id} `{w.describe()}` (line {w.line})" for w in writers[-3:])
                hints.append(f"{shown} was written by {listed}")
        return "; ".join(hints)

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid.value,
            "model": self.model,
            "initial": thaw(self.initial),
            "format": self.history.format,
            "source": self.history.source,
            "ops": len(self.history.ops),
            "seconds": round(self.seconds, 4),
            "keys": [key_result_to_dict(kr, self) for kr in self.keys],
            "analyses": self.analyses.to_dict(),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=repr)


def op_to_dict(op: Op) -> dict[str, Any]:
    return {
        "id": op.id,
        "process": op.process,
        "f": op.f,
        "key": thaw(op.key),
        "value": thaw(op.value),
        "type": op.type,
        "result": thaw(op.result),
        "siblings": thaw(op.siblings) if op.siblings is not None else None,
        "invoke": op.invoke,
        "complete": op.complete,
        "line": op.line,
        "node": op.node,
        "description": op.describe(),
    }


def key_result_to_dict(kr: KeyResult, result: Result) -> dict[str, Any]:
    out: dict[str, Any] = {
        "key": thaw(kr.key),
        "verdict": kr.verdict,
        "ops": kr.ops,
        "explored": kr.explored,
        "pruned": kr.pruned,
        "seconds": round(kr.seconds, 4),
    }
    if kr.reason:
        out["reason"] = kr.reason
    ce = kr.counterexample
    if ce is not None:
        out["counterexample"] = {
            "explanation": result.explain(kr),
            "not_linearizable": [op_to_dict(result.op(i)) for i in ce.pending],
            "stuck_op": ce.stuck,
            "longest_linearizable_prefix": [
                {**op_to_dict(result.op(i)), "state_after": thaw(s)} for i, s in zip(ce.prefix, ce.states, strict=True)
            ],
            "state": thaw(ce.state),
        }
    return out


# --- scheduling -------------------------------------------------------------------------------

_STOP: Any = None  # a multiprocessing Event in worker processes
Task = tuple[Hashable, list[Op], Model, int, float | None]  # key, ops, model, max states, seconds


def _init_worker(stop: Any) -> None:
    global _STOP
    _STOP = stop


def _worker_check(task: Task) -> KeyResult:
    """One key in a worker process (top-level, so the spawn start method can find it)."""
    key, ops, model, max_states, time_limit_s = task
    timer = deadline_after(time_limit_s)
    stop = _STOP

    def deadline() -> bool:
        return timer() or (stop is not None and stop.is_set())

    started = time.monotonic()
    kr = check_ops(key, ops, model, deadline, max_states)
    kr.seconds = time.monotonic() - started
    if kr.verdict == "unknown" and stop is not None and stop.is_set():
        kr.reason = "stopped: another key is already invalid"
    return kr


class _Searches:
    """Serial runs keep each key's search between rungs, so a rung continues the last one
    instead of starting over -- up to ``RETAIN_STATES`` cached states in all (memory)."""

    def __init__(self) -> None:
        self.kept: dict[Hashable, Search] = {}

    def run(self, task: Task) -> KeyResult:
        key, ops, model, max_states, time_limit_s = task
        search = self.kept.pop(key, None) or Search(key, ops, model)
        started = time.monotonic()
        kr = search.run(max_states, deadline_after(time_limit_s))
        kr.seconds = time.monotonic() - started
        if kr.verdict == "unknown" and sum(s.explored for s in self.kept.values()) + kr.explored <= RETAIN_STATES:
            self.kept[key] = search
        return kr

    def forget(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            self.kept.pop(key, None)


def _run_serial(tasks: Sequence[Task], stop_on_invalid: bool, searches: _Searches) -> list[KeyResult]:
    results: list[KeyResult] = []
    for task in tasks:
        if stop_on_invalid and any(kr.verdict == "invalid" for kr in results):
            results.append(KeyResult(task[0], "unknown", 0, 0, reason="stopped: another key is already invalid"))
            continue
        results.append(searches.run(task))
    return results


def _run(
    tasks: Sequence[Task], workers: int, stop_on_invalid: bool, searches: _Searches | None = None
) -> tuple[list[KeyResult], bool]:
    """(results, whether worker processes were used)."""
    searches = searches or _Searches()
    if workers > 1 and len(tasks) > 1:
        try:
            results = _parallel(tasks, min(workers, len(tasks)), stop_on_invalid)
        except (BrokenProcessPool, RuntimeError, OSError, pickle.PicklingError):
            # e.g. a caller's script without ``if __name__ == "__main__"`` under spawn:
            # the check must still give its answer, only slower.
            pass
        else:
            searches.forget(t[0] for t in tasks)  # the workers started over
            return results, True
    return _run_serial(tasks, stop_on_invalid, searches), False


def _parallel(tasks: Sequence[Task], workers: int, stop_on_invalid: bool) -> list[KeyResult]:
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    results: list[KeyResult] = []
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(stop,)) as pool:
        pending: set[Future[KeyResult]] = {pool.submit(_worker_check, t) for t in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.cancelled():
                    continue
                kr = fut.result()
                results.append(kr)
                if kr.verdict == "invalid" and stop_on_invalid and not stop.is_set():
                    stop.set()
                    for other in pending:
                        other.cancel()
    done_keys = {kr.key for kr in results}
    for task in tasks:
        key = task[0]
        if key not in done_keys:
            results.append(KeyResult(key, "unknown", 0, 0, reason="stopped: another key is already invalid"))
    return results


def check_keys(
    groups: Mapping[Hashable, list[Op]],
    model: Model,
    time_limit_s: float | None = None,
    max_states: int = DEFAULT_MAX_STATES,
    workers: int | None = None,
    exhaustive: bool = False,
) -> tuple[dict[Hashable, KeyResult], dict[str, Any]]:
    """Every key's verdict (see the module docstring for the budget ladder)."""
    cpus = os.cpu_count() or 1
    max_workers = cpus if workers is None else max(1, workers)
    results: dict[Hashable, KeyResult] = {}
    stats: dict[str, Any] = {"stages": [], "parallel": False}
    searches = _Searches()
    undecided = sorted(groups, key=lambda k: len(groups[k]))
    # A single key gains nothing from the ladder (there is no other key to stop early for).
    ladder = [b for b in STAGE_STATES if b < max_states] if len(groups) > 1 else []
    for stage, budget in enumerate([*ladder, max_states]):
        final = stage == len(ladder)
        # Small rungs: most keys take milliseconds, a worker costs more than it saves.  Bigger
        # ones hold keys that resisted 50k (or 500k) states: worth a fork if there are enough.
        parallel = budget >= PARALLEL_STATES and len(undecided) >= (2 if final else 4)
        tasks = [(k, groups[k], model, budget, _remaining(time_limit_s, results.get(k))) for k in undecided]
        batch, used = _run(tasks, max_workers if parallel else 1, final and not exhaustive, searches)
        stats["stages"].append({"states": budget, "keys": len(tasks), "parallel": used})
        stats["parallel"] = stats["parallel"] or used
        for kr in batch:
            before = results.get(kr.key)
            if before is not None:
                kr.seconds += before.seconds
                if kr.ops == 0:  # stopped before it ran: keep the earlier figures
                    kr.ops, kr.explored, kr.pruned = before.ops, before.explored, before.pruned
            results[kr.key] = kr
        undecided = [k for k in undecided if results[k].verdict == "unknown" and results[k].reason != "time limit"]
        if final or not undecided:
            break
        if not exhaustive and any(kr.verdict == "invalid" for kr in results.values()):
            for k in undecided:
                results[k].reason = "not finished: another key is already invalid"
            break
    return results, stats


def _remaining(time_limit_s: float | None, before: KeyResult | None) -> float | None:
    if time_limit_s is None or before is None:
        return time_limit_s
    return max(0.0, time_limit_s - before.seconds)


# --- the entry point --------------------------------------------------------------------------

HistoryLike = History | str | Path | Sequence[Mapping[str, Any]]


def _as_history(history: HistoryLike, fmt: str | None) -> History:
    if isinstance(history, History):
        return history
    if isinstance(history, (str, Path)):
        return history_mod.load(history, fmt)
    if isinstance(history, (list, tuple)):
        return history_mod.from_dicts(list(history))
    raise TypeError(f"history must be a path, a list of op dicts or a History, not {type(history).__name__}")


def validate(history: History, model: Model) -> None:
    """Raise ModelError early (in this process) for ops the model does not have."""
    for op in history.ops:
        if not model.supports(op.f):
            model.compile(op)  # raises with the line and a hint
        if op.f == "cas" and op.type != "fail":
            model.compile(op)


def check(
    history: HistoryLike,
    model: str | Model = "auto",
    initial: Any = UNSET,
    time_limit_s: float | None = None,
    *,
    format: str | None = None,
    workers: int | None = None,
    max_states: int = DEFAULT_MAX_STATES,
    exhaustive: bool = False,
) -> Result:
    """Check a history for linearizability (per key) and run the analyses.

    ``history``: a path (format detected, or ``format``), a list of op dicts in our JSON Lines
    format, or a parsed ``History``.  ``model``: ``register``, ``cas-register``, ``etcd``,
    ``kv`` or ``auto``.  ``time_limit_s`` and ``max_states`` bound the search *per key*; a key
    that exhausts them is ``unknown``.  ``workers``: processes for big checks (None: as many
    as CPUs, 1: never fork).  ``exhaustive``: decide every key even when one is already invalid.
    """
    started = time.monotonic()
    hist = _as_history(history, format)
    if isinstance(model, Model):
        chosen = model if initial is UNSET else Model(model.name, freeze(initial), model.cas,
                                                       model.failed_cas_observes, model.append)
    else:
        name = guess_model(hist) if model == "auto" else model
        chosen = make_model(name, freeze(initial) if initial is not UNSET else UNSET)
    validate(hist, chosen)
    groups = hist.by_key()
    per_key, stats = check_keys(groups, chosen, time_limit_s, max_states, workers, exhaustive)
    keys = [per_key[k] for k in groups]
    if any(kr.verdict == "invalid" for kr in keys):
        verdict = Verdict.FALSE
    elif any(kr.verdict == "unknown" for kr in keys):
        verdict = Verdict.UNKNOWN
    else:
        verdict = Verdict.TRUE
    analyses = analysis.analyse(hist, chosen.initial)
    return Result(verdict, chosen.name, chosen.initial, keys, analyses, hist, time.monotonic() - started, stats)


__all__ = ["HistoryFormatError", "ModelError", "Result", "Verdict", "check", "check_keys"]
