"""A finished peer call read as the step-able cores' input (``kvstore.protocol.calls``).

Theory of operation
-------------------
The AP coordinator driver (``kvstore.runtime.coordinator``) and the CASPaxos proposer driver
(``kvstore.runtime.caspaxos``) both start calls as futures and hand the cores ``Reply`` or
``CallFailed``.  One rule decides which: only a refusal the peer typed before doing anything
(the caller's ``certain_refusals``) or a connection that certainly never carried the request is a
certain failure; anything else that got no reply may have been applied, and the core then
reports the operation as indeterminate (one request, one outcome).  The pure layer cannot hold
this because it reads asyncio futures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any

from kvstore.protocol.calls import Answer, CallFailed, Reply
from kvstore.transport.base import Message, PeerUnavailable, RemoteError

log = logging.getLogger(__name__)


def answer_of(
    call: int, fut: asyncio.Future[Message], certain_refusals: Collection[str], *, refusal_is_recovering: bool = False
) -> Answer:
    """``Reply``, or ``CallFailed`` saying whether the request may have reached the peer.  A
    ``RemoteError`` whose code is in ``certain_refusals`` was refused before anything was done
    (``refusal_is_recovering``: the CASPaxos cores count such a peer's acceptor as not voting)."""
    assert fut.done(), "only a finished call has an answer"
    if fut.cancelled():
        return CallFailed(call, maybe_delivered=True)
    exc = fut.exception()
    if exc is None:
        return Reply(call, fut.result())
    if isinstance(exc, PeerUnavailable):
        return CallFailed(call, maybe_delivered=exc.maybe_delivered)
    if isinstance(exc, RemoteError):
        if exc.code in certain_refusals:
            return CallFailed(call, maybe_delivered=False, recovering=refusal_is_recovering)
        return CallFailed(call, maybe_delivered=True)  # e.g. a storage error mid-write: may have landed
    log.error("call %d failed unexpectedly", call, exc_info=exc)
    return CallFailed(call, maybe_delivered=True)


def consume_outcome(fut: asyncio.Future[Any]) -> None:
    """Done callback of a call or step nobody awaits any more (abandoned, or a straggler after
    its round was decided): retrieve its outcome so a later failure logs no "never retrieved"."""
    if not fut.cancelled():
        fut.exception()
