"""The checker, run live: per-key verdicts in windows, and the history's anomalies, as it grows.

Theory of operation
-------------------
A live history never ends, and checking it whole again and again costs more at every round.
So each key is checked in *windows*, the way the history arrives:

* A window of a key ends at a *quiescent point* of that key (every op invoked so far has
  completed, so no op spans the cut) once it holds ``WINDOW_OPS`` completed ops, is
  ``WINDOW_S`` old, or a fault started or stopped (so windows follow the fault's phases).
  The open window is checked as it grows (its in-flight ops count as ``info``: they may take
  effect or not), the closed one a last time, whole.
* The first window of a key starts from the register's real initial value (absent: every
  session writes fresh keys).  A later window starts from an *unknown* value (``UNKNOWN``):
  the first op that observes the register decides it.  Ops whose outcome is unknown (``info``
  writes, cas and deletes) of earlier windows are carried into every later window as
  optional ops: they may still take effect at any time (Jepsen's semantics).
* Sound for "not linearizable": every linearization of the whole history, cut at a window's
  start, is one our window model accepts (the value there is whatever it was; an old
  ``info`` op that took effect earlier may take effect again, which only allows more), so a
  window with no linearization proves the whole key has none.  The converse does not hold:
  a violation that needs ops of two windows to show (a read in one of a value overwritten in
  the previous one) is missed.  So a key's verdict is "not linearizable" (proved, with the
  counterexample) or "no violation found" -- exact only while it has one window.
* Lost writes, stale reads and sibling reads are properties of the whole history (a write is
  lost only if *no later* read saw it), so they are computed on all of it, from ops kept
  between rounds (``kvstore.checker.analysis``, the batch checker's own functions).  A live
  history has no final reads yet: with R = 1 a read on another replica a moment after a write
  often misses it until hinted handoff or read repair copies it.  So a write the analysis
  calls lost counts as *lost* only once it was acknowledged ``LOST_SETTLE_S`` before the
  newest op and no read has seen it since; until then it is *not seen yet*
  (``lost_writes_unsettled``), and a read that sees it later removes it from both.

All of this runs in one worker process (``LiveChecker``, kept between rounds by a
single-worker pool) so the UI's event loop never waits for a search; ``CheckerClient`` is the
event-loop side.  The search and the pictures are the checker's own (``check``,
``report.focus_ops/layout/svg``); only the window model and the bookkeeping are new here.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import Any, Final

from kvstore.checker import analysis, check, report
from kvstore.checker.history import History, NemesisEvent, Op, from_dicts
from kvstore.checker.models import READS, Model, Step, StepFn

WINDOW_OPS = 120  # completed ops of one key that close its window (at the next quiescent point)
WINDOW_S = 15.0  # or this old
CHECK_TIME_LIMIT_S = 2.0  # one window's search; beyond it the window is "unknown"
RECENT_S = 10.0  # "recent" anomalies: completed in the last 10 s of the history
LOST_SETTLE_S = 10.0  # an unseen acknowledged write counts as lost once this old (see above)
MAX_EXAMPLES = 3
FAULT_FS = ("start-", "stop-")
FAULT_EVENTS = frozenset({"kill", "restart", "pause", "resume"})


class _Unknown:
    """The register's value at a window's start: not known until an op observes it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "unknown (the value when the window began)"

    def __reduce__(self) -> str:
        return "UNKNOWN"  # unpickles as this module's singleton


UNKNOWN: Final[Any] = _Unknown()


def _from_unknown(step: Step, op: Op) -> Step:
    """The op's step, also defined from UNKNOWN: a read (of one value) or a cas decides the value."""
    inner = step.fn
    if op.f in READS:
        decided: Any = op.result if op.siblings is None else UNKNOWN  # siblings: any of them; keep it open
    elif op.f == "cas" and isinstance(op.value, tuple) and len(op.value) == 2:
        decided = op.value[1]
    else:
        return step  # writes and deletes do not look at the value

    def fn(state: Any) -> Any:
        return decided if state is UNKNOWN else inner(state)

    stepfn: StepFn = fn
    return replace(step, fn=stepfn)


@dataclass(frozen=True)
class WindowModel(Model):
    """The batch model, starting from UNKNOWN (a window after the first)."""

    def compile(self, op: Op) -> Step | None:
        step = super().compile(op)
        return None if step is None else _from_unknown(step, op)


