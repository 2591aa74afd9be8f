"""Recording a Jepsen-style history as JSON Lines (the format of docs/history-format.md).

Theory of operation
-------------------
Every client operation is written twice: an ``invoke`` line before the request
is sent and one completion line (``ok``/``fail``/``info``) after.  Times are
monotonic nanoseconds since the run began, so they never go backwards even if
the wall clock is skewed by a nemesis (``clock_ns``: the real monotonic clock, or
a simulation's virtual one).  Writes go through one object in one
event loop, so indexes are dense and times non-decreasing in file order.
The file is flushed line by line: a run interrupted by Ctrl-C still leaves a
history the checker can read (open invokes count as ``info``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol


class HistoryWriter:
    def __init__(
        self, path: Path, start_ns: int | None = None, clock_ns: Callable[[], int] = time.monotonic_ns
    ) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.clock_ns = clock_ns
        self.start_ns = start_ns if start_ns is not None else clock_ns()
        self.index = 0
        self._last_time = 0
        self.events: list[dict[str, Any]] = []  # kept for the live progress line and in-process checks

    def now(self) -> int:
        t = max(self._last_time, self.clock_ns() - self.start_ns)
        self._last_time = t
        return t

    def record(self, event: dict[str, Any]) -> dict[str, Any]:
        line = {"index": self.index, "time": self.now(), **event}
        self.index += 1
        self._fh.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._fh.flush()
        self.events.append(line)
        return line

    def nemesis(self, f: str, value: Any) -> None:
        self.record({"process": "nemesis", "type": "info", "f": f, "value": value})

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class NemesisLog(Protocol):
    """Where a nemesis records what it did (a history, or several)."""

    def nemesis(self, f: str, value: Any) -> None: ...


class HistoryTee:
    """Records each nemesis event in several histories: runs that share one cluster (one key
    prefix each) share its faults, and each history must show them for the checker."""

    def __init__(self, histories: Sequence[HistoryWriter]) -> None:
        self.histories = list(histories)

    def nemesis(self, f: str, value: Any) -> None:
        for history in self.histories:
            history.nemesis(f, value)


def read_history(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
