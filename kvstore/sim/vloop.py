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
import heapq
import selectors
from asyncio import base_events, events
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

NS_PER_S = 1_000_000_000
PRUNE_TASKS_AT = 256  # the task table is swept of finished tasks when it passes this (or twice its live size)
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


class SimAborted(SimError):
    """The run was asked to stop from outside (``request_abort``: a sweep's wall-clock limit)."""


# Set from a signal handler; read by the selector at every loop step.  An exception raised inside
# a signal handler can be swallowed (Python ignores exceptions raised in weakref callbacks and
# __del__), so a wall-clock limit sets this flag and the loop raises at its next step instead.
_abort_reason: str | None = None


def request_abort(reason: str) -> None:
    """Make every running virtual loop of this process raise ``SimAborted`` at its next step."""
    global _abort_reason
    _abort_reason = reason


def aborting() -> bool:
    return _abort_reason is not None


def clear_abort() -> None:
    global _abort_reason
    _abort_reason = None


class _Handle(events.Handle):
    """``events.Handle`` without the per-handle ``loop.get_debug()`` probe (the loop is never in debug
    mode when it makes these: see ``VirtualLoop.call_soon``).  Same slots, same ``_run``."""

    __slots__ = ()

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop,
                 context: contextvars.Context | None = None) -> None:
        self._context = context if context is not None else contextvars.copy_context()
        self._loop = loop
        self._callback = callback
        self._args = args
        self._cancelled = False
        self._repr = None
        self._source_traceback = None


class _TimerHandle(_Handle, events.TimerHandle):
    """``events.TimerHandle`` made as cheaply as ``_Handle``: its fields, then the timer's.  Everything
    else is ``events.TimerHandle``'s (ordered as it: by ``_when`` only; its ``cancel`` tells the loop)."""

    __slots__ = ()

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...],
                 loop: asyncio.AbstractEventLoop, context: contextvars.Context | None = None) -> None:
        _Handle.__init__(self, callback, args, loop, context)  # not super(): one lookup less per timer
        self._when = when
        self._scheduled = False



# The stock loop's tuning, which ``VirtualLoop._run_once`` keeps so that the timer heap evolves identically.
_stock: Any = base_events
_MIN_SCHEDULED_TIMER_HANDLES: int = _stock._MIN_SCHEDULED_TIMER_HANDLES
_MIN_CANCELLED_TIMER_HANDLES_FRACTION: float = _stock._MIN_CANCELLED_TIMER_HANDLES_FRACTION
_MAXIMUM_SELECT_TIMEOUT: float = _stock.MAXIMUM_SELECT_TIMEOUT

CURRENT_HOST: contextvars.ContextVar[Host | None] = contextvars.ContextVar("kvstore_sim_host", default=None)


class Host:
    """One simulated process: owns the tasks created in its context, can be paused or crashed."""

    def __init__(self, name: str) -> None:
        self.name = name
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
        for task in loop.tasks_of(self):
            task.cancel()


