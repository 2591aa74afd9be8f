"""In-memory simulated network: the Transport for reproducible scenario tests.

Theory of operation
-------------------
A ``MemoryNetwork`` connects any number of ``MemoryTransport`` endpoints inside
one event loop.  A call is delivered by scheduling the peer's handler; each
endpoint's ``FaultRules`` apply on the way out (sender side) and on the way in
(receiver side), exactly like the real transport, so a scenario test exercises
the same partition semantics.  Message loss and jitter draw from the rules'
seeded ``random.Random``: given the same seed and the same sequence of calls,
the same messages are lost.

Messages are deep-copied through msgpack so that no object is shared between
"nodes" (a shared mutable dict would hide bugs that a real network exposes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import msgpack

from kvstore.transport.base import FaultRules, Handler, Message, PeerUnavailable, RemoteError


class MemoryNetwork:
    def __init__(self) -> None:
        self.endpoints: dict[str, MemoryTransport] = {}

    def endpoint(self, node_id: str, faults: FaultRules | None = None) -> MemoryTransport:
        assert node_id not in self.endpoints, f"duplicate endpoint {node_id}"
        transport = MemoryTransport(self, node_id, faults or FaultRules())
        self.endpoints[node_id] = transport
        return transport

    def partition(self, *groups: list[str]) -> None:
        """Cut every link between nodes of different groups, both directions, on both ends."""
        from kvstore.transport.base import LinkRule

        side = {node: i for i, group in enumerate(groups) for node in group}
        for a, ta in self.endpoints.items():
            for b in self.endpoints:
                if a != b and a in side and b in side and side[a] != side[b]:
                    ta.faults.set_rule(b, LinkRule(drop_out=True, drop_in=True))

    def heal(self) -> None:
        for transport in self.endpoints.values():
            transport.faults.clear()


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, node_id: str, faults: FaultRules) -> None:
        self.network = network
        self.node_id = node_id
        self.faults = faults
        self.handler: Handler | None = None
        self.up = True  # False simulates a crashed process: nothing in, nothing out

    def add_peers(self, peers: Mapping[str, tuple[str, int, int]]) -> None:
        pass  # the simulated network routes by member id

    async def start(self, handler: Handler) -> None:
        self.handler = handler
        self.up = True

    async def close(self) -> None:
        self.up = False
        self.handler = None

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        try:
            return await asyncio.wait_for(self._deliver(peer, message), timeout_s)
        except TimeoutError:
            raise PeerUnavailable(peer, "timeout", maybe_delivered=True) from None

    async def _deliver(self, peer: str, message: Message) -> Message:
        if not self.up:
            raise PeerUnavailable(peer, "sender down", maybe_delivered=False)
        delay_s = self.faults.outgoing_delay_s(peer)
        if delay_s is None:
            await asyncio.sleep(3600)  # a dropped message looks like silence; the caller's timeout ends it
        elif delay_s:
            await asyncio.sleep(delay_s)
        target = self.network.endpoints.get(peer)
        if target is None or not target.up or target.handler is None:
            raise PeerUnavailable(peer, "connection refused", maybe_delivered=False)
        if target.faults.incoming_dropped(self.node_id):
            await asyncio.sleep(3600)
        wire = msgpack.packb(message, use_bin_type=True)
        reply = await target.handler(self.node_id, msgpack.unpackb(wire, raw=False))
        if not self.up or not target.up:
            await asyncio.sleep(3600)
        reply = msgpack.unpackb(msgpack.packb(reply, use_bin_type=True), raw=False)
        if isinstance(reply, dict) and reply.get("error") and reply.get("remote_error"):
            raise RemoteError(peer, str(reply["error"]), str(reply.get("message", "")))
        return reply
