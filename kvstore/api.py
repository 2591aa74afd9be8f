"""The public HTTP API of a node (Riak-style conventions) and its admin/internal routes.

Theory of operation
-------------------
This module only translates: HTTP in, ``Node`` calls, HTTP out.  It validates
everything a client sends before the node sees it (key length and encoding,
r/w range, value size; a context only if the cluster signed it for this key)
and maps every typed error to a JSON body with
a stable ``error`` code, so no client input can produce a 500 or a traceback.
Admin and internal routes demand the cluster secret (``X-Cluster-Secret``),
compared in constant time.  In-flight client requests are bounded; past the
bound the node answers 429 at once instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import unquote

import msgpack
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvstore import causal_context, versions
from kvstore.config import CONSISTENCY_LEVELS
from kvstore.contract import etag_of
from kvstore.errors import BadRequest, BodyTimeout, NodeError, Unauthorized, ValueTooLarge
from kvstore.failure import UnknownMember
from kvstore.node import Node
from kvstore.placement import placement
from kvstore.quorum import InvalidQuorum, majority, parse_quorum
from kvstore.storage import StorageBusy, StorageError

log = logging.getLogger(__name__)

NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)
KV_PREFIX = "/kv/"
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


def _op_name(request: web.Request) -> str:
    if request.path.startswith(KV_PREFIX):
        return {"GET": "get", "PUT": "put", "DELETE": "delete"}.get(request.method, "other")
    return "admin" if request.path.startswith("/admin") else "other"


@web.middleware
async def error_middleware(request: web.Request, handler: Route) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    started = time.perf_counter()
    op = _op_name(request)
    try:
        response = await handler(request)
    except NodeError as exc:
        response = web.json_response(exc.body(), status=exc.status)
        if getattr(exc, "close_connection", False):
            response.force_close()
    except StorageBusy:
        response = json_error(503, "overloaded", "the storage write queue is full; retry later",
                              indeterminate=False)
    except StorageError as exc:
        log.error("storage error on %s %s: %s", request.method, request.path, exc)
        response = json_error(503, "storage_unavailable", f"storage error: {exc}", indeterminate=True)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _json_from_http_exception(request, exc)
    except asyncio.CancelledError:
        raise
    except Exception:  # a bug: never show a client the traceback
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = json_error(500, "internal", "internal error; see the node's log")
    if op != "other":
        node.metrics.requests.labels(op=op, status=str(response.status)).inc()
        node.metrics.latency.labels(op=op).observe(time.perf_counter() - started)
    return response


def _json_from_http_exception(request: BaseRequest, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no such route, method not allowed, body too large) as JSON."""
    if exc.status == 404:
        return json_error(404, "no_route", f"no route for {request.path}")
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        response = json_error(405, "method_not_allowed", f"{request.method} is not allowed here; allowed: {allow}")
        response.headers["Allow"] = allow  # RFC 9110 15.5.6: a 405 lists the methods the resource supports
        return response
    if exc.status == 413:
        limit = request.client_max_size
        return json_error(413, "value_too_large", f"the body exceeds the limit of {limit} bytes", limit=limit)
    if exc.status == 417:
        return json_error(417, "expectation_failed", "the only Expect this node meets is 100-continue")
    return json_error(exc.status, "bad_request", exc.reason or "request refused")


# --- refusals made by aiohttp's HTTP parser, before any route or middleware ------------------
#
# The request line and each header field have their own size limit.  They differ by a few bytes
# so that a ``LineTooLong`` (which carries the limit it passed) tells a long URL (414) from a
# long header (431): aiohttp raises the same exception class for both.
MAX_REQUEST_LINE_BYTES = 8192  # a key is at most 1 KiB, 3 KiB percent-encoded, plus the query
MAX_HEADER_FIELD_BYTES = 8190  # name and value of one header (an X-Context is far smaller)
MAX_HEADER_COUNT = 100


