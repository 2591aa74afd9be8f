"""``Node.call`` / ``Node.start_call`` to itself and through a transport without a fast path.

A local call is the handler's task plus one future and a deadline timer: past the deadline (or
when its caller gives up) the caller gets its answer while the handler finishes in the
background, tracked by the node, as a remote handler would.  Runs on virtual time
(``@simulated``): the deadlines are simulated, a busy machine cannot fire them early or late.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from kvstore.protocol.calls import CallFailed, Reply
from kvstore.runtime.calls import answer_of
from kvstore.runtime.node import Node
from kvstore.transport.base import PeerUnavailable, RemoteError
from tests.test_coordinator_driver import Cluster, start
from tests.vtime import simulated


class Held:
    """A test op on the node: answers when released (or an error reply when asked)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.finished = 0

    async def __call__(self, sender: str, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("fail"):
            return {"error": "refused", "message": "as asked", "remote_error": True}
        self.started += 1
        await self.release.wait()
        self.finished += 1
        return {"ok": True}


@asynccontextmanager
async def node_with_held_op() -> AsyncIterator[tuple[Cluster, Node, Held]]:
    cluster = await start(3, 3)
    node = cluster.nodes[0]
    held = Held()
    node.handlers["test_held"] = held
    try:
        yield cluster, node, held
    finally:
        held.release.set()
        for each in cluster.nodes:
            await each.stop()


@simulated
async def test_a_local_call_past_its_deadline_fails_maybe_delivered_and_the_handler_finishes_tracked() -> None:
    async with node_with_held_op() as (_cluster, node, held):
        with pytest.raises(PeerUnavailable) as exc:
            await node.call(node.node_id, {"op": "test_held"}, 0.5)
        assert exc.value.maybe_delivered and "local handler" in exc.value.reason
        fut = node.start_call(node.node_id, {"op": "test_held"}, 0.5)
        with pytest.raises(PeerUnavailable):
            await fut
        assert held.started == 2 and held.finished == 0
        tracked = [task for task in node._background if not task.done()]
        assert len(tracked) >= 2, "the handlers still running are tracked by the node"
        held.release.set()
        await asyncio.sleep(0.01)
        assert held.finished == 2, "the handlers were not interrupted by the deadline"


@simulated
async def test_a_cancelled_local_call_leaves_its_handler_running_to_the_end() -> None:
    async with node_with_held_op() as (_cluster, node, held):
        caller = asyncio.create_task(node.call(node.node_id, {"op": "test_held"}, 30.0))
        fut = node.start_call(node.node_id, {"op": "test_held"}, 30.0)
        await asyncio.sleep(0.01)
        assert held.started == 2
        caller.cancel()
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        held.release.set()
        await asyncio.sleep(0.01)
        assert held.finished == 2


@simulated
async def test_a_local_call_answers_its_reply_or_its_error_reply_as_remote_error() -> None:
    async with node_with_held_op() as (_cluster, node, held):
        held.release.set()
        assert await node.call(node.node_id, {"op": "test_held"}, 5.0) == {"ok": True}
        assert await node.start_call(node.node_id, {"op": "test_held"}, 5.0) == {"ok": True}
        with pytest.raises(RemoteError) as exc:
            await node.start_call(node.node_id, {"op": "test_held", "fail": True}, 5.0)
        assert exc.value.code == "refused"


@simulated
async def test_start_call_through_a_transport_without_a_fast_path_runs_call_in_a_task() -> None:
    async with node_with_held_op() as (cluster, node, _held):
        peer = cluster.nodes[1]
        peer.handlers["test_held"] = Held()
        assert node._start_remote is None  # the memory transport has no start_call
        fut = node.start_call(peer.node_id, {"op": "test_held"}, 0.5)
        assert isinstance(fut, asyncio.Task)
        with pytest.raises(PeerUnavailable) as exc:
            await fut
        assert exc.value.maybe_delivered
        with pytest.raises(RemoteError):
            await node.start_call(peer.node_id, {"op": "test_held", "fail": True}, 5.0)



# --- answer_of: how both drivers read a finished call (kvstore.runtime.calls) --------------------

_CANCELLED = object()


@pytest.mark.parametrize(
    ("outcome", "refusals", "recovering", "expected"),
    [
        ({"ok": 1}, (), False, Reply(7, {"ok": 1})),
        (_CANCELLED, ("x",), False, CallFailed(7, maybe_delivered=True)),
        (PeerUnavailable("n2", "refused", maybe_delivered=False), (), False, CallFailed(7, maybe_delivered=False)),
        (PeerUnavailable("n2", "timeout", maybe_delivered=True), (), False, CallFailed(7, maybe_delivered=True)),
        (RemoteError("n2", "overloaded", "busy"), ("overloaded",), False, CallFailed(7, maybe_delivered=False)),
        (RemoteError("n2", "recovering", "lost disk"), ("recovering",), True,
         CallFailed(7, maybe_delivered=False, recovering=True)),
        (RemoteError("n2", "storage_error", "mid-write"), ("overloaded",), True,
         CallFailed(7, maybe_delivered=True)),  # may have landed
        (ValueError("bug"), ("overloaded",), False, CallFailed(7, maybe_delivered=True)),
    ],
)
def test_answer_of_a_finished_call(outcome: object, refusals: tuple[str, ...], recovering: bool, expected: object) -> None:
    loop = asyncio.new_event_loop()
    try:
        fut: asyncio.Future[Any] = loop.create_future()
        if outcome is _CANCELLED:
            fut.cancel()
        elif isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
        assert answer_of(7, fut, refusals, refusal_is_recovering=recovering) == expected
    finally:
        loop.close()
