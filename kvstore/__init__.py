"""kvstore: a Dynamo-style sharded key-value store with tunable consistency, built as a CAP explorer.

The client API (``kvstore.Client`` and friends) is re-exported here lazily, so
``import kvstore`` (and so ``kvstore --help``) does not pay for importing aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Attempt",
    "BadRequest",
    "Client",
    "GetResult",
    "KVError",
    "KvstoreError",
    "NodeUnreachable",
    "Overloaded",
    "PreconditionFailed",
    "PutResult",
    "QuorumUnavailable",
    "RequestTimeout",
    "ServerError",
    "Sibling",
    "Unauthorized",
    "ValueTooLarge",
    "lww_resolver",
]

_CLIENT_EXPORTS = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from kvstore.client import (
        Attempt,
        BadRequest,
        Client,
        GetResult,
        KVError,
        KvstoreError,
        NodeUnreachable,
        Overloaded,
        PreconditionFailed,
        PutResult,
        QuorumUnavailable,
        RequestTimeout,
        ServerError,
        Sibling,
        Unauthorized,
        ValueTooLarge,
        lww_resolver,
    )


def __getattr__(name: str) -> Any:
    if name in _CLIENT_EXPORTS:
        from kvstore import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