def classify_protocol_error(status: int, exc: BaseException | None) -> tuple[int, str, str]:
    """(status, stable code, message) for an error aiohttp's protocol answers by itself.

    ``status`` is what aiohttp chose (400 for every parser error, 500 for an exception that
    escaped the application, 504 for a handler timeout).
    """
    if isinstance(exc, HttpProcessingError):
        detail = " ".join(str(exc.message).split())[:300]
        if isinstance(exc, LineTooLong):
            limit = exc.args[1] if len(exc.args) > 1 else None
            if limit == MAX_REQUEST_LINE_BYTES:
                return 414, "uri_too_long", f"the request line exceeds {MAX_REQUEST_LINE_BYTES} bytes"
            return 431, "header_too_large", f"a header field exceeds {MAX_HEADER_FIELD_BYTES} bytes"
        if "too many headers" in detail.lower():
            return 431, "too_many_headers", f"the request has more than {MAX_HEADER_COUNT} header fields"
        return 400, "malformed_request", f"malformed HTTP request: {detail}"
    if status == 504:
        return 504, "timeout", "the request handler timed out"
    if 400 <= status < 500:
        return status, "malformed_request", "malformed HTTP request"
    return 500, "internal", "internal error; see the node's log"


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, answering its own refusals in JSON.

    Errors found by aiohttp's HTTP parser (a line too long, too many headers, a malformed
    Content-Length or request line) never reach the application or its middlewares: the
    protocol answers them through ``handle_error``, in text/plain.  This keeps what aiohttp
    does there (close the connection, never answer twice) and changes only the answer.
    """

    __slots__ = ()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        status, code, text = classify_protocol_error(status, exc)
        if status >= 500:
            log.error("error handling a request from %s: %s", request.remote, text, exc_info=exc)
        else:  # client input: not worth a traceback in the node's log
            log.debug("refused a request from %s: %s %s", request.remote, status, text)
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; no error response can follow")
        response = json_error(status, code, text)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """aiohttp's protocol factory, making ``JsonErrorRequestHandler`` connections."""

    def __call__(self) -> web.RequestHandler:
        handler = super().__call__()
        # Same slots, one overridden method: the connection is built exactly as aiohttp builds it.
        handler.__class__ = JsonErrorRequestHandler
        return handler