class VirtualSelector(selectors.SelectSelector):
    """A selector that never waits: ``select(t)`` advances the simulated clock by ``t``."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        assert loop is not None
        loop._advance(timeout)
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
        self._all_tasks: dict[asyncio.Task[Any], Host | None] = {}  # creation order (a dict, not a set)
        self._prune_at = PRUNE_TASKS_AT

    def time(self) -> float:
        return self.now_ns / NS_PER_S

    # --- the loop's step, on simulated time ------------------------------------------------

    def _advance(self, timeout: float | None) -> None:
        """What ``select(timeout)`` means here: one more step, and the clock moves by ``timeout``."""
        self.steps += 1
        if _abort_reason is not None:
            raise SimAborted(_abort_reason)
        if self.steps > self.max_steps:
            raise SimLimitExceeded(f"more than {self.max_steps} loop steps (simulated t={self.now_ns / NS_PER_S:.3f} s)")
        if timeout is None:
            raise SimDeadlock(self.now_ns, self.describe_waiting())
        if timeout > 0:
            # +1 ns: the loop pops timers strictly earlier than now + resolution, and the
            # float seconds of a timer's ``when`` may round a hair above the integer instant.
            target = self.now_ns + int(timeout * NS_PER_S) + 1
            if target > self.max_time_ns:
                raise SimLimitExceeded(
                    f"simulated time would pass its limit of {self.max_time_ns / NS_PER_S:.0f} s; "
                    f"waiting: {', '.join(self.describe_waiting()[:10])}"
                )
            self.now_ns = target

    def _run_once(self) -> None:
        """``BaseEventLoop._run_once`` without the selector, I/O events and debug timing: the same
        steps in the same order (drop cancelled timers, advance the clock to the next timer when
        nothing is ready, move the due timers to the ready queue, run what was ready), so a seed
        makes exactly the steps it made on the stock loop, for a fraction of the cost.  In asyncio's
        debug mode (decided when the loop is made, e.g. ``PYTHONASYNCIODEBUG``) the stock step and
        timers run instead; switching debug mode on a running simulation is not supported."""
        stock: Any = self  # the base loop's private state, which this method reimplements
        if stock._debug:
            super()._run_once()  # type: ignore[misc]
            return
        # The timer heap holds (when, handle) pairs: a pair compares its float in C, and for equal
        # instants falls back to the handles, which never order equal instants -- so the heap makes
        # exactly the comparisons, and keeps exactly the order, of the stock heap of handles.
        scheduled: list[tuple[float, Any]] = stock._scheduled
        sched_count = len(scheduled)
        if (sched_count > _MIN_SCHEDULED_TIMER_HANDLES
                and stock._timer_cancelled_count / sched_count > _MIN_CANCELLED_TIMER_HANDLES_FRACTION):
            kept = []
            for entry in scheduled:
                if entry[1]._cancelled:
                    entry[1]._scheduled = False
                else:
                    kept.append(entry)
            heapq.heapify(kept)
            stock._scheduled = scheduled = kept
            stock._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0][1]._cancelled:
                stock._timer_cancelled_count -= 1
                heapq.heappop(scheduled)[1]._scheduled = False
        ready = stock._ready
        if ready or stock._stopping:
            self._advance(0)
        elif scheduled:
            self._advance(min(max(0, scheduled[0][0] - self.now_ns / NS_PER_S), _MAXIMUM_SELECT_TIMEOUT))
        else:
            self._advance(None)
        end_time = self.now_ns / NS_PER_S + stock._clock_resolution
        while scheduled:
            if scheduled[0][0] >= end_time:
                break
            timer = heapq.heappop(scheduled)[1]
            timer._scheduled = False
            ready.append(timer)
        popleft = ready.popleft
        for _ in range(len(ready)):
            handle = popleft()
            if not handle._cancelled:
                handle._run()
        handle = None  # break cycles when an exception occurred, as the stock loop does

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> events.TimerHandle:
        stock: Any = self
        if stock._debug:
            return super().call_at(when, callback, *args, context=context)
        if when is None:
            raise TypeError("when cannot be None")
        if stock._closed:
            raise RuntimeError("Event loop is closed")
        timer = _TimerHandle(when, callback, args, self, context)
        heapq.heappush(stock._scheduled, (when, timer))
        timer._scheduled = True
        return timer

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> events.TimerHandle:
        if delay is None:
            raise TypeError("delay must not be None")
        return self.call_at(self.now_ns / NS_PER_S + delay, callback, *args, context=context)

    # --- task ownership -------------------------------------------------------------------

    def create_task(  # type: ignore[override]
        self, coro: Any, *, name: str | None = None, context: contextvars.Context | None = None
    ) -> asyncio.Task[Any]:
        task = super().create_task(coro, name=name, context=context)
        host = context.get(CURRENT_HOST) if context is not None else CURRENT_HOST.get()
        # Finished tasks are dropped in batches (when the table doubled), not by a done callback:
        # that callback was one loop step per task, the most frequent step of a run.
        self._all_tasks[task] = host
        if len(self._all_tasks) > self._prune_at:
            self._drop_finished()
        return task

    def _drop_finished(self) -> None:
        self._all_tasks = {task: host for task, host in self._all_tasks.items() if not task.done()}
        self._prune_at = max(PRUNE_TASKS_AT, 2 * len(self._all_tasks))

    def tasks_in_order(self) -> list[asyncio.Task[Any]]:
        """Every unfinished task, in creation order (``asyncio.all_tasks`` is a set)."""
        return [task for task in self._all_tasks if not task.done()]

    def tasks_of(self, host: Host) -> list[asyncio.Task[Any]]:
        """The unfinished tasks of ``host``, in creation order."""
        return [task for task, owner in self._all_tasks.items() if owner is host and not task.done()]

    def describe_waiting(self) -> list[str]:
        out = []
        for task, host in self._all_tasks.items():
            if task.done():
                continue
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
                handle = _Handle(callback, args, self, context)
                host.held.append(handle)
                return handle
        stock: Any = self
        if stock._debug:
            return super().call_soon(callback, *args, context=context)
        if stock._closed:
            raise RuntimeError("Event loop is closed")
        handle = _Handle(callback, args, self, context)
        stock._ready.append(handle)
        return handle


# Timers that belong to no simulated process (a reply's deadline): run them in an empty context.
_NO_HOST = contextvars.Context()


class _Expired(Exception):
    """Set on a future whose deadline passed (``wait_answer``); never escapes it."""


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_Expired())


async def wait_answer(future: asyncio.Future[T], timeout_s: float) -> T:
    """``asyncio.wait_for(future, timeout_s)`` for a plain future that the simulator settles (a reply).

    ``wait_for`` wraps the future in a waiter with its own done callback, so an answer wakes the
    caller two loop steps after it arrives; here the deadline is a timer that fails the future
    itself, and an answer wakes the caller at the next step.  The outcomes are ``wait_for``'s:
    the result, the future's exception, ``TimeoutError`` once ``timeout_s`` passed (the future is
    then done: a late answer is ignored), and a cancelled caller cancels the future."""
    if timeout_s <= 0:
        if future.done():
            return future.result()
        future.cancel()
        raise TimeoutError
    expiry = future.get_loop().call_later(timeout_s, _expire, future, context=_NO_HOST)
    try:
        return await future
    except _Expired:
        raise TimeoutError from None
    finally:
        expiry.cancel()


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
            # Release the finished tasks now, while the run's log handlers are still in place (a
            # task whose exception nobody retrieved logs it when it is freed), not at some later GC.
            loop._all_tasks.clear()
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all(loop: VirtualLoop) -> None:
    clear_abort()  # an abort has stopped the run; the tasks still get their bounded chance to unwind
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
