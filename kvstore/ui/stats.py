"""Rolling figures of one mode's workload: availability per side, latency, throughput.

Theory of operation
-------------------
Pure: completed operations go in (``Sample``: when it completed, which side of the fault its
node was on for its key when it was invoked, its outcome and latency), figures come out for
the last ``window_s`` seconds, plus per-second buckets for a sparkline of the last
``series_s`` seconds.  Availability follows the checker's rule (``analysis.Counts``, which
counts checker ops; these are live samples): answered = ok plus compare-and-set refusals (the
store was up and said no); ``fail`` and ``info`` (timeouts) are not answers.  Everything is bounded:
samples older than the window are dropped, at most ``max_samples`` kept.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from kvstore.checker.analysis import percentile
from kvstore.ui.topology import MAJORITY, MINORITY

SIDES = (MAJORITY, MINORITY)
WRITES = frozenset({"write", "cas", "delete"})


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float  # completion, seconds since the run began
    side: str  # majority | minority (of its key, when it was invoked)
    type: str  # ok | fail | info
    f: str
    node: str
    latency_ms: float
    refused: bool = False  # a cas whose compare did not match: an answer
    siblings: bool = False  # a read that returned several values

    @property
    def answered(self) -> bool:
        return self.type == "ok" or self.refused


class SideCounts:
    def __init__(self) -> None:
        self.ok = self.fail = self.info = self.refused = 0

    def add(self, s: Sample) -> None:
        if s.type == "ok":
            self.ok += 1
        elif s.type == "fail":
            self.fail += 1
            self.refused += int(s.refused)
        else:
            self.info += 1

    @property
    def total(self) -> int:
        return self.ok + self.fail + self.info

    @property
    def availability(self) -> float | None:
        return (self.ok + self.refused) / self.total if self.total else None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "fail": self.fail, "info": self.info, "refused": self.refused,
                "total": self.total, "availability": self.availability}


class ModeStats:
    def __init__(self, window_s: float = 10.0, series_s: int = 90, max_samples: int = 50_000) -> None:
        self.window_s = window_s
        self.series_s = series_s
        self.recent: deque[Sample] = deque(maxlen=max_samples)
        self.buckets: dict[int, dict[str, SideCounts]] = {}
        self.totals = {side: SideCounts() for side in SIDES}

    def add(self, sample: Sample) -> None:
        self.recent.append(sample)
        self.totals[sample.side].add(sample)
        second = int(sample.t_s)
        self.buckets.setdefault(second, {side: SideCounts() for side in SIDES})[sample.side].add(sample)
        for old in [b for b in self.buckets if b < second - self.series_s]:
            del self.buckets[old]

    def figures(self, now_s: float) -> dict[str, Any]:
        while self.recent and self.recent[0].t_s < now_s - self.window_s:
            self.recent.popleft()
        sides = {side: SideCounts() for side in SIDES}
        latencies: list[float] = []
        writes_ok_minority = 0
        siblings = 0
        by_node: dict[str, SideCounts] = {}
        for s in self.recent:
            sides[s.side].add(s)
            by_node.setdefault(s.node, SideCounts()).add(s)
            if s.type == "ok":
                latencies.append(s.latency_ms)
                siblings += int(s.siblings)
                if s.side == MINORITY and s.f in WRITES:
                    writes_ok_minority += 1
        latencies.sort()
        first = int(now_s) - self.series_s + 1
        series = {side: [self._bucket_availability(second, side) for second in range(first, int(now_s) + 1)]
                  for side in SIDES}
        return {
            "window_s": self.window_s,
            "majority": sides[MAJORITY].to_json(),
            "minority": sides[MINORITY].to_json(),
            "by_node": {n: c.to_json() for n, c in sorted(by_node.items())},
            "ops_per_s": round(len(self.recent) / self.window_s, 1),
            "latency_p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
            "latency_p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
            "writes_ok_minority": writes_ok_minority,
            "sibling_reads": siblings,
            "series": series,
            "series_from_s": first,
            "totals": {side: c.to_json() for side, c in self.totals.items()},
        }

    def _bucket_availability(self, second: int, side: str) -> float | None:
        bucket = self.buckets.get(second)
        return bucket[side].availability if bucket is not None else None