async def start_runner(app: web.Application, *, keepalive_timeout: float = 75.0) -> web.AppRunner:
    """Set up ``app`` for serving, with the protocol limits above and JSON protocol errors.

    ``keepalive_timeout`` (seconds) closes a keep-alive connection idle that long
    (``limits.http_idle_timeout_ms``)."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, max_line_size=MAX_REQUEST_LINE_BYTES,
        max_field_size=MAX_HEADER_FIELD_BYTES, max_headers=MAX_HEADER_COUNT, keepalive_timeout=keepalive_timeout,
    )
    await runner.setup()
    server = runner.server
    assert server is not None
    server.__class__ = JsonErrorServer  # the factory every site's connections come from
    # An HTTPException raised before the middlewares run (aiohttp's Expect handling: 417 for an
    # Expect other than 100-continue) would go out as text/plain; each connection takes its
    # handler from the server when it is made, so this wraps all of them.
    handle_app = server.request_handler

    async def handle(request: BaseRequest) -> web.StreamResponse:
        try:
            return await handle_app(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _json_from_http_exception(request, exc)
            response.force_close()
            return response

    server.request_handler = handle
    return runner


def require_secret(request: web.Request) -> None:
    node = request.app[NODE_KEY]
    # Compared as bytes: a header is not always ASCII, and hmac refuses non-ASCII str (a 500).
    # aiohttp decodes header bytes as UTF-8 with surrogateescape, so this restores what was sent.
    given = request.headers.get("X-Cluster-Secret", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, node.cfg.secret.encode("utf-8")):
        raise Unauthorized("this route needs the cluster secret in X-Cluster-Secret")


def parse_key(request: web.Request) -> str:
    return decode_key(request, request.rel_url.raw_path[len(KV_PREFIX) :])


def decode_key(request: web.Request, raw: str) -> str:
    """A percent-encoded key from the raw path, validated (400 ``invalid_key`` when it is not one)."""
    node = request.app[NODE_KEY]
    try:
        key = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("invalid_key", "the key is not valid percent-encoded UTF-8") from None
    if not key:
        raise BadRequest("invalid_key", "the key is empty")
    if len(key.encode("utf-8")) > node.cfg.limits.max_key_bytes:
        raise BadRequest("invalid_key", f"the key exceeds {node.cfg.limits.max_key_bytes} bytes")
    if "\x00" in key:
        raise BadRequest("invalid_key", "the key contains a NUL character")
    return key


def _bool_param(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise BadRequest("invalid_parameter", f"{name} must be true or false, got {raw!r}")


class RequestParams:
    """The consistency parameters of one request, resolved against the node's defaults."""

    def __init__(self, request: web.Request, quorum_name: str) -> None:
        node = request.app[NODE_KEY]
        cfg = node.cfg
        known = {"r", "w", "consistency", "sloppy", "timeout_ms"}
        unknown = sorted(set(request.query) - known)
        if unknown:
            raise BadRequest("invalid_parameter", f"unknown query parameter(s): {', '.join(unknown)}")
        self.consistency = request.query.get("consistency", cfg.consistency)
        if self.consistency not in CONSISTENCY_LEVELS:
            raise BadRequest("invalid_parameter", f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
        n = cfg.replicas
        default_q = cfg.r if quorum_name == "r" else cfg.w
        if self.consistency == "quorum":
            default_q = majority(n)
        raw_quorum = request.query.get(quorum_name)
        if raw_quorum is not None and not raw_quorum.strip():  # "?w=" is a mistake, not "the default"
            raise BadRequest("invalid_quorum", f"{quorum_name} is empty: give 1..N or one|quorum|all")
        try:
            self.quorum = parse_quorum(raw_quorum, n, default_q, quorum_name)
        except InvalidQuorum as exc:
            raise BadRequest("invalid_quorum", str(exc)) from None
        if self.consistency == "quorum":
            if request.query.get("sloppy", "false").lower() not in ("false", "0", "no"):
                raise BadRequest("invalid_parameter", "consistency=quorum counts only primaries: sloppy must be false")
            self.sloppy = False
        else:
            self.sloppy = _bool_param(request, "sloppy", cfg.sloppy)
        raw_timeout = request.query.get("timeout_ms")
        timeout_ms = cfg.limits.request_timeout_ms
        if raw_timeout is not None:
            try:
                timeout_ms = int(raw_timeout)
            except ValueError:
                raise BadRequest("invalid_parameter", "timeout_ms must be an integer") from None
            if not 1 <= timeout_ms <= 60_000:
                raise BadRequest("invalid_parameter", "timeout_ms must be between 1 and 60000")
        self.timeout_s = timeout_ms / 1000.0


def parse_context(request: web.Request, key: str) -> dict[str, int]:
    """The version vector of X-Context, only if this cluster issued that context for ``key``.

    A context claims "I have seen all of this": the write supersedes whatever it covers.  Only
    a context the cluster signed for this very key is believed (kvstore.causal_context), so a
    client can neither invent counters nor bring another key's context.
    """
    signer = request.app[SIGNER_KEY]
    try:
        return signer.verify(key, request.headers.get("X-Context"))
    except causal_context.BadContext as exc:
        raise BadRequest("bad_context", str(exc)) from None
    except causal_context.InvalidContext as exc:
        raise BadRequest("invalid_context", str(exc)) from None


async def read_bounded(request: web.Request, limit: int, what: str) -> bytes:
    """The whole request body, with or without Content-Length (chunked), or 413 past ``limit``.

    ``StreamReader.read(n)`` returns only what is already buffered (one network read), so the
    body is read to its end.  The declared length is checked first; a chunked body is refused
    at the first piece that passes the limit, so the node holds at most the limit plus one
    piece (aiohttp then discards the rest of the body while it drains the connection).
    """
    if request.content_length is not None and request.content_length > limit:
        raise ValueTooLarge(f"the {what} exceeds the limit of {limit} bytes", limit=limit)
    idle_timeout_ms = request.app[NODE_KEY].cfg.limits.body_idle_timeout_ms
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(idle_timeout_ms / 1000.0):
                part = await request.content.readany()
        except TimeoutError:
            # Also what a malformed chunk in the middle of a body becomes: aiohttp's C parser
            # then stops feeding the body without failing it.
            raise BodyTimeout(f"no body bytes arrived for {idle_timeout_ms} ms; the request is refused") from None
        except HttpProcessingError as exc:  # a malformed chunked encoding, a short body
            raise BadRequest("malformed_body", f"the request body is malformed: {exc.message}") from None
        except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip over bytes that are not gzip
            raise BadRequest("malformed_body", f"the request body cannot be decoded: {exc}") from None
        except ConnectionResetError:
            # The client went away mid-body: nothing was applied, and nobody is left to answer.
            raise BadRequest("incomplete_body", "the connection closed before the whole body arrived") from None
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > limit:
            raise ValueTooLarge(f"the {what} exceeds the limit of {limit} bytes", limit=limit)
        parts.append(part)


async def read_body(request: web.Request) -> bytes:
    """A PUT's value: the whole body, at most ``max_value_bytes`` (413 ``value_too_large`` beyond)."""
    return await read_bounded(request, request.app[NODE_KEY].cfg.limits.max_value_bytes, "value")


def object_response(obj: versions.VersionedObject, context: str | None) -> web.Response:
    """200 / 300 / 404 for a merged read; ``context`` is the signed clock of ``obj`` (None: no clock)."""
    live = [s for s in obj.siblings if s.value is not None]
    headers = {"X-Context": context} if context else {}
    if not live:
        response = json_error(404, "not_found", "no value for this key")
        response.headers.update(headers)
        return response
    if len(live) == 1:
        value = live[0].value
        assert value is not None
        return web.Response(
            body=value, headers={**headers, "ETag": etag_of(value)}, content_type="application/octet-stream"
        )
    siblings = [
        {"value": base64.b64encode(s.value).decode("ascii"), "timestamp_ns": s.timestamp_ns}
        for s in live
        if s.value is not None
    ]
    return web.json_response({"siblings": siblings, "context": context}, status=300, headers=headers)


class InflightGate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0


async def kv_handler(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    gate: InflightGate = request.app[GATE_KEY]
    if gate.current >= gate.limit:
        return json_error(429, "overloaded", f"more than {gate.limit} requests in flight; retry later")
    gate.current += 1
    try:
        key = parse_key(request)
        if request.method == "GET":
            params = RequestParams(request, "r")
            if params.consistency == "linearizable":
                return await node_cp(request).get(request, key, params)
            read = await node.get(key, params.quorum, params.sloppy, params.timeout_s)
            signer = request.app[SIGNER_KEY]
            return object_response(read.obj, signer.sign(key, read.obj.vector()) if read.obj.clock else None)
        params = RequestParams(request, "w")
        conditional = "If-Match" in request.headers or "If-None-Match" in request.headers
        if params.consistency == "linearizable":
            value = await read_body(request) if request.method == "PUT" else None
            return await node_cp(request).write(request, key, value, params)
        if conditional:
            raise BadRequest(
                "invalid_parameter", "If-Match / If-None-Match need consistency=linearizable (compare-and-set)"
            )
        context = parse_context(request, key)
        value = await read_body(request) if request.method == "PUT" else None
        outcome = await node.put(key, value, context, params.quorum, params.sloppy, params.timeout_s)
        # X-Siblings tells the writer whether the context now covers values it never saw:
        # reusing this context for another write would silently supersede them unless it is 1.
        live = len(outcome.obj.live_values)
        headers = {"X-Context": request.app[SIGNER_KEY].sign(key, outcome.obj.vector()), "X-Siblings": str(live)}
        if value is not None:
            headers["ETag"] = etag_of(value)
        return web.Response(status=204, headers=headers)
    finally:
        gate.current -= 1


def node_cp(request: web.Request) -> Any:
    cp = request.app.get(CP_KEY)
    if cp is None:
        raise BadRequest("invalid_parameter", "consistency=linearizable is not available on this node")
    return cp


async def cluster_handler(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    now_ns = node.clock.monotonic_ns()
    snapshot = node.membership.snapshot(now_ns)
    ownership = node.ring.ownership(1)
    members = []
    for m in node.cfg.members:
        view: dict[str, Any] = snapshot.get(m.id, {}) if m.id != node.node_id else {"state": "up", "phi": 0.0}
        phi = view.get("phi")
        members.append(
            {
                "id": m.id,
                "url": m.url,
                "state": view.get("state", "up"),
                "phi": None if phi is None or phi != phi or phi == float("inf") else round(float(phi), 3),
                "ownership": round(ownership[m.id] * 100, 2),
            }
        )
    pending = await node_pending_hints(node)
    return web.json_response(
        {
            "node": node.node_id,
            "members": members,
            "replicas": node.n,
            "r": node.cfg.r,
            "w": node.cfg.w,
            "vnodes": node.cfg.vnodes,
            "conflict_mode": node.cfg.conflict_mode,
            "consistency": node.cfg.consistency,
            "sloppy": node.cfg.sloppy,
            "pending_hints": pending,
        }
    )


PLACEMENT_PREFIX, PLACEMENT_SUFFIX = "/cluster/keys/", "/placement"


async def placement_handler(request: web.Request) -> web.Response:
    """Where a key lives as this node sees it (``kvstore.placement``): read-only, no secret."""
    node = request.app[NODE_KEY]
    raw = request.rel_url.raw_path[len(PLACEMENT_PREFIX) : -len(PLACEMENT_SUFFIX)]
    key = decode_key(request, raw)
    return web.json_response({"node": node.node_id, **placement(node.ring, key, node.n, node.is_up).to_json()})


async def node_pending_hints(node: Node) -> dict[str, int]:
    counter = getattr(node, "pending_hints", None)
    if callable(counter):
        result: dict[str, int] = await counter()
        return result
    return {}


async def health_handler(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node": request.app[NODE_KEY].node_id})


async def metrics_handler(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    node.metrics.storage_records.set(await node.data.count())
    node.metrics.storage_bytes.set(await node.data.size_bytes())
    return web.Response(body=generate_latest(node.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _openapi_text() -> str:
    return resources.files("kvstore").joinpath("openapi.json").read_text(encoding="utf-8")


async def openapi_handler(request: web.Request) -> web.Response:
    return web.Response(text=_openapi_text(), content_type="application/json")


async def internal_handler(request: web.Request) -> web.Response:
    """The HTTP-per-message internal route (baseline transport for benchmarks)."""
    require_secret(request)
    node = request.app[NODE_KEY]
    sender = request.headers.get("X-Node")
    if not sender:
        raise BadRequest("invalid_header", "X-Node (the sending member's id) is required")
    try:
        message = msgpack.unpackb(await request.read(), raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise BadRequest("invalid_body", "expected one msgpack-encoded message") from None
    try:
        reply = await node.handle_message(sender, message)
    except UnknownMember:
        # e.g. a ping, which feeds the failure detector of the member it names
        raise BadRequest("unknown_member", f"X-Node {sender!r} is not a member of this cluster") from None
    if reply.get("remote_error") and reply.get("error") in ("bad_request", "unknown_op"):
        raise BadRequest(str(reply["error"]), str(reply.get("message", "")))
    return web.Response(body=msgpack.packb(reply, use_bin_type=True), content_type="application/msgpack")


async def admin_repair_handler(request: web.Request) -> web.Response:
    require_secret(request)
    node = request.app[NODE_KEY]
    trigger = getattr(node, "trigger_repair", None)
    if trigger is None:
        return json_error(501, "not_implemented", "anti-entropy is not enabled on this node")
    result = await trigger()
    return web.json_response({"status": "started", **result}, status=202)


ADMIN_BODY_LIMIT_BYTES = 64 * 1024  # an admin body is a few rules or one number


async def admin_json(request: web.Request) -> dict[str, Any]:
    require_secret(request)
    raw = await read_bounded(request, ADMIN_BODY_LIMIT_BYTES, "body")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("invalid_body", "expected a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("invalid_body", "expected a JSON object")
    return data


def refuse_unknown_fields(data: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """400 ``invalid_body`` naming the first field of ``data`` that is not one of ``known``."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BadRequest("invalid_body", f"{where} has unknown field {unknown[0]!r} (known: {', '.join(known)})",
                         field=unknown[0])


GATE_KEY: web.AppKey[InflightGate] = web.AppKey("gate", InflightGate)
SIGNER_KEY: web.AppKey[causal_context.ContextSigner] = web.AppKey("context_signer", causal_context.ContextSigner)
CP_KEY: web.AppKey[Any] = web.AppKey("cp", object)


def build_app(node: Node, extra_routes: list[web.RouteDef] | None = None) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware], client_max_size=node.cfg.limits.max_value_bytes + 64 * 1024
    )
    app[NODE_KEY] = node
    app[GATE_KEY] = InflightGate(node.cfg.limits.max_inflight_requests)
    app[SIGNER_KEY] = causal_context.ContextSigner(node.cfg.secret)
    # [\s\S], not ".": a key may contain a newline (%0A), and the route matches the decoded path.
    for method in ("GET", "PUT", "DELETE"):
        app.router.add_route(method, r"/kv/{key:[\s\S]*}", kv_handler)
    app.router.add_get("/cluster", cluster_handler)
    app.router.add_get(PLACEMENT_PREFIX + r"{key:[\s\S]+}" + PLACEMENT_SUFFIX, placement_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_post("/internal/msg", internal_handler)
    app.router.add_post("/admin/repair", admin_repair_handler)
    if extra_routes:
        app.router.add_routes(extra_routes)
    return app
