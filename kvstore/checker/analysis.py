"""What else a history says, beside linearizability: availability, lost writes, stale reads,
sibling reads, latency -- overall, per nemesis phase and per side of a partition.

Theory of operation
-------------------
Every function here is pure: a ``History`` in, plain data out, no clock.  Real-time order is
the order of events in the history (positions), as for the linearizability check; clock times
are only used for latencies.

* Phases come from nemesis events: ``start-X``/``stop-X``, ``kill``/``restart``,
  ``pause``/``resume`` (per target node) and Jepsen's bare ``start``/``stop`` open and close
  faults; a phase is a maximal stretch of the history with the same set of active faults
  (``before``, the fault names joined by ``+``, ``healed``).  A repeated start of an active
  fault (Jepsen logs a nemesis op's invocation and completion) changes nothing.  An op belongs
  to the phase in which it was *invoked*: the conditions under which it was asked.
* Availability = answered / (ok + fail + info), where answered is ``ok`` plus a cas refused
  because its compare did not match (``error: precondition_failed``): the store was up and
  said no, which is not unavailability.  An invoke without completion counts as ``info``.
* Sides: during a partition, a client op's ``node`` tells which group it was on; the largest
  group, if it holds more than half of the nodes named, is the majority side.  A node in two
  groups (a bridge) is on the ``bridge`` side.
* Lost write: an acknowledged write (or cas) whose value no read ever returned (value or
  sibling), although some read began after the write completed, and which no other write can
  explain: none that could have taken effect after it (completing, or still unknown, after its
  invoke) and before the first such read completed.
* Stale read: a read whose value had certainly been overwritten before the read began: for
  every write that could have produced the value, an acknowledged write of another value was
  invoked after that one completed and completed before the read was invoked.
* Lost writes and stale reads assume a register with unique written values (as our workload
  and Jepsen's register tests write); keys with ``append`` ops are skipped.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvstore.checker.history import INF, History, NemesisEvent, Op, thaw

READ_FS = frozenset({"read", "get"})
WRITE_FS = frozenset({"write", "put", "cas", "delete"})
PAIRS = {"kill": "restart", "pause": "resume", "start": "stop"}
CLOSERS = {v: k for k, v in PAIRS.items()}


# --- phases ---------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: int  # first position of the phase
    end: int  # first position after it
    faults: list[str]
    start_time: int | None = None
    end_time: int | None = None

    def contains(self, position: int) -> bool:
        return self.start <= position < self.end


@dataclass
class FaultWindow:
    """One fault, from the event that started it to the one that stopped it (or the end)."""

    fault: str
    start: int
    end: int
    value: Any
    start_time: int | None
    end_time: int | None


def _fault_of(event: NemesisEvent) -> tuple[str, str, Hashable] | None:
    """(``open``/``close``, fault name, target node or None) for a nemesis event, or None."""
    f = event.f
    target: Hashable = None
    if f in PAIRS or f in CLOSERS:
        value = event.value
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            target = value[0]
        elif isinstance(value, str) and f not in ("start", "stop"):
            target = value
    if f in PAIRS:
        name = "nemesis" if f == "start" else f
        return "open", name, target
    if f in CLOSERS:
        name = "nemesis" if f == "stop" else CLOSERS[f]
        return "close", name, target
    if f.startswith("start-"):
        return "open", f[len("start-") :], None
    if f.startswith("stop-"):
        return "close", f[len("stop-") :], None
    return None


def fault_windows(history: History) -> list[FaultWindow]:
    """Every fault's window, in order of start."""
    open_: dict[tuple[str, Hashable], FaultWindow] = {}
    done: list[FaultWindow] = []
    end_time = max((op.complete_time or op.invoke_time or 0 for op in history.ops), default=None)
    for event in history.nemesis:
        parsed = _fault_of(event)
        if parsed is None:
            continue
        action, name, target = parsed
        ident = (name, target)
        if action == "open":
            if ident not in open_:
                open_[ident] = FaultWindow(name, event.position, history.length, event.value, event.time, None)
            elif open_[ident].value in (None, "") and event.value not in (None, ""):
                open_[ident].value = event.value  # Jepsen: the completion says what was done
        else:
            window = open_.pop(ident, None)
            if window is None:  # targets named differently: close the oldest fault of that name
                window = next((open_.pop(k) for k in list(open_) if k[0] == name), None)
            if window is not None:
                window.end = event.position
                window.end_time = event.time
                done.append(window)
    for window in open_.values():
        window.end_time = end_time
        done.append(window)
    return sorted(done, key=lambda w: (w.start, w.end))


