"""Peer messages of the repair mechanisms (anti-entropy, tombstone reaping): bounds and checks.

Theory of operation
-------------------
Anti-entropy (``kvstore.runtime.anti_entropy``) and the tombstone reaper (``kvstore.runtime.reaper``) exchange
lists of ``[token, key, ...]`` entries with the other replicas of a range.  Every list a peer
may send is bounded (``OBJECTS_PER_MESSAGE`` entries, ``MESSAGE_BYTES_BUDGET`` bytes of
objects) and checked entry by entry by the message codec (``kvstore.protocol.messages``) before
any of it is used; what the codec cannot know (a reply answering the wrong keys, an entry that
is not a tombstone) is a ``RepairProtocolError``.  A malformed message is answered with a
``bad_request`` error reply, never a failure inside a handler.  ``call_peer`` is ``Node.call``
with the repair mechanisms' timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from kvstore.protocol.messages import (
    OBJECTS_PER_MESSAGE as OBJECTS_PER_MESSAGE,  # keys per pull/push/reap message
)
from kvstore.transport.base import Message, RemoteError

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

SCAN_PAGE = 500  # records per storage scan call
MESSAGE_BYTES_BUDGET = 4 * 1024 * 1024  # pull replies and pushes stop adding objects past this
CALL_TIMEOUT_S = 10.0  # one anti-entropy or reap message to one peer

T = TypeVar("T")


class RepairProtocolError(Exception):
    """A peer's anti-entropy or reap message was malformed (answered as a remote error)."""


async def call_peer(node: Node, peer: str, message: Message) -> Message:
    """``node.call`` that raises ``RemoteError`` for any error reply, whichever path it took."""
    reply = await node.call(peer, message, CALL_TIMEOUT_S)
    if reply.get("remote_error"):
        raise RemoteError(peer, str(reply.get("error")), str(reply.get("message", "")))
    return reply


def byte_chunks(items: list[T], size_of: Callable[[T], int]) -> list[list[T]]:
    """Split ``items`` into chunks of at most ``MESSAGE_BYTES_BUDGET`` bytes (each at least one item)."""
    chunks: list[list[T]] = []
    current: list[T] = []
    size = 0
    for item in items:
        item_size = size_of(item)
        if current and size + item_size > MESSAGE_BYTES_BUDGET:
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        chunks.append(current)
    return chunks
