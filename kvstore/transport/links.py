"""What the handshakes of each peer link said, in both directions: why a member shows as refused.

Theory of operation
-------------------
The failure detector (kvstore.protocol.failure) only knows whether heartbeats arrive.  A link whose
handshake is *refused* (a wrong cluster secret, a node that is not a member, another protocol
version, a certificate the other side does not trust) is a different fault: the peer is running
and answering, but nothing can be sent to it, and no amount of waiting fixes it.  Showing such a
peer "up, phi 0.00" (the detector is optimistic about a peer it never heard from) or merely
"down" hides the cause from the operator.  ``LinkTable`` keeps the evidence the transport sees:

* **they refuse us** (outgoing): the last handshake this node attempted with a member was answered
  with a refusal frame or failed TLS verification on their side.  It stands until a handshake with
  that member succeeds, or one fails without a refusal (the peer went away: the detector's "down"
  then tells the truth).  While it stands the node does not route to the member (``Node.is_up``).
* **we refuse them** (incoming): a connection claiming to be a member was refused here.  The claim
  is not proven (the hello failed), so the remote address is kept with it.  It stands until that
  member authenticates, and is forgotten ``STALE_AFTER_S`` after the last such connection (a
  refused member retries every heartbeat interval, so a live cause keeps it fresh).  Our own
  attempt to reach a member can also be refused by us: its TLS certificate is not one we trust.
  That counts as "we refuse them" and, like "they refuse us", stops routing to it until a
  handshake succeeds.
* **strangers**: refused connections claiming an id that is not a member (a node whose member list
  has this cluster's members but not the other way round, a copy-pasted config).  At most
  ``MAX_STRANGERS`` are kept, the least recently seen dropped first, so a flood of made-up ids
  costs a fixed amount of memory.

A run of refusals with the same code keeps its first time (``since``) and counts attempts; a new
code starts a new run.  Time comes from the ``Clock`` it is given (monotonic for ages, wall clock
for the "since" a person reads), so the table is tested with a ``ManualClock``, without sleeping.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from kvstore.clock import Clock

STALE_AFTER_S = 30.0
MAX_STRANGERS = 16
MAX_MESSAGE_CHARS = 300

# Codes a refusal can carry (transport/stream.py sends the first group; the TLS codes are local).
REFUSAL_CODES = (
    "unauthorized",
    "unknown_member",
    "version_mismatch",
    "bad_hello",
    "hello_too_large",
    "hello_timeout",
    "too_many_unauthenticated",
    "tls_rejected",  # the TLS handshake failed: a certificate the other side does not trust
)


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str
    since_wall_ns: int
    since_ns: int  # monotonic: the first refusal of this run
    last_ns: int  # monotonic: the latest one
    count: int
    address: str | None = None  # incoming only: where the refused connection came from

    def to_json(self, now_ns: int) -> dict[str, Any]:
        since = datetime.datetime.fromtimestamp(self.since_wall_ns / 1e9, tz=datetime.UTC)
        return {
            "code": self.code,
            "message": self.message,
            "since": since.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "for_s": round(max(0, now_ns - self.since_ns) / 1e9, 1),
            "last_s_ago": round(max(0, now_ns - self.last_ns) / 1e9, 1),
            "count": self.count,
            "address": self.address,
        }


def _next(previous: Refusal | None, code: str, message: str, address: str | None,
          now_ns: int, wall_ns: int) -> Refusal:
    message = message[:MAX_MESSAGE_CHARS]
    if previous is not None and previous.code == code:
        return replace(previous, message=message, last_ns=now_ns, count=previous.count + 1, address=address)
    return Refusal(code, message, wall_ns, now_ns, now_ns, 1, address)


class LinkTable:
    """Refusals seen on the links of one node (see the module docstring)."""

    def __init__(self, peers: Iterable[str], clock: Clock, *, stale_after_s: float = STALE_AFTER_S,
                 max_strangers: int = MAX_STRANGERS) -> None:
        assert stale_after_s > 0 and max_strangers >= 1
        self.peers = frozenset(peers)
        self._clock = clock
        self._stale_after_ns = int(stale_after_s * 1e9)
        self._max_strangers = max_strangers
        self._outgoing: dict[str, Refusal] = {}
        self._outgoing_refused_here: dict[str, Refusal] = {}
        self._incoming: dict[str, Refusal] = {}
        self._strangers: OrderedDict[str, Refusal] = OrderedDict()

    # --- what the transport reports -------------------------------------------------------

    def refused_by_peer(self, peer: str, code: str, message: str) -> None:
        assert peer in self.peers, f"{peer!r} is not a peer"
        self._outgoing[peer] = _next(self._outgoing.get(peer), code, message, None, *self._now())

    def refused_on_our_attempt(self, peer: str, code: str, message: str) -> None:
        """Our connection to ``peer`` was refused by this node (its TLS certificate is not trusted)."""
        assert peer in self.peers, f"{peer!r} is not a peer"
        previous = self._outgoing_refused_here.get(peer)
        self._outgoing_refused_here[peer] = _next(previous, code, message, None, *self._now())

    def handshake_succeeded(self, peer: str) -> None:
        self._outgoing.pop(peer, None)
        self._outgoing_refused_here.pop(peer, None)

    def handshake_failed(self, peer: str) -> None:
        """A connection attempt failed without a refusal (nothing listening, a timeout)."""
        self.handshake_succeeded(peer)  # what we knew about the handshake no longer holds

    def refused_incoming(self, claimed: str | None, code: str, message: str, address: str | None) -> None:
        """This node refused a connection; ``claimed`` is the id its hello named, if any."""
        if claimed is None:
            return  # nothing says whose it was; the transport's log has it
        now_ns, wall_ns = self._now()
        if claimed in self.peers:
            self._incoming[claimed] = _next(self._incoming.get(claimed), code, message, address, now_ns, wall_ns)
            return
        previous = self._strangers.pop(claimed, None)
        self._strangers[claimed] = _next(previous, code, message, address, now_ns, wall_ns)
        while len(self._strangers) > self._max_strangers:
            self._strangers.popitem(last=False)
        assert len(self._strangers) <= self._max_strangers

    def authenticated(self, peer: str) -> None:
        self._incoming.pop(peer, None)

    # --- what status shows ---------------------------------------------------------------

    def refuses_us(self, peer: str) -> Refusal | None:
        return self._outgoing.get(peer)

    def outgoing_blocked(self, peer: str) -> bool:
        """Whether our last attempt to reach ``peer`` was refused, by either side: do not route to it."""
        return peer in self._outgoing or peer in self._outgoing_refused_here

    def we_refuse(self, peer: str) -> Refusal | None:
        refusal = self._incoming.get(peer)
        if refusal is not None and self._clock.monotonic_ns() - refusal.last_ns > self._stale_after_ns:
            del self._incoming[peer]
            refusal = None
        return refusal or self._outgoing_refused_here.get(peer)

    def strangers(self) -> list[tuple[str, Refusal]]:
        now_ns = self._clock.monotonic_ns()
        for claimed in [c for c, r in self._strangers.items() if now_ns - r.last_ns > self._stale_after_ns]:
            del self._strangers[claimed]
        return sorted(self._strangers.items())

    def is_refused(self, peer: str) -> bool:
        return self.refuses_us(peer) is not None or self.we_refuse(peer) is not None

    def member_json(self, peer: str) -> dict[str, Any]:
        """``{"they_refuse_us": ..., "we_refuse_them": ...}`` for /cluster (null when clear)."""
        now_ns = self._clock.monotonic_ns()
        out, incoming = self.refuses_us(peer), self.we_refuse(peer)
        return {
            "they_refuse_us": out.to_json(now_ns) if out else None,
            "we_refuse_them": incoming.to_json(now_ns) if incoming else None,
        }

    def strangers_json(self) -> list[dict[str, Any]]:
        now_ns = self._clock.monotonic_ns()
        return [{"id": claimed, **refusal.to_json(now_ns)} for claimed, refusal in self.strangers()]

    def _now(self) -> tuple[int, int]:
        return self._clock.monotonic_ns(), self._clock.wall_ns()