def model_for(mode: str, first_window: bool) -> Model:
    cas = mode == "linearizable"
    name = "cas-register" if cas else "register"
    return Model(name, None, cas=cas) if first_window else WindowModel(name, UNKNOWN, cas=cas)


# --- one key's windows ------------------------------------------------------------------------


@dataclass
class KeyTrack:
    """A key's current window and what the earlier ones left."""

    key: str
    window: int = 1
    events: list[dict[str, Any]] = field(default_factory=list)  # this window's invokes and completions
    open_invokes: dict[Hashable, dict[str, Any]] = field(default_factory=dict)
    quiet_at: int = 0  # events[:quiet_at] end at a quiescent point
    completed: int = 0  # completed ops in this window
    completed_at_check: int = -1
    started_s: float | None = None
    cut_wanted: bool = False  # a fault started or stopped during this window
    carried: list[dict[str, Any]] = field(default_factory=list)  # invokes of earlier info writes
    windows_checked: int = 0
    invalid_windows: int = 0
    verdict: str = "pending"  # of the current window so far: valid | invalid | unknown | pending
    worst: str = "pending"  # over every window: invalid beats unknown beats valid
    last_invalid_window: int | None = None

    def add(self, event: dict[str, Any]) -> None:
        if self.started_s is None:
            self.started_s = event["time"] / 1e9
        self.events.append(event)
        if event["type"] == "invoke":
            self.open_invokes[event["process"]] = event
            return
        invoke = self.open_invokes.pop(event["process"], None)
        self.completed += 1
        if invoke is not None and event["type"] == "info" and event["f"] in ("write", "cas", "delete"):
            self.carried.append(invoke)  # may take effect at any later time
        if not self.open_invokes:
            self.quiet_at = len(self.events)

    def due(self, now_s: float) -> bool:
        age = now_s - self.started_s if self.started_s is not None else 0.0
        return self.quiet_at > 0 and (self.completed >= WINDOW_OPS or age >= WINDOW_S or self.cut_wanted)

    def close(self) -> list[dict[str, Any]]:
        """End the window at its last quiescent point; the events after it open the next one."""
        closed, rest = self.events[: self.quiet_at], self.events[self.quiet_at :]
        self.events, self.quiet_at = rest, 0
        self.completed = sum(1 for e in rest if e["type"] != "invoke")
        self.completed_at_check = -1
        self.started_s = rest[0]["time"] / 1e9 if rest else None
        self.cut_wanted = False
        return closed

    def record(self, verdict: str, final: bool) -> None:
        self.verdict = verdict
        if verdict == "invalid":
            if self.last_invalid_window != self.window:
                self.invalid_windows += 1
            self.last_invalid_window = self.window
        rank = {"pending": 0, "valid": 1, "unknown": 2, "invalid": 3}
        if rank[verdict] > rank[self.worst]:
            self.worst = verdict
        if final:
            self.windows_checked += 1
            self.window += 1

    def summary(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "worst": self.worst,
            "window": self.window,
            "windows_checked": self.windows_checked,
            "invalid_windows": self.invalid_windows,
            "exact": self.window == 1,
            "carried_unknown_writes": len(self.carried),
        }


