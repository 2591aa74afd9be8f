"""Warnings that anyone on the network can trigger, logged without letting them flood the log.

Theory of operation
-------------------
A refused connection (bad secret, oversized hello, connection cap) deserves a log line, but an
attacker can cause thousands per second.  ``RateLimitedLog`` logs the first occurrence of each
kind at once, then at most one line per ``interval_s`` for that kind, saying how many were left
out since the last line.  Time comes from the ``now_s`` callable (monotonic seconds), so tests
drive it by hand.  Kinds are a small fixed set of codes chosen by the caller, so the table is
bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    def __init__(
        self, logger: logging.Logger, interval_s: float = 10.0, now_s: Callable[[], float] = time.monotonic
    ) -> None:
        assert interval_s > 0
        self._logger = logger
        self._interval_s = interval_s
        self._now_s = now_s
        self._next_s: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: Any) -> bool:
        """Log ``message % args`` unless ``kind`` was logged less than ``interval_s`` ago.

        Returns whether a line was written.
        """
        now_s = self._now_s()
        next_s = self._next_s.get(kind)
        if next_s is not None and now_s < next_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        left_out = self._suppressed.pop(kind, 0)
        if left_out:
            message += f" (and {left_out} more like it since the last such line)"
        self._logger.warning(message, *args)
        self._next_s[kind] = now_s + self._interval_s
        return True