def phases(history: History) -> list[Phase]:
    """Maximal stretches with one set of active faults, covering the whole history."""
    windows = fault_windows(history)
    if not windows:
        return [Phase("no faults", 0, max(history.length, 1), [])]
    cuts = sorted({0, history.length} | {w.start for w in windows} | {w.end for w in windows})
    times = _position_times(history)
    result: list[Phase] = []
    seen_fault = False
    used: dict[str, int] = {}
    for start, end in zip(cuts, cuts[1:], strict=False):
        if start >= end:
            continue
        active = sorted({w.fault for w in windows if w.start <= start < w.end})
        if active:
            seen_fault = True
            base = "+".join(active)
        else:
            base = "healed" if seen_fault else "before"
        if result and result[-1].faults == active:
            result[-1].end = end
            result[-1].end_time = times.get(end)
            continue
        used[base] = used.get(base, 0) + 1
        name = base if used[base] == 1 else f"{base} #{used[base]}"
        result.append(Phase(name, start, end, active, times.get(start), times.get(end)))
    return result


def _position_times(history: History) -> dict[int, int]:
    times: dict[int, int] = {}
    for op in history.ops:
        if op.invoke_time is not None:
            times[op.invoke] = op.invoke_time
        if op.complete is not None and op.complete_time is not None:
            times[op.complete] = op.complete_time
    for event in history.nemesis:
        if event.time is not None:
            times[event.position] = event.time
    return times


def phase_of(position: int, phase_list: Sequence[Phase]) -> Phase:
    starts = [p.start for p in phase_list]
    return phase_list[max(0, bisect.bisect_right(starts, position) - 1)]


# --- availability ---------------------------------------------------------------------------


@dataclass
class Counts:
    ok: int = 0
    fail: int = 0
    info: int = 0
    refused: int = 0  # fails that are answers (cas compare did not match), counted as available

    @property
    def total(self) -> int:
        return self.ok + self.fail + self.info

    @property
    def availability(self) -> float | None:
        return (self.ok + self.refused) / self.total if self.total else None

    def add(self, op: Op) -> None:
        if op.type == "ok":
            self.ok += 1
        elif op.type == "fail":
            self.fail += 1
            if op.error == "precondition_failed":
                self.refused += 1
        else:
            self.info += 1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "availability": self.availability}


@dataclass
class SideInfo:
    side: str  # majority | minority | bridge | unknown
    group: list[str]


def partition_sides(value: Any) -> dict[str, SideInfo] | None:
    """node -> side for a partition description; None when it names no groups."""
    groups: list[list[str]] | None = None
    if isinstance(value, dict):
        if "groups" in value:
            return partition_sides(value["groups"])
        if "sides" in value:
            groups = value["sides"]
        elif "deaf" in value and "cannot_hear" in value:
            groups = [[value["deaf"]], list(value["cannot_hear"])]
    elif isinstance(value, list) and value and all(isinstance(g, list) for g in value):
        groups = value
    if not groups or not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups):
        return None
    membership: dict[str, list[list[str]]] = {}
    for group in groups:
        for node in group:
            membership.setdefault(node, []).append(group)
    total = len(membership)
    sides: dict[str, SideInfo] = {}
    for node, member_of in membership.items():
        if len(member_of) > 1:
            sides[node] = SideInfo("bridge", [node])
        else:
            group = member_of[0]
            sides[node] = SideInfo("majority" if 2 * len(group) > total else "minority", sorted(group))
    return sides


