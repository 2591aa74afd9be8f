"""The simulated network between simulated nodes: latency, loss, partitions, crashes.

Theory of operation
-------------------
``SimNetwork`` carries every internal message of a simulated cluster; each node's boot gets a
``SimTransport`` endpoint (the ``Transport`` seam).  It is the in-memory transport of
``kvstore.transport.memory`` reworked for a whole-cluster simulation, where one thing matters
that a scenario test can ignore: *whose process runs what*.  A message is handled by a task of
the receiving node's ``Host`` (``kvstore.sim.vloop``), never inside the caller's task, so a
crash of the receiver cancels the handling (and only that), and a paused receiver holds it.

A call, step by step (mirroring ``kvstore.transport.stream``, the real transport):

1. The sender's ``FaultRules`` decide on the way out: a cut link (``drop_out``, a partition)
   means the caller waits out its timeout and gets ``PeerUnavailable(maybe_delivered=False)``,
   as the real transport does; loss drops the message silently (the caller times out,
   ``maybe_delivered=True``); delay and jitter add to the transit time.
2. The message travels for the rule's delay plus a one-way network latency drawn from the
   ``Latency`` distribution, and is copied through msgpack (no object is shared between nodes).
3. On arrival: a receiver that is down (crashed, not restarted) refuses the connection (the
   caller learns it one latency later, ``maybe_delivered=False``); the receiver's rules may drop
   it (``drop_in``, loss); otherwise a task of the receiver's host runs its handler.  A message
   always arrives, even if its caller gave up meanwhile: a timed-out write may still be applied.
4. The reply goes back through the receiver's outgoing rules and another latency (as in the
   real transport, a reply is an outgoing message of the receiver).  If the receiver crashes
   while handling, the caller gets ``PeerUnavailable("connection lost", maybe_delivered=True)``
   one latency later, like a TCP reset.

Every random draw (latency, jitter, loss) comes from the one ``random.Random`` the network is
given, in the order the messages are sent, so a seed replays the same network.  Partitions and
one-way cuts are ordinary ``FaultRules`` link rules on each endpoint (the nemesis installs a
Jepsen grudge exactly as it does on real nodes through ``/admin/faults``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from kvstore.sim.vloop import Host, wait_answer
from kvstore.transport.base import FaultRules, Handler, Message, PeerUnavailable, RemoteError

log = logging.getLogger(__name__)

# Network events (a message arriving, a reply arriving) belong to no process.
_NO_HOST = contextvars.Context()


@dataclass(frozen=True)
class Latency:
    """One-way latency: lognormal around ``median_ms`` (shape ``sigma``; 0 is constant), at most ``max_ms``."""

    median_ms: float = 0.5
    sigma: float = 0.5
    max_ms: float = 50.0

    def __post_init__(self) -> None:
        assert 0 <= self.median_ms <= self.max_ms and self.sigma >= 0, self

    def sample_s(self, rng: random.Random) -> float:
        if not self.sigma:
            return self.median_ms / 1000.0
        return min(self.max_ms, self.median_ms * rng.lognormvariate(0.0, self.sigma)) / 1000.0


# One packer for every message (``msgpack.packb`` builds a new one per call); it resets itself
# after each message, also after a failed one.
_pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack


def _unpack(wire: bytes) -> Any:
    return msgpack.unpackb(wire, raw=False)


class SimNetwork:
    def __init__(self, rng: random.Random, latency: Latency | None = None) -> None:
        self.rng = rng
        self.latency = latency or Latency()
        self.endpoints: dict[str, SimTransport] = {}
        self.messages_sent = 0

    def attach(self, node_id: str, host: Host) -> SimTransport:
        """The endpoint of a new boot of ``node_id`` (its previous one must be down)."""
        old = self.endpoints.get(node_id)
        assert old is None or not old.up, f"{node_id} is still up"
        transport = SimTransport(self, node_id, host, FaultRules(rng=self.rng))
        self.endpoints[node_id] = transport
        return transport

    def transit_s(self) -> float:
        return self.latency.sample_s(self.rng)

    def _later(self, delay_s: float, callback: Any, *args: Any) -> None:
        asyncio.get_running_loop().call_later(delay_s, callback, *args, context=_NO_HOST)

    # --- the life of one message ----------------------------------------------------------

    def _arrive(self, sender: str, peer: str, wire: bytes, reply: asyncio.Future[Any]) -> None:
        target = self.endpoints.get(peer)
        if target is None or not target.up or target.handler is None:
            refused = PeerUnavailable(peer, "connection refused", maybe_delivered=False)
            self._later(self.transit_s(), _settle, reply, None, refused)
            return
        if target.faults.incoming_dropped(sender):
            return  # a partitioned or lossy link: the message vanishes, the caller times out
        # The handler (the node's ``handle_message``) is a coroutine function: its coroutine is the task.
        handling = cast(Coroutine[Any, Any, Message], target.handler(sender, _unpack(wire)))
        task = target.host.spawn(handling, name=f"{peer}<-{sender}")
        task.add_done_callback(lambda done: target._answered(done, sender, reply))


def _settle(reply: asyncio.Future[Any], wire: bytes | None, error: BaseException | None) -> None:
    if reply.done():
        return  # the caller gave up (timeout) or its process crashed
    if error is not None:
        reply.set_exception(error)
    else:
        assert wire is not None
        reply.set_result(_unpack(wire))


class SimTransport:
    """One boot's endpoint on a ``SimNetwork`` (the ``Transport`` seam)."""

    def __init__(self, network: SimNetwork, node_id: str, host: Host, faults: FaultRules) -> None:
        self.network = network
        self.node_id = node_id
        self.host = host
        self.faults = faults
        self.handler: Handler | None = None
        self.up = True  # False once this boot crashed or stopped: nothing in, nothing out

    async def start(self, handler: Handler) -> None:
        self.handler = handler

    def add_peers(self, peers: Mapping[str, tuple[str, int, int]]) -> None:
        pass  # the simulated network routes by member id

    async def close(self) -> None:
        self.up = False

    def crash(self) -> None:
        self.up = False

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        if not self.up:
            raise PeerUnavailable(peer, "sender down", maybe_delivered=False)
        delay_s = self.faults.outgoing_delay_s(peer)
        if delay_s is None:
            # Cut (or lost on the way out): what a partition looks like to the real transport's caller.
            await asyncio.sleep(max(0.0, timeout_s))
            raise PeerUnavailable(peer, "timeout (link cut)", maybe_delivered=False)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        network = self.network
        network.messages_sent += 1
        network._later(delay_s + network.transit_s(), network._arrive, self.node_id, peer, _pack(message), reply)
        try:
            answer = await wait_answer(reply, timeout_s)
        except TimeoutError:
            raise PeerUnavailable(peer, "timeout", maybe_delivered=True) from None
        if isinstance(answer, dict) and answer.get("remote_error"):
            raise RemoteError(peer, str(answer.get("error")), str(answer.get("message", "")))
        return answer  # type: ignore[no-any-return]

    def _answered(self, task: asyncio.Task[Message], sender: str, reply: asyncio.Future[Any]) -> None:
        """The handler of a call from ``sender`` finished (or was cancelled by a crash)."""
        wire: bytes | None = None
        error: BaseException | None = None
        if task.cancelled():
            error = PeerUnavailable(self.node_id, "connection lost", maybe_delivered=True)
        elif task.exception() is not None:
            exc = task.exception()
            log.error("handler on %s failed for a message from %s", self.node_id, sender, exc_info=exc)
            wire = _pack({"error": "internal", "message": str(exc), "remote_error": True})
        else:
            wire = _pack(task.result())
        delay_s = self.faults.outgoing_delay_s(sender)
        if delay_s is None:
            return  # the reply is an outgoing message of ours: a cut link drops it
        self.network._later(delay_s + self.network.transit_s(), _settle, reply, wire, error)
