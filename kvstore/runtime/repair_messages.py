"""Peer messages of the repair mechanisms (anti-entropy, tombstone reaping): bounds and checks.

Theory of operation
-------------------
Anti-entropy (``kvstore.runtime.anti_entropy``) and the tombstone reaper (``kvstore.runtime.reaper``) exchange
lists of ``[token, key, ...]`` entries with the other replicas of a range.  Every list a peer
may send is bounded (``OBJECTS_PER_MESSAGE`` entries, ``MESSAGE_BYTES_BUDGET`` bytes of
objects) and checked entry by entry before any of it is used: a malformed message is
answered with a ``bad_request`` error reply (``RepairProtocolError``), never a failure inside
a handler.  ``call_peer`` is ``Node.call`` with the repair mechanisms' timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvstore.transport.base import Message, RemoteError

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

SCAN_PAGE = 500  # records per storage scan call
OBJECTS_PER_MESSAGE = 256  # keys per pull/push/reap message
MESSAGE_BYTES_BUDGET = 4 * 1024 * 1024  # pull replies and pushes stop adding objects past this
CALL_TIMEOUT_S = 10.0  # one anti-entropy or reap message to one peer


class RepairProtocolError(Exception):
    """A peer's anti-entropy or reap message was malformed (answered as a remote error)."""


def remote_error(code: str, message: str) -> Message:
    """The error reply of a handler (``Node.call`` raises it as ``RemoteError`` at the caller)."""
    return {"error": code, "message": message, "remote_error": True}


async def call_peer(node: Node, peer: str, message: Message) -> Message:
    """``node.call`` that raises ``RemoteError`` for any error reply, whichever path it took."""
    reply = await node.call(peer, message, CALL_TIMEOUT_S)
    if reply.get("remote_error"):
        raise RemoteError(peer, str(reply.get("error")), str(reply.get("message", "")))
    return reply


def token_key_list(raw: Any, what: str) -> list[tuple[int, str]]:
    """The ``(token, key)`` heads of a bounded list of ``[token, key, ...]`` entries."""
    if not isinstance(raw, list) or len(raw) > OBJECTS_PER_MESSAGE:
        raise RepairProtocolError(f"{what}: expected at most {OBJECTS_PER_MESSAGE} [token, key] pairs")
    out: list[tuple[int, str]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) >= 2 and type(item[0]) is int and isinstance(item[1], str)):
            raise RepairProtocolError(f"{what}: entries must start with [token: int, key: str]")
        out.append((item[0], item[1]))
    return out


def byte_chunks(items: list[list[Any]], size_of: Callable[[list[Any]], int]) -> list[list[list[Any]]]:
    """Split ``items`` into chunks of at most ``MESSAGE_BYTES_BUDGET`` bytes (each at least one item)."""
    chunks: list[list[list[Any]]] = []
    current: list[list[Any]] = []
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
