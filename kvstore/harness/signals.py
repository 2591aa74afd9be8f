"""Stopping long-running commands cleanly on Ctrl-C *and* SIGTERM.

Python turns SIGINT into KeyboardInterrupt, but SIGTERM (what ``kill``, a supervisor or CI
sends) ends the process at once, skipping every ``finally``: a chaos run or the explorer would
leave its node processes (started in their own session) running and its faults installed.  And a
command started in the background by a non-interactive shell inherits SIGINT as *ignored*.
``run_until_signalled`` makes both signals cancel the main task instead, so the harness heals
and stops its clusters by PID on the way out.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(Exception):
    """The command was stopped by SIGINT or SIGTERM after cleaning up."""


def run_until_signalled(main: Coroutine[Any, Any, T]) -> T:
    async def runner() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        received: list[int] = []

        def stop(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await main
        except asyncio.CancelledError:
            if received:
                raise Interrupted(signal.Signals(received[0]).name) from None
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    return asyncio.run(runner())
