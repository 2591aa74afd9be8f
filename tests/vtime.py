"""Virtual time for in-process async tests: run a test on a fresh kvstore.sim VirtualLoop, read time from it.

Tests of in-process logic over the in-memory seams (``kvstore.transport.memory``, ``MemoryStorage``)
have no real I/O, so they can run on ``kvstore.sim.vloop.VirtualLoop``: its clock is simulated and
jumps to the next timer when nothing is ready.  ``@simulated`` runs an ``async def`` test on a fresh
such loop; ``CLOCK`` is the ``Clock`` seam whose monotonic time *is* that loop's time.  So every
deadline, call timeout, backoff, link delay and ``asyncio.sleep`` in such a test is virtual: a 2 s
deadline costs no wall time, a busy machine cannot make anything time out, a run is the same
sequence of steps every time, and assertions about time can be exact (``elapsed_s``).

A hang or livelock ends as ``SimLimitExceeded`` (the budgets below: guards, not speed
assertions), a wait nothing can end as ``SimDeadlock``: typed failures, never a stuck test.  What
cannot run here: anything that waits for a real thread or socket (sqlite's executor threads, an
HTTP server), because while a thread works the loop sees nothing ready and no timer (a
``SimDeadlock``); such tests stay on a real loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from kvstore.sim import vloop

# Budgets of one simulated test: hang and livelock guards in virtual time, not speed assertions.
SIM_BUDGET_S = 3600.0
SIM_MAX_STEPS = 1_000_000  # the busiest test (test_cp_sim's contended CAS workload) takes ~25,000

P = ParamSpec("P")
T = TypeVar("T")


def virtual_loop() -> vloop.VirtualLoop:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, vloop.VirtualLoop), "this test must run on virtual time (@simulated)"
    return loop


class VirtualClock:
    """The ``Clock`` seam on the virtual loop.  Monotonic time is the loop's simulated time, so every
    deadline read through it is virtual.  The wall clock is the simulated time plus 1 ms per reading, so
    clock-derived ballots order deterministically by creation even within one simulated instant;
    ``reset`` at the start of each run makes a test independent of the tests before it."""

    def __init__(self) -> None:
        self._readings = 0

    def reset(self) -> None:
        self._readings = 0

    def monotonic_ns(self) -> int:
        return virtual_loop().now_ns

    def wall_ns(self) -> int:
        self._readings += 1
        return vloop.WALL_EPOCH_NS + virtual_loop().now_ns + self._readings * 1_000_000


CLOCK = VirtualClock()


def run_simulated(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a fresh virtual loop with ``CLOCK`` reset and the budgets above."""
    CLOCK.reset()
    return vloop.run(main, max_time_s=SIM_BUDGET_S, max_steps=SIM_MAX_STEPS)


def simulated(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test on a fresh virtual-time loop (closed, with every leftover task cancelled,
    when the test ends, even when it fails)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        run_simulated(test(*args, **kwargs))

    return run


def elapsed_s(since_ns: int) -> float:
    return (CLOCK.monotonic_ns() - since_ns) / 1e9
