"""The kv request core: one ``/kv`` request in, one answer out, without any HTTP library.

Theory of operation
-------------------
``KvApi.handle`` is everything a node does with a client's ``GET``/``PUT``/``DELETE`` of a
key: it bounds the requests in flight (429 ``overloaded`` beyond
``limits.max_inflight_requests``), validates everything the client sent before the node sees
it (key length and encoding, r/w range, known parameters, timeout, value size; a causal context
only if the cluster signed it for this key: ``kvstore.protocol.causal_context``), calls the node
(``Node.get``/``Node.put``) or its linearizable register (``LinearizableRegister.run``), and
maps the outcome to an ``ApiResponse``: 200/300/404 for a read, 204 for a write, 412 for a
failed precondition, and every typed error to a JSON body with a stable ``error`` code
(``kvstore.contract``).  It never raises for client input or an operating error; a bug is a
500 ``internal`` with the traceback in the node's log only.  It counts every request in the
node's metrics (``kvstore_requests``, ``kvstore_request_latency_seconds``, by op and status),
with the latency read on the node's injected clock.

Conventions (Riak's, plus compare-and-set): ``X-Context`` carries the causal context of an
eventual/quorum read or write; ``X-Siblings`` tells a writer how many values its new context
covers; ``ETag`` is the value's ``contract.etag_of``; with ``consistency=linearizable``,
``If-Match: "<etag>"`` is compare-and-set and ``If-None-Match: *`` create-if-absent.

The HTTP server (``kvstore.server.api``) is a thin adapter: it builds an ``ApiRequest`` from the
aiohttp request, passes a ``BodyReader`` that reads the body bounded (so a body is read only
once the request passed the checks that come before it, exactly as before this core existed),
and turns the ``ApiResponse`` into a ``web.Response``.  The simulator's clients call ``handle``
directly with the body in ``ApiRequest.body``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy

from kvstore.config import CONSISTENCY_LEVELS, NodeConfig
from kvstore.contract import etag_of
from kvstore.errors import BadRequest, NodeError, ValueTooLarge
from kvstore.protocol import causal_context, versions
from kvstore.protocol.paxos import Change, CompareAndSet, Delete, PutIfAbsent, Read, Write
from kvstore.protocol.quorum import InvalidQuorum, majority, parse_quorum
from kvstore.runtime.node import Node
from kvstore.storage import StorageBusy, StorageError

log = logging.getLogger(__name__)

KV_PREFIX = "/kv/"
KV_METHODS = ("DELETE", "GET", "PUT")
OP_LABELS = {method: method.lower() for method in KV_METHODS}  # the metrics' ``op`` label
# The only request headers the core reads: an adapter may pass just these (kvstore.server.http_front).
CORE_HEADERS = ("If-Match", "If-None-Match", "X-Context")
KNOWN_PARAMETERS = frozenset({"r", "w", "consistency", "sloppy", "timeout_ms"})
MAX_REMEMBERED_PARAMS = 256
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
VALUE_CONTENT_TYPE = "application/octet-stream"
NS_PER_S = 1_000_000_000

# Reads the whole request body, refusing it (``ValueTooLarge``) past ``limit`` bytes.
BodyReader = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True)
class ApiRequest:
    method: str  # "GET" | "PUT" | "DELETE"
    raw_path: str  # percent-encoded path as sent, e.g. "/kv/user%3A42"
    query: Mapping[str, str]
    headers: Mapping[str, str]  # looked up case-insensitively (a plain dict is wrapped)
    body: bytes | None = None  # already read and bounded by the caller (None for GET/DELETE)


@dataclass(frozen=True)
class ApiResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes  # JSON error bodies, values, 300 sibling JSON; empty for 204
    close_connection: bool = False  # an HTTP server closes the connection after it (408 body_timeout)


def json_response(status: int, document: dict[str, Any], headers: Mapping[str, str] | None = None) -> ApiResponse:
    body = json.dumps(document).encode("utf-8")  # what aiohttp's json_response writes
    return ApiResponse(status, {**(headers or {}), "Content-Type": JSON_CONTENT_TYPE}, body)


def json_error(status: int, code: str, message: str, **extra: Any) -> ApiResponse:
    return json_response(status, {"error": code, "message": message, **extra})


def value_response(value: bytes, headers: Mapping[str, str]) -> ApiResponse:
    return ApiResponse(200, {**headers, "ETag": etag_of(value), "Content-Type": VALUE_CONTENT_TYPE}, value)


def parse_key(raw_path: str, cfg: NodeConfig) -> str:
    return decode_key(raw_path[len(KV_PREFIX) :], cfg)


def decode_key(raw: str, cfg: NodeConfig) -> str:
    """A percent-encoded key (a path segment), validated: 400 ``invalid_key`` when it is not one."""
    try:
        key = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("invalid_key", "the key is not valid percent-encoded UTF-8") from None
    if not key:
        raise BadRequest("invalid_key", "the key is empty")
    if len(key.encode("utf-8")) > cfg.limits.max_key_bytes:
        raise BadRequest("invalid_key", f"the key exceeds {cfg.limits.max_key_bytes} bytes")
    if "\x00" in key:
        raise BadRequest("invalid_key", "the key contains a NUL character")
    return key


def _bool_param(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise BadRequest("invalid_parameter", f"{name} must be true or false, got {raw!r}")


class RequestParams:
    """The consistency parameters of one request, resolved against the node's defaults (read-only:
    ``KvApi`` shares one among the requests with the same query)."""

    __slots__ = ("consistency", "quorum", "sloppy", "timeout_s")

    def __init__(self, query: Mapping[str, str], quorum_name: str, cfg: NodeConfig) -> None:
        unknown = sorted(set(query) - KNOWN_PARAMETERS)
        if unknown:
            raise BadRequest("invalid_parameter", f"unknown query parameter(s): {', '.join(unknown)}")
        self.consistency = query.get("consistency", cfg.consistency)
        if self.consistency not in CONSISTENCY_LEVELS:
            raise BadRequest("invalid_parameter", f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
        n = cfg.replicas
        default_q = cfg.r if quorum_name == "r" else cfg.w
        if self.consistency == "quorum":
            default_q = majority(n)
        raw_quorum = query.get(quorum_name)
        if raw_quorum is not None and not raw_quorum.strip():  # "?w=" is a mistake, not "the default"
            raise BadRequest("invalid_quorum", f"{quorum_name} is empty: give 1..N or one|quorum|all")
        try:
            self.quorum = parse_quorum(raw_quorum, n, default_q, quorum_name)
        except InvalidQuorum as exc:
            raise BadRequest("invalid_quorum", str(exc)) from None
        if self.consistency == "quorum":
            if query.get("sloppy", "false").lower() not in ("false", "0", "no"):
                raise BadRequest("invalid_parameter", "consistency=quorum counts only primaries: sloppy must be false")
            self.sloppy = False
        else:
            self.sloppy = _bool_param(query, "sloppy", cfg.sloppy)
        raw_timeout = query.get("timeout_ms")
        timeout_ms = cfg.limits.request_timeout_ms
        if raw_timeout is not None:
            try:
                timeout_ms = int(raw_timeout)
            except ValueError:
                raise BadRequest("invalid_parameter", "timeout_ms must be an integer") from None
            if not 1 <= timeout_ms <= 60_000:
                raise BadRequest("invalid_parameter", "timeout_ms must be between 1 and 60000")
        self.timeout_s = timeout_ms / 1000.0


def change_of(kind: str, value: bytes | None, if_match: str | None, if_none_match: str | None) -> Change:
    """The register change a linearizable request asks for (``kind``: get | put | delete)."""
    if if_match is not None and if_none_match is not None:
        raise BadRequest("invalid_parameter", "use either If-Match or If-None-Match, not both")
    if if_none_match is not None:
        if if_none_match.strip() != "*":
            raise BadRequest("invalid_parameter", "If-None-Match supports only *")
        if kind != "put":
            raise BadRequest("invalid_parameter", "If-None-Match: * applies to PUT")
        assert value is not None
        return PutIfAbsent(value)
    if if_match is not None:
        etag = if_match.strip()
        if not (etag.startswith('"') and etag.endswith('"') and len(etag) > 2):
            raise BadRequest("invalid_parameter", 'If-Match takes a quoted ETag, e.g. "0123abcd..."')
        return CompareAndSet(etag, value if kind == "put" else None)
    if kind == "get":
        return Read()
    if kind == "delete":
        return Delete()
    assert value is not None
    return Write(value)


def object_response(obj: versions.VersionedObject, context: str | None) -> ApiResponse:
    """200 / 300 / 404 for a merged read; ``context`` is the signed clock of ``obj`` (None: no clock)."""
    live = [s for s in obj.siblings if s.value is not None]
    headers = {"X-Context": context} if context else {}
    if not live:
        return json_response(404, {"error": "not_found", "message": "no value for this key"}, headers)
    if len(live) == 1:
        value = live[0].value
        assert value is not None
        return value_response(value, headers)
    siblings = [
        {"value": base64.b64encode(s.value).decode("ascii"), "timestamp_ns": s.timestamp_ns}
        for s in live
        if s.value is not None
    ]
    return json_response(300, {"siblings": siblings, "context": context}, headers)


def _case_insensitive(headers: Mapping[str, str]) -> Mapping[str, str]:
    if isinstance(headers, CIMultiDict | CIMultiDictProxy):
        return headers
    return CIMultiDict(headers)


class KvApi:
    """Every ``/kv`` request of one node (see the module docstring)."""

    def __init__(self, node: Node, signer: causal_context.ContextSigner | None = None) -> None:
        self.node = node
        self.cfg = node.cfg
        self.signer = signer or causal_context.ContextSigner(node.cfg.secret)
        self.max_inflight = node.cfg.limits.max_inflight_requests
        self.inflight = 0
        # Valid parameters by (quorum name, query items): the config they resolve against is fixed.
        self._params: dict[tuple[str, tuple[tuple[str, str], ...]], RequestParams] = {}

    async def handle(self, request: ApiRequest, read_body: BodyReader | None = None) -> ApiResponse:
        """Every /kv request: validation, the node call, typed errors -> JSON (never raises for
        client input or operating errors).

        ``read_body`` (an HTTP adapter's) reads a PUT's body when the request needs it, instead
        of ``request.body``; either way a value beyond ``limits.max_value_bytes`` is a 413.
        """
        metrics = self.node.metrics
        started_ns = self.node.clock.monotonic_ns()
        try:
            response = await self._handle(request, read_body)
        except NodeError as exc:
            response = json_response(exc.status, exc.body())
            if exc.close_connection:
                response = ApiResponse(response.status, response.headers, response.body, close_connection=True)
        except StorageBusy:
            response = json_error(503, "overloaded", "the storage write queue is full; retry later",
                                  indeterminate=False)
        except StorageError as exc:
            log.error("storage error on %s %s: %s", request.method, request.raw_path, exc)
            response = json_error(503, "storage_unavailable", f"storage error: {exc}", indeterminate=True)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: never show a client the traceback
            log.exception("unhandled error on %s %s", request.method, request.raw_path)
            response = json_error(500, "internal", "internal error; see the node's log")
        op = OP_LABELS.get(request.method)
        if op is not None and request.raw_path.startswith(KV_PREFIX):
            metrics.count_request(op, response.status, (self.node.clock.monotonic_ns() - started_ns) / NS_PER_S)
        return response

    def _request_params(self, query: Mapping[str, str], quorum_name: str) -> RequestParams:
        key = (quorum_name, tuple(query.items()))
        params = self._params.get(key)
        if params is None:
            params = RequestParams(query, quorum_name, self.cfg)  # raises BadRequest: never remembered
            if len(self._params) < MAX_REMEMBERED_PARAMS:
                self._params[key] = params
        return params

    async def _handle(self, request: ApiRequest, read_body: BodyReader | None) -> ApiResponse:
        if not request.raw_path.startswith(KV_PREFIX):
            return json_error(404, "no_route", f"no route for {request.raw_path}")
        if request.method not in KV_METHODS:
            allow = ",".join(KV_METHODS)
            response = json_error(405, "method_not_allowed",
                                  f"{request.method} is not allowed here; allowed: {allow}")
            return ApiResponse(405, {**response.headers, "Allow": allow}, response.body)
        if self.inflight >= self.max_inflight:
            return json_error(429, "overloaded", f"more than {self.max_inflight} requests in flight; retry later")
        self.inflight += 1
        try:
            return await self._kv(request, _case_insensitive(request.headers), read_body)
        finally:
            self.inflight -= 1

    async def _kv(self, request: ApiRequest, headers: Mapping[str, str], read_body: BodyReader | None) -> ApiResponse:
        node = self.node
        key = parse_key(request.raw_path, self.cfg)
        if request.method == "GET":
            params = self._request_params(request.query, "r")
            if params.consistency == "linearizable":
                return await self._linearizable_get(key, params)
            read = await node.get(key, params.quorum, params.sloppy, params.timeout_s)
            return object_response(read.obj, self.signer.sign(key, read.obj.vector()) if read.obj.clock else None)
        params = self._request_params(request.query, "w")
        if params.consistency == "linearizable":
            value = await self._value(request, read_body) if request.method == "PUT" else None
            return await self._linearizable_write(request.method, headers, key, value, params)
        if "If-Match" in headers or "If-None-Match" in headers:
            raise BadRequest(
                "invalid_parameter", "If-Match / If-None-Match need consistency=linearizable (compare-and-set)"
            )
        context = self._context(headers, key)
        value = await self._value(request, read_body) if request.method == "PUT" else None
        outcome = await node.put(key, value, context, params.quorum, params.sloppy, params.timeout_s)
        # X-Siblings tells the writer whether the context now covers values it never saw:
        # reusing this context for another write would silently supersede them unless it is 1.
        live = len(outcome.obj.live_values)
        answer = {"X-Context": self.signer.sign(key, outcome.obj.vector()), "X-Siblings": str(live)}
        if value is not None:
            answer["ETag"] = etag_of(value)
        return ApiResponse(204, answer, b"")

    def _context(self, headers: Mapping[str, str], key: str) -> dict[str, int]:
        """The version vector of X-Context, only if this cluster issued that context for ``key``.

        A context claims "I have seen all of this": the write supersedes whatever it covers.  Only
        a context the cluster signed for this very key is believed (kvstore.protocol.causal_context), so a
        client can neither invent counters nor bring another key's context.
        """
        try:
            return self.signer.verify(key, headers.get("X-Context"))
        except causal_context.BadContext as exc:
            raise BadRequest("bad_context", str(exc)) from None
        except causal_context.InvalidContext as exc:
            raise BadRequest("invalid_context", str(exc)) from None

    async def _value(self, request: ApiRequest, read_body: BodyReader | None) -> bytes:
        """A PUT's value: the whole body, at most ``max_value_bytes`` (413 ``value_too_large`` beyond)."""
        limit = self.cfg.limits.max_value_bytes
        if read_body is not None:
            return await read_body(limit)
        body = request.body or b""
        if len(body) > limit:
            raise ValueTooLarge(f"the value exceeds the limit of {limit} bytes", limit=limit)
        return body

    async def _linearizable_get(self, key: str, params: RequestParams) -> ApiResponse:
        outcome = await self.node.parts.register.run(key, Read(), params.timeout_s)
        value = outcome["value"]
        if value is None:
            return json_error(404, "not_found", "no value for this key")
        return value_response(value, {})

    async def _linearizable_write(
        self, method: str, headers: Mapping[str, str], key: str, value: bytes | None, params: RequestParams
    ) -> ApiResponse:
        if "X-Context" in headers:
            raise BadRequest("invalid_parameter", "X-Context is for eventual/quorum writes; linearizable writes "
                                                  "use If-Match for compare-and-set")
        kind = "put" if method == "PUT" else "delete"
        change = change_of(kind, value, headers.get("If-Match"), headers.get("If-None-Match"))
        outcome = await self.node.parts.register.run(key, change, params.timeout_s)
        if outcome["outcome"] == "precondition_failed":
            return json_error(412, "precondition_failed", "the current value does not match the precondition",
                              current=outcome["etag"])
        return ApiResponse(204, {"ETag": outcome["etag"]} if outcome.get("etag") else {}, b"")
