"""Typed operating errors raised by the node, answered as JSON by ``kvstore.server.kv_api`` and ``kvstore.server.api``.

Each carries a stable ``code`` (the JSON ``error`` field) and an HTTP ``status``.
Programmer errors are asserts, not these.
"""

from __future__ import annotations

from typing import Any

from kvstore.contract import KvstoreError


class NodeError(KvstoreError):
    """A node's operating error (the server side of the one family in ``kvstore.contract``)."""

    status: int = 500
    code = "internal"
    close_connection = False  # True: the request was not read to its end; close after answering

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra
        # A refusal (4xx) changed nothing; a 5xx may have, unless it says otherwise (kvstore.contract).
        self.indeterminate = bool(extra.get("indeterminate", self.status >= 500))

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class BadRequest(NodeError):
    status = 400
    code = "bad_request"

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.code = code


class Unauthorized(NodeError):
    status = 401
    code = "unauthorized"


class NotFound(NodeError):
    status = 404
    code = "not_found"


class ConsistencyConflict(NodeError):
    status = 409
    code = "consistency_conflict"


class BodyTimeout(NodeError):
    """The request body stopped arriving; the connection is closed after the answer."""

    status = 408
    code = "body_timeout"
    close_connection = True


class PreconditionFailed(NodeError):
    status = 412
    code = "precondition_failed"


class ValueTooLarge(NodeError):
    status = 413
    code = "value_too_large"


class Overloaded(NodeError):
    """Shed before anything was written: the body says ``indeterminate: false`` (kvstore.contract)."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, **{"indeterminate": False, **extra})


class QuorumUnavailable(NodeError):
    """Fewer than the needed replicas answered.  ``indeterminate``: a write may still appear."""

    status = 503
    code = "quorum_unavailable"

    def __init__(self, needed: int, acknowledged: int, indeterminate: bool, detail: str = "") -> None:
        what = "may still become visible on the replicas that took it" if indeterminate else "was not applied"
        message = f"{acknowledged} of the {needed} required replicas answered; the request {what}"
        if detail:
            message += f" ({detail})"
        super().__init__(message, needed=needed, acknowledged=acknowledged, indeterminate=indeterminate)
        self.needed = needed
        self.acknowledged = acknowledged
        self.indeterminate = indeterminate


class RequestTimeout(NodeError):
    status = 503
    code = "timeout"

    def __init__(self, message: str, indeterminate: bool) -> None:
        super().__init__(message, indeterminate=indeterminate)
        self.indeterminate = indeterminate


class InsufficientStorage(NodeError):
    """A node's disk is full.  ``indeterminate`` false: the write was refused before any replica
    saw it (the coordinator's own durable write failed first), so it was certainly not applied."""

    status = 507
    code = "insufficient_storage"

    def __init__(self, message: str, indeterminate: bool) -> None:
        super().__init__(message, indeterminate=indeterminate)
        self.indeterminate = indeterminate


class StorageUnavailable(NodeError):
    """A storage operation failed (an I/O error).  ``indeterminate``: a write may be on disk."""

    status = 503
    code = "storage_unavailable"

    def __init__(self, message: str, indeterminate: bool) -> None:
        super().__init__(message, indeterminate=indeterminate)
        self.indeterminate = indeterminate
