"""Clock seam: every reading of time in kvstore goes through a ``Clock``.

Theory of operation
-------------------
Two kinds of time are needed and they must not be confused:

* ``monotonic_ns()`` measures durations (timeouts, heartbeat intervals, phi
  accrual).  It never goes backwards and has no meaning across processes.
* ``wall_ns()`` is the node's idea of "now" used for last-write-wins
  timestamps and hint ages.  It can be skewed on purpose (the clock-skew
  nemesis sets ``skew_ns``), which is exactly how Jepsen shows that LWW loses
  acknowledged writes when clocks disagree.

Pure logic never calls ``time`` itself: it receives a ``Clock`` (or plain
numbers) so that simulations run on a ``ManualClock`` and replay from a seed.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic_ns(self) -> int: ...

    def wall_ns(self) -> int: ...


class SystemClock:
    """Real time, with an adjustable offset on the wall clock (for skew experiments)."""

    def __init__(self, skew_ns: int = 0) -> None:
        self.skew_ns = skew_ns

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    def wall_ns(self) -> int:
        return time.time_ns() + self.skew_ns


class ManualClock:
    """A clock that only moves when told to: for unit tables and simulations."""

    def __init__(self, start_ns: int = 1_000_000_000, skew_ns: int = 0) -> None:
        self._now_ns = start_ns
        self.skew_ns = skew_ns

    def advance(self, delta_ns: int) -> None:
        assert delta_ns >= 0, "a manual clock never goes backwards"
        self._now_ns += delta_ns

    def monotonic_ns(self) -> int:
        return self._now_ns

    def wall_ns(self) -> int:
        return self._now_ns + self.skew_ns