@dataclass
class Availability:
    overall: Counts
    by_phase: dict[str, Counts]
    by_side: dict[str, Counts]  # majority / minority / bridge, over every partition window
    by_group: dict[str, Counts]  # "n1,n2 (minority)" etc.
    by_f: dict[str, Counts]

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "by_phase": {k: v.to_dict() for k, v in self.by_phase.items()},
            "by_side": {k: v.to_dict() for k, v in self.by_side.items()},
            "by_group": {k: v.to_dict() for k, v in self.by_group.items()},
            "by_f": {k: v.to_dict() for k, v in self.by_f.items()},
        }


def availability(history: History, phase_list: Sequence[Phase] | None = None) -> Availability:
    phase_list = list(phase_list) if phase_list is not None else phases(history)
    overall = Counts()
    by_phase = {p.name: Counts() for p in phase_list}
    by_f: dict[str, Counts] = {}
    for op in history.ops:
        overall.add(op)
        by_phase[phase_of(op.invoke, phase_list).name].add(op)
        by_f.setdefault(op.f, Counts()).add(op)
    by_side: dict[str, Counts] = {}
    by_group: dict[str, Counts] = {}
    windows = [w for w in fault_windows(history) if w.fault == "partition"]
    for window in windows:
        sides = partition_sides(window.value)
        if sides is None:
            continue
        for op in history.ops:
            if not (window.start <= op.invoke < window.end) or op.node is None:
                continue
            info = sides.get(op.node, SideInfo("unknown", []))
            by_side.setdefault(info.side, Counts()).add(op)
            label = f"{','.join(info.group) or op.node} ({info.side})"
            by_group.setdefault(label, Counts()).add(op)
    return Availability(overall, by_phase, by_side, by_group, by_f)


# --- lost writes and stale reads ------------------------------------------------------------


def _produces(op: Op) -> tuple[bool, Any]:
    """(does the op set the register, to what) for an op that took or may have taken effect."""
    if op.f in ("write", "put"):
        return True, op.value
    if op.f == "delete":
        return True, None
    if op.f == "cas" and isinstance(op.value, tuple) and len(op.value) == 2:
        return True, op.value[1]
    return False, None


def _read_values(op: Op) -> tuple[Any, ...]:
    return op.siblings if op.siblings is not None else (op.result,)


def _register_keys(history: History) -> dict[Hashable, list[Op]]:
    return {k: ops for k, ops in history.by_key().items() if not any(op.f == "append" for op in ops)}


@dataclass
class LostWrite:
    op: int
    key: Any
    value: Any
    first_read: int  # the first read that began after the write completed and did not see it
    later_reads: int  # how many reads began after the write completed (none saw it)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": thaw(self.key), "value": thaw(self.value)}


def _unreachable_reads(history: History) -> Callable[[Op, Op], bool]:
    """(write, read) -> True when the read could not have reached the write's node: an active
    partition separated the two nodes, or the write's node was killed or paused, when the read
    began.  Such a read missing the write is a stale read, not evidence that the write was lost.
    """
    cuts: list[tuple[int, int, dict[str, SideInfo] | None, str | None]] = []
    for window in fault_windows(history):
        if window.fault == "partition":
            sides = partition_sides(window.value)
            if sides is not None:
                cuts.append((window.start, window.end, sides, None))
        elif window.fault in ("kill", "pause"):
            target = window.value[0] if isinstance(window.value, list) and window.value else window.value
            if isinstance(target, str):
                cuts.append((window.start, window.end, None, target))

    def unreachable(write: Op, read: Op) -> bool:
        if write.node is None or read.node is None:
            return False
        for start, end, sides, down in cuts:
            if not start <= read.invoke < end:
                continue
            if down is not None and down == write.node and read.node != write.node:
                return True
            if sides is not None:
                a, b = sides.get(write.node), sides.get(read.node)
                if a is not None and b is not None and "bridge" not in (a.side, b.side) and read.node not in a.group:
                    return True
        return False

    return unreachable


