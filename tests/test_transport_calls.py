"""The stream transport's calls, in process on real sockets: one future per call, settled once.

A call's future is resolved by the connection's reader, failed by its deadline timer or by the
connection's loss; a cancelled call leaves nothing in the connection's table.  The handlers
here block on events the test releases, so no assertion depends on how fast anything runs
(deadlines are short only where the test waits for them to pass).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from kvstore.harness.local_cluster import free_ports
from kvstore.transport import stream
from kvstore.transport.base import LinkRule, PeerUnavailable, RemoteError
from kvstore.transport.stream import StreamTransport

SECRET = "secret-123"
WAIT_S = 30.0  # bound of every wait for a condition (never an expected duration)


class Server:
    """b's handler: answers at once, or holds each ``hold`` call until the test releases it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = 0
        self.answered: list[str] = []

    async def __call__(self, sender: str, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("fail"):
            return {"error": "refused", "message": "as asked", "remote_error": True}
        if message.get("hold"):
            self.held += 1
            await self.release.wait()
        self.answered.append(message["tag"])
        return {"ok": True, "tag": message["tag"]}


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[StreamTransport, StreamTransport, Server]]:
    port_a, port_b = free_ports(2)
    a = StreamTransport("a", SECRET, {"b": ("127.0.0.1", port_b)}, ("127.0.0.1", port_a))
    b = StreamTransport("b", SECRET, {"a": ("127.0.0.1", port_a)}, ("127.0.0.1", port_b))
    server = Server()

    async def nothing(sender: str, message: dict[str, Any]) -> dict[str, Any]:
        return {}

    await a.start(nothing)
    await b.start(server)
    try:
        yield a, b, server
    finally:
        server.release.set()
        await a.close()
        await b.close()


async def until(condition: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_S
    while not condition():
        assert loop.time() < give_up, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.005)


def pending(a: StreamTransport) -> int:
    return len(a._conns["b"].pending)


async def test_a_call_on_an_open_connection_is_a_future_the_reader_resolves() -> None:
    async with pair() as (a, _b, server):
        assert a.start_call("b", {"tag": "x"}, WAIT_S) is None, "no connection yet: only call() connects"
        assert await a.call("b", {"tag": "first"}, WAIT_S) == {"ok": True, "tag": "first"}
        fut = a.start_call("b", {"tag": "second"}, WAIT_S)
        assert fut is not None
        assert await fut == {"ok": True, "tag": "second"}
        assert server.answered == ["first", "second"] and pending(a) == 0


async def test_an_error_reply_fails_the_future_with_remote_error() -> None:
    async with pair() as (a, _b, _server):
        await a.call("b", {"tag": "connect"}, WAIT_S)
        fut = a.start_call("b", {"tag": "x", "fail": True}, WAIT_S)
        assert fut is not None
        with pytest.raises(RemoteError) as exc:
            await fut
        assert (exc.value.peer, exc.value.code) == ("b", "refused")
        with pytest.raises(RemoteError):
            await a.call("b", {"tag": "y", "fail": True}, WAIT_S)


async def test_the_deadline_fails_the_call_as_maybe_delivered_and_a_late_reply_is_ignored() -> None:
    async with pair() as (a, _b, server):
        await a.call("b", {"tag": "connect"}, WAIT_S)
        with pytest.raises(PeerUnavailable) as exc:
            await a.call("b", {"tag": "slow", "hold": True}, 0.05)
        assert exc.value.maybe_delivered and exc.value.reason == "timeout"
        assert pending(a) == 0, "a call past its deadline leaves nothing behind"
        fut = a.start_call("b", {"tag": "slow2", "hold": True}, 0.05)
        assert fut is not None
        with pytest.raises(PeerUnavailable) as exc:
            await fut
        assert exc.value.maybe_delivered and pending(a) == 0
        server.release.set()  # both handlers now answer, after their callers' deadlines
        await until(lambda: server.answered == ["connect", "slow", "slow2"], "the held handlers answered")
        # The late replies were read and ignored: the connection still serves calls.
        assert await a.call("b", {"tag": "after"}, WAIT_S) == {"ok": True, "tag": "after"}
        assert pending(a) == 0


async def test_a_cancelled_call_is_forgotten_at_once_and_its_handler_still_runs() -> None:
    async with pair() as (a, _b, server):
        await a.call("b", {"tag": "connect"}, WAIT_S)
        caller = asyncio.create_task(a.call("b", {"tag": "awaited", "hold": True}, WAIT_S))
        fut = a.start_call("b", {"tag": "future", "hold": True}, WAIT_S)
        assert fut is not None
        await until(lambda: server.held == 2, "both calls reached the handler")
        assert pending(a) == 2
        caller.cancel()
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)  # the futures' done callbacks run
        assert pending(a) == 0, "cancelled calls leave no entry (nor a live timer) behind"
        server.release.set()
        await until(lambda: len(server.answered) == 3, "the sent requests still landed")
        assert sorted(server.answered) == ["awaited", "connect", "future"]
        assert await a.call("b", {"tag": "after"}, WAIT_S) == {"ok": True, "tag": "after"}


async def test_losing_the_connection_fails_every_pending_call_as_maybe_delivered() -> None:
    async with pair() as (a, b, server):
        await a.call("b", {"tag": "connect"}, WAIT_S)
        futures = [a.start_call("b", {"tag": f"c{i}", "hold": True}, WAIT_S) for i in range(3)]
        awaited = asyncio.create_task(a.call("b", {"tag": "awaited", "hold": True}, WAIT_S))
        await until(lambda: server.held == 4, "every call reached the handler")
        await b.close()  # the peer goes away with all four calls in flight
        for fut in futures:
            assert fut is not None
            with pytest.raises(PeerUnavailable) as exc:
                await fut
            assert exc.value.maybe_delivered and exc.value.reason == "connection lost"
        with pytest.raises(PeerUnavailable) as exc:
            await awaited
        assert exc.value.maybe_delivered
        assert "b" not in a._conns
        assert a.start_call("b", {"tag": "x"}, WAIT_S) is None


async def test_calls_over_the_in_flight_bound_fail_fast_as_not_delivered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "MAX_INFLIGHT_PER_PEER", 2)
    async with pair() as (a, _b, server):
        await a.call("b", {"tag": "connect"}, WAIT_S)
        held = [a.start_call("b", {"tag": f"h{i}", "hold": True}, WAIT_S) for i in range(2)]
        over = a.start_call("b", {"tag": "over"}, WAIT_S)
        assert over is not None and over.done()
        with pytest.raises(PeerUnavailable) as exc:
            await over
        assert not exc.value.maybe_delivered
        with pytest.raises(PeerUnavailable):
            await a.call("b", {"tag": "over2"}, WAIT_S)
        server.release.set()
        for fut in held:
            assert fut is not None and (await fut)["ok"]
        assert "over" not in server.answered and "over2" not in server.answered


async def test_a_fault_rule_on_the_link_takes_the_call_off_the_fast_path() -> None:
    async with pair() as (a, _b, server):
        await a.call("b", {"tag": "connect"}, WAIT_S)
        a.faults.set_rule("b", LinkRule(drop_out=True))
        assert a.start_call("b", {"tag": "x"}, WAIT_S) is None, "the rule is applied by call()"
        with pytest.raises(PeerUnavailable) as exc:
            await a.call("b", {"tag": "cut"}, 0.05)
        assert not exc.value.maybe_delivered and "cut" not in server.answered
        a.faults.clear()
        fut = a.start_call("b", {"tag": "healed"}, WAIT_S)
        assert fut is not None and await fut == {"ok": True, "tag": "healed"}
