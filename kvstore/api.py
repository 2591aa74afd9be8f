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
import hashlib
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
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kvstore import causal_context, versions
from kvstore.config import CONSISTENCY_LEVELS
from kvstore.errors import BadRequest, NodeError, Unauthorized, ValueTooLarge
from kvstore.node import Node
from kvstore.quorum import InvalidQuorum, majority, parse_quorum
from kvstore.storage import StorageBusy, StorageError

log = logging.getLogger(__name__)

NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)
KV_PREFIX = "/kv/"
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def etag_of(value: bytes) -> str:
    return '"' + hashlib.blake2b(value, digest_size=8).hexdigest() + '"'


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
    except StorageBusy:
        response = json_error(503, "overloaded", "the storage write queue is full; retry later",
                              indeterminate=False)
    except StorageError as exc:
        log.error("storage error on %s %s: %s", request.method, request.path, exc)
        response = json_error(503, "storage_unavailable", f"storage error: {exc}", indeterminate=True)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "value_too_large"}.get(exc.status, "bad_request")
        response = json_error(exc.status, code, exc.reason or "request refused")
    except asyncio.CancelledError:
        raise
    except Exception:  # a bug: never show a client the traceback
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = json_error(500, "internal", "internal error; see the node's log")
    if op != "other":
        node.metrics.requests.labels(op=op, status=str(response.status)).inc()
        node.metrics.latency.labels(op=op).observe(time.perf_counter() - started)
    return response


def require_secret(request: web.Request) -> None:
    node = request.app[NODE_KEY]
    given = request.headers.get("X-Cluster-Secret", "")
    if not hmac.compare_digest(given.encode(), node.cfg.secret.encode()):
        raise Unauthorized("this route needs the cluster secret in X-Cluster-Secret")


def parse_key(request: web.Request) -> str:
    node = request.app[NODE_KEY]
    raw = request.rel_url.raw_path[len(KV_PREFIX) :]
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
        try:
            self.quorum = parse_quorum(request.query.get(quorum_name), n, default_q, quorum_name)
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


async def read_body(request: web.Request) -> bytes:
    limit = request.app[NODE_KEY].cfg.limits.max_value_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ValueTooLarge(f"the value exceeds the limit of {limit} bytes", limit=limit)
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise ValueTooLarge(f"the value exceeds the limit of {limit} bytes", limit=limit)
    return body


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
    sender = request.headers.get("X-Node", "?")
    try:
        message = msgpack.unpackb(await request.read(), raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise BadRequest("invalid_body", "expected one msgpack-encoded message") from None
    reply = await node.handle_message(sender, message)
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


async def admin_json(request: web.Request) -> dict[str, Any]:
    require_secret(request)
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("invalid_body", "expected a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("invalid_body", "expected a JSON object")
    return data


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
    app.router.add_route("GET", "/kv/{key:.*}", kv_handler)
    app.router.add_route("PUT", "/kv/{key:.*}", kv_handler)
    app.router.add_route("DELETE", "/kv/{key:.*}", kv_handler)
    app.router.add_get("/cluster", cluster_handler)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_post("/internal/msg", internal_handler)
    app.router.add_post("/admin/repair", admin_repair_handler)
    if extra_routes:
        app.router.add_routes(extra_routes)
    return app