def lost_writes(history: History) -> list[LostWrite]:
    found: list[LostWrite] = []
    unreachable = _unreachable_reads(history)
    for key, ops in _register_keys(history).items():
        reads = sorted((op for op in ops if op.f in READ_FS and op.type == "ok"), key=lambda o: o.invoke)
        read_starts = [r.invoke for r in reads]
        observed: set[Any] = set()
        for r in reads:
            observed.update(_hashable(v) for v in _read_values(r))
        writers = sorted((op for op in ops if op.type != "fail" and _produces(op)[0]), key=lambda o: o.invoke)
        writer_starts = [w.invoke for w in writers]
        # the two latest ends among writers invoked before each point (two: to leave one out)
        top2: list[tuple[tuple[float, int], tuple[float, int]]] = []
        best: tuple[float, int] = (-1.0, -1)
        second: tuple[float, int] = (-1.0, -1)
        for w in writers:
            candidate = (w.end, w.id)
            if candidate > best:
                best, second = candidate, best
            elif candidate > second:
                second = candidate
            top2.append((best, second))
        for w in writers:
            sets, value = _produces(w)
            if w.type != "ok" or w.f == "delete" or w.complete is None or _hashable(value) in observed:
                continue
            after = bisect.bisect_right(read_starts, w.complete)
            # Reads cut off from the writer's node cannot tell whether the write survived.
            while after < len(reads) and unreachable(w, reads[after]):
                after += 1
            if after == len(reads):
                continue  # nothing that could see it read the key afterwards: no evidence either way
            first = reads[after]
            assert first.complete is not None
            # another write invoked before that read completed, still running after w began?
            i = bisect.bisect_left(writer_starts, first.complete) - 1
            if i >= 0:
                best, second = top2[i]
                latest_end = second[0] if best[1] == w.id else best[0]
                if latest_end > w.invoke:
                    continue  # explained: it may have overwritten w before the read
            found.append(LostWrite(w.id, key, value, first.id, len(reads) - after))
    return sorted(found, key=lambda lw: lw.op)


@dataclass
class StaleRead:
    op: int
    key: Any
    value: Any
    overwritten_by: int  # an acknowledged write that had replaced the value before the read began

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": thaw(self.key), "value": thaw(self.value)}


class _AckedWrites:
    """A key's acknowledged writes, to ask "was this value surely replaced before t?"."""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.acked = sorted((op for op in ops if op.type == "ok" and _produces(op)[0]), key=lambda o: o.invoke)
        self.starts = [w.invoke for w in self.acked]
        # suffix minimum of completion positions: the earliest-finishing write invoked after t
        self.suffix: list[tuple[float, int]] = [(INF, -1)] * (len(self.acked) + 1)
        for i in range(len(self.acked) - 1, -1, -1):
            complete = self.acked[i].complete
            done: float = complete if complete is not None else INF
            self.suffix[i] = min(self.suffix[i + 1], (done, i))

    def overwritten(self, after: float, value: Any, before: int) -> Op | None:
        """An acked write of another value invoked after ``after`` and done before ``before``."""
        i = bisect.bisect_right(self.starts, after)
        done, j = self.suffix[i]
        if done >= before:
            return None
        if _hashable(_produces(self.acked[j])[1]) != value:
            return self.acked[j]
        for w in self.acked[i:]:  # rare: the earliest is a rewrite of the same value
            if w.complete is not None and w.complete < before and _hashable(_produces(w)[1]) != value:
                return w
        return None


