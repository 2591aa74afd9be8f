"""Transport seam: how nodes send each other internal messages.

Theory of operation
-------------------
Every node-to-node interaction (replica reads and writes, hints, heartbeats,
Paxos phases, Merkle exchanges) is a request/response ``call`` of one small
message (a ``dict`` of msgpack-able values) to a peer named by member id.  A
call either returns the peer's reply or raises ``PeerUnavailable``: the caller
cannot tell a lost request from a lost reply, so a write that timed out may
still have been applied (the coordinator reports it as *indeterminate*, as
Dynamo and Jepsen do).

Implementations:

* ``StreamTransport`` (real): one persistent TCP connection per peer, framed
  msgpack, many requests multiplexed by id; authenticated by the cluster
  secret in a hello frame.
* ``HttpTransport`` (real, baseline only): one HTTP POST per message; kept to
  measure what multiplexing buys.
* ``MemoryNetwork`` / ``MemoryTransport`` (simulated): in-process delivery
  with seeded random delay and loss, for reproducible scenario tests.

All of them pass every incoming and outgoing message through a
``FaultRules`` table (partitions, one-way cuts, delay, loss) so a partition is
enforced on both ends: a node drops what it would send to a cut peer and
what arrives from it.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, Any]
# handler(sender_member_id, message) -> reply
Handler = Callable[[str, Message], Awaitable[Message]]


class TransportError(Exception):
    """Base of the transport's operating errors."""


class PeerUnavailable(TransportError):
    """The peer did not answer: refused, cut by a fault rule, timed out or disconnected.

    ``maybe_delivered`` is True when the request may have reached the peer (so a write
    may have been applied there).
    """

    def __init__(self, peer: str, reason: str, maybe_delivered: bool) -> None:
        super().__init__(f"peer {peer} unavailable: {reason}")
        self.peer = peer
        self.reason = reason
        self.maybe_delivered = maybe_delivered


class RemoteError(TransportError):
    """The peer answered with an error (its handler raised a typed operating error)."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(f"peer {peer}: {code}: {message}")
        self.peer = peer
        self.code = code
        self.message = message


class Transport(Protocol):
    node_id: str
    faults: FaultRules

    async def start(self, handler: Handler) -> None:
        """Begin accepting messages; ``handler`` answers each one."""
        ...

    async def call(self, peer: str, message: Message, timeout_s: float) -> Message:
        """Send ``message`` to ``peer`` and wait for its reply (raises PeerUnavailable/RemoteError)."""
        ...

    async def close(self) -> None:
        ...

    def add_peers(self, peers: Mapping[str, tuple[str, int, int]]) -> None:
        """Learn more members' addresses (id -> (host, peer_port, http_port)) after a membership
        change; peers are only ever added, so a removed member can still learn its removal."""
        ...


@dataclass
class LinkRule:
    """What happens to messages on one directed link (this node <-> peer)."""

    drop_out: bool = False  # drop messages this node sends to the peer
    drop_in: bool = False  # drop messages this node receives from the peer
    delay_ms: float = 0.0  # added one-way delay (mean)
    jitter_ms: float = 0.0  # uniform +/- jitter around delay_ms
    loss: float = 0.0  # probability of dropping a message (each direction)

    def is_clear(self) -> bool:
        return not (self.drop_out or self.drop_in or self.delay_ms or self.jitter_ms or self.loss)


@dataclass
class FaultRules:
    """Per-peer fault rules of one node, changeable at run time.

    ``rng`` is seeded so loss and jitter are reproducible in simulations.  A healthy
    node has an empty table, and the fast path is one dict lookup per message.
    """

    links: dict[str, LinkRule] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def set_rule(self, peer: str, rule: LinkRule) -> None:
        if rule.is_clear():
            self.links.pop(peer, None)
        else:
            self.links[peer] = rule

    def clear(self) -> None:
        self.links.clear()

    def outgoing_delay_s(self, peer: str) -> float | None:
        """None: drop the outgoing message; otherwise the delay to add before sending."""
        rule = self.links.get(peer)
        if rule is None:
            return 0.0
        if rule.drop_out or (rule.loss and self.rng.random() < rule.loss):
            return None
        return self._delay_s(rule)

    def incoming_dropped(self, peer: str) -> bool:
        rule = self.links.get(peer)
        if rule is None:
            return False
        return rule.drop_in or bool(rule.loss and self.rng.random() < rule.loss)

    def _delay_s(self, rule: LinkRule) -> float:
        if not rule.delay_ms and not rule.jitter_ms:
            return 0.0
        jitter = self.rng.uniform(-rule.jitter_ms, rule.jitter_ms) if rule.jitter_ms else 0.0
        return max(0.0, rule.delay_ms + jitter) / 1000.0

    def to_json(self) -> dict[str, Any]:
        return {
            peer: {
                "drop_out": r.drop_out,
                "drop_in": r.drop_in,
                "delay_ms": r.delay_ms,
                "jitter_ms": r.jitter_ms,
                "loss": r.loss,
            }
            for peer, r in sorted(self.links.items())
        }