def _window_rows(track: KeyTrack, events: Sequence[dict[str, Any]], nemesis: Sequence[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """The history a window is checked as: carried info invokes first, then its own events with
    the nemesis events of its stretch (for the picture), in history order."""
    if not events:
        return []
    first, last = events[0]["index"], events[-1]["index"]
    own = {e["process"] for e in events}
    carried = [c for c in track.carried if c["process"] not in own and c["index"] < first]
    during = [n for n in nemesis if first <= n["index"] <= last]
    body = sorted([*events, *during], key=lambda e: e["index"])
    return [*carried, *body]


def check_window(mode: str, track: KeyTrack, rows: list[dict[str, Any]], first_window: bool,
                 final: bool) -> dict[str, Any]:
    """One window's verdict; with the counterexample picture when it is not linearizable."""
    result = check(rows, model=model_for(mode, first_window), time_limit_s=CHECK_TIME_LIMIT_S, workers=1)
    kr = result.keys[0] if result.keys else None
    verdict = kr.verdict if kr is not None else "valid"
    out: dict[str, Any] = {"verdict": verdict, "final": final, "window": track.window,
                           "ops": len(result.history.ops)}
    if kr is not None and kr.verdict == "invalid" and kr.counterexample is not None:
        out["counterexample"] = counterexample(mode, track, result, kr, rows)
    return out


def counterexample(mode: str, track: KeyTrack, result: Any, kr: Any, rows: Sequence[dict[str, Any]]
                   ) -> dict[str, Any]:
    """The checker's timeline of a key's counterexample, labelled for the live page."""
    ops, first = report.focus_ops(result, kr)
    nodes: dict[Hashable, str] = {op.process: op.node for op in result.history.ops if op.node}
    times = [r["time"] for r in rows if "time" in r]
    start_s, end_s = (min(times) / 1e9, max(times) / 1e9) if times else (0.0, 0.0)
    title = (f"{mode}: key {track.key}, window {track.window} "
             f"({start_s:.1f}-{end_s:.1f} s): not linearizable")
    lay = report.layout(result, ops, title, kr, first)
    lay.lanes = [f"{lane} @{nodes.get(_process_of(lane), '?')}" for lane in lay.lanes]
    stuck = result.op(kr.counterexample.stuck)
    return {
        "mode": mode,
        "key": track.key,
        "window": track.window,
        "start_s": round(start_s, 2),
        "end_s": round(end_s, 2),
        "svg": report.svg(lay, max_width=1100),
        "explanation": result.explain(kr),
        "stuck": f"{stuck.describe()} on {stuck.node or '?'}",
        "exact": track.window == 1,
    }


def _process_of(lane: str) -> Hashable:
    raw = lane[1:] if lane.startswith("p") else lane
    return int(raw) if raw.isdigit() else raw


# --- whole-history anomalies ------------------------------------------------------------------


class OpLog:
    """A mode's ops in invoke order, kept between rounds (each parsed once, by the checker's own
    reader), so the anomalies need no re-reading of the whole history."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.nemesis: list[NemesisEvent] = []
        self.length = 0
        self._open: dict[Hashable, tuple[int, dict[str, Any]]] = {}  # process -> (slot, invoke event)

    def add(self, event: dict[str, Any]) -> None:
        self.length = event["index"] + 1
        if event["process"] == "nemesis":
            parsed = from_dicts([event]).nemesis[0]
            parsed.position, parsed.line = event["index"], event["index"] + 1
            self.nemesis.append(parsed)
            return
        if event["type"] == "invoke":
            self._open[event["process"]] = (len(self.ops), event)
            self.ops.append(self._op([event]))  # in flight: an info op until it completes
            return
        slot_invoke = self._open.pop(event["process"], None)
        if slot_invoke is not None:
            slot, invoke = slot_invoke
            self.ops[slot] = self._op([invoke, event])

    @staticmethod
    def _op(events: list[dict[str, Any]]) -> Op:
        op = from_dicts(events).ops[0]
        op.invoke = events[0]["index"]
        op.line = op.invoke + 1
        if len(events) > 1:
            op.complete = events[1]["index"]
        return op

    def history(self) -> History:
        for i, op in enumerate(self.ops):
            op.id = i
        return History(ops=self.ops, nemesis=self.nemesis, format="jsonl", length=self.length)


def anomalies(log: OpLog) -> dict[str, Any]:
    hist = log.history()
    now = max((op.complete_time or op.invoke_time or 0 for op in hist.ops[-200:]), default=0)
    recent_from = now - int(RECENT_S * 1e9)
    settled_by = now - int(LOST_SETTLE_S * 1e9)
    unseen = analysis.lost_writes(hist)
    lost = [lw for lw in unseen if (hist.ops[lw.op].complete_time or 0) <= settled_by]
    stale = analysis.stale_reads(hist, None)
    siblings = analysis.sibling_reads(hist)

    def recent(op_ids: Sequence[int], shift_ns: int = 0) -> int:
        return sum(1 for i in op_ids if (hist.ops[i].complete_time or 0) >= recent_from - shift_ns)

    def show(op_id: int) -> str:
        op = hist.ops[op_id]
        at = f" at {op.complete_time / 1e9:.1f} s" if op.complete_time is not None else ""
        return f"{op.describe()} on {op.node or '?'} (key {op.key}){at}"

    return {
        "lost_writes": len(lost),
        # settled in the last RECENT_S: acknowledged between LOST_SETTLE_S + RECENT_S and LOST_SETTLE_S ago
        "lost_writes_recent": recent([lw.op for lw in lost], int(LOST_SETTLE_S * 1e9)),
        "lost_writes_unsettled": len(unseen) - len(lost),
        "lost_examples": [show(lw.op) for lw in lost[-MAX_EXAMPLES:]],
        "stale_reads": len(stale),
        "stale_reads_recent": recent([s.op for s in stale]),
        "stale_examples": [f"{show(s.op)}, already overwritten by {hist.ops[s.overwritten_by].describe()}"
                           for s in stale[-MAX_EXAMPLES:]],
        "sibling_reads": len(siblings),
        "sibling_reads_recent": recent(siblings),
        "ops": len(hist.ops),
    }


# --- the worker's state -----------------------------------------------------------------------


class ModeChecker:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.tracks: dict[str, KeyTrack] = {}
        self.nemesis: list[dict[str, Any]] = []
        self.log = OpLog()
        self.now_s = 0.0

    def feed(self, events: Sequence[dict[str, Any]]) -> None:
        for event in events:
            self.now_s = max(self.now_s, event["time"] / 1e9)
            self.log.add(event)
            if event["process"] == "nemesis":
                self.nemesis.append(event)
                if str(event["f"]).startswith(FAULT_FS) or event["f"] in FAULT_EVENTS:
                    for track in self.tracks.values():
                        track.cut_wanted = True
                continue
            key = str(event.get("key"))
            if key not in self.tracks:
                self.tracks[key] = KeyTrack(key)
            self.tracks[key].add(event)

    def round(self) -> dict[str, Any]:
        counterexamples: list[dict[str, Any]] = []
        for track in self.tracks.values():
            if track.due(self.now_s):
                first = track.window == 1
                closed = track.close()
                verdict = check_window(self.mode, track, _window_rows(track, closed, self.nemesis), first, True)
                if "counterexample" in verdict and track.last_invalid_window != track.window:
                    counterexamples.append(verdict["counterexample"])
                track.record(verdict["verdict"], final=True)
            if track.completed and track.completed != track.completed_at_check:
                track.completed_at_check = track.completed
                verdict = check_window(self.mode, track, _window_rows(track, track.events, self.nemesis),
                                       track.window == 1, False)
                if "counterexample" in verdict and track.last_invalid_window != track.window:
                    counterexamples.append(verdict["counterexample"])
                track.record(verdict["verdict"], final=False)
        # Fault events older than every open window are drawn in no picture any more.
        oldest = min((t.events[0]["index"] for t in self.tracks.values() if t.events), default=None)
        if oldest is not None:
            self.nemesis = [n for n in self.nemesis if n["index"] >= oldest]
        return {
            "keys": {k: t.summary() for k, t in sorted(self.tracks.items())},
            "anomalies": anomalies(self.log),
            "counterexamples": counterexamples,
        }


class LiveChecker:
    """Every mode's checker, in the worker process."""

    def __init__(self) -> None:
        self.modes: dict[str, ModeChecker] = {}

    def step(self, batch: Mapping[str, Sequence[dict[str, Any]]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for mode, events in batch.items():
            checker = self.modes.get(mode)
            if checker is None:
                checker = self.modes[mode] = ModeChecker(mode)
            checker.feed(events)
            out[mode] = checker.round()
        return out


_WORKER: LiveChecker | None = None


def _worker_init() -> None:
    global _WORKER
    _WORKER = LiveChecker()


def _worker_step(batch: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    assert _WORKER is not None, "the pool's initializer makes the checker"
    return _WORKER.step(batch)


class CheckerClient:
    """The event loop's side: one worker process, fed each round with the events since the last.

    If the worker dies, a new one starts with fresh windows (it says so: ``restarts``); the
    anomalies then cover the history from that point on.
    """

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0
        self.error: str | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init)
        return self._pool

    async def step(self, batch: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        try:
            result: dict[str, Any] = await loop.run_in_executor(self._executor(), _worker_step, batch)
        except BrokenProcessPool as exc:
            self.error = f"the checker process stopped ({exc}); restarted with fresh windows"
            self.restarts += 1
            self.close()
            return None
        self.error = None
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

