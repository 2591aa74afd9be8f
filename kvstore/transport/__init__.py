"""Transports between nodes; see ``kvstore.transport.base`` for the seam's contract."""

from kvstore.transport.base import (
    FaultRules,
    Handler,
    LinkRule,
    Message,
    PeerUnavailable,
    RemoteError,
    Transport,
    TransportError,
)

__all__ = [
    "FaultRules",
    "Handler",
    "LinkRule",
    "Message",
    "PeerUnavailable",
    "RemoteError",
    "Transport",
    "TransportError",
]