def stale_reads(history: History, initial: Any = None) -> list[StaleRead]:
    found: list[StaleRead] = []
    for key, ops in _register_keys(history).items():
        writers: dict[Any, list[Op]] = {}
        for op in ops:
            sets, value = _produces(op)
            if sets and op.type != "fail":
                writers.setdefault(_hashable(value), []).append(op)
        acked = _AckedWrites(ops)
        for r in ops:
            if r.f not in READ_FS or r.type != "ok":
                continue
            witness: Op | None = None
            stale = True
            for raw in _read_values(r):
                value = _hashable(raw)
                sources: list[float] = [
                    w.complete if w.type == "ok" and w.complete is not None else INF for w in writers.get(value, [])
                ]
                if value == _hashable(initial):
                    sources.append(-1)
                if not sources:
                    stale = False  # a value nobody wrote: not a stale read (the checker flags it)
                    break
                latest = max(sources)
                over = acked.overwritten(latest, value, r.invoke) if latest != INF else None
                if over is None:
                    stale = False
                    break
                witness = over
            if stale and witness is not None:
                shown = r.result if r.siblings is None else r.siblings
                found.append(StaleRead(r.id, key, shown, witness.id))
    return sorted(found, key=lambda s: s.op)


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def sibling_reads(history: History) -> list[int]:
    return [op.id for op in history.ops if op.f in READ_FS and op.type == "ok" and op.siblings is not None]


# --- latency --------------------------------------------------------------------------------


@dataclass
class Latency:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _summarise(values: Iterable[float]) -> Latency:
    ordered = sorted(values)
    return Latency(len(ordered), percentile(ordered, 50), percentile(ordered, 99), ordered[-1])


def latency(history: History, phase_list: Sequence[Phase] | None = None) -> dict[str, dict[str, Latency]]:
    """{f: {"all" | phase name: Latency}} over ok ops with clock times, in milliseconds."""
    phase_list = list(phase_list) if phase_list is not None else phases(history)
    samples: dict[str, dict[str, list[float]]] = {}
    for op in history.ops:
        if op.type != "ok" or op.invoke_time is None or op.complete_time is None:
            continue
        ms = (op.complete_time - op.invoke_time) / 1e6
        per_f = samples.setdefault(op.f, {})
        per_f.setdefault("all", []).append(ms)
        per_f.setdefault(phase_of(op.invoke, phase_list).name, []).append(ms)
    return {f: {ph: _summarise(v) for ph, v in per.items()} for f, per in samples.items()}


# --- everything -----------------------------------------------------------------------------


@dataclass
class Analyses:
    phases: list[Phase]
    availability: Availability
    lost_writes: list[LostWrite]
    stale_reads: list[StaleRead]
    sibling_reads: list[int]
    latency: dict[str, dict[str, Latency]]
    skipped_keys: list[Any] = field(default_factory=list)  # keys with appends: no lost/stale analysis

    def to_dict(self) -> dict[str, Any]:
        return {
            "phases": [asdict(p) for p in self.phases],
            "availability": self.availability.to_dict(),
            "lost_writes": [lw.to_dict() for lw in self.lost_writes],
            "stale_reads": [s.to_dict() for s in self.stale_reads],
            "sibling_reads": {"count": len(self.sibling_reads), "ops": self.sibling_reads},
            "latency": {f: {ph: asdict(lat) for ph, lat in per.items()} for f, per in self.latency.items()},
            "skipped_keys": [thaw(k) for k in self.skipped_keys],
        }


def analyse(history: History, initial: Any = None) -> Analyses:
    phase_list = phases(history)
    register_keys = _register_keys(history)
    return Analyses(
        phases=phase_list,
        availability=availability(history, phase_list),
        lost_writes=lost_writes(history),
        stale_reads=stale_reads(history, initial),
        sibling_reads=sibling_reads(history),
        latency=latency(history, phase_list),
        skipped_keys=[k for k in history.by_key() if k not in register_keys],
    )
