"""The virtual-time event loop: asyncio with a simulated clock that jumps when there is nothing to do.

Theory of operation
-------------------
``VirtualLoop`` is a ``SelectorEventLoop`` whose ``time()`` is a simulated clock (integer
nanoseconds) and whose selector never blocks: where a real loop would wait ``timeout`` seconds
for I/O, ``select(timeout)`` moves the clock forward by ``timeout`` (to the next timer) and
returns no events.  Every ``asyncio.sleep``, ``wait_for`` and ``asyncio.timeout`` therefore ends
at exactly the simulated instant it asked for, and an idle simulated minute costs nothing.
There is no real I/O in a simulation (nodes talk through ``kvstore.sim.network``, persist to
``kvstore.sim.disk``); a socket or a thread would break the model and is not used.

Determinism: asyncio runs ready callbacks in FIFO order and timers in ``(when, heap order)``;
with no real I/O, no threads and the clock under our control, the same program on the same seed
makes the same sequence of steps.  What can still vary is *the program*: iteration over sets of
objects hashed by id (tasks, futures) or of strings (``PYTHONHASHSEED``), ``os.urandom``, real
time.  Those are fixed where they live (see ``kvstore/sim/__init__.py``).

Hosts.  Each simulated process is a ``Host``: every task created while a host's context is
current belongs to it (tasks copy their creator's ``contextvars`` context, so a node's children,
grandchildren and message handlers are its own), tracked in creation order.  That gives two
process faults without touching node code:

* **crash**: cancel every task of the host, in creation order (``Host.crash``); the host's I/O
  endpoints are fenced by their owners (network, disk) so the cancelled code's ``finally``
  blocks cannot reach the outside world any more.
* **pause** (SIGSTOP): while a host is paused, every callback the loop is asked to schedule
  *in that host's context* is held instead of run, in order, and released on resume.  Every
  step of a task and every future callback of a task is scheduled that way, so none of the
  host's code runs while it is paused.  Timers still fire (a ``sleep`` ends, a ``wait_for``
  times out), but what they wake is held: on resume the host sees every deadline that passed,
  as a process does after SIGCONT.

Two ways a run can go wrong are typed errors, not hangs: ``SimDeadlock`` (nothing ready and no
timer: nothing can ever happen again) names the tasks still waiting; ``SimLimitExceeded`` ends a
run that passes its simulated-time or step budget (a livelock: heartbeats tick for ever while the
harness waits for something that never comes).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import selectors
from asyncio import events
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

NS_PER_S = 1_000_000_000
# The simulated wall clock starts at a fixed, realistic date (2024-01-01T00:00:00Z) so LWW
# timestamps, hint ages and clock-derived ballots look like real ones.
WALL_EPOCH_NS = 1_704_067_200 * NS_PER_S


class SimError(RuntimeError):
    """A simulation could not go on (a typed operating error of the simulator itself)."""


class SimDeadlock(SimError):
    """Nothing is ready and no timer is pending: the waiting tasks can never be woken."""

    def __init__(self, now_ns: int, stuck: list[str]) -> None:
        shown = ", ".join(stuck[:20]) + (f" (+{len(stuck) - 20} more)" if len(stuck) > 20 else "")
        super().__init__(f"deadlock at simulated t={now_ns / NS_PER_S:.6f} s: "
                         f"{len(stuck)} task(s) waiting for ever: {shown or 'none'}")
        self.now_ns = now_ns
        self.stuck = stuck


class SimLimitExceeded(SimError):
    """The run passed its budget of simulated time or loop steps (a livelock, or a budget too small)."""


CURRENT_HOST: contextvars.ContextVar[Host | None] = contextvars.ContextVar("kvstore_sim_host", default=None)


class Host:
    """One simulated process: owns the tasks created in its context, can be paused or crashed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks: dict[asyncio.Task[Any], None] = {}  # creation order (a dict, not a set)
        self.paused = False
        self.crashed = False
        self.held: list[events.Handle] = []
        self._context = contextvars.Context()
        self._context.run(CURRENT_HOST.set, self)

    def context(self) -> contextvars.Context:
        """A fresh context in which new tasks and callbacks belong to this host."""
        return self._context.copy()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Start ``coro`` as a task of this host (from any context)."""
        assert not self.crashed, f"host {self.name} crashed; restart makes a new host"
        loop = asyncio.get_running_loop()
        return loop.create_task(coro, name=name, context=self.context())

    def crash(self) -> None:
        """Cancel every task of this host, in creation order, and drop what pause held."""
        self.crashed = True
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualLoop)
        loop.release(self)
        for task in list(self.tasks):
            task.cancel()


class VirtualSelector(selectors.SelectSelector):
    """A selector that never waits: ``select(t)`` advances the simulated clock by ``t``."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        assert loop is not None
        loop.steps += 1
        if loop.steps > loop.max_steps:
            raise SimLimitExceeded(f"more than {loop.max_steps} loop steps (simulated t={loop.now_ns / NS_PER_S:.3f} s)")
        if timeout is None:
            raise SimDeadlock(loop.now_ns, loop.describe_waiting())
        if timeout > 0:
            # +1 ns: the loop pops timers strictly earlier than now + resolution, and the
            # float seconds of a timer's ``when`` may round a hair above the integer instant.
            target = loop.now_ns + int(timeout * NS_PER_S) + 1
            if target > loop.max_time_ns:
                raise SimLimitExceeded(
                    f"simulated time would pass its limit of {loop.max_time_ns / NS_PER_S:.0f} s; "
                    f"waiting: {', '.join(loop.describe_waiting()[:10])}"
                )
            loop.now_ns = target
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on simulated time; see the module docstring."""

    def __init__(self, *, max_time_s: float = 24 * 3600.0, max_steps: int = 50_000_000) -> None:
        selector = VirtualSelector()
        super().__init__(selector=selector)
        selector.loop = self
        self.now_ns = 0
        self.steps = 0
        self.max_time_ns = int(max_time_s * NS_PER_S)
        self.max_steps = max_steps
        self._paused: dict[Host, None] = {}
        self._all_tasks: dict[asyncio.Task[Any], Host | None] = {}

    def time(self) -> float:
        return self.now_ns / NS_PER_S

    # --- task ownership -------------------------------------------------------------------

    def create_task(  # type: ignore[override]
        self, coro: Any, *, name: str | None = None, context: contextvars.Context | None = None
    ) -> asyncio.Task[Any]:
        task = super().create_task(coro, name=name, context=context)
        host = context.get(CURRENT_HOST) if context is not None else CURRENT_HOST.get()
        self._all_tasks[task] = host
        if host is not None:
            host.tasks[task] = None
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        host = self._all_tasks.pop(task, None)
        if host is not None:
            host.tasks.pop(task, None)

    def tasks_in_order(self) -> list[asyncio.Task[Any]]:
        """Every unfinished task, in creation order (``asyncio.all_tasks`` is a set)."""
        return list(self._all_tasks)

    def describe_waiting(self) -> list[str]:
        out = []
        for task, host in self._all_tasks.items():
            coro = task.get_coro()
            where = getattr(coro, "__qualname__", type(coro).__name__)
            out.append(f"{host.name if host else 'harness'}:{task.get_name()}({where})")
        return out

    # --- pause ----------------------------------------------------------------------------

    def pause(self, host: Host) -> None:
        host.paused = True
        self._paused[host] = None

    def release(self, host: Host) -> None:
        """Resume a paused host: what it held runs next, in the order it was scheduled."""
        host.paused = False
        self._paused.pop(host, None)
        held, host.held = host.held, []
        for handle in held:
            if not handle.cancelled():
                self._ready.append(handle)  # type: ignore[attr-defined]

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> events.Handle:
        if self._paused:
            host = context.get(CURRENT_HOST) if context is not None else CURRENT_HOST.get()
            if host is not None and host.paused:
                if self.is_closed():
                    raise RuntimeError("Event loop is closed")
                handle = events.Handle(callback, args, self, context)
                host.held.append(handle)
                return handle
        return super().call_soon(callback, *args, context=context)


def run(main: Coroutine[Any, Any, T], *, max_time_s: float = 24 * 3600.0, max_steps: int = 50_000_000) -> T:
    """Run ``main`` to completion on a fresh ``VirtualLoop``; always closes the loop.

    On a ``SimError`` the tasks still pending are cancelled (and given the chance to unwind) before
    the error is raised, so nothing leaks into the next run."""
    loop = VirtualLoop(max_time_s=max_time_s, max_steps=max_steps)
    previous = events._get_running_loop()
    assert previous is None, "a simulation runs on its own loop, not inside another running loop"
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all(loop)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all(loop: VirtualLoop) -> None:
    pending = loop.tasks_in_order()
    if not pending:
        return
    for paused in list(loop._paused):
        loop.release(paused)
    for task in pending:
        task.cancel()
    loop.max_time_ns = loop.now_ns + 3600 * NS_PER_S  # room to unwind, bounded
    loop.max_steps = loop.steps + 1_000_000
    with contextlib.suppress(SimError):  # a task that cannot even unwind: abandon it with the loop
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


class SimClock:
    """The ``Clock`` seam of one simulated node: monotonic = the loop's time; wall = a fixed epoch
    + the loop's time + this node's skew (``skew_ns``, set by the clock-skew nemesis)."""

    def __init__(self, loop: VirtualLoop, skew_ns: int = 0) -> None:
        self.loop = loop
        self.skew_ns = skew_ns

    def monotonic_ns(self) -> int:
        return self.loop.now_ns

    def wall_ns(self) -> int:
        return WALL_EPOCH_NS + self.loop.now_ns + self.skew_ns
