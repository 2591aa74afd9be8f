"""The public HTTP API of a node (aiohttp): the ``/kv`` adapter and the admin/internal routes.

Theory of operation
-------------------
This module only translates HTTP.  A ``/kv`` request goes to the kv request core
(``kvstore.server.kv_api.KvApi``), which validates it, calls the node, bounds the requests in
flight and maps every typed error to a JSON body with a stable ``error`` code; the route
here is a thin adapter: it builds an ``ApiRequest``, lets the core read the body through
``read_bounded`` when (and only when) the request needs it, and writes the ``ApiResponse``
back.  The other routes (``/cluster``, ``/health``, ``/metrics``, ``/openapi.json``, the
internal message route and ``/admin/*``) are answered here; their typed errors become JSON
in ``error_middleware``, and so do aiohttp's own refusals (no route, wrong method, a
malformed request line or header: ``JsonErrorRequestHandler``), so no client input can
produce a 500 or a traceback.  Admin and internal routes demand the cluster secret
(``X-Cluster-Secret``), compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import msgpack
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvstore.errors import BadRequest, BodyTimeout, NodeError, RequestTimeout, Unauthorized, ValueTooLarge
from kvstore.protocol.failure import UnknownMember
from kvstore.protocol.placement import placement
from kvstore.runtime.node import Node
from kvstore.server.kv_api import ApiRequest, ApiResponse, KvApi, decode_key
from kvstore.storage import StorageBusy, StorageError

log = logging.getLogger(__name__)

NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)
KV_API_KEY: web.AppKey[KvApi] = web.AppKey("kv_api", KvApi)
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


def _op_name(request: web.Request) -> str:
    # /kv requests are counted by the kv core (KvApi.handle), with the same labels.
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
        if exc.close_connection:
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


async def kv_handler(request: web.Request) -> web.StreamResponse:
    """``/kv/{key}``: the kv core answers; this adapter only moves bytes in and out."""
    core_request = ApiRequest(request.method, request.rel_url.raw_path, request.query, request.headers)

    async def read_value(limit: int) -> bytes:
        return await read_bounded(request, limit, "value")

    return web_response(await request.app[KV_API_KEY].handle(core_request, read_value))


def web_response(answer: ApiResponse) -> web.Response:
    # No body and no Content-Type (a 204): aiohttp then sends neither, as for web.Response(status=204).
    has_body = bool(answer.body) or "Content-Type" in answer.headers
    response = web.Response(status=answer.status, body=answer.body if has_body else None, headers=answer.headers)
    if answer.close_connection:
        response.force_close()
    return response


async def cluster_handler(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    now_ns = node.clock.monotonic_ns()
    snapshot = node.membership.snapshot(now_ns)
    ownership = node.ring.ownership(1)
    links = getattr(node.transport, "links", None)  # refused handshakes, both ways (kvstore.transport.links)
    members = []
    for member_id, address in node.config.addresses:  # the membership in force (kvstore.protocol.membership)
        view: dict[str, Any] = (
            snapshot.get(member_id, {}) if member_id != node.node_id else {"state": "up", "phi": 0.0}
        )
        phi = view.get("phi")
        entry: dict[str, Any] = {
            "id": member_id,
            "url": f"{node.cfg.scheme}://{address.host}:{address.http_port}",
            "state": view.get("state", "up"),
            "phi": None if phi is None or phi != phi or phi == float("inf") else round(float(phi), 3),
            "ownership": round(ownership.get(member_id, 0.0) * 100, 2),
            "machine": address.machine or member_id,  # replicas go to distinct machines first
        }
        if links is not None and member_id != node.node_id:
            entry["link"] = links.member_json(member_id)
            if links.is_refused(member_id):
                entry["state"] = "refused"  # never "up, phi 0.00" for a peer no message can reach
                if node.membership.detector(member_id).last_heard_ns is None:
                    entry["phi"] = None
        members.append(entry)
    pending = await node.parts.handoff.pending_hints()
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
            "refused_peers": links.strangers_json() if links is not None else [],
        }
    )


PLACEMENT_PREFIX, PLACEMENT_SUFFIX = "/cluster/keys/", "/placement"


async def placement_handler(request: web.Request) -> web.Response:
    """Where a key lives as this node sees it (``kvstore.protocol.placement``): read-only, no secret."""
    node = request.app[NODE_KEY]
    raw = request.rel_url.raw_path[len(PLACEMENT_PREFIX) : -len(PLACEMENT_SUFFIX)]
    key = decode_key(raw, node.cfg)
    return web.json_response({"node": node.node_id, **placement(node.ring, key, node.n, node.is_up).to_json()})


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


CALL_TIMEOUT_HEADER = "X-Call-Timeout-Ms"  # the caller's timeout (kvstore.transport.http)
MAX_HOLD_S = 60.0  # a dropped message is held at most this long, whatever its caller says


def held_for_s(declared_ms: str | None) -> float:
    """How long to hold a dropped message: the caller's declared timeout, capped; a missing or
    unreadable one is held for the cap (the caller's own timeout ends its wait first)."""
    try:
        declared_s = float(declared_ms or "nan") / 1000.0
    except ValueError:
        return MAX_HOLD_S
    if declared_s != declared_s:  # NaN: nothing declared
        return MAX_HOLD_S
    return min(max(declared_s, 0.0), MAX_HOLD_S)


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
    if node.transport.faults.incoming_dropped(sender):
        # The message vanishes, as on the stream transport: not handled, not answered while the
        # caller waits (its declared timeout, capped), so the caller times out as in a partition.
        await asyncio.sleep(held_for_s(request.headers.get(CALL_TIMEOUT_HEADER)))
        raise RequestTimeout("dropped by an incoming fault rule (its caller has stopped waiting)", indeterminate=False)
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
    result = await request.app[NODE_KEY].parts.anti_entropy.trigger_repair()
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


def build_app(node: Node, extra_routes: list[web.RouteDef] | None = None) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware], client_max_size=node.cfg.limits.max_value_bytes + 64 * 1024
    )
    app[NODE_KEY] = node
    app[KV_API_KEY] = KvApi(node)
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
