"""The client contract of the public HTTP API: error codes, ETags, and what an answer proves.

Theory of operation
-------------------
Everything that talks to a node -- the Python client, the chaos harness that records
histories for the checker, the benchmarks, the CLI -- must agree on what an HTTP outcome
*proves*, or the checker ends up judging the harness instead of the store (a write recorded
as failed although it was applied makes a correct history "not linearizable").  This module
is that one agreement.  It is pure (no I/O, no clock, no randomness) and table-tested.

**Outcomes** follow Jepsen's op types:

* ``ok``: the operation took effect.  A write only on a 2xx; a read on 200 (a value),
  300 (siblings) or 404 (no value).
* ``fail``: it certainly did not take effect, because the answer proves it:

  - any 4xx: the API validates, authenticates, checks preconditions and admits a request
    before it changes anything, so a 4xx (400 bad input, 401, 404, 409 consistency
    conflict, 412 precondition failed, 413 too large, 429 shed) is a refusal;
  - a 5xx whose JSON body says ``"indeterminate": false``: the node states that nothing was
    written (it could not even plan enough replicas, or shed the request first);
  - no connection: it could not be established, so nothing was sent.

* ``info``: anything else that may have reached a node -- a timeout, a connection cut after
  the request may have been sent, a 5xx that does not say ``"indeterminate": false`` (a
  quorum that may still land, a storage error, a node bug, a proxy), an unexpected status.
  The checker lets an ``info`` write take effect at any time after its invoke, or never, so
  calling a refusal ``info`` only costs search time; calling an applied write ``fail`` is a
  false verdict.  When in doubt, ``info``.

  A read changes nothing, so an ``info`` read only means "unanswered" rather than
  "refused"; the checker ignores both.

**One request, one outcome.**  The classification assumes each recorded operation was sent
exactly once.  A transport that silently re-sends after a dropped connection (aiohttp does,
for PUT and DELETE) turns a first copy that was applied plus a refused second copy into a
``fail``.  Every HTTP client session of the project comes from
``kvstore.client.http_session.client_session``, which switches that re-send off.

**ETag**: the entity tag of a present value is a quoted 64-bit BLAKE2b digest of its bytes,
the same on every node and in every client, so ``If-Match: etag_of(expected)`` is a
compare-and-set on the value itself.

**Error codes**: every JSON error body is ``{"error": CODE, "message": ..., ...}`` with a
stable ``CODE`` from ``ERROR_CODES``; ``indeterminate`` (where present) says whether a
write may still take effect.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final, Literal

Outcome = Literal["ok", "fail", "info"]
OK: Final = "ok"
FAIL: Final = "fail"
INFO: Final = "info"

# What happened to a request that got no HTTP answer.
NoAnswer = Literal["unreachable", "timeout", "disconnected"]

READ_OK_STATUSES: Final = frozenset({200, 300, 404})

# The stable ``error`` codes of the public API (the JSON body of every error answer).
ERROR_CODES: Final = frozenset({
    # 400
    "bad_request", "bad_context", "invalid_body", "invalid_context", "invalid_key", "invalid_parameter", "invalid_quorum",
    "invalid_header", "incomplete_body", "malformed_body", "malformed_request", "unknown_member",
    # 401, 404, 405, 408, 409, 412, 413, 414, 417, 431
    "unauthorized", "not_found", "no_route", "method_not_allowed", "body_timeout", "request_timeout",
    "consistency_conflict", "precondition_failed", "value_too_large", "uri_too_long", "expectation_failed",
    "header_too_large", "too_many_headers",
    # 429 / 503
    "overloaded", "quorum_unavailable", "timeout", "storage_unavailable", "insufficient_storage",
    # 500, 501
    "internal", "not_implemented",
    # /admin/membership (docs/membership.md): 400 and 409 refusals of a membership change
    "invalid_action", "invalid_config", "change_in_progress", "change_running", "already_member",
    "too_few_members", "too_many_members", "address_in_use", "conflict", "no_change_in_progress", "config_lost",
})

# Codes the Python client gives errors that have no HTTP answer (``status`` None) or no JSON body.
CLIENT_ERROR_CODES: Final = frozenset({"unreachable", "indeterminate", "bad_response"})


class KvstoreError(Exception):
    """The root of the project's one error family: every operating error a node answers with and every
    error the client raises is one, so a caller (the harness, the benchmarks, an application) can catch
    one type and read what the failure *proves*.

    ``code`` is the stable ``error`` code (``ERROR_CODES``, or ``CLIENT_ERROR_CODES`` for failures with
    no HTTP answer); ``status`` the HTTP status (None when no answer came); ``indeterminate`` whether a
    write may still take effect -- when in doubt it is, as in the outcome rules above.
    """

    code: str = "internal"
    status: int | None = None
    indeterminate: bool = True

    @property
    def outcome(self) -> Outcome:
        """``info`` if the request may have been applied, else ``fail`` (a certain refusal)."""
        return INFO if self.indeterminate else FAIL


def etag_of(value: bytes) -> str:
    """The ETag of a present value: a quoted 16-hex-digit BLAKE2b-64 digest of its bytes."""
    return '"' + hashlib.blake2b(value, digest_size=8).hexdigest() + '"'


def error_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of an error answer, or ``{}`` when the body is not one (a proxy's text)."""
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def says_not_applied(body: Mapping[str, Any] | None) -> bool:
    """Whether an error body states that nothing was (or ever will be) written."""
    return body is not None and body.get("indeterminate") is False


def answer_outcome(status: int, body: Mapping[str, Any] | None, *, read: bool) -> Outcome:
    """What an HTTP answer to a ``/kv`` request proves (see the module docstring).

    ``body`` is the parsed JSON error body (``error_body``), or None when there is none.
    """
    if read:
        if status in READ_OK_STATUSES:
            return OK
    elif 200 <= status < 300:
        return OK
    return refusal_outcome(status, body)


def refusal_outcome(status: int, body: Mapping[str, Any] | None) -> Outcome:
    """``fail`` or ``info`` for an answer that is not a success."""
    if 400 <= status < 500:
        return FAIL
    if status >= 500 and says_not_applied(body):
        return FAIL
    return INFO


def no_answer_outcome(what: NoAnswer) -> Outcome:
    """A request without an HTTP answer: ``fail`` only if it was never sent."""
    return FAIL if what == "unreachable" else INFO
